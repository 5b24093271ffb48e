//! `deploy-controller`: the fleet CLI (see the crate docs and README).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use deploy_controller::client::{Transport, TransportOptions};
use deploy_controller::deploy::{DeployOptions, RollbackOptions};
use deploy_controller::install::{self, InstallOptions};
use deploy_controller::inventory::Inventory;
use deploy_controller::pki::{self, Kind};
use deploy_controller::report::Reporter;
use deploy_controller::{commands, deploy, exit};

/// The exit codes of the fleet commands (README, "Exit codes").
const EXIT_CODES: &str = "Exit codes:
  0  success
  1  a host failed its health gate; every updated host was rolled back
  2  configuration or usage error (inventory, compose file, flag, certificate files); nothing changed
  3  registry authentication failure or image not found; nothing changed
  4  another deployment holds the environment lease
  5  an agent could not be reached, over HTTPS or SSH, or its host is not ready
  6  denied: a safety gate, a missing role, or the agent refused this controller's certificate
  7  MIXED VERSIONS: the hosts do not all run one release";

#[derive(Parser)]
#[command(
    name = "deploy-controller",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("DEPLOY_GIT_COMMIT"), ")"),
    about = "Deploys releases to fleets of deploy-agent hosts: canary, batches, fleet-wide rollback"
)]
struct Cli {
    /// The inventory: environments, hosts, strategy, client certificate.
    #[arg(
        long,
        global = true,
        env = "DEPLOY_INVENTORY",
        default_value = "deploy.toml"
    )]
    inventory: PathBuf,
    /// How to reach the agents: `auto` (HTTPS; SSH only for a host whose
    /// agent cannot be reached), `agent` (HTTPS only) or `ssh` (SSH only).
    #[arg(long, global = true, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Accept and record in known_hosts the SSH key of a host that is not
    /// in it yet (never a changed key). Printed loudly and audited on the host.
    #[arg(long, global = true)]
    accept_new_host_keys: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The private CA and the certificates of agents and clients.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// Deploy a release to every host of an environment.
    #[command(after_help = EXIT_CODES)]
    Deploy(DeployArgs),
    /// Roll every host of an environment back at once.
    #[command(after_help = EXIT_CODES)]
    Rollback {
        /// The environment to roll back.
        #[arg(long)]
        env: String,
        /// The release to go back to (default: each host's previous one).
        #[arg(long)]
        to: Option<String>,
        /// Wait this long for another deployment's environment lease
        /// (default: fail at once, naming its holder).
        #[arg(long, alias = "lock-wait", value_name = "DURATION", value_parser = humantime::parse_duration)]
        lease_wait: Option<Duration>,
        /// Why (recorded in every agent's audit log).
        #[arg(long)]
        reason: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Which release runs where: host × project, digests, health, drift.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// The environment to show.
        #[arg(long)]
        env: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The hosts' deploys and rollbacks, merged, newest first.
    History {
        /// The environment whose history to merge.
        #[arg(long)]
        env: String,
        /// At most this many entries per host.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Approve a release for deploy to an environment: recorded in every
    /// host's audit log under this certificate's identity (it needs the
    /// `approver` role); the environment's `approvals` gate counts them.
    Approve {
        /// The environment whose hosts record the approval.
        #[arg(long)]
        env: String,
        /// The release being approved.
        #[arg(long)]
        release: String,
        /// Why (kept with the approval).
        #[arg(long)]
        reason: Option<String>,
        /// Your own client certificate (PEM) instead of the environment's.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Its private key.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// DORA figures from the hosts' history: deployment frequency, change
    /// failure rate, time to restore, rollback rate.
    Dora {
        /// The environment to measure.
        #[arg(long)]
        env: String,
        /// The period, back from now.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        since: Duration,
        /// The figures as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Install deploy-agent on hosts over SSH: binary (or .deb), agent.toml,
    /// certificates; start the services. Idempotent (docs/ssh.md).
    #[command(after_help = EXIT_CODES)]
    Install {
        /// The environment whose hosts to install.
        #[arg(long)]
        env: String,
        /// Only this host (repeatable; default: every host of the environment).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// The deploy-agent binary to install (default: [install] binary,
        /// else target/debian/deploy-agent_*.deb, else the one next to deploy-controller).
        #[arg(long, conflicts_with = "deb")]
        binary: Option<PathBuf>,
        /// A .deb (packaging/build-deb.sh) to install with dpkg instead.
        #[arg(long)]
        deb: Option<PathBuf>,
        /// Copy the files only; do not enable or start the services.
        #[arg(long)]
        no_start: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The hosts' audit records, merged, oldest first.
    Audit {
        /// The environment whose hosts' audit logs to merge.
        #[arg(long)]
        env: String,
        /// At most this many records per host (newest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Every record, not only the environment's project.
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct DeployArgs {
    /// The environment of the inventory to deploy to.
    #[arg(long)]
    env: String,
    /// The release id (e.g. the commit SHA); `${RELEASE}` in the compose file.
    #[arg(long)]
    release: String,
    /// Interpolation variable `K=V` (repeatable), over the inventory's.
    #[arg(long = "var", value_name = "K=V")]
    vars: Vec<String>,
    /// The compose file (default: the environment's `compose`).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Deploy the digests this environment recorded for the release
    /// (default: the environment's `promote_from`).
    #[arg(long, value_name = "ENV", conflicts_with = "no_promote")]
    promote_from: Option<String>,
    /// Resolve the compose file's tags even if `promote_from` is set.
    #[arg(long)]
    no_promote: bool,
    /// Wait this long for another deployment's environment lease
    /// (default: fail at once, naming its holder).
    #[arg(long, alias = "lock-wait", value_name = "DURATION", value_parser = humantime::parse_duration)]
    lease_wait: Option<Duration>,
    /// Why (recorded in every agent's audit log).
    #[arg(long)]
    reason: Option<String>,
    /// Deploy even if the environment's safety gates (window, blackout,
    /// rate limit, promotion rule) deny it; the reason and the gates
    /// overridden go into every host's audit record.
    #[arg(long = "override", value_name = "REASON")]
    override_reason: Option<String>,
    /// When the release's commit was made (RFC 3339, e.g.
    /// `${{ github.event.head_commit.timestamp }}`): recorded on every
    /// host, for lead time in `dora`.
    #[arg(long, value_name = "TIME")]
    commit_time: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA (ca.pem, ca-key.pem) in DIR.
    Init {
        /// Where the CA's certificate and key are written (keep the key secret).
        #[arg(long)]
        dir: PathBuf,
        /// How long the CA certificate is valid, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate (NAME.pem, NAME-key.pem) signed by DIR's CA.
    Issue {
        /// The CA's directory (from `pki init`); the certificate is written there.
        #[arg(long)]
        dir: PathBuf,
        /// The CN: the identity agents authorize (clients), or the agent's name.
        #[arg(long)]
        name: String,
        /// `agent`: the server certificate of an agent's HTTPS API;
        /// `client`: a controller's or CI job's identity.
        #[arg(long, value_enum)]
        kind: Kind,
        /// A DNS name or IP address the agent is reached at (repeatable).
        #[arg(long = "san", value_name = "HOST_OR_IP")]
        sans: Vec<String>,
        /// How long the certificate is valid, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Both rustls providers may be compiled in; pick one explicitly.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
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
    let code = runtime.block_on(run(cli));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn parse_vars(vars: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for v in vars {
        let Some((k, val)) = v.split_once('=') else {
            return Err(format!("--var {v:?} must be KEY=VALUE"));
        };
        if k.is_empty() {
            return Err(format!("--var {v:?}: the name is empty"));
        }
        m.insert(k.to_string(), val.to_string());
    }
    Ok(m)
}

fn load(path: &std::path::Path) -> Result<Inventory, i32> {
    Inventory::load(path).map_err(|e| {
        eprintln!("error: {e}");
        exit::CONFIG
    })
}

/// One function per command; this one picks it.
async fn run(cli: Cli) -> i32 {
    let transport = TransportOptions {
        transport: cli.transport,
        accept_new_host_keys: cli.accept_new_host_keys,
    };
    let inventory = cli.inventory;
    let with_inventory = || load(&inventory);
    match cli.cmd {
        Cmd::Pki { cmd } => pki_command(cmd),
        Cmd::Deploy(args) => deploy_command(&inventory, args, transport).await,
        Cmd::Rollback {
            env,
            to,
            lease_wait,
            reason,
            json,
        } => {
            let inv = match with_inventory() {
                Ok(i) => i,
                Err(code) => return code,
            };
            let opts = RollbackOptions {
                env,
                to,
                lease_wait,
                reason,
                transport,
            };
            deploy::rollback(&inv, &opts, Arc::new(Reporter::new(json))).await
        }
        Cmd::Install {
            env,
            hosts,
            binary,
            deb,
            no_start,
            json,
        } => {
            let inv = match with_inventory() {
                Ok(i) => i,
                Err(code) => return code,
            };
            let opts = InstallOptions {
                env,
                hosts,
                binary,
                deb,
                no_start,
                transport,
            };
            install::install(&inv, &opts, Arc::new(Reporter::new(json))).await
        }
        Cmd::Status { env, json } => match with_inventory() {
            Ok(inv) => commands::status(&inv, &env, json, &transport).await,
            Err(code) => code,
        },
        Cmd::History { env, limit, json } => match with_inventory() {
            Ok(inv) => commands::history(&inv, &env, limit, json, &transport).await,
            Err(code) => code,
        },
        Cmd::Approve {
            env,
            release,
            reason,
            cert,
            key,
            json,
        } => {
            if transport.transport == Transport::Ssh {
                eprintln!(
                    "error: --transport ssh: an approval is a client certificate's identity, given over the agents' HTTPS API only"
                );
                return exit::CONFIG;
            }
            match with_inventory() {
                Ok(inv) => {
                    commands::approve(&inv, &env, &release, reason, cert.zip(key), json).await
                }
                Err(code) => code,
            }
        }
        Cmd::Dora { env, since, json } => match with_inventory() {
            Ok(inv) => commands::dora(&inv, &env, since, json, &transport).await,
            Err(code) => code,
        },
        Cmd::Audit {
            env,
            limit,
            all,
            json,
        } => match with_inventory() {
            Ok(inv) => commands::audit(&inv, &env, all, limit, json, &transport).await,
            Err(code) => code,
        },
    }
}

fn pki_command(cmd: PkiCmd) -> i32 {
    let done = match cmd {
        PkiCmd::Init { dir, days } => pki::init(&dir, days).map(|files| {
            format!(
                "CA created: {} (keep {} secret)",
                files.cert.display(),
                files.key.display()
            )
        }),
        PkiCmd::Issue {
            dir,
            name,
            kind,
            sans,
            days,
        } => pki::issue(&dir, &name, kind, &sans, days).map(|files| {
            format!(
                "issued {} certificate {}: {} (key {})",
                match kind {
                    Kind::Agent => "agent",
                    Kind::Client => "client",
                },
                name,
                files.cert.display(),
                files.key.display()
            )
        }),
    };
    match done {
        Ok(line) => {
            println!("{line}");
            exit::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::CONFIG
        }
    }
}

async fn deploy_command(
    inventory: &std::path::Path,
    args: DeployArgs,
    transport: TransportOptions,
) -> i32 {
    if let Some(t) = &args.commit_time
        && let Err(e) = t.parse::<jiff::Timestamp>()
    {
        eprintln!(
            "error: --commit-time {t:?} is not an RFC 3339 time like 2026-12-01T09:30:00Z: {e}"
        );
        return exit::CONFIG;
    }
    if args
        .override_reason
        .as_deref()
        .is_some_and(|r| r.trim().is_empty())
    {
        eprintln!(
            "error: --override needs a reason (e.g. --override \"hotfix for INC-123\"): it is audited on every host"
        );
        return exit::CONFIG;
    }
    let vars = match parse_vars(&args.vars) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::CONFIG;
        }
    };
    let inv = match load(inventory) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let out = Arc::new(Reporter::new(args.json));
    let opts = DeployOptions {
        env: args.env,
        release: args.release,
        vars,
        file: args.file,
        promote_from: args.promote_from,
        no_promote: args.no_promote,
        lease_wait: args.lease_wait,
        reason: args.reason,
        transport,
        override_reason: args.override_reason,
        commit_time: args.commit_time,
    };
    deploy::deploy(&inv, &opts, out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

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
    fn fleet_commands_list_their_exit_codes() {
        let mut cli = Cli::command();
        for name in ["deploy", "rollback", "status", "install"] {
            let help = deploy_testkit::cli::help_of(&mut cli, name);
            assert!(
                help.contains("Exit codes:") && help.contains("7  "),
                "{name}:\n{help}"
            );
        }
    }

    #[test]
    fn vars() {
        assert_eq!(
            parse_vars(&["A=1".into(), "B=x=y".into()]).unwrap(),
            BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x=y".into())])
        );
        assert!(parse_vars(&["A".into()]).is_err());
        assert!(parse_vars(&["=1".into()]).is_err());
    }
}
