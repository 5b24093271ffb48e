//! The inventory (`deploy.toml`): environments, their hosts and agents, the
//! compose project, the rollout strategy, and the client certificate.
//!
//! Strict: an unknown key is an error naming it (with its line), and every
//! value is checked when the file is loaded, before anything is contacted.
//! Relative paths are relative to the inventory file's directory.
//!
//! ```toml
//! [tls]                          # default client certificate (any environment may override it)
//! ca = "pki/ca.pem"
//! cert = "pki/ci.pem"
//! key = "pki/ci-key.pem"
//!
//! [environments.production]
//! project = "shop"
//! compose = "compose.yml"
//! promote_from = "staging"       # deploy the digests staging recorded for the release
//! observation = "5m"             # passed to the agents (their observation window)
//! lock_ttl = "60s"               # the environment lock's lease, renewed while the controller runs
//! vars = { DOMAIN = "shop.example.com" }
//! strategy = { canary = 1, batch = "50%", pause = "30s", max_failed = 0 }
//!
//! [environments.production.policy]   # safety gates (crate::policy); rollbacks are never gated
//! timezone = "America/New_York"      # windows and blackout dates are read here (default UTC)
//! windows = ["Mon-Thu 09:00-15:00"]  # deploys only inside one of these
//! blackouts = ["2026-12-24..2027-01-02"]
//! rate_limit = "1/4h"                # at most 1 successful deploy per 4 hours
//! promotion = { min_age = "24h", still_serving = true }  # ran in promote_from that long ago, still serves there
//! approvals = { min = 2, timeout = "24h" }  # distinct approver identities (deploy-controller approve)
//!
//! [[environments.production.hosts]]
//! name = "web-1"
//! agent = "web-1.internal:7443"
//! vars = { PORT = "8080" }       # per-host interpolation variables
//! ssh = { user = "deploy", key_env = "DEPLOY_SSH_KEY", known_hosts = "known_hosts" }  # SSH fallback
//! ```
//!
//! The SSH fallback (docs/ssh.md): a host's `ssh` table, over the
//! environment's `ssh` table (defaults for every host). `connect_timeout`
//! bounds the connection to an agent (and to sshd) before the controller
//! counts it unreachable. `[environments.E.install]` feeds
//! `deploy-controller install`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::fleet::{Batch, Canary, Strategy};
use crate::policy::{self, Policy};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(
        "cannot read the inventory {}: {source}; pass it with --inventory FILE or DEPLOY_INVENTORY",
        path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid inventory {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error(
        "environment {name:?} is not in the inventory {}; it has: {known}",
        path.display()
    )]
    UnknownEnvironment {
        path: PathBuf,
        name: String,
        known: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    environments: BTreeMap<String, RawEnvironment>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    project: String,
    compose: PathBuf,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    promote_from: Option<String>,
    #[serde(default)]
    observation: Option<String>,
    #[serde(default)]
    lock_ttl: Option<String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    #[serde(default)]
    strategy: RawStrategy,
    #[serde(default)]
    hosts: Vec<RawHost>,
    // --- SSH fallback ---
    #[serde(default)]
    ssh: Option<RawSsh>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    install: Option<RawInstall>,
    /// The safety gates (`crate::policy`).
    #[serde(default)]
    policy: Option<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    windows: Vec<String>,
    #[serde(default)]
    blackouts: Vec<String>,
    #[serde(default)]
    rate_limit: Option<String>,
    #[serde(default)]
    promotion: Option<RawPromotionRule>,
    #[serde(default)]
    approvals: Option<RawApprovalRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovalRule {
    min: usize,
    #[serde(default)]
    timeout: Option<String>,
}

/// How long an approval counts when `approvals.timeout` is not set.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPromotionRule {
    #[serde(default)]
    min_age: Option<String>,
    #[serde(default)]
    still_serving: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStrategy {
    #[serde(default)]
    canary: Option<CanaryValue>,
    #[serde(default)]
    batch: Option<BatchValue>,
    #[serde(default)]
    pause: Option<String>,
    #[serde(default)]
    max_failed: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CanaryValue {
    Count(usize),
    Hosts(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BatchValue {
    Count(usize),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    agent: String,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    #[serde(default)]
    ssh: Option<RawSsh>,
}

// --- SSH fallback ---------------------------------------------------

/// An `ssh` table, of a host or of an environment (defaults for its hosts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    /// Where sshd listens (default: the host part of `agent`).
    #[serde(default, alias = "host")]
    address: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    user: Option<String>,
    /// A private key file (OpenSSH format; ed25519 or RSA, unencrypted).
    #[serde(default)]
    key: Option<PathBuf>,
    /// The name of an environment variable holding the private key's text
    /// (for CI secrets), instead of `key`.
    #[serde(default)]
    key_env: Option<String>,
    #[serde(default)]
    known_hosts: Option<PathBuf>,
    /// The remote command that runs deploy-agent (default `deploy-agent`),
    /// e.g. `"/usr/bin/deploy-agent"` or `"sudo -n /usr/bin/deploy-agent"`.
    #[serde(default)]
    command: Option<String>,
    /// Environment variables set for it (`env K=V … command`), e.g.
    /// `DEPLOY_AGENT_STATE_DIR`.
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
}

impl RawSsh {
    /// `self` (the host's) over `base` (the environment's).
    fn over(&self, base: &RawSsh) -> RawSsh {
        RawSsh {
            address: self.address.clone().or_else(|| base.address.clone()),
            port: self.port.or(base.port),
            user: self.user.clone().or_else(|| base.user.clone()),
            key: self.key.clone().or_else(|| base.key.clone()),
            key_env: self.key_env.clone().or_else(|| base.key_env.clone()),
            known_hosts: self
                .known_hosts
                .clone()
                .or_else(|| base.known_hosts.clone()),
            command: self.command.clone().or_else(|| base.command.clone()),
            env: self.env.clone().or_else(|| base.env.clone()),
        }
    }
}

/// Where the SSH fallback's private key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshKeySource {
    File(PathBuf),
    /// The name of an environment variable holding the key's text.
    Env(String),
}

impl std::fmt::Display for SshKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshKeySource::File(p) => write!(f, "key file {}", p.display()),
            SshKeySource::Env(v) => write!(f, "key in ${v}"),
        }
    }
}

/// A host's SSH details, checked and complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSettings {
    pub address: String,
    pub port: u16,
    pub user: String,
    pub key: SshKeySource,
    pub known_hosts: PathBuf,
    /// The remote command that runs deploy-agent.
    pub command: String,
    pub env: BTreeMap<String, String>,
}

impl SshSettings {
    /// `user@address:port`, for messages.
    pub fn target(&self) -> String {
        format!("{}@{}:{}", self.user, self.address, self.port)
    }
}

/// `[environments.E.install]`: what `deploy-controller install` copies.
/// Paths may contain `{host}`, replaced by each host's name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstall {
    #[serde(default)]
    agent_toml: Option<String>,
    #[serde(default)]
    tls_cert: Option<String>,
    #[serde(default)]
    tls_key: Option<String>,
    #[serde(default)]
    tls_ca: Option<String>,
    #[serde(default)]
    binary: Option<String>,
    #[serde(default)]
    deb: Option<String>,
    #[serde(default)]
    root: Option<String>,
    #[serde(default)]
    sudo: Option<bool>,
}

/// `[environments.E.install]`, with local paths resolved (still holding
/// `{host}` where given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallSettings {
    /// The host's agent.toml (local file).
    pub agent_toml: Option<String>,
    /// The local files installed where that agent.toml's `tls_cert`,
    /// `tls_key` and `tls_ca` say.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_ca: Option<String>,
    /// The deploy-agent binary to copy (default: the one next to
    /// deploy-controller), or a .deb to install instead.
    pub binary: Option<String>,
    pub deb: Option<String>,
    /// A prefix of every remote path (default `/`): `/tmp/x` installs into
    /// `/tmp/x/usr/bin/deploy-agent` etc. and starts nothing.
    pub root: String,
    /// Run the remote commands with `sudo -n` (an SSH user that is not root).
    pub sudo: bool,
}

/// The default of `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn valid_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks a host's merged `ssh` table.
fn ssh_settings(
    raw: &RawSsh,
    agent: &str,
    at: &str,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<SshSettings, String> {
    let address = match &raw.address {
        Some(a) if a.trim().is_empty() || a.contains(char::is_whitespace) => {
            return Err(format!(
                "`{at}.address` {a:?} is not a host name or address"
            ));
        }
        Some(a) => a.clone(),
        None => agent
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .unwrap_or_default(),
    };
    let port = raw.port.unwrap_or(22);
    if port == 0 {
        return Err(format!("`{at}.port` must be a port number (1-65535)"));
    }
    let user = match &raw.user {
        Some(u) if !u.is_empty() && !u.contains(char::is_whitespace) => u.clone(),
        Some(u) => return Err(format!("`{at}.user` {u:?} is not a user name")),
        None => {
            return Err(format!(
                "`{at}` has no `user`: the SSH fallback needs the login, e.g. user = \"deploy\""
            ));
        }
    };
    let key = match (&raw.key, &raw.key_env) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "`{at}` sets both `key` and `key_env`: give the private key one way"
            ));
        }
        (Some(k), None) => SshKeySource::File(resolve(k)),
        (None, Some(v)) if valid_env_name(v) => SshKeySource::Env(v.clone()),
        (None, Some(v)) => {
            return Err(format!(
                "`{at}.key_env` {v:?} is not an environment variable name"
            ));
        }
        (None, None) => {
            return Err(format!(
                "`{at}` has no private key: set `key` (a file) or `key_env` (an environment variable holding it, e.g. \"DEPLOY_SSH_KEY\")"
            ));
        }
    };
    let Some(known_hosts) = &raw.known_hosts else {
        return Err(format!(
            "`{at}` has no `known_hosts`: host keys are always verified; give the file that lists this host's key \
             (ssh-keyscan -p {port} {address} > known_hosts)"
        ));
    };
    let command = raw
        .command
        .clone()
        .unwrap_or_else(|| "deploy-agent".to_string());
    if command.trim().is_empty() {
        return Err(format!("`{at}.command` is empty"));
    }
    let env = raw.env.clone().unwrap_or_default();
    if let Some(k) = env.keys().find(|k| !valid_env_name(k)) {
        return Err(format!(
            "`{at}.env` key {k:?} is not an environment variable name"
        ));
    }
    Ok(SshSettings {
        address,
        port,
        user,
        key,
        known_hosts: resolve(known_hosts),
        command,
        env,
    })
}

// --- end SSH fallback -------------------------------------------------------------

/// The client certificate the controller presents, and the CA it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// `host:port` of the agent's HTTPS API.
    pub agent: String,
    pub vars: BTreeMap<String, String>,
    /// The SSH fallback: `None` when neither the host nor its
    /// environment has an `ssh` table.
    pub ssh: Option<SshSettings>,
}

#[derive(Debug, Clone)]
pub struct Environment {
    pub name: String,
    pub project: String,
    /// The compose file (absolute or relative to the working directory).
    pub compose: PathBuf,
    /// The client certificate for the agents' HTTPS API; `None`: every
    /// host is reached over SSH.
    pub tls: Option<TlsFiles>,
    pub promote_from: Option<String>,
    pub observation: Option<Duration>,
    pub lock_ttl: Duration,
    pub vars: BTreeMap<String, String>,
    pub strategy: Strategy,
    pub hosts: Vec<Host>,
    /// How long a connection to an agent (and to sshd) may take before
    /// the host counts as unreachable.
    pub connect_timeout: Duration,
    /// `[environments.E.install]`.
    pub install: Option<InstallSettings>,
    /// `[environments.E.policy]`: the safety gates of a deploy.
    pub policy: Option<Policy>,
}

impl Environment {
    /// The interpolation variables of `host`: the environment's, then the
    /// host's, then the command line's (`--var`), later ones winning.
    pub fn vars_for(
        &self,
        host: &Host,
        cli: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut v = self.vars.clone();
        v.extend(host.vars.clone());
        v.extend(cli.clone());
        v
    }
}

#[derive(Debug, Clone)]
pub struct Inventory {
    pub path: PathBuf,
    pub environments: BTreeMap<String, Environment>,
}

/// The default lease of the environment lock.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(60);

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Inventory::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
        let r = Reader::new(path);
        let raw: RawInventory = toml::from_str(text).map_err(|e| {
            let hint = deploy_protocol::suggest::hint(e.message());
            r.invalid(format!("{e}{hint}"))
        })?;
        if raw.environments.is_empty() {
            return Err(
                r.invalid("no environments: add at least one [environments.NAME] table".into())
            );
        }
        let mut environments = BTreeMap::new();
        for (name, e) in &raw.environments {
            environments.insert(name.clone(), r.environment(&raw, name, e)?);
        }
        Ok(Inventory {
            path: path.to_path_buf(),
            environments,
        })
    }

    pub fn environment(&self, name: &str) -> Result<&Environment, InventoryError> {
        self.environments
            .get(name)
            .ok_or_else(|| InventoryError::UnknownEnvironment {
                path: self.path.clone(),
                name: name.to_string(),
                known: self
                    .environments
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// `[environments.E.policy]`, checked; errors name the key.
fn policy_of(p: &RawPolicy, at: &str, promotes: bool) -> Result<Policy, String> {
    let pat = format!("{at}.policy");
    let timezone_name = p.timezone.clone().unwrap_or_else(|| "UTC".to_string());
    let timezone =
        policy::parse_timezone(&timezone_name).map_err(|m| format!("`{pat}.timezone`: {m}"))?;
    let windows = p
        .windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            policy::parse_window(w).map_err(|m| format!("`{pat}.windows[{i}]` {w:?}: {m}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let blackouts = p
        .blackouts
        .iter()
        .enumerate()
        .map(|(i, b)| {
            policy::parse_blackout(b).map_err(|m| format!("`{pat}.blackouts[{i}]` {b:?}: {m}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rate_limit = p
        .rate_limit
        .as_ref()
        .map(|r| policy::parse_rate_limit(r).map_err(|m| format!("`{pat}.rate_limit` {r:?}: {m}")))
        .transpose()?;
    let (mut promotion_min_age, mut promotion_still_serving) = (None, false);
    if let Some(rule) = &p.promotion {
        if !promotes {
            return Err(format!(
                "`{pat}.promotion` needs `{at}.promote_from` (the environment the release must have run in)"
            ));
        }
        promotion_min_age = rule
            .min_age
            .as_ref()
            .map(|s| {
                humantime::parse_duration(s).map_err(|err| {
                    format!("`{pat}.promotion.min_age` {s:?} is not a duration like \"24h\": {err}")
                })
            })
            .transpose()?;
        promotion_still_serving = rule.still_serving.unwrap_or(false);
    }
    let approvals = match &p.approvals {
        None => None,
        Some(a) => {
            if a.min == 0 {
                return Err(format!(
                    "`{pat}.approvals.min` must be at least 1 (remove `approvals` for none)"
                ));
            }
            let timeout = match &a.timeout {
                None => DEFAULT_APPROVAL_TIMEOUT,
                Some(s) => humantime::parse_duration(s).map_err(|err| {
                    format!("`{pat}.approvals.timeout` {s:?} is not a duration like \"4h\": {err}")
                })?,
            };
            Some(policy::ApprovalRule {
                min: a.min,
                timeout,
            })
        }
    };
    Ok(Policy {
        approvals,
        timezone,
        timezone_name,
        windows,
        blackouts,
        rate_limit,
        promotion_min_age,
        promotion_still_serving,
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `host:port` (an `https://` prefix and a trailing `/` are accepted).
fn normalize_agent(s: &str) -> Result<String, String> {
    if s.starts_with("http://") {
        return Err(
            "the agent API is HTTPS only (mutual TLS): use host:port or https://host:port".into(),
        );
    }
    let t = s.trim_start_matches("https://").trim_end_matches('/');
    let (host, port) = t
        .rsplit_once(':')
        .ok_or_else(|| "give host:port, e.g. \"web-1.internal:7443\"".to_string())?;
    if host.is_empty() || host.contains('/') {
        return Err("give host:port, e.g. \"web-1.internal:7443\"".into());
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a port number"))?;
    Ok(t.to_string())
}

/// `"3"` or `"25%"`.
fn parse_batch(t: &str) -> Result<Batch, String> {
    let t = t.trim();
    if let Some(p) = t.strip_suffix('%') {
        let n: u32 = p
            .trim()
            .parse()
            .map_err(|_| "a percentage must look like \"25%\"".to_string())?;
        if n == 0 || n > 100 {
            return Err("a percentage must be between 1% and 100%".into());
        }
        return Ok(Batch::Percent(n));
    }
    match t.parse::<usize>() {
        Ok(0) | Err(_) => {
            Err("give a number of hosts (at least 1) or a percentage like \"25%\"".into())
        }
        Ok(n) => Ok(Batch::Count(n)),
    }
}

/// Reads deploy.toml's tables into checked settings; every error names the
/// file and the key.
struct Reader<'a> {
    path: &'a Path,
    /// Relative paths are relative to the inventory's directory.
    base: PathBuf,
}

impl<'a> Reader<'a> {
    fn new(path: &'a Path) -> Reader<'a> {
        Reader {
            path,
            base: path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        }
    }

    fn invalid(&self, message: String) -> InventoryError {
        InventoryError::Invalid {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// One `[environments.NAME]` table.
    fn environment(
        &self,
        raw: &RawInventory,
        name: &String,
        e: &RawEnvironment,
    ) -> Result<Environment, InventoryError> {
        let invalid = |m: String| self.invalid(m);
        let resolve = |p: &Path| self.resolve(p);
        let at = format!("environments.{name}");
        if !valid_name(name) {
            return Err(invalid(format!(
                "`{at}`: the name must be 1-64 characters of letters, digits, `-`, `_` and `.`"
            )));
        }
        // No client certificate: the environment is reached over SSH only.
        let tls = e
            .tls
            .clone()
            .or_else(|| raw.tls.clone())
            .map(|tls| TlsFiles {
                ca: resolve(&tls.ca),
                cert: resolve(&tls.cert),
                key: resolve(&tls.key),
            });
        if e.hosts.is_empty() {
            return Err(invalid(format!(
                "`{at}` has no hosts: add [[{at}.hosts]] with name and agent"
            )));
        }
        let hosts = self.hosts(&at, e, tls.is_some())?;
        let duration =
            |key: &str, v: &Option<String>| -> Result<Option<Duration>, InventoryError> {
                v.as_ref()
                    .map(|s| {
                        humantime::parse_duration(s).map_err(|err| {
                            invalid(format!(
                                "`{at}.{key}` {s:?} is not a duration like \"30s\" or \"5m\": {err}"
                            ))
                        })
                    })
                    .transpose()
            };
        let observation = duration("observation", &e.observation)?;
        let connect_timeout =
            duration("connect_timeout", &e.connect_timeout)?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        if connect_timeout < Duration::from_millis(100) {
            return Err(invalid(format!(
                "`{at}.connect_timeout` must be at least 100ms"
            )));
        }
        let install = self.install(&at, e)?;
        let lock_ttl = duration("lock_ttl", &e.lock_ttl)?.unwrap_or(DEFAULT_LOCK_TTL);
        if lock_ttl < Duration::from_secs(1) {
            return Err(invalid(format!(
                "`{at}.lock_ttl` must be at least 1s (the lease is renewed every third of it)"
            )));
        }
        let pause = duration("strategy.pause", &e.strategy.pause)?.unwrap_or_default();
        let strategy = self.strategy(&at, e, &hosts, pause)?;
        if let Some(src) = &e.promote_from {
            if src == name {
                return Err(invalid(format!(
                    "`{at}.promote_from` names the environment itself"
                )));
            }
            if !raw.environments.contains_key(src) {
                return Err(invalid(format!(
                    "`{at}.promote_from` names environment {src:?}, which is not in the inventory"
                )));
            }
        }
        let policy = match &e.policy {
            None => None,
            Some(p) => Some(policy_of(p, &at, e.promote_from.is_some()).map_err(invalid)?),
        };
        let project = e.project.clone();
        if project.is_empty() {
            return Err(invalid(format!("`{at}.project` is empty")));
        }
        Ok(Environment {
            name: name.clone(),
            project,
            compose: resolve(&e.compose),
            tls,
            promote_from: e.promote_from.clone(),
            observation,
            lock_ttl,
            vars: e.vars.clone(),
            strategy,
            hosts,
            connect_timeout,
            install,
            policy,
        })
    }

    /// `[environments.E.install]`: what `deploy-controller install` copies.
    fn install(
        &self,
        at: &str,
        e: &RawEnvironment,
    ) -> Result<Option<InstallSettings>, InventoryError> {
        let invalid = |m: String| self.invalid(m);
        let resolve = |p: &Path| self.resolve(p);
        let install = e.install.as_ref().map(|i| {
            let path = |p: &Option<String>| {
                p.as_ref()
                    .map(|p| resolve(Path::new(p)).display().to_string())
            };
            InstallSettings {
                agent_toml: path(&i.agent_toml),
                tls_cert: path(&i.tls_cert),
                tls_key: path(&i.tls_key),
                tls_ca: path(&i.tls_ca),
                binary: path(&i.binary),
                deb: path(&i.deb),
                root: i.root.clone().unwrap_or_else(|| "/".into()),
                sudo: i.sudo.unwrap_or(false),
            }
        });
        if let Some(i) = &install {
            if i.binary.is_some() && i.deb.is_some() {
                return Err(invalid(format!(
                    "`{at}.install` sets both `binary` and `deb`: install one or the other"
                )));
            }
            if !i.root.starts_with('/') {
                return Err(invalid(format!(
                    "`{at}.install.root` {:?} must be an absolute path",
                    i.root
                )));
            }
        }
        Ok(install)
    }

    /// `[environments.E.strategy]`: canary, batches, pause.
    fn strategy(
        &self,
        at: &str,
        e: &RawEnvironment,
        hosts: &[Host],
        pause: Duration,
    ) -> Result<Strategy, InventoryError> {
        let invalid = |m: String| self.invalid(m);
        let canary = match &e.strategy.canary {
            None => Canary::Count(1),
            Some(CanaryValue::Count(n)) => Canary::Count(*n),
            Some(CanaryValue::Hosts(names)) => {
                for n in names {
                    if !hosts.iter().any(|h| &h.name == n) {
                        return Err(invalid(format!(
                            "`{at}.strategy.canary` names host {n:?}, which is not among the hosts of {at}"
                        )));
                    }
                }
                Canary::Hosts(names.clone())
            }
        };
        let batch = match &e.strategy.batch {
            None => Batch::Count(1),
            Some(BatchValue::Count(0)) => {
                return Err(invalid(format!(
                    "`{at}.strategy.batch` must be at least 1 (or a percentage like \"50%\")"
                )));
            }
            Some(BatchValue::Count(n)) => Batch::Count(*n),
            Some(BatchValue::Text(t)) => {
                parse_batch(t).map_err(|m| invalid(format!("`{at}.strategy.batch` {t:?}: {m}")))?
            }
        };
        Ok(Strategy {
            canary,
            batch,
            pause,
            max_failed: e.strategy.max_failed.unwrap_or(0),
        })
    }

    /// The hosts of an environment, each reachable over HTTPS or SSH.
    fn hosts(
        &self,
        at: &str,
        e: &RawEnvironment,
        has_tls: bool,
    ) -> Result<Vec<Host>, InventoryError> {
        let invalid = |m: String| self.invalid(m);
        let resolve = |p: &Path| self.resolve(p);
        let mut hosts: Vec<Host> = Vec::new();
        for (i, h) in e.hosts.iter().enumerate() {
            let hat = format!("{at}.hosts[{i}]");
            if !valid_name(&h.name) {
                return Err(invalid(format!(
                    "`{hat}.name` {:?} must be 1-64 characters of letters, digits, `-`, `_` and `.`",
                    h.name
                )));
            }
            if hosts.iter().any(|x| x.name == h.name) {
                return Err(invalid(format!(
                    "`{hat}.name`: host {} is listed twice in {at}",
                    h.name
                )));
            }
            let agent = normalize_agent(&h.agent)
                .map_err(|m| invalid(format!("`{hat}.agent` {:?}: {m}", h.agent)))?;
            // the host's ssh table over the environment's.
            let ssh = match (&h.ssh, &e.ssh) {
                (None, None) => None,
                (host_ssh, env_ssh) => {
                    let merged = host_ssh
                        .clone()
                        .unwrap_or_default()
                        .over(&env_ssh.clone().unwrap_or_default());
                    let sat = if h.ssh.is_some() {
                        format!("{hat}.ssh")
                    } else {
                        format!("{at}.ssh")
                    };
                    Some(ssh_settings(&merged, &agent, &sat, &resolve).map_err(invalid)?)
                }
            };
            if !has_tls && ssh.is_none() {
                return Err(invalid(format!(
                    "`{hat}` (host {}) cannot be reached: `{at}` has no client certificate for the agents' HTTPS API \
                     and the host has no `ssh` table; add `[{at}.tls]` (or a top-level `[tls]`) with ca, cert and key \
                     (`deploy-controller pki issue --kind client` makes them), or an `ssh` table to the host or the environment",
                    h.name
                )));
            }
            hosts.push(Host {
                name: h.name.clone(),
                agent,
                vars: h.vars.clone(),
                ssh,
            });
        }
        Ok(hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[tls]
ca = "pki/ca.pem"
cert = "pki/ci.pem"
key = "pki/ci-key.pem"

[environments.staging]
project = "shop"
compose = "compose.yml"
[[environments.staging.hosts]]
name = "s1"
agent = "s1.internal:7443"

[environments.production]
project = "shop"
compose = "/srv/compose.yml"
promote_from = "staging"
observation = "2m"
lock_ttl = "30s"
vars = { DOMAIN = "shop.example.com", PORT = "80" }
strategy = { canary = ["p2"], batch = "50%", pause = "10s", max_failed = 1 }
[environments.production.tls]
ca = "/etc/ca.pem"
cert = "prod.pem"
key = "prod-key.pem"
[[environments.production.hosts]]
name = "p1"
agent = "https://10.0.0.1:7443/"
vars = { PORT = "8080" }
ssh = { user = "deploy", port = 2222, known_hosts = "kh", key_env = "DEPLOY_SSH_KEY" }
[[environments.production.hosts]]
name = "p2"
agent = "p2:7443"
"#;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(Path::new("/etc/deploy/deploy.toml"), text)
    }

    #[test]
    fn a_full_inventory() {
        let inv = parse(GOOD).unwrap();
        let s = inv.environment("staging").unwrap();
        assert_eq!(
            s.tls.as_ref().unwrap().ca,
            PathBuf::from("/etc/deploy/pki/ca.pem")
        );
        assert_eq!(s.compose, PathBuf::from("/etc/deploy/compose.yml"));
        assert_eq!(s.strategy.canary, Canary::Count(1));
        assert_eq!(s.strategy.batch, Batch::Count(1));
        assert_eq!(s.lock_ttl, DEFAULT_LOCK_TTL);
        let p = inv.environment("production").unwrap();
        let tls = p.tls.as_ref().unwrap();
        assert_eq!(tls.ca, PathBuf::from("/etc/ca.pem"));
        assert_eq!(tls.cert, PathBuf::from("/etc/deploy/prod.pem"));
        assert_eq!(p.compose, PathBuf::from("/srv/compose.yml"));
        assert_eq!(p.promote_from.as_deref(), Some("staging"));
        assert_eq!(p.observation, Some(Duration::from_secs(120)));
        assert_eq!(p.lock_ttl, Duration::from_secs(30));
        assert_eq!(p.strategy.canary, Canary::Hosts(vec!["p2".into()]));
        assert_eq!(p.strategy.batch, Batch::Percent(50));
        assert_eq!(p.strategy.pause, Duration::from_secs(10));
        assert_eq!(p.strategy.max_failed, 1);
        assert_eq!(p.hosts[0].agent, "10.0.0.1:7443");
        let ssh = p.hosts[0].ssh.as_ref().unwrap();
        assert_eq!(ssh.port, 2222);
        assert_eq!(ssh.address, "10.0.0.1");
        assert_eq!(ssh.known_hosts, PathBuf::from("/etc/deploy/kh"));
        assert_eq!(ssh.key, SshKeySource::Env("DEPLOY_SSH_KEY".into()));
        assert_eq!(ssh.command, "deploy-agent");
        assert_eq!(p.hosts[1].ssh, None);
        assert_eq!(p.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        let cli = BTreeMap::from([("DOMAIN".to_string(), "x".to_string())]);
        let v = p.vars_for(&p.hosts[0], &cli);
        assert_eq!(v["PORT"], "8080");
        assert_eq!(v["DOMAIN"], "x");
        assert_eq!(p.vars_for(&p.hosts[1], &BTreeMap::new())["PORT"], "80");
    }

    #[test]
    fn a_mistyped_key_suggests_the_nearest_one() {
        let text = GOOD.replace("lock_ttl = \"30s\"", "lock_tll = \"30s\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("did you mean `lock_ttl`?"), "{e}");
    }

    #[test]
    fn without_a_certificate_every_host_needs_ssh() {
        let ssh_only = "[environments.a]\nproject = \"p\"\ncompose = \"c\"\n\
            ssh = { user = \"deploy\", key = \"k\", known_hosts = \"kh\" }\n\
            [[environments.a.hosts]]\nname = \"h\"\nagent = \"h:7443\"\n";
        let inv = parse(ssh_only).unwrap();
        let a = inv.environment("a").unwrap();
        assert_eq!(a.tls, None);
        assert_eq!(a.hosts[0].ssh.as_ref().unwrap().address, "h");
        let one_without = format!(
            "{ssh_only}[[environments.a.hosts]]\nname = \"g\"\nagent = \"g:7443\"\nssh = {{ user = \"x\" }}\n\
             [environments.b]\nproject = \"p\"\ncompose = \"c\"\n[[environments.b.hosts]]\nname = \"z\"\nagent = \"z:7443\"\n"
        );
        let e = parse(&one_without).unwrap_err().to_string();
        assert!(
            e.contains("environments.b.hosts[0]")
                && e.contains("host z")
                && e.contains("no client certificate"),
            "{e}"
        );
    }

    #[test]
    fn unknown_environment_lists_the_known_ones() {
        let inv = parse(GOOD).unwrap();
        let e = inv.environment("prod").unwrap_err().to_string();
        assert!(
            e.contains("\"prod\"") && e.contains("production, staging"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            (
                "[environments.a]\nproject = \"p\"\ncompose = \"c\"\nbogus = 1\n",
                "bogus",
            ),
            (
                "[environments.a]\nproject = \"p\"\ncompose = \"c\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n",
                "client certificate",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\n",
                "no hosts",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h\"\n",
                "environments.a.hosts[0].agent",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"http://h:1\"\n",
                "HTTPS only",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\nstrategy = { batch = \"0%\" }\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n",
                "strategy.batch",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\nstrategy = { canary = [\"zz\"] }\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n",
                "zz",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\npromote_from = \"nope\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n",
                "promote_from",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\nobservation = \"soon\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n",
                "observation",
            ),
            (
                "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:2\"\n",
                "twice",
            ),
            ("", "no environments"),
        ];
        let base = "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\n[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n";
        let policy_cases: Vec<(String, &str)> = [
            (
                "timezone = \"Mars/Base\"",
                "`environments.a.policy.timezone`",
            ),
            (
                "windows = [\"Mon-Thu 09:00-15:00\", \"Fri 9-5\"]",
                "`environments.a.policy.windows[1]` \"Fri 9-5\"",
            ),
            (
                "blackouts = [\"2026-02-30\"]",
                "`environments.a.policy.blackouts[0]`",
            ),
            (
                "rate_limit = \"often\"",
                "`environments.a.policy.rate_limit` \"often\"",
            ),
            (
                "promotion = { min_age = \"24h\" }",
                "needs `environments.a.promote_from`",
            ),
            ("approvers = 2", "approvers"),
            (
                "approvals = { min = 0 }",
                "`environments.a.policy.approvals.min` must be at least 1",
            ),
            (
                "approvals = { min = 1, timeout = \"later\" }",
                "`environments.a.policy.approvals.timeout`",
            ),
        ]
        .into_iter()
        .map(|(line, needle)| (format!("{base}[environments.a.policy]\n{line}\n"), needle))
        .collect();
        let cases: Vec<(&str, &str)> = cases
            .iter()
            .copied()
            .chain(policy_cases.iter().map(|(t, n)| (t.as_str(), *n)))
            .collect();
        for (text, needle) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "expected {needle:?} in: {e}");
            assert!(e.contains("/etc/deploy/deploy.toml"), "{e}");
        }
    }

    #[test]
    fn a_policy_is_read_per_environment() {
        let inv = parse(
            "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n\
             [environments.staging]\nproject = \"p\"\ncompose = \"c\"\n[[environments.staging.hosts]]\nname = \"s\"\nagent = \"s:1\"\n\
             [environments.production]\nproject = \"p\"\ncompose = \"c\"\npromote_from = \"staging\"\n\
             [environments.production.policy]\ntimezone = \"America/New_York\"\nwindows = [\"Mon-Thu 09:00-15:00\"]\n\
             blackouts = [\"2026-12-24..2027-01-02\"]\nrate_limit = \"1/4h\"\npromotion = { min_age = \"24h\", still_serving = true }\n\
             [[environments.production.hosts]]\nname = \"h\"\nagent = \"h:1\"\n",
        )
        .unwrap();
        assert!(inv.environments["staging"].policy.is_none());
        let p = inv.environments["production"].policy.as_ref().unwrap();
        assert_eq!(p.timezone_name, "America/New_York");
        assert_eq!(p.windows.len(), 1);
        assert_eq!(p.blackouts.len(), 1);
        assert_eq!(
            p.rate_limit.as_ref().map(|r| (r.max, r.per)),
            Some((1, Duration::from_secs(4 * 3600)))
        );
        assert_eq!(p.promotion_min_age, Some(Duration::from_secs(24 * 3600)));
        assert!(p.promotion_still_serving);
    }

    #[test]
    fn ssh_tables_merge_and_are_checked() {
        let base = "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[environments.a]\nproject = \"p\"\ncompose = \"c\"\n";
        let inv = parse(&format!(
            "{base}connect_timeout = \"1500ms\"\n\
             ssh = {{ user = \"deploy\", key = \"id\", known_hosts = \"kh\", env = {{ DEPLOY_AGENT_STATE_DIR = \"/srv/x\" }} }}\n\
             install = {{ agent_toml = \"hosts/{{host}}.toml\", root = \"/tmp/r\" }}\n\
             [[environments.a.hosts]]\nname = \"h1\"\nagent = \"h1.internal:7443\"\n\
             [[environments.a.hosts]]\nname = \"h2\"\nagent = \"h2:7443\"\nssh = {{ address = \"10.0.0.2\", port = 2222, user = \"root\", command = \"/usr/bin/deploy-agent\" }}\n"
        ))
        .unwrap();
        let a = inv.environment("a").unwrap();
        assert_eq!(a.connect_timeout, Duration::from_millis(1500));
        let h1 = a.hosts[0].ssh.as_ref().unwrap();
        assert_eq!(h1.target(), "deploy@h1.internal:22");
        assert_eq!(h1.key, SshKeySource::File(PathBuf::from("/etc/deploy/id")));
        assert_eq!(h1.env["DEPLOY_AGENT_STATE_DIR"], "/srv/x");
        let h2 = a.hosts[1].ssh.as_ref().unwrap();
        assert_eq!(h2.target(), "root@10.0.0.2:2222");
        assert_eq!(h2.known_hosts, PathBuf::from("/etc/deploy/kh"));
        assert_eq!(h2.command, "/usr/bin/deploy-agent");
        let install = a.install.as_ref().unwrap();
        assert_eq!(
            install.agent_toml.as_deref(),
            Some("/etc/deploy/hosts/{host}.toml")
        );
        assert_eq!(install.root, "/tmp/r");

        let host = "[[environments.a.hosts]]\nname = \"h\"\nagent = \"h:1\"\n";
        for (ssh, needle) in [
            (
                "ssh = { key = \"k\", known_hosts = \"kh\" }",
                "environments.a.hosts[0].ssh` has no `user`",
            ),
            (
                "ssh = { user = \"u\", known_hosts = \"kh\" }",
                "no private key",
            ),
            (
                "ssh = { user = \"u\", key = \"k\", key_env = \"K\", known_hosts = \"kh\" }",
                "both `key` and `key_env`",
            ),
            ("ssh = { user = \"u\", key = \"k\" }", "known_hosts"),
            (
                "ssh = { user = \"u\", key_env = \"not a var\", known_hosts = \"kh\" }",
                "key_env",
            ),
            (
                "ssh = { user = \"u\", key = \"k\", known_hosts = \"kh\", env = { \"A B\" = \"1\" } }",
                "env",
            ),
            (
                "ssh = { user = \"u\", key = \"k\", known_hosts = \"kh\", password = \"x\" }",
                "password",
            ),
        ] {
            let e = parse(&format!("{base}{host}{ssh}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "expected {needle:?} in: {e}");
        }
        let e = parse(&format!("{base}connect_timeout = \"1ms\"\n{host}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("connect_timeout"), "{e}");
        let e = parse(&format!(
            "{base}install = {{ binary = \"a\", deb = \"b\" }}\n{host}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("install"), "{e}");
    }

    #[test]
    fn batches() {
        assert_eq!(parse_batch("3"), Ok(Batch::Count(3)));
        assert_eq!(parse_batch("25%"), Ok(Batch::Percent(25)));
        assert!(parse_batch("101%").is_err());
        assert!(parse_batch("x").is_err());
        assert!(parse_batch("0").is_err());
    }
}
