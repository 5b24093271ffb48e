//! `ProjectSpec`: a compose project after parsing, interpolation and
//! validation. It is what the engine acts on, and (with images pinned to
//! digests) the configuration snapshot a `Release` keeps, so that a rollback
//! restores that release's own configuration rather than today's.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectSpec {
    pub project: String,
    pub release: String,
    /// Services in `depends_on` order: a service comes after all it depends on.
    pub services: Vec<ServiceSpec>,
    /// Project networks (name as written in the compose file, without prefix).
    pub networks: Vec<NetworkSpec>,
    /// Named volumes (name as written, without prefix).
    pub volumes: Vec<VolumeSpec>,
    pub source: SourceSnapshot,
    /// Project-wide rollout settings (top-level `x-deploy` only).
    #[serde(default)]
    pub rollout: RolloutSettings,
}

/// `observe`, `canary` and `hooks` under the top-level `x-deploy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSettings {
    /// `None`: the agent config's default for this host's environment.
    pub observe: Option<ObserveSettings>,
    /// Percent of requests sent to the new release, step by step (the last
    /// is always 100). Empty: switch at once.
    pub canary: Vec<u8>,
    /// How long each canary step is held and judged. Default 30s.
    #[serde(with = "duration_ms", default = "default_canary_hold")]
    pub canary_hold: Duration,
    pub hooks: Hooks,
}

fn default_canary_hold() -> Duration {
    Duration::from_secs(30)
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            observe: None,
            canary: Vec::new(),
            canary_hold: default_canary_hold(),
            hooks: Hooks::default(),
        }
    }
}

/// The observation window after the switch, and its gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObserveSettings {
    /// How long to watch after the switch. 0: no window.
    #[serde(with = "duration_ms")]
    pub window: Duration,
    /// Consecutive probe failures that fail the window. Default 3.
    pub unhealthy_after: u32,
    /// Share of 5xx responses (0.0-1.0) above which the release fails. Default 0.05.
    pub max_error_rate: f64,
    /// The error rate must stay above the threshold this long. Default 2m.
    #[serde(with = "duration_ms")]
    pub error_rate_for: Duration,
    /// Fewer requests than this in the period: not judged. Default 20.
    pub min_requests: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hooks {
    pub pre_deploy: Option<Hook>,
    pub backup: Option<Hook>,
    pub migrate: Option<Hook>,
    pub smoke: Option<Smoke>,
    pub post_deploy: Option<Hook>,
    pub pre_rollback: Option<Hook>,
    pub post_rollback: Option<Hook>,
}

/// A one-off command: its exit code decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hook {
    pub run: HookRun,
    /// Killed after this long, and the hook fails. Default 10m.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// A warning event after this long (default for migrate: 5m).
    #[serde(with = "opt_duration_ms")]
    pub warn_after: Option<Duration>,
    /// `migrate` only: the command that undoes it, run on rollback only when
    /// asked (`--migrate-down`).
    pub down: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookRun {
    /// A one-off container from `service`'s image of the release, with its
    /// environment and networks.
    Container {
        service: String,
        command: Vec<String>,
    },
    /// A command on the host; only when the agent config allows host hooks.
    Host { command: Vec<String> },
}

/// Smoke checks: run against the new release before the switch (through a
/// private proxy route) and again after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Smoke {
    /// The routed service whose containers are checked.
    pub service: String,
    pub checks: Vec<SmokeCheck>,
    /// Instead of (or besides) HTTP checks, a command.
    pub command: Option<Hook>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmokeCheck {
    /// Default GET.
    pub method: String,
    pub path: String,
    /// Expected status, default 200.
    pub status: u16,
    pub body_contains: Option<String>,
    #[serde(with = "opt_duration_ms")]
    pub max_latency: Option<Duration>,
}

/// What the spec was made from, kept verbatim for the release snapshot.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SourceSnapshot {
    pub compose_path: String,
    pub compose_text: String,
    /// Every variable the file referenced, with the value it got
    /// (`RELEASE` included); unset variables that used a default are absent.
    pub interpolated: BTreeMap<String, String>,
    /// `env_file` contents, keyed by the path as written.
    pub env_files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// As written (interpolated); the engine pins it to a digest after pulling.
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// `env_file` entries first, then `environment` over them.
    pub environment: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    pub mounts: Vec<MountSpec>,
    /// Project network names this service joins; `["default"]` when none given.
    pub networks: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// The compose `healthcheck` (Docker runs it); `None` when absent or disabled.
    pub healthcheck: Option<DockerHealthcheck>,
    pub depends_on: Vec<String>,
    pub restart: RestartPolicy,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    /// `deploy.replicas`, default 1.
    pub replicas: u32,
    /// `stop_grace_period`, default 10s.
    #[serde(with = "duration_ms")]
    pub stop_grace_period: Duration,
    /// Our `x-deploy` settings, defaults filled in.
    pub deploy: DeploySettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
}

/// `ports: ["127.0.0.1:8080:80"]`: the proxy listens on `host_ip:host_port`
/// and forwards to the container's `target` port. Containers never publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Default `0.0.0.0`.
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub target: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MountSpec {
    /// A named project volume (`data:/var/lib/data`).
    Volume {
        source: String,
        target: String,
        read_only: bool,
    },
    /// A host path, made absolute against the compose file's directory.
    Bind {
        source: String,
        target: String,
        read_only: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    /// `external: true`: the network exists already, under `name` unprefixed.
    pub external: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub external: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerHealthcheck {
    /// As Docker wants it: `["CMD", ...]` or `["CMD-SHELL", "..."]`.
    pub test: Vec<String>,
    #[serde(with = "opt_duration_ms")]
    pub interval: Option<Duration>,
    #[serde(with = "opt_duration_ms")]
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
    #[serde(with = "opt_duration_ms")]
    pub start_period: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    No,
    Always,
    OnFailure,
    UnlessStopped,
}

/// `x-deploy` under a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploySettings {
    pub health: HealthSettings,
    /// How long in-flight requests may take to finish on a replaced container.
    #[serde(with = "duration_ms")]
    pub drain_timeout: Duration,
    pub proxy: ProxyMode,
    /// Replicas replaced at a time (`x-deploy.parallel`), default 1.
    pub parallel: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    Http,
    Tcp,
}

/// Which probe decides that a container is healthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `x-deploy.health.http: /path`: GET must answer 2xx or 3xx.
    Http { path: String, port: u16 },
    /// `x-deploy.health.tcp: PORT`: a TCP connection must be accepted.
    Tcp { port: u16 },
    /// `x-deploy.health.exec: [cmd, ...]`: exit code 0 inside the container.
    Exec { command: Vec<String> },
    /// The compose `healthcheck` (or `x-deploy.health.docker: true`): Docker's
    /// health status must be `healthy`.
    Docker,
    /// No probe configured: the container keeps running, unrestarted, for the
    /// start period and then accepts a TCP connection on `port` (if it has one).
    Running { port: Option<u16> },
}

impl Probe {
    /// How the gate is named in output and audit records.
    pub fn describe(&self) -> String {
        match self {
            Probe::Http { path, port } => format!("http GET {path} on port {port}"),
            Probe::Tcp { port } => format!("tcp connect to port {port}"),
            Probe::Exec { command } => format!("exec {}", command.join(" ")),
            Probe::Docker => "docker healthcheck".to_string(),
            Probe::Running { port: Some(p) } => {
                format!("running through start period, then tcp connect to port {p}")
            }
            Probe::Running { port: None } => "running through start period".to_string(),
        }
    }
}

/// The health gate of a service: a probe and its timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthSettings {
    pub probe: Probe,
    /// Default 1s.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// Default 2s.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Consecutive successes needed, default 1.
    pub healthy_after: u32,
    /// Consecutive failures that fail the gate, default 3.
    pub unhealthy_after: u32,
    /// Failures during the start period do not count. Default 0s (2s for `Running`).
    #[serde(with = "duration_ms")]
    pub start_period: Duration,
    /// The container must be healthy within this time. Default 60s.
    #[serde(with = "duration_ms")]
    pub deadline: Duration,
}

/// Durations are stored as milliseconds in snapshots and on the wire.
pub mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

pub mod opt_duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}
