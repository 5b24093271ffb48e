//! `agent.toml`: the host's own settings (not the project's).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/deploy-agent/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/deploy-agent";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Label value on every container, network and volume this agent
    /// creates, and the prefix of their names. Several agents on one machine
    /// (tests, demos) need distinct instances.
    pub instance: String,
    /// Releases kept per project (images and configuration snapshot).
    pub retain: usize,
    /// How often the daemon checks for drift, in seconds.
    pub reconcile_interval_secs: u64,
    /// How long one reconciliation pass may run before the daemon counts its
    /// main loop as hung and stops pinging the systemd watchdog (systemd then
    /// restarts it, and recovery resumes from the last persisted step). A
    /// pass can legitimately wait on health gates, so this bounds a pass, not
    /// the interval between pings.
    pub reconcile_timeout_secs: u64,
    /// Also serve `GET /metrics` (Prometheus text format) on this plain,
    /// unauthenticated TCP address, for a scraper that cannot read the unix
    /// socket. Absent: metrics only on `agent.sock`.
    pub metrics_listen: Option<SocketAddr>,
    /// Registry credentials by registry host (`host[:port]`).
    pub registries: BTreeMap<String, RegistryAuth>,
    /// The observation window after a switch when the compose file does not
    /// set `x-deploy.observe.window` (e.g. "5m"; "0s" for none).
    #[serde(with = "humantime_serde_compat")]
    pub observe_window: std::time::Duration,
    /// Hooks may run commands on the host itself (not only in containers).
    pub allow_host_hooks: bool,
    /// Run the `backup` hook before every `migrate` (production).
    pub backup_before_migrate: bool,
    // --- the HTTPS API with mutual TLS (see `crate::api`) ---
    /// Where the HTTPS API listens, e.g. `"0.0.0.0:7443"`; absent: no TLS API
    /// (the unix socket only).
    pub api_listen: Option<std::net::SocketAddr>,
    /// This agent's certificate chain (PEM), issued by `deploy-controller pki issue --kind agent`.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA whose client certificates are accepted (PEM).
    pub tls_ca: Option<PathBuf>,
    /// The environment this host belongs to (e.g. `"production"`); required
    /// with `api_listen`. Grants are for this environment only.
    pub environment: Option<String>,
    /// Client certificate identity (its CN) → `"deployer"` or `"reader"` here.
    pub grants: BTreeMap<String, crate::wire::Role>,
    /// An HTTPS connection with no request in flight for this long is
    /// closed, in seconds; a streamed answer (a deploy's progress) is in
    /// flight however long it lasts. A connection's first request, and
    /// every HTTP/1.1 request's headers, must arrive within the smaller of
    /// 10 s and this.
    pub api_idle_timeout_secs: u64,
    /// At most this many HTTPS connections at once, handshakes included;
    /// more are closed as soon as they are accepted. Each is a file
    /// descriptor: keep it well below the daemon's `LimitNOFILE`.
    pub api_max_connections: usize,
    /// At most this many HTTPS connections at once per client certificate
    /// identity (in effect at most `api_max_connections`); one more is
    /// answered 503 and closed.
    pub api_max_connections_per_identity: usize,
    /// `[notify]`: a webhook told of every deploy and rollback (see
    /// `crate::notify`). Absent: no notifications.
    pub notify: Option<NotifyConfig>,
}

/// `[notify]` in agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where the JSON is POSTed (Slack-compatible: an incoming webhook URL).
    pub webhook: WebhookUrl,
    /// Which events are sent; default all of them.
    #[serde(default = "NotifyEvent::all")]
    pub events: Vec<NotifyEvent>,
    /// How long one attempt may take (connect, send, answer).
    #[serde(default = "default_notify_timeout", with = "humantime_serde_compat")]
    pub timeout: std::time::Duration,
}

fn default_notify_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

/// What a notification is about. The names are those of the audit actions
/// (`deploy.started`, `deploy.succeeded`, `deploy.failed`) and of the
/// rollout's ending (`RolledBack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    /// A deploy or a rollback began (its first step is about to run).
    Started,
    /// A deploy now serves its release.
    Succeeded,
    /// A deploy or a rollback failed; the release serving before still serves.
    Failed,
    /// Traffic went back to the previous release: a rollback (by hand or by
    /// the controller) succeeded, or the observation window failed a gate and
    /// the agent undid the deploy by itself (`automatic`).
    RolledBack,
}

impl NotifyEvent {
    pub fn all() -> Vec<NotifyEvent> {
        vec![
            NotifyEvent::Started,
            NotifyEvent::Succeeded,
            NotifyEvent::Failed,
            NotifyEvent::RolledBack,
        ]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Started => "started",
            NotifyEvent::Succeeded => "succeeded",
            NotifyEvent::Failed => "failed",
            NotifyEvent::RolledBack => "rolled_back",
        }
    }
}

/// An `http://` or `https://` URL with a host, checked when agent.toml is read.
#[derive(Clone)]
pub struct WebhookUrl(pub url::Url);

/// The URL's secret path (a Slack webhook's token) stays out of logs.
impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl WebhookUrl {
    /// `scheme://host[:port]/…`: enough to say where, not the token.
    pub fn redacted(&self) -> String {
        let port = self.0.port().map(|p| format!(":{p}")).unwrap_or_default();
        format!(
            "{}://{}{port}/…",
            self.0.scheme(),
            self.0.host_str().unwrap_or("")
        )
    }
}

impl<'de> Deserialize<'de> for WebhookUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WebhookUrl, D::Error> {
        let s = String::deserialize(d)?;
        let url = url::Url::parse(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "not a URL ({e}); write the whole webhook URL, e.g. \"https://hooks.slack.com/services/…\""
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(serde::de::Error::custom(format!(
                "the webhook URL must be http:// or https://, not {}://",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(serde::de::Error::custom("the webhook URL has no host"));
        }
        Ok(WebhookUrl(url))
    }
}

/// `"5m"`-style durations in agent.toml.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"90s\" or \"5m\": {e}"
            ))
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            instance: "default".into(),
            retain: 10,
            reconcile_interval_secs: 5,
            reconcile_timeout_secs: 600,
            metrics_listen: None,
            registries: BTreeMap::new(),
            observe_window: std::time::Duration::from_secs(300),
            allow_host_hooks: false,
            backup_before_migrate: false,
            api_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            environment: None,
            grants: BTreeMap::new(),
            api_idle_timeout_secs: 60,
            api_max_connections: 256,
            api_max_connections_per_identity: 32,
            notify: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// "FILE, line N, key `k`: what is wrong", so that an operator fixes it
    /// without guessing which key (or which `[registries]` table) is meant.
    #[error(
        "invalid agent config {}{}{}: {message}",
        path.display(),
        line.map(|l| format!(", line {l}")).unwrap_or_default(),
        key.as_deref().map(|k| format!(", key `{k}`")).unwrap_or_default()
    )]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending key or value, when known.
        line: Option<usize>,
        /// Dotted path of the offending key, e.g. `registries."r.example".password`.
        key: Option<String>,
        message: String,
    },
}

impl AgentConfig {
    /// Load `path`; a missing file is the defaults only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<AgentConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(AgentConfig::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::parse(path, &text)
    }

    /// Parse and validate `text` (the contents of `path`). Every error names
    /// the file, the line and the key.
    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let cfg = deserialize(path, text)?;
        // Semantic checks name a top-level key; its line is found in the text.
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: top_level_key_line(text, key),
            key: Some(key.to_string()),
            message,
        };
        // Validators elsewhere answer "key `k`: message" or "key `k` = …".
        let keyed = |message: String| match message
            .strip_prefix("key `")
            .and_then(|rest| rest.split_once('`'))
        {
            Some((key, rest)) => match rest.strip_prefix(": ") {
                Some(rest) => invalid(key, rest.to_string()),
                None => invalid(key, message.clone()),
            },
            None => ConfigError::Invalid {
                path: path.to_path_buf(),
                line: None,
                key: None,
                message,
            },
        };
        let valid_instance = !cfg.instance.is_empty()
            && cfg.instance.len() <= 32
            && cfg
                .instance
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_instance {
            return Err(invalid(
                "instance",
                format!(
                    "{:?} must be 1-32 characters of a-z, 0-9 and -",
                    cfg.instance
                ),
            ));
        }
        if cfg.retain < 2 {
            return Err(invalid(
                "retain",
                format!(
                    "{} is too small; keep at least 2 releases (current and previous)",
                    cfg.retain
                ),
            ));
        }
        for (key, value) in [
            ("reconcile_interval_secs", cfg.reconcile_interval_secs),
            ("reconcile_timeout_secs", cfg.reconcile_timeout_secs),
        ] {
            if !(1..=86_400).contains(&value) {
                return Err(invalid(
                    key,
                    format!("{value} is out of range: 1 to 86400 seconds"),
                ));
            }
        }
        if let Some(addr) = cfg.metrics_listen
            && addr.port() == 0
        {
            return Err(invalid(
                "metrics_listen",
                format!(
                    "{addr} has port 0; name the port Prometheus scrapes, e.g. \"127.0.0.1:9480\""
                ),
            ));
        }
        validate_api(&cfg).map_err(keyed)?;
        if let Some(n) = &cfg.notify {
            if n.timeout.is_zero() || n.timeout > std::time::Duration::from_secs(60) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line: table_key_line(text, "notify", "timeout")
                        .or_else(|| top_level_key_line(text, "notify")),
                    key: Some("notify.timeout".into()),
                    message: format!(
                        "{} is out of range: more than 0s, at most 60s (each attempt; a deploy never waits for it)",
                        humantime::format_duration(n.timeout)
                    ),
                });
            }
            if n.events.is_empty() {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line: table_key_line(text, "notify", "events")
                        .or_else(|| top_level_key_line(text, "notify")),
                    key: Some("notify.events".into()),
                    message: "is empty; name at least one of \"started\", \"succeeded\", \"failed\", \"rolled_back\", or leave the key out for all of them (remove [notify] for none)".into(),
                });
            }
        }
        Ok(cfg)
    }
}

/// Deserialize, with the path of the failing key (serde_path_to_error) and
/// the line of the failing span (toml).
fn deserialize(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
    let invalid =
        |line: Option<usize>, key: Option<String>, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            key,
            message,
        };
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        invalid(line, None, e.message().to_string())
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner();
        let line = inner.span().map(|s| line_of(text, s.start));
        let message = inner.message().to_string();
        let at = e.path().to_string();
        let at = (at != ".").then_some(at);
        // The path names the failing key; for an unknown key, make sure it
        // ends with the key itself rather than its table.
        let key = match (unknown_field(&message), at) {
            (Some(field), Some(at)) if !at.ends_with(field) => Some(format!("{at}.{field}")),
            (Some(field), None) => Some(field.to_string()),
            (_, at) => at,
        };
        let message = format!("{message}{}", crate::suggest::hint(&message));
        invalid(line, key, message)
    })
}

/// "unknown field `x`, expected …" → `x`.
fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
}

/// The 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line of `key = …` before the first table header, or of the table
/// `[key]` (or `[key.…]`) itself.
fn top_level_key_line(text: &str, key: &str) -> Option<usize> {
    let mut top_level = true;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[').trim_start();
            if name
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with([']', '.']))
            {
                return Some(i + 1);
            }
            top_level = false;
            continue;
        }
        if !top_level {
            continue;
        }
        if line
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(i + 1);
        }
    }
    None
}

/// The line of `key = …` inside the table `[table]`.
fn table_key_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if let Some(header) = line.strip_prefix('[') {
            inside = header
                .strip_prefix(table)
                .is_some_and(|rest| rest.trim_start().starts_with(']'));
            continue;
        }
        if inside
            && line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(i + 1);
        }
    }
    None
}

/// The environment name of an agent without `environment` in agent.toml.
pub const DEFAULT_ENVIRONMENT: &str = "default";

/// This agent's environment.
pub fn environment(cfg: &AgentConfig) -> &str {
    cfg.environment.as_deref().unwrap_or(DEFAULT_ENVIRONMENT)
}

/// The largest `api_max_connections`: a quarter of the `LimitNOFILE` the
/// packaged unit sets, so that the HTTPS API can never take the descriptors
/// agent.sock, the store and Docker need.
pub const MAX_API_CONNECTIONS: usize = 16_384;

/// The checks of agent.toml's TLS API keys (part of `AgentConfig::parse`).
fn validate_api(cfg: &AgentConfig) -> Result<(), String> {
    if let Some(env) = &cfg.environment
        && !valid_name(env)
    {
        return Err(format!(
            "key `environment`: {env:?} must be 1-64 characters of letters, digits, `-`, `_` and `.`"
        ));
    }
    for (identity, _) in cfg.grants.iter() {
        if identity.trim().is_empty() || identity.starts_with("mtls:") {
            return Err(format!(
                "key `grants`: {identity:?} is not a certificate identity; use the certificate's CN, e.g. \"ci-production\""
            ));
        }
    }
    if !(1..=3600).contains(&cfg.api_idle_timeout_secs) {
        return Err(format!(
            "key `api_idle_timeout_secs`: {} is out of range: 1 to 3600 seconds",
            cfg.api_idle_timeout_secs
        ));
    }
    if !(1..=MAX_API_CONNECTIONS).contains(&cfg.api_max_connections) {
        return Err(format!(
            "key `api_max_connections`: {} is out of range: 1 to {MAX_API_CONNECTIONS} \
             (each connection is a file descriptor of the daemon; keep it well below its LimitNOFILE)",
            cfg.api_max_connections
        ));
    }
    if !(1..=MAX_API_CONNECTIONS).contains(&cfg.api_max_connections_per_identity) {
        return Err(format!(
            "key `api_max_connections_per_identity`: {} is out of range: 1 to {MAX_API_CONNECTIONS} \
             (more than api_max_connections has the effect of api_max_connections)",
            cfg.api_max_connections_per_identity
        ));
    }
    if let Some(addr) = cfg.api_listen {
        let mut missing = Vec::new();
        if cfg.tls_cert.is_none() {
            missing.push("tls_cert");
        }
        if cfg.tls_key.is_none() {
            missing.push("tls_key");
        }
        if cfg.tls_ca.is_none() {
            missing.push("tls_ca");
        }
        if cfg.environment.is_none() {
            missing.push("environment");
        }
        if !missing.is_empty() {
            return Err(format!(
                "key `api_listen` = \"{addr}\" needs {} as well (the HTTPS API always uses mutual TLS; \
                 `deploy-controller pki issue --kind agent` makes the certificate)",
                missing.join(", ")
            ));
        }
        if cfg.grants.is_empty() {
            return Err(format!(
                "key `api_listen` = \"{addr}\": no `[grants]`, so every client would be refused; \
                 grant at least one certificate identity a role, e.g. [grants] \"ci-{}\" = \"deployer\"",
                environment(cfg)
            ));
        }
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mistyped_key_suggests_the_nearest_one() {
        let e = AgentConfig::parse(Path::new("agent.toml"), "retian = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `retain`?"), "{e}");
    }

    fn cfg(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("agent.toml"), text).map_err(|e| e.to_string())
    }

    const TLS: &str = "api_listen = \"0.0.0.0:7443\"\ntls_cert = \"a.pem\"\ntls_key = \"a-key.pem\"\ntls_ca = \"ca.pem\"\n";

    #[test]
    fn the_tls_api_needs_certificates_an_environment_and_grants() {
        let ok = cfg(&format!(
            "{TLS}environment = \"production\"\n[grants]\n\"ci-production\" = \"deployer\"\ndashboard = \"reader\"\n"
        ))
        .unwrap();
        assert_eq!(ok.api_listen, Some("0.0.0.0:7443".parse().unwrap()));
        assert_eq!(ok.grants["dashboard"], crate::wire::Role::Reader);
        assert_eq!(environment(&ok), "production");
        // No TLS API: nothing else is required.
        assert_eq!(environment(&cfg("").unwrap()), DEFAULT_ENVIRONMENT);

        let e =
            cfg("api_listen = \"0.0.0.0:7443\"\nenvironment = \"p\"\ngrants = { x = \"reader\" }")
                .unwrap_err();
        assert!(e.contains("tls_cert, tls_key, tls_ca"), "{e}");
        let e = cfg(&format!("{TLS}grants = {{ x = \"reader\" }}")).unwrap_err();
        assert!(e.contains("environment"), "{e}");
        let e = cfg(&format!("{TLS}environment = \"p\"")).unwrap_err();
        assert!(e.contains("[grants]"), "{e}");
        let e = cfg(&format!(
            "{TLS}environment = \"p\"\ngrants = {{ x = \"admin\" }}"
        ))
        .unwrap_err();
        assert!(e.contains("admin"), "{e}");
        let e = cfg("environment = \"prod env\"").unwrap_err();
        assert!(e.contains("environment"), "{e}");
        let e = cfg("grants = { \"mtls:x\" = \"reader\" }").unwrap_err();
        assert!(e.contains("CN"), "{e}");
        let e = cfg("api_listen = \"nowhere\"").unwrap_err();
        assert!(e.contains("api_listen"), "{e}");
    }

    #[test]
    fn https_connection_limits_have_defaults_and_bounds() {
        let d = AgentConfig::default();
        assert_eq!(
            (
                d.api_idle_timeout_secs,
                d.api_max_connections,
                d.api_max_connections_per_identity
            ),
            (60, 256, 32)
        );
        let ok = cfg(
            "api_idle_timeout_secs = 5\napi_max_connections = 10\napi_max_connections_per_identity = 10\n",
        )
        .unwrap();
        assert_eq!(ok.api_idle_timeout_secs, 5);
        assert_eq!(ok.api_max_connections_per_identity, 10);
        let err = refusal("api_idle_timeout_secs = 0\n");
        assert!(
            err.contains("line 1, key `api_idle_timeout_secs`: 0 is out of range"),
            "{err}"
        );
        let err = refusal("api_max_connections = 100000\n");
        assert!(
            err.contains("key `api_max_connections`: 100000 is out of range")
                && err.contains("LimitNOFILE"),
            "{err}"
        );
        // A total below the per-identity default needs no second key.
        let small = cfg("api_max_connections = 8\n").unwrap();
        assert_eq!(small.api_max_connections_per_identity, 32);
        let err = refusal("api_max_connections = 8\napi_max_connections_per_identity = 0\n");
        assert!(
            err.contains("line 2, key `api_max_connections_per_identity`: 0 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn defaults_when_the_default_file_is_missing() {
        let cfg = AgentConfig::load(Path::new("/nonexistent/agent.toml"), false).unwrap();
        assert_eq!(cfg.instance, "default");
        assert_eq!(cfg.retain, 10);
    }

    #[test]
    fn a_named_file_must_exist() {
        let err = AgentConfig::load(Path::new("/nonexistent/agent.toml"), true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = AgentConfig::parse(Path::new("a.toml"), "instance = \"x\"\nretian = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retian"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn observe_window_is_a_duration() {
        let cfg = AgentConfig::parse(Path::new("a"), "observe_window = \"90s\"").unwrap();
        assert_eq!(cfg.observe_window, std::time::Duration::from_secs(90));
        assert_eq!(
            AgentConfig::default().observe_window,
            std::time::Duration::from_secs(300)
        );
        let err = AgentConfig::parse(Path::new("a"), "observe_window = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("observe_window") || err.contains("soon"),
            "{err}"
        );
    }

    #[test]
    fn registries_and_bad_values() {
        let cfg = AgentConfig::parse(
            Path::new("a.toml"),
            "[registries.\"127.0.0.1:5001\"]\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        assert_eq!(cfg.registries["127.0.0.1:5001"].username, "u");
        assert!(AgentConfig::parse(Path::new("a"), "instance = \"Bad_Name\"").is_err());
        assert!(AgentConfig::parse(Path::new("a"), "retain = 1").is_err());
    }

    /// Every refusal names the file, the line and the key.
    fn refusal(text: &str) -> String {
        AgentConfig::parse(Path::new("/etc/deploy-agent/agent.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = refusal("instance = \"a\"\n\nretain = \"ten\"\n");
        assert!(
            err.starts_with(
                "invalid agent config /etc/deploy-agent/agent.toml, line 3, key `retain`: "
            ),
            "{err}"
        );
        let err = refusal("retain = 1\n");
        assert!(
            err.contains(", line 1, key `retain`: 1 is too small"),
            "{err}"
        );
        let err = refusal("# c\ninstance = \"Bad_Name\"\n");
        assert!(err.contains(", line 2, key `instance`: "), "{err}");
        let err = refusal(
            "instance = \"a\"\n[registries.\"r.example\"]\nusername = \"u\"\npasword = \"p\"\n",
        );
        assert!(
            err.contains(", line 4, key `registries.r.example.pasword`"),
            "{err}"
        );
        let err = refusal("retain = [\n");
        assert!(err.contains("/etc/deploy-agent/agent.toml, line "), "{err}");
    }

    #[test]
    fn metrics_listen_and_loop_bounds() {
        let cfg =
            AgentConfig::parse(Path::new("a"), "metrics_listen = \"127.0.0.1:9480\"").unwrap();
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9480".parse().unwrap()));
        assert_eq!(AgentConfig::default().metrics_listen, None);
        assert_eq!(AgentConfig::default().reconcile_timeout_secs, 600);
        let err = refusal("metrics_listen = \"localhost\"\n");
        assert!(err.contains(", line 1, key `metrics_listen`: "), "{err}");
        let err = refusal("metrics_listen = \"127.0.0.1:0\"\n");
        assert!(
            err.contains("key `metrics_listen`: 127.0.0.1:0 has port 0"),
            "{err}"
        );
        let err = refusal("reconcile_interval_secs = 0\n");
        assert!(
            err.contains("line 1, key `reconcile_interval_secs`: 0 is out of range"),
            "{err}"
        );
        let err = refusal("retain = 3\nreconcile_timeout_secs = 0\n");
        assert!(
            err.contains("line 2, key `reconcile_timeout_secs`"),
            "{err}"
        );
    }

    #[test]
    fn keys_of_tables_and_other_validators_get_their_line() {
        let text = "instance = \"a\"\n\n[grants]\n\"mtls:x\" = \"reader\"\n";
        assert_eq!(top_level_key_line(text, "grants"), Some(3));
        assert_eq!(top_level_key_line(text, "instance"), Some(1));
        assert_eq!(top_level_key_line(text, "retain"), None);
        let err = refusal(text);
        assert!(err.contains(", line 3, key `grants`: "), "{err}");
    }

    #[test]
    fn notify_defaults_and_values() {
        assert!(AgentConfig::default().notify.is_none());
        let cfg = AgentConfig::parse(
            Path::new("a"),
            "[notify]\nwebhook = \"https://hooks.slack.com/services/T0/B0/secret\"\n",
        )
        .unwrap();
        let n = cfg.notify.unwrap();
        assert_eq!(n.webhook.0.host_str(), Some("hooks.slack.com"));
        assert_eq!(n.events, NotifyEvent::all());
        assert_eq!(n.timeout, std::time::Duration::from_secs(5));
        // The token in the path stays out of logs.
        assert_eq!(format!("{:?}", n.webhook), "https://hooks.slack.com/…");
        let cfg = AgentConfig::parse(
            Path::new("a"),
            "[notify]\nwebhook = \"http://127.0.0.1:9000/hook\"\nevents = [\"failed\", \"rolled_back\"]\ntimeout = \"2s\"\n",
        )
        .unwrap();
        let n = cfg.notify.unwrap();
        assert_eq!(n.events, [NotifyEvent::Failed, NotifyEvent::RolledBack]);
        assert_eq!(n.timeout, std::time::Duration::from_secs(2));
    }

    #[test]
    fn notify_refusals_name_file_line_and_key() {
        let head = "instance = \"a\"\n\n[notify]\n";
        let err = refusal(&format!("{head}webhook = \"hooks.slack.com/x\"\n"));
        assert!(
            err.starts_with(
                "invalid agent config /etc/deploy-agent/agent.toml, line 4, key `notify.webhook`: not a URL"
            ),
            "{err}"
        );
        let err = refusal(&format!("{head}webhook = \"ftp://example.com/x\"\n"));
        assert!(
            err.contains(", line 4, key `notify.webhook`: the webhook URL must be http:// or https://, not ftp://"),
            "{err}"
        );
        let err = refusal(&format!(
            "{head}webhook = \"https://h.example/x\"\nevents = [\"failed\", \"start\"]\n"
        ));
        assert!(err.contains(", line 5, key `notify.events"), "{err}");
        assert!(err.contains("unknown variant `start`"), "{err}");
        assert!(err.contains("rolled_back"), "{err}");
        let err = refusal(&format!(
            "{head}webhook = \"https://h.example/x\"\nevents = []\n"
        ));
        assert!(
            err.contains(", line 5, key `notify.events`: is empty"),
            "{err}"
        );
        let err = refusal(&format!(
            "{head}webhook = \"https://h.example/x\"\ntimeout = \"0s\"\n"
        ));
        assert!(
            err.contains(", line 5, key `notify.timeout`: 0s is out of range"),
            "{err}"
        );
        let err = refusal(&format!(
            "{head}webhook = \"https://h.example/x\"\nurl = \"https://h.example/y\"\n"
        ));
        assert!(
            err.contains(", line 5, key `notify.url`: unknown field"),
            "{err}"
        );
        let err = refusal(&format!("{head}events = [\"failed\"]\n"));
        assert!(err.contains("key `notify"), "{err}");
        assert!(err.contains("missing field `webhook`"), "{err}");
    }

    /// docs/configuration.md and packaging/agent.toml cover every key the
    /// parser knows (the list comes from the parser's own error message), and
    /// the packaged file is valid as shipped and with its examples uncommented.
    #[test]
    fn every_key_is_documented_and_in_the_packaged_default() {
        let err = refusal("no_such_key = 1\n");
        let keys: Vec<&str> = err
            .split("expected one of ")
            .nth(1)
            .expect("the error lists the known keys")
            .split(", ")
            .map(|k| k.trim().trim_matches('`'))
            .collect();
        assert!(keys.contains(&"metrics_listen"), "{keys:?}");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let docs = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
        let packaged = std::fs::read_to_string(root.join("packaging/agent.toml")).unwrap();
        for key in &keys {
            assert!(
                docs.contains(&format!("| `{key}")),
                "docs/configuration.md has no table row for `{key}`"
            );
            assert!(
                packaged.contains(&format!("# {key} = "))
                    || packaged.contains(&format!("# [{key}")),
                "packaging/agent.toml does not show `{key}`"
            );
        }
        let as_shipped = AgentConfig::parse(Path::new("packaging/agent.toml"), &packaged).unwrap();
        assert_eq!(as_shipped.retain, AgentConfig::default().retain);
        let uncommented: String = packaged
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with('[')
                    || l.starts_with('"')
                    || l.split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        AgentConfig::parse(Path::new("uncommented"), &uncommented)
            .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    }
}
