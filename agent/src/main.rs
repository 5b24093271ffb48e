//! `deploy-agent`: the CLI, the control daemon and the proxy, in one binary.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use deploy_agent::config::{AgentConfig, DEFAULT_CONFIG, DEFAULT_STATE_DIR};
use deploy_agent::engine::{Engine, OpError};
use deploy_agent::local::{Local, Reply};
use deploy_agent::store::{AuditHead, AuditVerification, BreakKind, Store, StoreError};
use deploy_agent::wire::{
    Caller, DeployRequest, Event, HistoryEntry, Op, Outcome, Query, RollbackRequest, StatusReport,
    exit, timestamp,
};
use deploy_agent::{api, daemon, proxy};

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("DEPLOY_GIT_COMMIT"),
    ")"
);

/// The exit codes of `deploy` and `rollback` (README, "Exit codes").
const EXIT_CODES: &str = "Exit codes:
  0  success
  1  the new release failed its health gate (or was interrupted); the previous release is serving
  2  configuration or usage error (compose file, unknown key, bad flag); nothing changed
  3  registry authentication failure, image not found, or registry unreachable; nothing changed
  4  another operation holds the host lock for this project, or a fleet deployment holds the lease
  5  the host is not ready: Docker unreachable, proxy not running, state store unusable
  6  denied by authorization or a policy gate; nothing changed";

#[derive(Parser)]
#[command(name = "deploy-agent", version = VERSION, about = "Health-gated, zero-downtime deploys of compose projects on this host")]
struct Cli {
    /// Where the agent keeps its state, sockets and locks.
    #[arg(long, global = true, env = "DEPLOY_AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Agent configuration file (a missing default file means defaults).
    #[arg(long, global = true, env = "DEPLOY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The data path: owns the published ports (run it as its own service).
    /// SIGHUP (`systemctl reload deploy-proxy`) starts the binary again with
    /// --take-over: the upgraded proxy takes the listening sockets over
    /// and this one exits once its open connections are done.
    Proxy {
        /// Take the listening sockets over from the proxy running on this
        /// state directory, instead of binding them.
        #[arg(long)]
        take_over: bool,
    },
    /// The control daemon: local API on STATE_DIR/agent.sock, reconciliation.
    Run,
    /// Deploy a release of a compose project.
    #[command(after_help = EXIT_CODES)]
    Deploy(DeployArgs),
    /// Put a retained release back (default: the previous one).
    #[command(after_help = EXIT_CODES)]
    Rollback(RollbackArgs),
    /// Which release serves each project, and its containers.
    Status {
        /// Only this project (default: every project on this host).
        #[arg(long)]
        project: Option<String>,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Deploys and rollbacks of a project, newest first.
    History {
        /// The project whose operations to list.
        #[arg(long)]
        project: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Check the agent configuration file and exit.
    CheckConfig,
    /// Run one request read from stdin, answer in JSON lines on stdout
    /// (what deploy-controller runs over SSH; see docs/ssh.md).
    ServeStdio,
}

#[derive(clap::Args)]
struct DeployArgs {
    /// The project: its containers, networks and volumes carry this name.
    #[arg(long)]
    project: String,
    /// The compose file.
    #[arg(long)]
    file: PathBuf,
    /// The release id (e.g. the commit SHA); `${RELEASE}` in the compose file.
    #[arg(long)]
    release: String,
    /// Interpolation variable, `K=V` (repeatable). `RELEASE` is set for you.
    #[arg(long = "var", value_name = "K=V")]
    vars: Vec<String>,
    /// Wait this long for another operation on the project to finish.
    #[arg(long, value_parser = humantime::parse_duration)]
    lock_wait: Option<std::time::Duration>,
    /// Why (recorded in the audit log).
    #[arg(long)]
    reason: Option<String>,
    /// Run the `migrate` hook here (one host of an environment).
    #[arg(long)]
    run_migrations: bool,
    /// Return once traffic has switched; the daemon watches the
    /// observation window and rolls back by itself if a gate fails.
    #[arg(long)]
    no_wait: bool,
    /// When the release's commit was made (RFC 3339): kept in history,
    /// for lead time (`deploy-controller dora`).
    #[arg(long, value_name = "TIME")]
    commit_time: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RollbackArgs {
    /// The project to roll back.
    #[arg(long)]
    project: String,
    /// The retained release to put back (default: the previous good one).
    #[arg(long)]
    to: Option<String>,
    /// Wait this long for another operation on the project to finish
    /// (default: fail at once, naming it).
    #[arg(long, value_parser = humantime::parse_duration)]
    lock_wait: Option<std::time::Duration>,
    /// Why (recorded in the audit log).
    #[arg(long)]
    reason: Option<String>,
    /// Also run the leaving release's `migrate.down` (code-only otherwise).
    #[arg(long)]
    migrate_down: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the log: the hash chain, the heads, truncation. Detects
    /// edited, deleted and truncated records; exit 1 when broken.
    Verify {
        /// Also check that the log still holds, unchanged, every record up
        /// to this head (`SEQ HASH`, as `audit head` printed it earlier and
        /// you kept off the host).
        #[arg(long, value_name = "HEAD")]
        anchor: Option<String>,
        /// The whole report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the current head (`SEQ HASH`): keep it off the host and check
    /// against it later with `audit verify --anchor`.
    Head {
        /// `{"seq": …, "hash": …}`.
        #[arg(long)]
        json: bool,
    },
    /// After investigating the problems `verify` reports up to record SEQ,
    /// accept them with an audited record saying who and why (e.g. a
    /// database restored from a backup).
    Acknowledge {
        /// The newest record of the problems to accept (`verify` names it).
        #[arg(long, value_name = "SEQ")]
        through: i64,
        /// Why they are accepted (kept in the acknowledging record).
        #[arg(long)]
        reason: String,
    },
    /// Print records as JSON lines.
    Export {
        /// Only this project's records (default: all of them).
        #[arg(long)]
        project: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ENVIRONMENT as u8);
        }
    };
    let code = runtime.block_on(async {
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                exit::ENVIRONMENT
            }
        }
    });
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging(service: bool) {
    use tracing_subscriber::prelude::*;
    let default = if service { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let registry = tracing_subscriber::registry().with(filter);
    // Under systemd, structured fields go to journald; elsewhere, stderr.
    // Fields keep their own names (PROJECT=, RELEASE=, STEP=, OUTCOME=), so
    // that `journalctl -u deploy-agent PROJECT=web` works.
    let journald = service && deploy_agent::service::stderr_is_journal();
    match journald.then(tracing_journald::layer) {
        Some(Ok(j)) => registry
            .with(
                j.with_syslog_identifier("deploy-agent".into())
                    .with_field_prefix(None),
            )
            .init(),
        _ => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .init(),
    }
}

fn load_config(path: Option<&Path>) -> Result<AgentConfig, i32> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    AgentConfig::load(&path, required).map_err(|e| {
        eprintln!("error: {e}");
        exit::CONFIG
    })
}

/// One function per command; this one picks it.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    let service = matches!(cli.cmd, Cmd::Proxy { .. } | Cmd::Run);
    init_logging(service);
    // The SSH transport reads its own config only if no daemon answers,
    // and reports every error as a JSON line.
    if matches!(cli.cmd, Cmd::ServeStdio) {
        return Ok(deploy_agent::stdio::serve(&cli.state_dir, cli.config.clone(), VERSION).await);
    }
    let config = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let local = Local::new(&cli.state_dir, cli.config.clone());
    match cli.cmd {
        Cmd::ServeStdio => Ok(exit::CONFIG), // handled above
        Cmd::CheckConfig => Ok(check_config(&config)),
        Cmd::Proxy { take_over } => run_proxy(&cli.state_dir, take_over).await,
        Cmd::Run => run_daemon(&cli.state_dir, config).await,
        Cmd::Deploy(args) => deploy(local, args).await,
        Cmd::Rollback(args) => rollback(local, args).await,
        Cmd::Status { project, json } => status(local, project, json).await,
        Cmd::History { project, json } => history(&cli.state_dir, &project, json),
        Cmd::Audit { cmd } => audit(&cli.state_dir, cmd),
    }
}

fn check_config(config: &AgentConfig) -> i32 {
    println!(
        "configuration ok: instance {}, retain {}, {} registr{}",
        config.instance,
        config.retain,
        config.registries.len(),
        if config.registries.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    exit::SUCCESS
}

async fn run_proxy(state_dir: &Path, take_over: bool) -> anyhow::Result<i32> {
    let options = proxy::Options {
        take_over,
        successor: successor_command(),
    };
    proxy::run_with(state_dir, options, upgrade_requests(), shutdown_signal())
        .await
        .context("the proxy stopped")?;
    Ok(exit::SUCCESS)
}

async fn run_daemon(state_dir: &Path, config: AgentConfig) -> anyhow::Result<i32> {
    let engine = match Engine::open(state_dir, config).await {
        Ok(e) => e,
        Err(e) => return Ok(fail(e)),
    };
    daemon::run(engine, state_dir, shutdown_signal()).await?;
    Ok(exit::SUCCESS)
}

fn millis(d: Option<std::time::Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn deploy(local: Local, args: DeployArgs) -> anyhow::Result<i32> {
    let mut vars = BTreeMap::new();
    for v in &args.vars {
        let Some((k, val)) = v.split_once('=') else {
            eprintln!("error: --var {v:?} must be KEY=VALUE");
            return Ok(exit::CONFIG);
        };
        vars.insert(k.to_string(), val.to_string());
    }
    let compose_text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "error: cannot read the compose file {}: {e}",
                args.file.display()
            );
            return Ok(exit::CONFIG);
        }
    };
    let compose_path = std::path::absolute(&args.file).unwrap_or(args.file);
    let req = DeployRequest {
        project: args.project,
        release: args.release,
        compose_path: compose_path.display().to_string(),
        compose_text,
        vars,
        lock_wait_ms: millis(args.lock_wait),
        reason: args.reason,
        run_migrations: args.run_migrations,
        no_wait: args.no_wait,
        commit_time: args.commit_time,
        ..DeployRequest::default()
    };
    operation(
        local,
        Op::Deploy,
        serde_json::to_value(&req)?,
        args.json,
        args.no_wait,
    )
    .await
}

async fn rollback(local: Local, args: RollbackArgs) -> anyhow::Result<i32> {
    let req = RollbackRequest {
        project: args.project,
        to: args.to,
        lock_wait_ms: millis(args.lock_wait),
        reason: args.reason,
        migrate_down: args.migrate_down,
        ..RollbackRequest::default()
    };
    operation(
        local,
        Op::Rollback,
        serde_json::to_value(&req)?,
        args.json,
        false,
    )
    .await
}

/// A deploy or rollback, through the daemon or in this process, its
/// events printed as they come. `no_wait`: stop at the switch (the
/// observation window begins) and leave the rest to the daemon.
async fn operation(
    mut local: Local,
    op: Op,
    input: serde_json::Value,
    json: bool,
    no_wait: bool,
) -> anyhow::Result<i32> {
    let caller = Caller::unix(api::process_user());
    let mut printer = Printer::new(json);
    let (_, reply) = local.perform(op, &caller, input).await?;
    let mut events = match reply {
        Reply::Events(events) => events,
        Reply::Refused { error, .. } => {
            eprintln!("error: {}", error.message);
            return Ok(error.outcome.exit_code());
        }
        Reply::Json(_) | Reply::Text(_) => anyhow::bail!("unexpected answer to {}", op.name()),
    };
    while let Some(e) = events.next().await {
        let e = e.map_err(anyhow::Error::msg)?;
        let switched = no_wait && matches!(&e, Event::Progress(p) if p.step == "observe");
        printer.event(e);
        if switched {
            printer.detached();
            break;
        }
    }
    local.finish().await;
    Ok(printer.exit_code())
}

async fn status(mut local: Local, project: Option<String>, json: bool) -> anyhow::Result<i32> {
    let caller = Caller::unix(api::process_user());
    let query = Query {
        project,
        ..Query::default()
    };
    let (_, reply) = local
        .perform(Op::Status, &caller, serde_json::to_value(&query)?)
        .await?;
    let report: StatusReport = match reply.json() {
        Ok(r) => r,
        Err(e) => return Ok(fail(e)),
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_status(&report);
    }
    // A release that should serve and a proxy that does not: nothing is
    // served, and that is not a healthy host.
    let should_serve = report.projects.iter().any(|p| p.current.is_some());
    match &report.proxy {
        Some(p) if !p.running && should_serve => Ok(exit::ENVIRONMENT),
        _ => Ok(exit::SUCCESS),
    }
}

fn history(state_dir: &Path, project: &str, json: bool) -> anyhow::Result<i32> {
    let store = match open_store(state_dir) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let entries: Vec<HistoryEntry> =
        store.history(project, Query::default().limit_for(Op::History))?;
    for h in &entries {
        if json {
            println!("{}", serde_json::to_string(h)?);
        } else {
            println!(
                "{}  {:<9} {:<12} {:<18} from {:<12} by {}{}",
                timestamp::for_people(&h.started_at),
                h.operation.as_str(),
                h.release,
                h.outcome.map(Outcome::as_str).unwrap_or("in progress"),
                h.previous.as_deref().unwrap_or("-"),
                h.who,
                h.duration_ms
                    .map(|d| format!(" ({:.1}s)", d as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
    if entries.is_empty() && !json {
        println!("no operations recorded for project {project}");
    }
    Ok(exit::SUCCESS)
}

fn audit(state_dir: &Path, cmd: AuditCmd) -> anyhow::Result<i32> {
    let store = match open_store(state_dir) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    match cmd {
        AuditCmd::Verify { anchor, json } => audit_verify(&store, anchor.as_deref(), json),
        AuditCmd::Head { json } => {
            let head = store.audit_head()?;
            if json {
                println!("{}", serde_json::to_string(&head)?);
            } else {
                println!("{head}");
            }
            Ok(exit::SUCCESS)
        }
        AuditCmd::Acknowledge { through, reason } => {
            let who = Caller::unix(api::process_user()).to_string();
            let ack = match store.acknowledge_audit(&who, through, &reason) {
                Ok(a) => a,
                Err(e @ StoreError::AuditAcknowledge { .. }) => {
                    eprintln!("error: {e}");
                    return Ok(exit::CONFIG);
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(t) = &ack.tamper_record {
                println!("recorded the heads' disagreement as audit record {}", t.seq);
            }
            println!(
                "acknowledged {} problem(s) in audit record {}:",
                ack.acknowledged.len(),
                ack.record.seq
            );
            for b in &ack.acknowledged {
                println!("  record {} ({}): {}", b.seq, b.kind, b.reason);
            }
            Ok(exit::SUCCESS)
        }
        AuditCmd::Export { project } => {
            let mut out = std::io::stdout().lock();
            for r in store.audit(project.as_deref(), usize::MAX)? {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            }
            Ok(exit::SUCCESS)
        }
    }
}

/// `audit verify`: exit 0 intact (acknowledged problems listed), 1 broken,
/// 2 a malformed anchor.
fn audit_verify(store: &Store, anchor: Option<&str>, json: bool) -> anyhow::Result<i32> {
    let report = match anchor {
        Some(text) => match text.parse::<AuditHead>() {
            Ok(a) => store.verify_audit_against(&a)?,
            Err(e) => {
                eprintln!("error: --anchor: {e}");
                return Ok(exit::CONFIG);
            }
        },
        None => store.verify_audit_report()?,
    };
    let code = if report.is_intact() {
        exit::SUCCESS
    } else {
        exit::HEALTH_GATE_FAILED
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(code);
    }
    match report.verification() {
        AuditVerification::Intact { records, head } => {
            println!("audit log intact: {records} records, head {head}");
        }
        AuditVerification::Broken { .. } => {
            for b in &report.breaks {
                eprintln!(
                    "audit log BROKEN at record {} ({}): {}",
                    b.seq, b.kind, b.reason
                );
            }
            let acknowledgeable: Vec<i64> = report
                .breaks
                .iter()
                .filter(|b| b.kind != BreakKind::Anchor)
                .map(|b| b.seq)
                .collect();
            if let Some(last) = acknowledgeable.iter().max() {
                eprintln!(
                    "once investigated: deploy-agent audit acknowledge --through {last} --reason TEXT"
                );
            }
        }
    }
    for a in &report.acknowledged {
        println!(
            "  acknowledged: record {} ({}): {}; by {} in record {}{}",
            a.problem.seq,
            a.problem.kind,
            a.problem.reason,
            a.acknowledged_by,
            a.acknowledged_in,
            a.acknowledged_because
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    Ok(code)
}

fn open_store(state_dir: &Path) -> Result<Store, i32> {
    let path = state_dir.join("state.db");
    if !path.exists() {
        eprintln!(
            "error: no state store at {}: nothing was ever deployed with this --state-dir",
            path.display()
        );
        return Err(exit::CONFIG);
    }
    Store::open(&path).map_err(|e| {
        eprintln!("error: {e}");
        exit::ENVIRONMENT
    })
}

fn fail(e: OpError) -> i32 {
    eprintln!("error: {}", e.message);
    e.outcome.exit_code()
}

/// This very command line plus `--take-over`, from the path the binary was
/// started from: after a package upgrade that path holds the new binary.
fn successor_command() -> Option<proxy::Successor> {
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(err) => {
            tracing::warn!(
                "cannot find this binary's path ({err}): SIGHUP will not upgrade the proxy"
            );
            return None;
        }
    };
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|arg| arg == "--take-over") {
        args.push("--take-over".into());
    }
    Some(proxy::Successor { program, args })
}

/// One message per SIGHUP.
fn upgrade_requests() -> tokio::sync::mpsc::Receiver<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let _ = tx.try_send(());
                }
            });
        }
        Err(err) => {
            tracing::warn!("cannot handle SIGHUP ({err}): the proxy cannot be upgraded in place")
        }
    }
    rx
}

/// The one shutdown future of both services: SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Prints events: JSON lines, or lines for people (timestamped when not a terminal).
struct Printer {
    json: bool,
    tty: bool,
    exit: Option<i32>,
}

impl Printer {
    fn new(json: bool) -> Printer {
        Printer {
            json,
            tty: std::io::stdout().is_terminal(),
            exit: None,
        }
    }

    fn event(&mut self, e: Event) {
        if let Event::Result(r) = &e {
            self.exit = Some(r.exit_code);
        }
        if self.json {
            if let Ok(line) = serde_json::to_string(&e) {
                println!("{line}");
            }
            return;
        }
        match e {
            Event::Progress(p) => {
                let ts = if self.tty {
                    String::new()
                } else {
                    format!("{} ", timestamp::for_people(&p.ts))
                };
                let svc = p.service.map(|s| format!("[{s}] ")).unwrap_or_default();
                println!("{ts}{} {}: {svc}{}", p.project, p.step, p.message);
            }
            Event::Result(r) => {
                let line = format!(
                    "{} {} of {}: {} in {:.1}s — {}",
                    r.operation.as_str(),
                    r.release,
                    r.project,
                    r.outcome.as_str(),
                    r.duration_ms as f64 / 1000.0,
                    r.message
                );
                let mut extra = Vec::new();
                for h in &r.hooks {
                    extra.push(format!(
                        "  {} {} in {:.1}s{}",
                        h.hook,
                        if h.succeeded { "passed" } else { "FAILED" },
                        h.duration_ms as f64 / 1000.0,
                        h.output_tail
                            .last()
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default()
                    ));
                }
                // Only reported when traffic had moved to the failed release.
                if let Some(ms) = r.switch_back_ms {
                    extra.push(match &r.serving {
                        Some(back) => format!(
                            "  traffic was back on release {back} {ms} ms after the decision to roll back"
                        ),
                        None => format!(
                            "  {}'s ports were out of the proxy {ms} ms after the decision to roll back",
                            r.release
                        ),
                    });
                }
                if r.outcome == Outcome::Succeeded {
                    println!("{line}");
                    extra.iter().for_each(|l| println!("{l}"));
                } else {
                    eprintln!("{line}");
                    extra.iter().for_each(|l| eprintln!("{l}"));
                }
            }
        }
    }

    /// `--no-wait`: the daemon finishes on its own; say so, exit 0.
    fn detached(&mut self) {
        self.exit = Some(exit::SUCCESS);
        let msg = "traffic has switched; the daemon is watching the observation window and rolls back by itself if a gate fails (see `deploy-agent status` and `history`)";
        if self.json {
            println!(
                "{}",
                serde_json::json!({ "type": "detached", "message": msg })
            );
        } else {
            println!("{msg}");
        }
    }

    fn exit_code(&self) -> i32 {
        self.exit.unwrap_or(exit::ENVIRONMENT)
    }
}

fn print_status(report: &StatusReport) {
    match &report.proxy {
        Some(p) if p.running => {
            println!(
                "proxy: running (pid {}), {} listener(s)",
                p.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                p.listeners.len()
            );
            for l in &p.listeners {
                println!("  {l}");
            }
        }
        Some(p) => println!(
            "proxy: NOT RUNNING: {}",
            p.error.as_deref().unwrap_or("it does not answer")
        ),
        None => {}
    }
    if report.projects.is_empty() {
        println!("no projects deployed on {}", report.host);
    }
    for p in &report.projects {
        println!(
            "{}: serving {} since {} (previous: {})",
            p.project,
            p.current.as_deref().unwrap_or("nothing"),
            p.since
                .as_deref()
                .map(timestamp::for_people)
                .unwrap_or_else(|| "-".into()),
            p.previous.as_deref().unwrap_or("-")
        );
        if let Some(op) = &p.operation {
            println!("  operation in progress: {op}");
        }
        for s in &p.services {
            println!("  {} {}", s.service, s.published.join(", "));
            for r in &s.replicas {
                println!("    #{} {} {}", r.replica, r.container, r.state);
            }
            if let Some(d) = p.digests.get(&s.service) {
                println!("    image {d}");
            }
        }
        for d in &p.drift {
            println!("  drift: {d}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option of every command says what it is for.
    #[test]
    fn every_option_has_a_help_line() {
        let missing = deploy_testkit::cli::options_without_help(&Cli::command());
        assert!(
            missing.is_empty(),
            "options without a help line: {missing:?}"
        );
    }

    #[test]
    fn operations_list_their_exit_codes() {
        let mut cli = Cli::command();
        for name in ["deploy", "rollback"] {
            let help = deploy_testkit::cli::help_of(&mut cli, name);
            assert!(
                help.contains("Exit codes:") && help.contains("4  "),
                "{name}:\n{help}"
            );
        }
    }
}
