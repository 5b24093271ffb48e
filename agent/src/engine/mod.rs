//! The engine: the imperative shell around the [`Rollout`] state machine.
//!
//! It validates a request, takes the [`HostLock`], pulls and pins images,
//! then loops: ask the rollout for a step, persist it, take it against Docker
//! and the proxy, report the outcome. The same engine runs inside the daemon
//! (`deploy-agent run`) and inside the CLI when no daemon answers, so a
//! request does the same thing whichever way it arrives.

mod hooks;
pub mod lease;
mod probe;
pub mod pull;
mod reconcile;
mod steps;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::compose::{self, LoadInput};
use crate::config::AgentConfig;
use crate::docker::{DockerClient, DockerError};
use crate::lock::{HostLock, LockError, LockOwner};
use crate::proxy::ProxyClient;
use crate::rollout::{Decision, Ending, FailureKind, Observation, Plan, Rollout, ServicePlan};
use crate::spec::ProjectSpec;
use crate::store::{AuditEntry, NewOperation, ReleaseRecord, ReleaseState, Store};
use crate::wire::{
    ApiError, Caller, DeployRequest, Event, Lease, OperationKind, OperationResult, Outcome,
    Progress, RollbackRequest,
};

/// Where progress goes: the CLI prints it, the daemon streams it.
pub type Events = UnboundedSender<Event>;

/// An operation refused or failed before (or instead of) a rollout.
#[derive(Debug)]
pub struct OpError {
    pub outcome: Outcome,
    pub message: String,
    /// `Locked` by an environment lease: who holds it.
    pub holder: Option<Box<Lease>>,
    /// What was asked for does not exist here (a release never deployed).
    pub not_found: bool,
}

impl OpError {
    pub fn new(outcome: Outcome, message: impl Into<String>) -> OpError {
        OpError {
            outcome,
            message: message.into(),
            holder: None,
            not_found: false,
        }
    }

    /// A request about something this host does not have.
    pub fn not_found(message: impl Into<String>) -> OpError {
        OpError {
            not_found: true,
            ..OpError::new(Outcome::ConfigError, message)
        }
    }

    /// Names the lease that refused it.
    pub fn held_by(mut self, holder: Option<Box<Lease>>) -> OpError {
        self.holder = holder;
        self
    }

    /// The error as the API answers it.
    pub fn into_api(self) -> ApiError {
        ApiError {
            outcome: self.outcome,
            message: self.message,
            holder: self.holder,
            denied: None,
        }
    }
}

impl From<DockerError> for OpError {
    fn from(e: DockerError) -> Self {
        let outcome = match &e {
            DockerError::RegistryAuth { .. }
            | DockerError::ImageNotFound { .. }
            | DockerError::Pull { .. } => Outcome::RegistryError,
            _ => Outcome::EnvironmentError,
        };
        OpError::new(outcome, e.to_string())
    }
}

impl From<crate::store::StoreError> for OpError {
    fn from(e: crate::store::StoreError) -> Self {
        OpError::new(Outcome::EnvironmentError, e.to_string())
    }
}

impl From<LockError> for OpError {
    fn from(e: LockError) -> Self {
        let outcome = match e {
            LockError::Held { .. } => Outcome::Locked,
            LockError::Io { .. } => Outcome::EnvironmentError,
        };
        OpError::new(outcome, e.to_string())
    }
}

pub struct Engine {
    pub state_dir: PathBuf,
    pub config: AgentConfig,
    pub store: Arc<Store>,
    pub docker: DockerClient,
    pub proxy: ProxyClient,
    /// The webhook (`[notify]`), told when an operation starts and ends.
    pub notifier: crate::notify::Notifier,
    /// Test-only fault injection: `DEPLOY_AGENT_CRASH_AT=<step>` kills the
    /// process right after that step is persisted (see ARCHITECTURE.md).
    crash_at: Option<String>,
}

/// What a running rollout acts on.
pub(crate) struct Ctx<'a> {
    pub kind: OperationKind,
    pub project: &'a str,
    pub target: &'a ProjectSpec,
    pub old: Option<&'a ProjectSpec>,
    pub previous: Option<&'a str>,
    pub who: &'a str,
    /// The reason given with the request (`--reason`).
    pub reason: Option<&'a str>,
    pub events: &'a Events,
    /// What the result reports besides the ending.
    pub report: std::sync::Mutex<OpReport>,
}

#[derive(Debug, Default)]
pub(crate) struct OpReport {
    pub hooks: Vec<crate::wire::HookReport>,
    /// When the rollout decided to undo (to time the switch back).
    pub decided_at: Option<Instant>,
    /// How long traffic took to be back on the previous release; only when
    /// it had moved to the target.
    pub switch_back_ms: Option<u64>,
    /// Whether any request may have gone to the target (see
    /// [`Rollout::any_traffic_moved`]), known when the rollout is done.
    pub traffic_moved: bool,
    /// The check that failed in the step being taken (a health gate, an
    /// observation gate, a smoke check, a hook), as the step names it.
    pub step_gate: Option<String>,
    /// The check whose failure decided the undo: the result's `gate`.
    pub failed_gate: Option<String>,
}

impl Ctx<'_> {
    /// The step being taken failed this check (see [`OpReport::step_gate`]).
    pub(crate) fn gate_failed(&self, gate: String) {
        if let Ok(mut r) = self.report.lock() {
            r.step_gate = Some(gate);
        }
    }
}

impl Engine {
    pub async fn open(state_dir: &Path, config: AgentConfig) -> Result<Engine, OpError> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            OpError::new(
                Outcome::EnvironmentError,
                format!(
                    "cannot create the state directory {}: {e}; check --state-dir",
                    state_dir.display()
                ),
            )
        })?;
        let store = Store::open(&state_dir.join("state.db"))?;
        let docker = DockerClient::connect().await?;
        let notifier =
            crate::notify::Notifier::new(config.notify.as_ref(), config.environment.as_deref());
        Ok(Engine {
            state_dir: state_dir.to_path_buf(),
            config,
            store: Arc::new(store),
            docker,
            proxy: ProxyClient::new(state_dir.join("proxy.sock")),
            notifier,
            crash_at: std::env::var("DEPLOY_AGENT_CRASH_AT").ok(),
        })
    }

    // ----- deploy ---------------------------------------------------------

    pub async fn deploy(
        &self,
        req: &DeployRequest,
        caller: &Caller,
        ev: &Events,
    ) -> OperationResult {
        let started = Instant::now();
        let who = &caller.to_string();
        match self.deploy_inner(req, who, ev, started).await {
            Ok(result) => result,
            Err(e) => self.refused(
                OperationKind::Deploy,
                &req.project,
                &req.release,
                who,
                e,
                started,
            ),
        }
    }

    async fn deploy_inner(
        &self,
        req: &DeployRequest,
        who: &str,
        ev: &Events,
        started: Instant,
    ) -> Result<OperationResult, OpError> {
        let commit_time = check_commit_time(req.commit_time.as_deref())?;
        let mut spec = load_spec(
            &req.compose_path,
            &req.compose_text,
            &req.project,
            &req.release,
            &req.vars,
        )?;
        self.require_proxy(&spec).await?;

        let _lock = self
            .lock(
                &req.project,
                &format!("deploy of {}", req.release),
                who,
                req.lock_wait_ms,
            )
            .await?;
        // while a fleet deployment holds the environment lease, only it deploys.
        lease::check_lease(&self.store, &self.config, req.deployment_id.as_deref(), who)?;
        self.recover_project(&req.project, ev).await?;

        let serving = self.store.serving(&req.project)?;
        let current = serving.as_ref().and_then(|s| s.current.clone());
        if current.as_deref() == Some(req.release.as_str()) {
            let rec = self.store.release(&req.project, &req.release)?;
            let same = rec
                .as_ref()
                .and_then(|r| serde_json::from_str::<ProjectSpec>(&r.spec_json).ok())
                .is_some_and(|old| old.source == spec.source);
            if !same {
                return Err(OpError::new(
                    Outcome::ConfigError,
                    format!(
                        "release {} already serves project {} with a different configuration; deploy the change under a new release id",
                        req.release, req.project
                    ),
                ));
            }
            let digests = rec.map(|r| r.digests).unwrap_or_default();
            let msg = format!("release {} already serves; nothing to do", req.release);
            emit(ev, &req.project, &req.release, "done", None, &msg);
            return Ok(self.result(
                OperationKind::Deploy,
                &req.project,
                &req.release,
                current.clone(),
                current,
                Outcome::Succeeded,
                msg,
                None,
                started,
                digests,
            ));
        }
        let old_spec = match &current {
            Some(r) => Some(self.snapshot(&req.project, r)?),
            None => None,
        };

        // Pull and pin every image before anything changes.
        let (digests, image_ids) = self.pull_and_pin(req, &mut spec, ev).await?;

        // A retained release deployed again is rebuilt from this request.
        if self.store.release(&req.project, &req.release)?.is_some() {
            self.remove_release_containers(&req.project, &req.release)
                .await?;
        }
        let spec_json = serde_json::to_string(&spec)
            .map_err(|e| OpError::new(Outcome::EnvironmentError, e.to_string()))?;
        self.store.put_release(&ReleaseRecord {
            project: req.project.clone(),
            release: req.release.clone(),
            created_at: now(),
            state: ReleaseState::Deploying,
            spec_json,
            digests: digests.clone(),
            image_ids,
        })?;
        let plan = self.make_plan(
            &spec,
            old_spec.as_ref(),
            PlanOptions {
                rollback: false,
                run_migrations: req.run_migrations,
                migrate_down: false,
                observe_window_ms: req.observe_window_ms,
            },
        )?;
        let ctx = Ctx {
            kind: OperationKind::Deploy,
            project: &req.project,
            target: &spec,
            old: old_spec.as_ref(),
            previous: current.as_deref(),
            who,
            reason: req.reason.as_deref(),
            events: ev,
            report: Default::default(),
        };
        let op_id = self.begin(&ctx, req.reason.clone(), commit_time, &digests)?;
        let ending = self.run(op_id, Rollout::new(plan), &ctx).await;
        self.finish(op_id, &ctx, ending, false, started)
    }

    /// Pulls every image of `spec` and pins it to its digest (a pinned
    /// digest of the request, promotion, is pulled as is, never
    /// re-resolved); records the images as the agent's. Returns service
    /// name → pinned reference, and the image ids.
    async fn pull_and_pin(
        &self,
        req: &DeployRequest,
        spec: &mut ProjectSpec,
        ev: &Events,
    ) -> Result<(BTreeMap<String, String>, Vec<String>), OpError> {
        let mut digests = BTreeMap::new();
        let mut image_ids = Vec::new();
        let mut pinned: BTreeMap<String, String> = BTreeMap::new();
        for svc in &spec.services {
            if !pinned.contains_key(&svc.image) {
                emit(
                    ev,
                    &req.project,
                    &req.release,
                    "pull",
                    Some(&svc.name),
                    &format!("pulling {}", svc.image),
                );
                let pinned_ref = req.pinned.get(&svc.name);
                let pulled = pull::pull_service(
                    &self.docker,
                    &self.config,
                    &svc.name,
                    &svc.image,
                    pinned_ref,
                )
                .await?;
                self.store.record_image(
                    &pulled.image_id,
                    &pulled.pinned,
                    pulled.pulled_by_agent,
                )?;
                image_ids.push(pulled.image_id.clone());
                pinned.insert(svc.image.clone(), pulled.pinned);
            }
        }
        for svc in &mut spec.services {
            if let Some(p) = pinned.get(&svc.image) {
                svc.image = p.clone();
                digests.insert(svc.name.clone(), p.clone());
            }
        }

        Ok((digests, image_ids))
    }

    // ----- rollback -------------------------------------------------------

    pub async fn rollback(
        &self,
        req: &RollbackRequest,
        caller: &Caller,
        ev: &Events,
    ) -> OperationResult {
        let started = Instant::now();
        let who = &caller.to_string();
        match self.rollback_inner(req, who, ev, started).await {
            Ok(result) => result,
            Err(e) => self.refused(
                OperationKind::Rollback,
                &req.project,
                req.to.as_deref().unwrap_or("previous"),
                who,
                e,
                started,
            ),
        }
    }

    async fn rollback_inner(
        &self,
        req: &RollbackRequest,
        who: &str,
        ev: &Events,
        started: Instant,
    ) -> Result<OperationResult, OpError> {
        let what = format!(
            "rollback to {}",
            req.to.as_deref().unwrap_or("the previous release")
        );
        let _lock = self
            .lock(&req.project, &what, who, req.lock_wait_ms)
            .await?;
        // while a fleet deployment holds the environment lease, only it rolls back.
        lease::check_lease(&self.store, &self.config, req.deployment_id.as_deref(), who)?;
        self.recover_project(&req.project, ev).await?;
        let serving = self.store.serving(&req.project)?.unwrap_or_default();
        let Some(current) = serving.current.clone() else {
            return Err(OpError::new(
                Outcome::ConfigError,
                format!(
                    "project {} has no release serving on this host; nothing to roll back",
                    req.project
                ),
            ));
        };
        let target = match (&req.to, &serving.previous) {
            (Some(to), _) => to.clone(),
            (None, Some(prev)) => prev.clone(),
            (None, None) => {
                return Err(OpError::new(
                    Outcome::ConfigError,
                    format!(
                        "project {} has no previous release on this host; name one with --to (see `deploy-agent history --project {}`)",
                        req.project, req.project
                    ),
                ));
            }
        };
        if target == current {
            return Err(OpError::new(
                Outcome::ConfigError,
                format!(
                    "release {target} is already serving project {}",
                    req.project
                ),
            ));
        }
        let record = self.store.release(&req.project, &target)?.ok_or_else(|| {
            OpError::new(
                Outcome::ConfigError,
                format!(
                    "release {target} of project {} is not retained on this host; see `deploy-agent history --project {}`",
                    req.project, req.project
                ),
            )
        })?;
        if record.state != ReleaseState::Good {
            return Err(OpError::new(
                Outcome::ConfigError,
                format!(
                    "release {target} cannot be restored: it is {}; pick a release that served successfully",
                    record.state.as_str()
                ),
            ));
        }
        let spec: ProjectSpec = serde_json::from_str(&record.spec_json).map_err(|e| {
            OpError::new(
                Outcome::EnvironmentError,
                format!("the snapshot of release {target} is unreadable: {e}"),
            )
        })?;
        for svc in &spec.services {
            if !self.docker.has_image(&svc.image).await {
                return Err(OpError::new(
                    Outcome::RegistryError,
                    format!(
                        "image {} of release {target} is no longer in the local image store (removed by hand?); it cannot be restored without the registry",
                        svc.image
                    ),
                ));
            }
        }
        self.require_proxy(&spec).await?;
        let old_spec = self.snapshot(&req.project, &current)?;
        let ctx = Ctx {
            kind: OperationKind::Rollback,
            project: &req.project,
            target: &spec,
            old: Some(&old_spec),
            previous: Some(&current),
            who,
            reason: req.reason.as_deref(),
            events: ev,
            report: Default::default(),
        };
        let op_id = self.begin(&ctx, req.reason.clone(), None, &record.digests)?;
        let plan = self.make_plan(
            &spec,
            Some(&old_spec),
            PlanOptions {
                rollback: true,
                run_migrations: false,
                migrate_down: req.migrate_down,
                observe_window_ms: None,
            },
        )?;
        let ending = self.run(op_id, Rollout::new(plan), &ctx).await;
        self.finish(op_id, &ctx, ending, false, started)
    }

    // ----- the step loop --------------------------------------------------

    /// Persist each step before taking it; feed outcomes back.
    async fn run(&self, op_id: i64, mut rollout: Rollout, ctx: &Ctx<'_>) -> Ending {
        loop {
            let step = match rollout.next() {
                Decision::Done(ending) => {
                    if let Ok(mut r) = ctx.report.lock() {
                        r.traffic_moved = rollout.any_traffic_moved();
                    }
                    return ending;
                }
                Decision::Take(step) => step,
            };
            let state = serde_json::to_string(&rollout).unwrap_or_default();
            if let Err(e) = self.store.save_step(op_id, step.name(), &state) {
                // Without a persisted step we could not recover from a crash:
                // do not take it.
                rollout.observe(Observation::Failed {
                    kind: FailureKind::Error,
                    reason: format!("cannot persist step {}: {e}", step.name()),
                });
                continue;
            }
            self.crash_point(step.name());
            if let Ok(mut r) = ctx.report.lock() {
                r.step_gate = None;
            }
            let obs = self.take(&step, ctx, &rollout).await;
            if let Observation::Failed { reason, .. } = &obs {
                emit(
                    ctx.events,
                    ctx.project,
                    &ctx.target.release,
                    step.name(),
                    step.service(),
                    &format!("failed: {reason}"),
                );
            }
            if matches!(obs, Observation::Failed { .. })
                && rollout.failure().is_none()
                && !rollout.committed()
                && let Ok(mut r) = ctx.report.lock()
            {
                r.decided_at = Some(Instant::now());
                r.failed_gate = r.step_gate.take();
            }
            rollout.observe(obs);
        }
    }

    fn crash_point(&self, step: &str) {
        if self.crash_at.as_deref() == Some(step) {
            tracing::warn!(step, "DEPLOY_AGENT_CRASH_AT: killing this process");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    fn begin(
        &self,
        ctx: &Ctx<'_>,
        reason: Option<String>,
        commit_time: Option<String>,
        digests: &BTreeMap<String, String>,
    ) -> Result<i64, OpError> {
        let id = self.store.begin_operation(&NewOperation {
            kind: ctx.kind,
            project: ctx.project.to_string(),
            release: ctx.target.release.clone(),
            previous: ctx.previous.map(str::to_string),
            who: ctx.who.to_string(),
            reason: reason.clone(),
            commit_time,
        })?;
        self.store.append_audit(&AuditEntry {
            who: ctx.who.to_string(),
            action: format!("{}.started", ctx.kind.as_str()),
            project: Some(ctx.project.to_string()),
            release: Some(ctx.target.release.clone()),
            outcome: None,
            duration_ms: None,
            reason,
            detail: serde_json::json!({
                "operation_id": id,
                "previous": ctx.previous,
                "digests": digests,
                "compose_path": ctx.target.source.compose_path,
            }),
        })?;
        self.notifier.send(crate::notify::Notification {
            event: crate::config::NotifyEvent::Started,
            operation: ctx.kind,
            project: ctx.project.to_string(),
            release: ctx.target.release.clone(),
            previous: ctx.previous.map(str::to_string),
            serving: None,
            outcome: None,
            automatic: false,
            failure: None,
            message: None,
            who: ctx.who.to_string(),
            reason: ctx.reason.map(str::to_string),
            duration_ms: None,
        });
        emit(
            ctx.events,
            ctx.project,
            &ctx.target.release,
            "start",
            None,
            &format!(
                "{} {} (serving now: {})",
                ctx.kind.as_str(),
                ctx.target.release,
                ctx.previous.unwrap_or("nothing")
            ),
        );
        Ok(id)
    }

    /// Record the ending (store, audit: durable) and only then answer.
    fn finish(
        &self,
        op_id: i64,
        ctx: &Ctx<'_>,
        ending: Ending,
        recovered: bool,
        started: Instant,
    ) -> Result<OperationResult, OpError> {
        let release = &ctx.target.release;
        let digests: BTreeMap<String, String> = ctx
            .target
            .services
            .iter()
            .map(|s| (s.name.clone(), s.image.clone()))
            .collect();
        let (outcome, message, gate, serving) = match &ending {
            Ending::Succeeded { warnings } => {
                let mut msg = format!("{} {release}: now serving", ctx.kind.as_str());
                if recovered {
                    msg.push_str(" (completed by reconciliation after an interruption)");
                }
                for w in warnings {
                    msg.push_str(&format!("; warning: {w}"));
                }
                (
                    Outcome::Succeeded,
                    msg,
                    self.gate_names(ctx.target),
                    Some(release.clone()),
                )
            }
            Ending::RolledBack { failure, warnings } => {
                let outcome = match failure.kind {
                    FailureKind::HealthGate => Outcome::HealthGateFailed,
                    FailureKind::Interrupted => Outcome::Interrupted,
                    FailureKind::Error => Outcome::EnvironmentError,
                };
                let serving = ctx.previous.map(str::to_string);
                let moved = ctx.report.lock().map(|r| r.traffic_moved).unwrap_or(true);
                let mut msg = format!(
                    "{} {release} failed at step {}: {}; {} serving{}",
                    ctx.kind.as_str(),
                    failure.step,
                    failure.reason,
                    serving
                        .as_deref()
                        .map(|s| format!("release {s} is still"))
                        .unwrap_or_else(|| "nothing was".into()),
                    if moved {
                        String::new()
                    } else {
                        format!(" ({release} never received traffic)")
                    },
                );
                for w in warnings {
                    msg.push_str(&format!("; warning: {w}"));
                }
                // Only the check that failed (none for an interruption or
                // an error of Docker or the proxy).
                let gate = ctx.report.lock().ok().and_then(|r| r.failed_gate.clone());
                (outcome, msg, gate, serving)
            }
        };
        if let Ending::RolledBack { .. } = ending
            && ctx.kind == OperationKind::Deploy
        {
            self.store
                .set_release_state(ctx.project, release, ReleaseState::Failed)?;
        }
        self.store.finish_operation(op_id, outcome, &message)?;
        let action = match (&ending, recovered) {
            (Ending::Succeeded { .. }, _) => "succeeded",
            (Ending::RolledBack { .. }, true) => "interrupted",
            (Ending::RolledBack { .. }, false) => "failed",
        };
        self.store.append_audit(&AuditEntry {
            who: ctx.who.to_string(),
            action: format!("{}.{action}", ctx.kind.as_str()),
            project: Some(ctx.project.to_string()),
            release: Some(release.clone()),
            outcome: Some(outcome.as_str().to_string()),
            duration_ms: Some(millis(started.elapsed())),
            reason: None,
            detail: serde_json::json!({
                "operation_id": op_id,
                "previous": ctx.previous,
                "serving": serving,
                "digests": digests,
                "message": message,
                "gate": gate,
            }),
        })?;
        tracing::info!(
            project = ctx.project,
            release = release.as_str(),
            outcome = outcome.as_str(),
            "{message}"
        );
        // Durable first (above), then the webhook; never waited for.
        self.notifier.send(ending_notification(
            ctx,
            &ending,
            outcome,
            serving.clone(),
            message.clone(),
            millis(started.elapsed()),
        ));
        let mut result = self.result(
            ctx.kind,
            ctx.project,
            release,
            ctx.previous.map(str::to_string),
            serving,
            outcome,
            message,
            gate,
            started,
            digests,
        );
        if let Ok(mut r) = ctx.report.lock() {
            result.hooks = std::mem::take(&mut r.hooks);
            result.switch_back_ms = r.switch_back_ms;
        }
        Ok(result)
    }

    /// A request refused before any step: audited, nothing changed.
    fn refused(
        &self,
        kind: OperationKind,
        project: &str,
        release: &str,
        who: &str,
        e: OpError,
        started: Instant,
    ) -> OperationResult {
        let serving = self
            .store
            .serving(project)
            .ok()
            .flatten()
            .and_then(|s| s.current);
        let mut message = e.message;
        let audit = self.store.append_audit(&AuditEntry {
            who: who.to_string(),
            action: format!("{}.refused", kind.as_str()),
            project: Some(project.to_string()),
            release: Some(release.to_string()),
            outcome: Some(e.outcome.as_str().to_string()),
            duration_ms: Some(millis(started.elapsed())),
            reason: None,
            detail: serde_json::json!({ "message": message }),
        });
        if let Err(a) = audit {
            message.push_str(&format!(
                " (and the audit record could not be written: {a})"
            ));
        }
        self.result(
            kind,
            project,
            release,
            serving.clone(),
            serving,
            e.outcome,
            message,
            None,
            started,
            BTreeMap::new(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &self,
        operation: OperationKind,
        project: &str,
        release: &str,
        previous: Option<String>,
        serving: Option<String>,
        outcome: Outcome,
        message: String,
        gate: Option<String>,
        started: Instant,
        digests: BTreeMap<String, String>,
    ) -> OperationResult {
        OperationResult {
            ts: now(),
            operation,
            project: project.to_string(),
            release: release.to_string(),
            previous,
            serving,
            outcome,
            exit_code: outcome.exit_code(),
            message,
            gate,
            duration_ms: millis(started.elapsed()),
            digests,
            switch_back_ms: None,
            hooks: Vec::new(),
        }
    }

    fn gate_names(&self, spec: &ProjectSpec) -> Option<String> {
        let names: Vec<String> = spec
            .services
            .iter()
            .map(|s| format!("{}: {}", s.name, s.deploy.health.probe.describe()))
            .collect();
        (!names.is_empty()).then(|| names.join("; "))
    }

    // ----- helpers ----------------------------------------------------------

    async fn require_proxy(&self, spec: &ProjectSpec) -> Result<(), OpError> {
        if spec.services.iter().any(|s| !s.ports.is_empty()) {
            self.proxy
                .ping()
                .await
                .map_err(|e| OpError::new(Outcome::EnvironmentError, e.to_string()))?;
        }
        Ok(())
    }

    async fn lock(
        &self,
        project: &str,
        operation: &str,
        who: &str,
        wait_ms: Option<u64>,
    ) -> Result<HostLock, OpError> {
        let owner = LockOwner {
            pid: std::process::id(),
            user: who.to_string(),
            operation: operation.to_string(),
            since: now(),
        };
        Ok(HostLock::acquire(
            &self.state_dir,
            project,
            &owner,
            wait_ms.map(Duration::from_millis),
        )
        .await?)
    }

    pub(crate) fn snapshot(&self, project: &str, release: &str) -> Result<ProjectSpec, OpError> {
        let rec = self.store.release(project, release)?.ok_or_else(|| {
            OpError::new(
                Outcome::EnvironmentError,
                format!(
                    "the state store names release {release} of {project} but has no snapshot of it"
                ),
            )
        })?;
        serde_json::from_str(&rec.spec_json).map_err(|e| {
            OpError::new(
                Outcome::EnvironmentError,
                format!("the snapshot of release {release} is unreadable: {e}"),
            )
        })
    }

    pub(crate) fn container_name(
        &self,
        project: &str,
        service: &str,
        release: &str,
        replica: u32,
    ) -> String {
        format!(
            "{}-{project}-{service}-{release}-{replica}",
            self.config.instance
        )
    }

    async fn remove_release_containers(&self, project: &str, release: &str) -> Result<(), OpError> {
        let names = self
            .docker
            .list(&[
                (crate::docker::LABEL_INSTANCE, &self.config.instance),
                (crate::docker::LABEL_PROJECT, project),
                (crate::docker::LABEL_RELEASE, release),
            ])
            .await?;
        for n in names {
            self.docker.remove(&n).await?;
        }
        Ok(())
    }
}

/// What an operation asks of the plan beyond the two specs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    pub rollback: bool,
    pub run_migrations: bool,
    pub migrate_down: bool,
    /// Overrides the observation window (from the request).
    pub observe_window_ms: Option<u64>,
}

impl Engine {
    /// The rollout plan: target services in order, then services only the
    /// old release has (they are unpublished and stopped), framed by the
    /// hooks, smoke checks, canary and observation the request calls for.
    pub fn make_plan(
        &self,
        target: &ProjectSpec,
        old: Option<&ProjectSpec>,
        opts: PlanOptions,
    ) -> Result<Plan, OpError> {
        use crate::rollout::HookName;
        let config_error = |m: String| OpError::new(Outcome::ConfigError, m);
        let hooks = &target.rollout.hooks;
        let mut plan = Plan {
            services: plan_services(target, old),
            remove_failed: !opts.rollback,
            smoke: hooks.smoke.as_ref().map(|s| s.service.clone()),
            ..Plan::default()
        };
        for (name, hook) in [
            ("pre_deploy", &hooks.pre_deploy),
            ("backup", &hooks.backup),
            ("migrate", &hooks.migrate),
            ("post_deploy", &hooks.post_deploy),
            ("pre_rollback", &hooks.pre_rollback),
            ("post_rollback", &hooks.post_rollback),
        ] {
            if let Some(h) = hook
                && matches!(h.run, crate::spec::HookRun::Host { .. })
                && !self.config.allow_host_hooks
            {
                return Err(config_error(format!(
                    "hook {name} runs a host command, which this agent does not allow; run it in a container (service + command) or set allow_host_hooks = true in agent.toml"
                )));
            }
        }
        if opts.rollback {
            if hooks.pre_rollback.is_some() {
                plan.hooks_before.push(HookName::PreRollback);
            }
            if hooks.post_rollback.is_some() {
                plan.hooks_after.push(HookName::PostRollback);
            }
            if opts.migrate_down {
                let has_down = old
                    .and_then(|o| o.rollout.hooks.migrate.as_ref())
                    .is_some_and(|m| m.down.is_some());
                if !has_down {
                    return Err(config_error(format!(
                        "--migrate-down: release {} defines no x-deploy.hooks.migrate.down",
                        old.map(|o| o.release.as_str()).unwrap_or("?")
                    )));
                }
                plan.migrate_down = true;
            }
        } else {
            if hooks.pre_deploy.is_some() {
                plan.hooks_before.push(HookName::PreDeploy);
            }
            if opts.run_migrations && hooks.migrate.is_some() {
                if self.config.backup_before_migrate {
                    if hooks.backup.is_none() {
                        return Err(config_error(
                            "this agent requires a backup before migrations (backup_before_migrate = true) but the compose file defines no x-deploy.hooks.backup".into(),
                        ));
                    }
                    plan.hooks_before.push(HookName::Backup);
                }
                plan.hooks_before.push(HookName::Migrate);
            }
            if hooks.post_deploy.is_some() {
                plan.hooks_after.push(HookName::PostDeploy);
            }
            plan.undo_hooks = hooks.pre_rollback.is_some() || hooks.post_rollback.is_some();
            plan.canary = target.rollout.canary.clone();
            let window = opts
                .observe_window_ms
                .map(std::time::Duration::from_millis)
                .unwrap_or_else(|| self.observe_settings_for(target).window);
            plan.observe = !window.is_zero();
            plan.observe_window_ms = opts.observe_window_ms;
        }
        Ok(plan)
    }
}

fn plan_services(target: &ProjectSpec, old: Option<&ProjectSpec>) -> Vec<ServicePlan> {
    let old_replicas = |name: &str| {
        old.and_then(|o| o.services.iter().find(|s| s.name == name))
            .map(|s| s.replicas)
            .unwrap_or(0)
    };
    let mut services: Vec<ServicePlan> = target
        .services
        .iter()
        .map(|s| ServicePlan {
            service: s.name.clone(),
            new_replicas: s.replicas,
            old_replicas: old_replicas(&s.name),
            parallel: s.deploy.parallel,
            routed: !s.ports.is_empty()
                || old
                    .and_then(|o| o.services.iter().find(|x| x.name == s.name))
                    .is_some_and(|x| !x.ports.is_empty()),
        })
        .collect();
    if let Some(o) = old {
        for s in &o.services {
            if !target.services.iter().any(|t| t.name == s.name) {
                services.push(ServicePlan {
                    service: s.name.clone(),
                    new_replicas: 0,
                    old_replicas: s.replicas,
                    parallel: 1,
                    routed: !s.ports.is_empty(),
                });
            }
        }
    }
    services
}

/// What the webhook hears when an operation ends: `succeeded` (a deploy),
/// `rolled_back` (a rollback that succeeded, or a deploy the agent undid by
/// itself after its observation window or a canary hold failed a gate:
/// `automatic`), else `failed` (the previous release still serves).
fn ending_notification(
    ctx: &Ctx<'_>,
    ending: &Ending,
    outcome: Outcome,
    serving: Option<String>,
    message: String,
    duration_ms: u64,
) -> crate::notify::Notification {
    use crate::config::NotifyEvent;
    let (event, automatic, failure) = match ending {
        Ending::Succeeded { .. } if ctx.kind == OperationKind::Rollback => {
            (NotifyEvent::RolledBack, false, None)
        }
        Ending::Succeeded { .. } => (NotifyEvent::Succeeded, false, None),
        Ending::RolledBack { failure, .. } => {
            let automatic = ctx.kind == OperationKind::Deploy
                && failure.kind != FailureKind::Interrupted
                && matches!(failure.step.as_str(), "observe" | "canary_hold");
            let event = if automatic {
                NotifyEvent::RolledBack
            } else {
                NotifyEvent::Failed
            };
            let failure = crate::notify::FailureNote {
                step: failure.step.clone(),
                reason: failure.reason.clone(),
            };
            (event, automatic, Some(failure))
        }
    };
    crate::notify::Notification {
        event,
        operation: ctx.kind,
        project: ctx.project.to_string(),
        release: ctx.target.release.clone(),
        previous: ctx.previous.map(str::to_string),
        serving,
        outcome: Some(outcome),
        automatic,
        failure,
        message: Some(message),
        who: ctx.who.to_string(),
        reason: ctx.reason.map(str::to_string),
        duration_ms: Some(duration_ms),
    }
}

pub(crate) fn emit(
    ev: &Events,
    project: &str,
    release: &str,
    step: &str,
    service: Option<&str>,
    message: &str,
) {
    tracing::info!(project, release, step, service, "{message}");
    let _ = ev.send(Event::Progress(Progress {
        ts: now(),
        project: project.to_string(),
        release: release.to_string(),
        step: step.to_string(),
        service: service.map(str::to_string),
        message: message.to_string(),
    }));
}

pub use deploy_protocol::timestamp::now;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The compose file of a request as a `ProjectSpec`: relative paths in it
/// resolve against the file's own directory. Any problem is a config error.
pub fn load_spec(
    compose_path: &str,
    compose_text: &str,
    project: &str,
    release: &str,
    vars: &BTreeMap<String, String>,
) -> Result<ProjectSpec, OpError> {
    let compose_path = absolute(Path::new(compose_path));
    let base_dir = compose_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let display_path = compose_path.display().to_string();
    compose::load(&LoadInput {
        compose_path: &display_path,
        compose_text,
        base_dir: &base_dir,
        project,
        release,
        vars,
    })
    .map_err(|e| OpError::new(Outcome::ConfigError, e.to_string()))
}

/// `commit_time` of a deploy request: an RFC 3339 time, normalised to UTC.
fn check_commit_time(t: Option<&str>) -> Result<Option<String>, OpError> {
    let Some(t) = t else { return Ok(None) };
    match t.parse::<jiff::Timestamp>() {
        Ok(ts) => Ok(Some(format!("{ts:.0}"))),
        Err(e) => Err(OpError::new(
            Outcome::ConfigError,
            format!(
                "commit_time {t:?} is not an RFC 3339 time like 2026-12-01T09:30:00Z: {e}; nothing was changed"
            ),
        )),
    }
}
