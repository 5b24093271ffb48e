//! `deploy-controller deploy` and `rollback`: the imperative shell around
//! [`FleetRollout`]. It reads the inventory and compose file, promotes
//! digests, pre-pulls on every host, takes the environment lock, then takes
//! each action of the state machine (a whole wave in parallel) and feeds
//! the hosts' results back; at the end it releases the lock and reports.
//!
//! Cost grows with waves, not hosts: pre-pull, lock, every wave and the
//! rollback each run their hosts' requests concurrently.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy_protocol::caller::Transport;
use deploy_protocol::{
    APPROVAL_ACTION, DeployRequest, FleetOutcome, OperationKind, OperationResult, Outcome,
    PullRequest, RollbackRequest,
};
use futures_util::future::join_all;
use serde::Serialize;

use crate::client::{self, AgentClient, CallError, Notice, TransportOptions};
use crate::exit;
use crate::fleet::{Action, Failure, FleetRollout, Observation, Seen, Verdict};
use crate::inventory::{Environment, Inventory};
use crate::lease::FleetLease;
use crate::policy;
use crate::promote;
use crate::report::{Reporter, md_cell, step_summary};

/// How long a host's agent may wait for its own per-project lock. Under
/// the environment lock, that lock is only held by an operation already
/// running there (e.g. one a killed controller started, which the agent
/// finishes on its own): waiting for it is right.
const HOST_LOCK_WAIT: Duration = Duration::from_secs(300);

pub struct DeployOptions {
    pub env: String,
    pub release: String,
    pub vars: BTreeMap<String, String>,
    pub file: Option<PathBuf>,
    pub promote_from: Option<String>,
    pub no_promote: bool,
    /// `--lease-wait`: how long to wait for another deployment's lease.
    pub lease_wait: Option<Duration>,
    pub reason: Option<String>,
    /// `--transport`, `--accept-new-host-keys`.
    pub transport: TransportOptions,
    /// `--override REASON`: deploy even if the safety gates deny it.
    pub override_reason: Option<String>,
    /// `--commit-time`: recorded with the deploy on every host (lead time).
    pub commit_time: Option<String>,
}

/// One host's line of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct HostLine {
    pub host: String,
    pub before: Option<String>,
    /// What it serves at the end (`unknown` when its agent could not tell).
    pub after: String,
    pub result: String,
    /// How it was reached: `agent` (HTTPS, mutual TLS) or `ssh`.
    pub via: String,
}

/// The clients of `env`'s hosts; route warnings go to `out`.
fn make_clients(
    env: &Environment,
    transport: &TransportOptions,
    out: &Arc<Reporter>,
) -> Result<Vec<AgentClient>, String> {
    let notice: Notice = {
        let out = out.clone();
        Arc::new(move |m: &str| out.warn(m))
    };
    client::clients(env, env.tls.as_ref(), transport, notice)
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub command: &'static str,
    pub environment: String,
    pub project: String,
    pub release: String,
    pub deployment_id: String,
    pub outcome: FleetOutcome,
    pub exit_code: i32,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<String>,
    pub digests: BTreeMap<String, String>,
    pub hosts: Vec<HostLine>,
    pub duration_ms: u64,
}

impl Summary {
    fn markdown(&self) -> String {
        let icon = match self.outcome {
            FleetOutcome::Succeeded => "✅",
            FleetOutcome::RolledBack => "↩️",
            FleetOutcome::Mixed | FleetOutcome::Refused => "❌",
        };
        let mut md = format!(
            "### {icon} {}: {}\n\n{}\n\n",
            self.what(),
            self.outcome.as_str().replace('_', " "),
            md_cell(&self.message)
        );
        if !self.hosts.is_empty() {
            md.push_str("| host | before | after | result | via |\n|---|---|---|---|---|\n");
            for h in &self.hosts {
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    md_cell(&h.host),
                    md_cell(h.before.as_deref().unwrap_or("-")),
                    md_cell(&h.after),
                    md_cell(&h.result),
                    md_cell(&h.via)
                ));
            }
            md.push('\n');
        }
        if !self.digests.is_empty() {
            md.push_str("Images:\n");
            for (s, d) in &self.digests {
                md.push_str(&format!("- `{s}`: `{d}`\n"));
            }
            md.push('\n');
        }
        md.push_str(&format!(
            "Deployment `{}`, exit code {}, {:.1}s.\n\n",
            self.deployment_id,
            self.exit_code,
            self.duration_ms as f64 / 1000.0
        ));
        md
    }

    fn what(&self) -> String {
        if self.command == "rollback" {
            format!(
                "rollback of {} in {} to {}",
                self.project, self.environment, self.release
            )
        } else {
            format!(
                "deploy {} of {} to {}",
                self.release, self.project, self.environment
            )
        }
    }

    /// The summary for people. A failure's message is not repeated here:
    /// the error line printed just before it says it (see
    /// [`Ctx::conclude`]).
    fn text(&self) -> String {
        let mut s = format!(
            "{}: {} (exit {})",
            self.what(),
            self.outcome.as_str().replace('_', " "),
            self.exit_code,
        );
        if self.exit_code == exit::SUCCESS {
            s.push_str(&format!(" — {}", self.message));
        }
        for h in &self.hosts {
            s.push_str(&format!(
                "\n  {:<16} {:<14} -> {:<14} {}{}",
                h.host,
                h.before.as_deref().unwrap_or("-"),
                h.after,
                h.result,
                if h.via == "ssh" { " (over SSH)" } else { "" }
            ));
        }
        s
    }
}

/// A deployment id: environment, release, UTC time, and randomness.
pub fn new_deployment_id(env: &str, release: &str) -> String {
    let t = jiff::Timestamp::now();
    let stamp = t.strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(std::process::id(), t.as_nanosecond()), &mut h);
    let r = std::hash::Hasher::finish(&h) % 0x1_0000_0000;
    let release: String = release.chars().take(40).collect();
    format!("{env}-{release}-{stamp}-{r:08x}")
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Ctx<'a> {
    env: &'a Environment,
    clients: Vec<AgentClient>,
    out: Arc<Reporter>,
    started: Instant,
    deployment_id: String,
}

impl Ctx<'_> {
    fn refuse(&self, command: &'static str, release: &str, code: i32, message: String) -> i32 {
        self.refusal(command, release, code, message, None)
    }

    /// Refused by the safety gates named in `gates` (exit 6).
    fn refuse_gates(&self, release: &str, gates: &str, message: String) -> i32 {
        self.refusal(
            "deploy",
            release,
            exit::DENIED,
            message,
            Some(gates.to_string()),
        )
    }

    fn refusal(
        &self,
        command: &'static str,
        release: &str,
        code: i32,
        message: String,
        gate: Option<String>,
    ) -> i32 {
        self.out.error(&message);
        let summary = Summary {
            command,
            environment: self.env.name.clone(),
            project: self.env.project.clone(),
            release: release.to_string(),
            deployment_id: self.deployment_id.clone(),
            outcome: FleetOutcome::Refused,
            exit_code: code,
            message,
            failed_host: None,
            gate,
            digests: BTreeMap::new(),
            hosts: vec![],
            duration_ms: ms(self.started.elapsed()),
        };
        self.finish(&summary);
        code
    }

    fn finish(&self, summary: &Summary) {
        self.out.summary(summary, &summary.text());
        if let Err(e) = step_summary(&summary.markdown()) {
            self.out.warn(&e);
        }
    }

    /// Prints the summary (when it failed, its message once, as the error
    /// line before it) and keeps it for CI; returns its exit code.
    fn conclude(&self, summary: Summary) -> i32 {
        if summary.exit_code != exit::SUCCESS {
            self.out.error(&summary.message);
        }
        self.finish(&summary);
        summary.exit_code
    }

    /// The environment lease on every host, renewed while the command runs.
    async fn take_lease(
        &self,
        command: &'static str,
        target: &str,
        purpose: &str,
        wait: Option<Duration>,
    ) -> Result<FleetLease, Refused> {
        let env = self.env;
        let mut lease = FleetLease::acquire(
            &self.clients,
            &self.deployment_id,
            env.lock_ttl,
            purpose,
            wait,
            &self.out,
        )
        .await
        .map_err(|f| {
            self.refuse(
                command,
                target,
                f.exit_code(),
                format!(
                    "cannot take the environment lock of {}: {}",
                    env.name,
                    f.message()
                ),
            )
        })?;
        lease.start_renewal(env.lock_ttl, self.out.clone());
        self.out.phase(&format!(
            "environment lock of {} taken (lease {:?}, renewed while this runs)",
            env.name, env.lock_ttl
        ));
        Ok(lease)
    }

    /// Rolls the hosts of `set` back, each to its release, at once.
    async fn roll_back(
        &self,
        set: &[(usize, String)],
        names: &[String],
        why: &str,
    ) -> Vec<Observation> {
        let list: Vec<String> = set
            .iter()
            .map(|(h, to)| format!("{} -> {to}", names[*h]))
            .collect();
        self.out
            .phase(&format!("rolling back: {}", list.join(", ")));
        let results = join_all(set.iter().map(|(h, to)| {
            let c = &self.clients[*h];
            let req = RollbackRequest {
                project: self.env.project.clone(),
                to: Some(to.clone()),
                reason: Some(why.to_string()),
                deployment_id: Some(self.deployment_id.clone()),
                lock_wait_ms: Some(ms(HOST_LOCK_WAIT)),
                ..RollbackRequest::default()
            };
            let out = self.out.clone();
            let h = *h;
            async move {
                let r = c.rollback(&req, |ev| out.agent_event(&c.host, ev)).await;
                (h, r)
            }
        }))
        .await;
        let mut observations = Vec::new();
        for (h, r) in results {
            observations.push(rollback_observation(self, h, r).await);
        }
        observations
    }

    /// What a host serves now, asked after a failed call.
    async fn serving(&self, host: usize) -> Seen {
        match self.clients[host].status(&self.env.project).await {
            Ok(r) => Seen::from_option(
                r.projects
                    .into_iter()
                    .find(|p| p.project == self.env.project)
                    .and_then(|p| p.current),
            ),
            Err(CallError::Api { error, .. }) if error.outcome == Outcome::ConfigError => {
                Seen::Nothing
            }
            Err(_) => Seen::Unknown,
        }
    }
}

/// Sorts per-host call errors into one exit code and message (host order:
/// the first one decides the code).
fn combine(errors: &[CallError]) -> (i32, String) {
    let code = errors
        .first()
        .map(|e| e.outcome().exit_code())
        .unwrap_or(exit::ENVIRONMENT);
    let msg = errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    (code, msg)
}

/// Evaluates `policy` (see [`crate::policy`]) for a deploy of `release`
/// now. `Ok(None)`: every gate passes. `Ok(Some(text))`: gates denied it
/// and `--override` overrode them; `text` goes into every host's audit
/// record as the deploy's reason. `Err(code)`: refused (already reported).
async fn gate(
    ctx: &Ctx<'_>,
    policy: &policy::Policy,
    release: &str,
    source: Option<policy::SourceFacts>,
    opts: &DeployOptions,
) -> Result<Option<String>, i32> {
    let out = &ctx.out;
    let mut facts = policy::Facts {
        deploys: vec![],
        source,
        approvals: vec![],
    };
    if policy.approvals.is_some() {
        // Approvals are audit records on the hosts (`release.approved`).
        let answers = join_all(
            ctx.clients
                .iter()
                .map(|c| c.audit(Some(&ctx.env.project), APPROVAL_SCAN)),
        )
        .await;
        let records = told(
            ctx,
            release,
            ("approvals gate", "audit log"),
            "told its approvals, so they cannot be counted",
            answers,
        )?;
        facts.approvals = records
            .into_iter()
            .filter_map(|r| {
                let approved = r.action == APPROVAL_ACTION
                    && r.release.as_deref() == Some(release)
                    && Transport::of_recorded(&r.who) == Some(Transport::Mtls);
                let at = r.ts.parse::<jiff::Timestamp>().ok()?;
                approved.then_some((r.who, at))
            })
            .collect();
    }
    if policy.rate_limit.is_some() {
        // The environment's own record: what its hosts say they deployed.
        let answers = join_all(ctx.clients.iter().map(|c| c.history(&ctx.env.project))).await;
        let entries = told(
            ctx,
            release,
            ("rate limit gate", "history"),
            "told its deploy history, so the limit cannot be checked",
            answers,
        )?;
        facts.deploys = entries
            .into_iter()
            .filter_map(|e| {
                let done =
                    e.operation == OperationKind::Deploy && e.outcome == Some(Outcome::Succeeded);
                let at = e.finished_at.as_deref()?.parse::<jiff::Timestamp>().ok()?;
                done.then_some((e.release, at))
            })
            .collect();
    }
    let decision = policy::evaluate(policy, release, &facts, jiff::Timestamp::now());
    if decision.allowed() {
        out.phase(&format!("safety gates of {}: all pass", ctx.env.name));
        return Ok(None);
    }
    let when = match decision.passes_at {
        Some(t) => {
            let local = t.to_zoned(policy.timezone.clone());
            format!(
                "it would pass at {} ({} {})",
                policy::short(t),
                local.strftime("%a %Y-%m-%d %H:%M"),
                policy.timezone_name
            )
        }
        None => "waiting alone will not make it pass".to_string(),
    };
    let denials = decision
        .denials
        .iter()
        .map(|d| format!("{} gate: {}", d.gate, d.message))
        .collect::<Vec<_>>()
        .join("; ");
    match &opts.override_reason {
        Some(why) => {
            out.warn(&format!(
                "OVERRIDE: the safety gates of {} deny this deploy ({denials}); deploying anyway because: {why}",
                ctx.env.name
            ));
            Ok(Some(format!(
                "OVERRIDE of the {} gate(s) by {}: {why}",
                decision.gates(),
                ctx.deployment_id
            )))
        }
        None => Err(ctx.refuse_gates(
            release,
            &decision.gates(),
            format!(
                "deploy of {release} to {} denied by its safety gates: {denials}; {when}. \
                 Nothing changed. In an emergency: --override \"REASON\" (audited on every host)",
                ctx.env.name
            ),
        )),
    }
}

/// The records the hosts of the environment gave for one gate, one answer
/// per host in host order (`gate` names it and what was asked, for the
/// messages). A host that could not answer is a warning; when none could,
/// the gate cannot be checked and the deploy is refused (`Err` carries the
/// exit code, already reported).
fn told<T>(
    ctx: &Ctx<'_>,
    release: &str,
    (gate, record): (&str, &str),
    none_told: &str,
    answers: Vec<Result<Vec<T>, CallError>>,
) -> Result<Vec<T>, i32> {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for (c, a) in ctx.clients.iter().zip(answers) {
        match a {
            Ok(records) => all.extend(records),
            Err(e) => {
                ctx.out
                    .warn(&format!("{gate}: no {record} from {}: {e}", c.host));
                errors.push(e);
            }
        }
    }
    if errors.len() == ctx.clients.len() {
        let (code, msg) = combine(&errors);
        return Err(ctx.refuse(
            "deploy",
            release,
            code,
            format!("{gate}: no host of {} {none_told}: {msg}", ctx.env.name),
        ));
    }
    Ok(all)
}

/// How many of a host's newest audit records of the project the approvals
/// gate reads.
const APPROVAL_SCAN: usize = 10_000;

/// `deploy-controller deploy`. Returns the exit code. The phases, each
/// refusing with nothing changed until the lease is taken: promote → gate
/// → pre-pull → take lease → roll → summarize.
pub async fn deploy(inv: &Inventory, opts: &DeployOptions, out: Arc<Reporter>) -> i32 {
    match deploy_phases(inv, opts, out).await {
        Ok(code) | Err(code) => code,
    }
}

/// A phase's refusal: its exit code, already reported.
type Refused = i32;

async fn deploy_phases(
    inv: &Inventory,
    opts: &DeployOptions,
    out: Arc<Reporter>,
) -> Result<i32, Refused> {
    let run = DeployRun::open(inv, opts, out)?;
    let promoted = run.promote(inv).await?;
    let reason = run.gate(promoted.as_ref()).await?;
    let pulled = run.pre_pull(promoted.map(|p| p.digests)).await?;
    let purpose = format!("deploy of {}", run.release);
    let lease = run
        .ctx
        .take_lease("deploy", &run.release, &purpose, opts.lease_wait)
        .await?;
    let (fleet, verdict) = run.roll(&pulled, reason).await;
    lease.release(&run.ctx.out).await;
    Ok(run.summarize(&fleet, &verdict, pulled))
}

/// One deploy: what every phase reads.
struct DeployRun<'a> {
    ctx: Ctx<'a>,
    opts: &'a DeployOptions,
    release: String,
    compose_path: String,
    compose_text: String,
    names: Vec<String>,
}

/// What the pre-pull found: per host, the pins it deploys and what it
/// served before.
struct Pulled {
    pins: Vec<BTreeMap<String, String>>,
    digests: BTreeMap<String, String>,
    before: Vec<Option<String>>,
}

impl<'a> DeployRun<'a> {
    /// Reads the environment, the compose file and the certificates.
    fn open(
        inv: &'a Inventory,
        opts: &'a DeployOptions,
        out: Arc<Reporter>,
    ) -> Result<DeployRun<'a>, Refused> {
        let started = Instant::now();
        let env = inv.environment(&opts.env).map_err(|e| {
            out.error(&e.to_string());
            exit::CONFIG
        })?;
        let release = opts.release.clone();
        let compose_path = opts.file.clone().unwrap_or_else(|| env.compose.clone());
        let compose_text = std::fs::read_to_string(&compose_path).map_err(|e| {
            out.error(&format!(
                "cannot read the compose file {}: {e}; set `compose` in the inventory or pass --file",
                compose_path.display()
            ));
            exit::CONFIG
        })?;
        let clients = make_clients(env, &opts.transport, &out).map_err(|e| {
            out.error(&e);
            exit::CONFIG
        })?;
        let ctx = Ctx {
            env,
            clients,
            out,
            started,
            deployment_id: new_deployment_id(&env.name, &release),
        };
        let names: Vec<String> = env.hosts.iter().map(|h| h.name.clone()).collect();
        ctx.out.phase(&format!(
            "deploy {release} of {} to {} ({} host(s): {}), deployment {}",
            env.project,
            env.name,
            names.len(),
            names.join(", "),
            ctx.deployment_id
        ));
        Ok(DeployRun {
            ctx,
            opts,
            release,
            compose_path: compose_path.display().to_string(),
            compose_text,
            names,
        })
    }

    fn refuse(&self, code: i32, message: String) -> Refused {
        self.ctx.refuse("deploy", &self.release, code, message)
    }

    /// The environment to promote from, if any.
    fn source(&self) -> Option<String> {
        if self.opts.no_promote {
            return None;
        }
        self.opts
            .promote_from
            .clone()
            .or_else(|| self.ctx.env.promote_from.clone())
    }

    /// Promotion: the source environment's digests, never a tag.
    async fn promote(&self, inv: &Inventory) -> Result<Option<promote::Promoted>, Refused> {
        let env = self.ctx.env;
        let Some(src) = self.source() else {
            return Ok(None);
        };
        if src == env.name {
            return Err(self.refuse(
                exit::CONFIG,
                format!(
                    "--promote-from {}: an environment cannot promote from itself",
                    env.name
                ),
            ));
        }
        let p = promote::source_digests(
            inv,
            env,
            &src,
            &self.release,
            &self.ctx.out,
            &self.opts.transport,
        )
        .await
        .map_err(|r| self.refuse(r.code, r.message))?;
        self.ctx
            .out
            .phase(&format!("promotion: {src} ran {}", describe(&p.digests)));
        Ok(Some(p))
    }

    /// The safety gates, before anything changes. The reason to record:
    /// the caller's, with an override said first.
    async fn gate(&self, promoted: Option<&promote::Promoted>) -> Result<Option<String>, Refused> {
        let opts = self.opts;
        let Some(policy) = &self.ctx.env.policy else {
            return Ok(opts.reason.clone());
        };
        let source_facts = match (self.source(), promoted) {
            (Some(src), Some(p)) => Some(policy::SourceFacts {
                environment: src,
                first_ran_at: p.first_ran_at,
                not_serving: p.not_serving.clone(),
            }),
            _ => None,
        };
        let overridden = gate(&self.ctx, policy, &self.release, source_facts, opts).await?;
        Ok(match overridden {
            Some(text) => Some(match &opts.reason {
                Some(r) => format!("{text}; {r}"),
                None => text,
            }),
            None => opts.reason.clone(),
        })
    }

    /// Pre-pull everywhere at once; any failure: nothing changed.
    async fn pre_pull(
        &self,
        promoted: Option<BTreeMap<String, String>>,
    ) -> Result<Pulled, Refused> {
        let (env, out) = (self.ctx.env, &self.ctx.out);
        out.phase(&format!("pre-pull on {} host(s)", self.names.len()));
        let pulls = join_all(self.ctx.clients.iter().zip(&env.hosts).map(|(c, h)| {
            let req = PullRequest {
                project: env.project.clone(),
                release: self.release.clone(),
                compose_path: self.compose_path.clone(),
                compose_text: self.compose_text.clone(),
                vars: env.vars_for(h, &self.opts.vars),
                pinned: promoted.clone().unwrap_or_default(),
            };
            async move { c.pull(&req).await }
        }))
        .await;
        let mut errors = Vec::new();
        let mut pulled = Vec::new();
        for (c, r) in self.ctx.clients.iter().zip(pulls) {
            match r {
                Ok(p) => {
                    out.host(&c.host, &format!("pulled {}", describe(&p.digests)));
                    pulled.push(p);
                }
                Err(e) => {
                    out.host(&c.host, &format!("pre-pull failed: {e}"));
                    errors.push(e);
                }
            }
        }
        if !errors.is_empty() {
            let (code, msg) = combine(&errors);
            return Err(self.refuse(code, format!("pre-pull failed, nothing was changed: {msg}")));
        }
        // Each host deploys exactly what it pre-pulled (or what was
        // promoted); the same repository must have resolved to the same
        // digest everywhere.
        let pins: Vec<BTreeMap<String, String>> = pulled
            .iter()
            .map(|p| promoted.clone().unwrap_or_else(|| p.digests.clone()))
            .collect();
        if let Some(moved) = tag_moved(&self.names, &pins) {
            return Err(self.refuse(
                exit::REGISTRY,
                format!("pre-pull resolved different images on different hosts ({moved}): a tag moved while pulling; nothing was changed, retry"),
            ));
        }
        Ok(Pulled {
            digests: pins.first().cloned().unwrap_or_default(),
            before: pulled.iter().map(|p| p.serving.clone()).collect(),
            pins,
        })
    }

    /// The rollout: each action of [`FleetRollout`] taken, a wave's hosts
    /// at once, their results fed back, until it is done.
    async fn roll(&self, pulled: &Pulled, reason: Option<String>) -> (FleetRollout, Verdict) {
        let (env, out, names) = (self.ctx.env, &self.ctx.out, &self.names);
        out.hosts(names);
        let mut fleet = FleetRollout::new(
            &self.release,
            names.clone(),
            pulled.before.clone(),
            &env.strategy,
        );
        let verdict = loop {
            match fleet.next_action() {
                Action::Done(v) => break v,
                Action::Wait => {
                    // Cannot happen: every action's observations are fed below.
                    out.warn("internal: the rollout waited with nothing in flight");
                    break Verdict::Mixed {
                        failure: None,
                        hosts: vec!["the rollout stopped unexpectedly".into()],
                    };
                }
                Action::Pause(d) => {
                    out.phase(&format!("pause {d:?} before the next batch"));
                    tokio::time::sleep(d).await;
                    fleet.observe(Observation::Paused);
                }
                Action::Deploy(wave) => {
                    for obs in self.deploy_wave(&wave, pulled, &reason).await {
                        fleet.observe(obs);
                    }
                }
                Action::Rollback(set) => {
                    let why = fleet
                        .failures()
                        .first()
                        .map(|f| {
                            format!("automatic: deploy of {} failed on {}", self.release, f.host)
                        })
                        .unwrap_or_else(|| {
                            format!("automatic: deploy of {} stopped", self.release)
                        });
                    for obs in self.ctx.roll_back(&set, names, &why).await {
                        fleet.observe(obs);
                    }
                }
            }
        };
        (fleet, verdict)
    }

    /// One wave of the rollout, its hosts at once.
    async fn deploy_wave(
        &self,
        wave: &crate::fleet::Wave,
        pulled: &Pulled,
        reason: &Option<String>,
    ) -> Vec<Observation> {
        let (ctx, env, out) = (&self.ctx, self.ctx.env, &self.ctx.out);
        let who: Vec<&str> = wave.hosts.iter().map(|h| self.names[*h].as_str()).collect();
        if wave.canary {
            out.phase(&format!("canary: {}", who.join(", ")));
        } else {
            out.phase(&format!("batch {}: {}", wave.number, who.join(", ")));
        }
        let results = join_all(wave.hosts.iter().map(|&h| {
            let c = &ctx.clients[h];
            let req = DeployRequest {
                project: env.project.clone(),
                release: self.release.clone(),
                compose_path: self.compose_path.clone(),
                compose_text: self.compose_text.clone(),
                vars: env.vars_for(&env.hosts[h], &self.opts.vars),
                reason: reason.clone(),
                deployment_id: Some(ctx.deployment_id.clone()),
                pinned: pulled.pins[h].clone(),
                observe_window_ms: env.observation.map(ms),
                lock_wait_ms: Some(ms(HOST_LOCK_WAIT)),
                commit_time: self.opts.commit_time.clone(),
                ..DeployRequest::default()
            };
            let out = out.clone();
            async move {
                let r = c.deploy(&req, |ev| out.agent_event(&c.host, ev)).await;
                (h, r)
            }
        }))
        .await;
        let mut observations = Vec::new();
        for (h, r) in results {
            observations.push(deploy_observation(ctx, h, r).await);
        }
        observations
    }

    /// The ending: the verdict as an outcome, exit code and message, the
    /// summary printed and kept for CI.
    fn summarize(&self, fleet: &FleetRollout, verdict: &Verdict, pulled: Pulled) -> i32 {
        let (env, release) = (self.ctx.env, self.release.as_str());
        let (outcome, code, message, failure) = match verdict {
            Verdict::Succeeded => (
                FleetOutcome::Succeeded,
                exit::SUCCESS,
                format!("every host of {} serves {release}", env.name),
                None,
            ),
            Verdict::RolledBack { failure } => {
                let code = match failure.outcome {
                    Outcome::HealthGateFailed | Outcome::Interrupted => exit::HEALTH_GATE_FAILED,
                    o => o.exit_code(),
                };
                let msg = format!(
                    "{}; the rollout stopped and every updated host was rolled back: {} runs what it ran before",
                    failure_text(release, failure),
                    env.name
                );
                (FleetOutcome::RolledBack, code, msg, Some(failure.clone()))
            }
            Verdict::Mixed { failure, hosts } => {
                let mut msg = String::new();
                if let Some(f) = failure {
                    msg.push_str(&failure_text(release, f));
                    msg.push_str("; ");
                }
                msg.push_str(&format!(
                    "MIXED VERSIONS: the hosts of {} do not all run the same release: {}; \
                     check `deploy-controller status --env {}` and roll back or redeploy",
                    env.name,
                    hosts.join("; "),
                    env.name
                ));
                (FleetOutcome::Mixed, exit::MIXED, msg, failure.clone())
            }
        };
        let lines = (0..self.names.len())
            .map(|h| HostLine {
                host: self.names[h].clone(),
                before: pulled.before[h].clone(),
                after: fleet.serving(h).to_string(),
                result: host_result(fleet.states().get(h)),
                via: self.ctx.clients[h].route_report().transport.to_string(),
            })
            .collect();
        self.ctx.conclude(Summary {
            command: "deploy",
            environment: env.name.clone(),
            project: env.project.clone(),
            release: release.to_string(),
            deployment_id: self.ctx.deployment_id.clone(),
            outcome,
            exit_code: code,
            message,
            failed_host: failure.as_ref().map(|f| f.host.clone()),
            gate: failure.as_ref().and_then(|f| f.gate.clone()),
            digests: pulled.digests,
            hosts: lines,
            duration_ms: ms(self.ctx.started.elapsed()),
        })
    }
}

/// Two hosts whose pins give the same service the same repository but
/// different digests: `"a: repo@sha256:…; b: repo@sha256:…"`.
fn tag_moved(names: &[String], pins: &[BTreeMap<String, String>]) -> Option<String> {
    let first = pins.first()?;
    for (i, p) in pins.iter().enumerate().skip(1) {
        for (svc, r) in p {
            let Some(r0) = first.get(svc) else { continue };
            let repo = |x: &str| x.split('@').next().map(str::to_string);
            if r != r0 && repo(r) == repo(r0) {
                return Some(format!(
                    "{}: {}; {}: {}",
                    names[0],
                    short_digest(r0),
                    names[i],
                    short_digest(r)
                ));
            }
        }
    }
    None
}

fn failure_text(release: &str, f: &Failure) -> String {
    format!(
        "deploy of {release} failed on host {}{}{}: {}",
        f.host,
        if f.canary { " (canary)" } else { "" },
        f.gate
            .as_ref()
            .map(|g| format!(" at gate [{g}]"))
            .unwrap_or_default(),
        f.message
    )
}

fn host_result(s: Option<&crate::fleet::HostState>) -> String {
    use crate::fleet::HostState::*;
    match s {
        None | Some(Pending) => "not started".into(),
        Some(Deploying) => "deploying".into(),
        Some(Updated { .. }) => "updated".into(),
        Some(Failed { .. }) => "failed its gates (rolled back by its agent)".into(),
        Some(RollingBack { .. }) => "rolling back".into(),
        Some(RolledBack { to }) => format!("rolled back to {to}"),
        Some(RollbackFailed { to, .. }) => format!("rollback to {to} FAILED"),
    }
}

/// `service=repo@sha256:0123456789ab…`, short.
pub fn describe(d: &BTreeMap<String, String>) -> String {
    d.iter()
        .map(|(s, r)| format!("{s}={}", short_digest(r)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn short_digest(reference: &str) -> String {
    match reference.split_once("@sha256:") {
        Some((repo, hex)) => format!("{repo}@sha256:{}", hex.chars().take(12).collect::<String>()),
        None => reference.to_string(),
    }
}

async fn deploy_observation(
    ctx: &Ctx<'_>,
    h: usize,
    r: Result<OperationResult, CallError>,
) -> Observation {
    match r {
        Ok(res) if res.outcome == Outcome::Succeeded => Observation::Deployed {
            host: h,
            previous: res.previous,
        },
        Ok(res) => Observation::DeployFailed {
            host: h,
            outcome: res.outcome,
            gate: res.gate,
            message: res.message,
            serving: Seen::from_option(res.serving),
        },
        Err(e) => {
            ctx.out
                .host_done(&ctx.clients[h].host, false, &e.to_string());
            Observation::DeployFailed {
                host: h,
                outcome: e.outcome(),
                gate: None,
                message: e.to_string(),
                serving: ctx.serving(h).await,
            }
        }
    }
}

async fn rollback_observation(
    ctx: &Ctx<'_>,
    h: usize,
    r: Result<OperationResult, CallError>,
) -> Observation {
    match r {
        Ok(res) if res.outcome == Outcome::Succeeded => Observation::RolledBack { host: h },
        Ok(res) => Observation::RollbackFailed {
            host: h,
            message: res.message,
            serving: Seen::from_option(res.serving),
        },
        Err(e) => {
            ctx.out
                .host_done(&ctx.clients[h].host, false, &e.to_string());
            Observation::RollbackFailed {
                host: h,
                message: e.to_string(),
                serving: ctx.serving(h).await,
            }
        }
    }
}

pub struct RollbackOptions {
    pub env: String,
    pub to: Option<String>,
    /// `--lease-wait`: how long to wait for another deployment's lease.
    pub lease_wait: Option<Duration>,
    pub reason: Option<String>,
    /// `--transport`, `--accept-new-host-keys`.
    pub transport: TransportOptions,
}

/// `deploy-controller rollback`: every host of the environment at once, to
/// `--to R` or to the release each had before. Returns the exit code. The
/// phases: take lease → roll back → summarize.
pub async fn rollback(inv: &Inventory, opts: &RollbackOptions, out: Arc<Reporter>) -> i32 {
    match rollback_phases(inv, opts, out).await {
        Ok(code) | Err(code) => code,
    }
}

async fn rollback_phases(
    inv: &Inventory,
    opts: &RollbackOptions,
    out: Arc<Reporter>,
) -> Result<i32, Refused> {
    let started = Instant::now();
    let env = inv.environment(&opts.env).map_err(|e| {
        out.error(&e.to_string());
        exit::CONFIG
    })?;
    let clients = make_clients(env, &opts.transport, &out).map_err(|e| {
        out.error(&e);
        exit::CONFIG
    })?;
    let target = opts.to.clone().unwrap_or_else(|| "previous".into());
    let ctx = Ctx {
        env,
        clients,
        out,
        started,
        deployment_id: new_deployment_id(&env.name, &format!("rollback-{target}")),
    };
    let names: Vec<String> = env.hosts.iter().map(|h| h.name.clone()).collect();
    ctx.out.phase(&format!(
        "rollback of {} in {} to {} on {} host(s), deployment {}",
        env.project,
        env.name,
        opts.to.as_deref().unwrap_or("each host's previous release"),
        names.len(),
        ctx.deployment_id
    ));
    let purpose = format!(
        "rollback to {}",
        opts.to.as_deref().unwrap_or("the previous release")
    );
    let lease = ctx
        .take_lease("rollback", &target, &purpose, opts.lease_wait)
        .await?;
    ctx.out.hosts(&names);
    let before: Vec<Seen> = join_all((0..names.len()).map(|h| ctx.serving(h))).await;
    let results = join_all((0..names.len()).map(|h| {
        let c = &ctx.clients[h];
        let out = ctx.out.clone();
        let skip = matches!((&before[h], &opts.to), (Seen::Release(cur), Some(to)) if cur == to);
        let req = RollbackRequest {
            project: env.project.clone(),
            to: opts.to.clone(),
            reason: opts.reason.clone(),
            deployment_id: Some(ctx.deployment_id.clone()),
            lock_wait_ms: Some(ms(HOST_LOCK_WAIT)),
            ..RollbackRequest::default()
        };
        async move {
            if skip {
                out.host_done(&c.host, true, "already serves it");
                return None;
            }
            Some(c.rollback(&req, |ev| out.agent_event(&c.host, ev)).await)
        }
    }))
    .await;
    lease.release(&ctx.out).await;
    Ok(summarize_rollback(&ctx, &names, target, &before, results).await)
}

/// The ending of a fleet rollback: one line per host, and whether every
/// host ended on one release.
async fn summarize_rollback(
    ctx: &Ctx<'_>,
    names: &[String],
    target: String,
    before: &[Seen],
    results: Vec<Option<Result<OperationResult, CallError>>>,
) -> i32 {
    let env = ctx.env;
    let mut lines = Vec::new();
    let mut failed: Vec<(usize, i32, String)> = Vec::new();
    for (h, r) in results.into_iter().enumerate() {
        let (after, result) = match r {
            None => (before[h].clone(), "already there".to_string()),
            Some(Ok(res)) if res.outcome == Outcome::Succeeded => (
                Seen::from_option(res.serving.clone()),
                format!("rolled back in {:.1}s", res.duration_ms as f64 / 1000.0),
            ),
            Some(Ok(res)) => {
                failed.push((h, res.outcome.exit_code(), res.message.clone()));
                (
                    Seen::from_option(res.serving.clone()),
                    format!("FAILED: {}", res.message),
                )
            }
            Some(Err(e)) => {
                failed.push((h, e.outcome().exit_code(), e.to_string()));
                (ctx.serving(h).await, format!("FAILED: {e}"))
            }
        };
        lines.push(HostLine {
            host: names[h].clone(),
            before: match &before[h] {
                Seen::Release(r) => Some(r.clone()),
                _ => None,
            },
            after: after.to_string(),
            result,
            via: ctx.clients[h].route_report().transport.to_string(),
        });
    }
    let distinct: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l.after.as_str()).collect();
    let (outcome, code, message) = if failed.is_empty() {
        (
            FleetOutcome::Succeeded,
            exit::SUCCESS,
            format!(
                "every host of {} rolled back ({})",
                env.name,
                distinct.into_iter().collect::<Vec<_>>().join(", ")
            ),
        )
    } else if failed.len() == names.len() && distinct.len() == 1 {
        let (_, code, _) = failed[0];
        let msgs: Vec<String> = failed
            .iter()
            .map(|(h, _, m)| format!("{}: {m}", names[*h]))
            .collect();
        (
            FleetOutcome::Refused,
            code,
            format!(
                "the rollback failed on every host, nothing changed: {}",
                msgs.join("; ")
            ),
        )
    } else {
        let msgs: Vec<String> = lines
            .iter()
            .map(|l| format!("{} serves {}", l.host, l.after))
            .collect();
        (
            FleetOutcome::Mixed,
            exit::MIXED,
            format!(
                "MIXED VERSIONS: the rollback failed on {} host(s): {}",
                failed.len(),
                msgs.join(", ")
            ),
        )
    };
    ctx.conclude(Summary {
        command: "rollback",
        environment: env.name.clone(),
        project: env.project.clone(),
        release: target,
        deployment_id: ctx.deployment_id.clone(),
        outcome,
        exit_code: code,
        message,
        failed_host: failed.first().map(|(h, _, _)| names[*h].clone()),
        gate: None,
        digests: BTreeMap::new(),
        hosts: lines,
        duration_ms: ms(ctx.started.elapsed()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_ids_are_unique_and_readable() {
        let a = new_deployment_id("production", "3f2a9c1");
        let b = new_deployment_id("production", "3f2a9c1");
        assert!(a.starts_with("production-3f2a9c1-"), "{a}");
        assert_ne!(a, b);
        assert!(!a.contains(' '));
    }

    #[test]
    fn a_moved_tag_is_detected_per_repository() {
        let names = vec!["a".to_string(), "b".to_string()];
        let pin = |r: &str| BTreeMap::from([("web".to_string(), r.to_string())]);
        assert_eq!(
            tag_moved(&names, &[pin("r@sha256:1"), pin("r@sha256:1")]),
            None
        );
        // Per-host images (another repository) are fine.
        assert_eq!(
            tag_moved(&names, &[pin("r@sha256:1"), pin("s@sha256:2")]),
            None
        );
        let m = tag_moved(&names, &[pin("r@sha256:1"), pin("r@sha256:2")]).unwrap();
        assert!(
            m.contains("a: r@sha256:1") && m.contains("b: r@sha256:2"),
            "{m}"
        );
        assert_eq!(tag_moved(&names, &[]), None);
    }

    #[test]
    fn a_failure_is_said_once_by_the_error_line_not_again_by_the_summary() {
        let summary = |code: i32, outcome: FleetOutcome, message: &str| Summary {
            command: "deploy",
            environment: "production".into(),
            project: "web".into(),
            release: "v3".into(),
            deployment_id: "production-v3-x".into(),
            outcome,
            exit_code: code,
            message: message.into(),
            failed_host: None,
            gate: None,
            digests: BTreeMap::new(),
            hosts: vec![HostLine {
                host: "a".into(),
                before: Some("v2".into()),
                after: "v2".into(),
                result: "failed its gates (rolled back by its agent)".into(),
                via: "agent".into(),
            }],
            duration_ms: 1200,
        };
        let failed = summary(
            exit::HEALTH_GATE_FAILED,
            FleetOutcome::RolledBack,
            "deploy of v3 failed on host a (canary) at gate [web: http GET /health on port 80]: …",
        );
        let t = failed.text();
        assert!(
            t.starts_with("deploy v3 of web to production: rolled back (exit 1)\n"),
            "{t}"
        );
        assert!(!t.contains("failed on host a"), "{t}");
        assert!(t.contains("  a "), "the hosts stay: {t}");
        // CI's step summary keeps the whole story.
        assert!(failed.markdown().contains("failed on host a"));
        let ok = summary(
            exit::SUCCESS,
            FleetOutcome::Succeeded,
            "every host of production serves v3",
        );
        assert!(
            ok.text()
                .starts_with("deploy v3 of web to production: succeeded (exit 0) — every host of production serves v3"),
            "{}",
            ok.text()
        );
    }

    #[test]
    fn digests_are_shortened() {
        assert_eq!(
            short_digest("127.0.0.1:5000/demo@sha256:0123456789abcdef0123"),
            "127.0.0.1:5000/demo@sha256:0123456789ab"
        );
        assert_eq!(short_digest("demo:v1"), "demo:v1");
        let d = BTreeMap::from([("web".to_string(), "r@sha256:aaaaaaaaaaaaaaaa".to_string())]);
        assert_eq!(describe(&d), "web=r@sha256:aaaaaaaaaaaa");
    }
}
