//! Wire types: what crosses a process boundary between the `deploy-agent`
//! CLI, the control daemon (`deploy-agent run`) and, later, `deploy-controller`.
//!
//! They are defined once, here, and every client (unix socket, mTLS, SSH)
//! speaks exactly these shapes as JSON. Changing a field is an API change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Process exit codes. Stable: CI scripts and `scripts/deploy.sh` rely on them.
pub mod exit {
    /// The operation succeeded.
    pub const SUCCESS: i32 = 0;
    /// The new release failed its health gate (or the operation was
    /// interrupted) and the previous release is serving.
    pub const HEALTH_GATE_FAILED: i32 = 1;
    /// Configuration or usage error: bad compose file, unknown key, bad flag.
    /// Nothing was changed.
    pub const CONFIG: i32 = 2;
    /// Registry authentication failure or image not found. Nothing was changed.
    pub const REGISTRY: i32 = 3;
    /// Another operation holds the host lock for this project.
    pub const LOCKED: i32 = 4;
    /// The host is not ready: Docker unreachable, proxy not running, state
    /// store unusable, or an unexpected Docker error. The message says which.
    pub const ENVIRONMENT: i32 = 5;
}

/// Which operation a request or a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    Deploy,
    Rollback,
    /// The agent itself repairing state: an interrupted operation or drift.
    Reconcile,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Deploy => "deploy",
            OperationKind::Rollback => "rollback",
            OperationKind::Reconcile => "reconcile",
        }
    }
}

/// A request to deploy release `release` of `project` from a compose file.
///
/// The compose text travels with the request (not just its path) so that a
/// remote client can send it; `compose_path` is used for messages and to
/// resolve relative paths (`env_file`, bind mounts) on the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployRequest {
    pub project: String,
    pub release: String,
    pub compose_path: String,
    pub compose_text: String,
    /// `--var K=V`: values for `${K}` interpolation, over the environment.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// How long to wait for the host lock; `None` fails at once when held.
    #[serde(default)]
    pub lock_wait_ms: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// A request to put a retained release back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub project: String,
    /// `None`: the previous release.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub lock_wait_ms: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    /// The target release failed its health gate; the previous one serves.
    HealthGateFailed,
    /// The operation was interrupted (agent killed, host rebooted) and was
    /// completed by reconciliation to the release named in the result.
    Interrupted,
    ConfigError,
    RegistryError,
    Locked,
    EnvironmentError,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Succeeded => exit::SUCCESS,
            Outcome::HealthGateFailed | Outcome::Interrupted => exit::HEALTH_GATE_FAILED,
            Outcome::ConfigError => exit::CONFIG,
            Outcome::RegistryError => exit::REGISTRY,
            Outcome::Locked => exit::LOCKED,
            Outcome::EnvironmentError => exit::ENVIRONMENT,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::HealthGateFailed => "health_gate_failed",
            Outcome::Interrupted => "interrupted",
            Outcome::ConfigError => "config_error",
            Outcome::RegistryError => "registry_error",
            Outcome::Locked => "locked",
            Outcome::EnvironmentError => "environment_error",
        }
    }
}

/// One line of `--json` output, and one chunk of the daemon's streamed answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Progress(Progress),
    Result(OperationResult),
}

/// Something the engine is doing or has just observed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// UTC, RFC 3339.
    pub ts: String,
    pub project: String,
    pub release: String,
    /// Machine-readable step name, e.g. `pull`, `start_new`, `await_healthy`.
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub message: String,
}

/// The final answer to a deploy or rollback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationResult {
    pub ts: String,
    pub operation: OperationKind,
    pub project: String,
    /// The release the operation tried to put in service.
    pub release: String,
    /// The release serving before the operation.
    #[serde(default)]
    pub previous: Option<String>,
    /// The release serving now.
    #[serde(default)]
    pub serving: Option<String>,
    pub outcome: Outcome,
    pub exit_code: i32,
    pub message: String,
    /// The health gate that decided, when one did (e.g. `http GET /health on port 80`).
    #[serde(default)]
    pub gate: Option<String>,
    pub duration_ms: u64,
    /// Service name to pinned image (`repo@sha256:…`).
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
}

/// `deploy-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub host: String,
    pub projects: Vec<ProjectStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectStatus {
    pub project: String,
    /// The release serving, if any.
    pub current: Option<String>,
    pub previous: Option<String>,
    /// When `current` started serving (UTC, RFC 3339).
    pub since: Option<String>,
    pub digests: BTreeMap<String, String>,
    /// An operation in progress (or interrupted and not yet reconciled).
    pub operation: Option<String>,
    pub services: Vec<ServiceStatus>,
    /// Differences between what should run and what runs.
    pub drift: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub replicas: Vec<ReplicaStatus>,
    /// Published addresses, e.g. `0.0.0.0:8080 -> 80 (http)`.
    pub published: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub replica: u32,
    pub container: String,
    pub state: String,
}

/// One row of `deploy-agent history`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub operation: OperationKind,
    pub project: String,
    pub release: String,
    pub previous: Option<String>,
    pub outcome: Option<Outcome>,
    pub who: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub message: Option<String>,
}

/// An error answer from the daemon's API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub outcome: Outcome,
    pub message: String,
}
