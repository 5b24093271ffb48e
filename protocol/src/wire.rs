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
    /// Refused by authorization (the mTLS identity has no role, or not the
    /// role needed, in this environment) or by a policy gate. Nothing changed.
    pub const DENIED: i32 = 6;
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Run the `migrate` hook on this host (the controller picks one host).
    #[serde(default)]
    pub run_migrations: bool,
    /// Answer once traffic has switched; the daemon finishes the observation
    /// window on its own (and rolls back by itself if a gate fails).
    #[serde(default)]
    pub no_wait: bool,
    // --- fleet deploys (deploy-controller) ---
    /// The fleet deployment this belongs to. When an environment lease is
    /// held on the agent (`POST /v1/lock`), only its holder may deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// Promotion / no tag drift: service name to the exact `repo@sha256:…`
    /// to run. The agent pulls these references instead of resolving the
    /// compose file's tags, and refuses one whose repository differs from
    /// the service's image.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pinned: BTreeMap<String, String>,
    /// The environment's observation window from the controller's inventory
    /// (pass-through: overrides the agent's default when the engine honours it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observe_window_ms: Option<u64>,
    // --- end fleet deploys ---
    /// When the release's commit was made (RFC 3339, e.g. CI's
    /// `head_commit.timestamp`): recorded in history for lead time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<String>,
}

/// A request to put a retained release back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub project: String,
    /// `None`: the previous release.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub lock_wait_ms: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Also run the leaving release's `migrate.down` (code-only otherwise).
    #[serde(default)]
    pub migrate_down: bool,
    /// The fleet deployment this belongs to (see [`DeployRequest::deployment_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
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
    /// Refused by authorization or a policy gate (HTTP 403); nothing changed.
    Denied,
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
            Outcome::Denied => exit::DENIED,
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
            Outcome::Denied => "denied",
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
    /// Success: the health gates passed. Failure: only the check that
    /// failed (e.g. `web: http GET /health on port 80`), none when no check
    /// decided (an interruption, an error of Docker or the proxy).
    #[serde(default)]
    pub gate: Option<String>,
    pub duration_ms: u64,
    /// Service name to pinned image (`repo@sha256:…`).
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
    /// When the release was undone after traffic had moved: milliseconds
    /// from the decision to traffic being back on the previous release.
    #[serde(default)]
    pub switch_back_ms: Option<u64>,
    /// Hooks that ran, in order.
    #[serde(default)]
    pub hooks: Vec<HookReport>,
}

/// What a hook did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookReport {
    /// e.g. `migrate`, `smoke (before switch)`.
    pub hook: String,
    pub succeeded: bool,
    #[serde(default)]
    pub exit_code: Option<i64>,
    pub duration_ms: u64,
    /// The last lines of its output (all of it is in the audit record).
    #[serde(default)]
    pub output_tail: Vec<String>,
}

/// `deploy-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub host: String,
    pub projects: Vec<ProjectStatus>,
    /// The data path: whether the proxy answers, and what it listens on.
    /// Absent from agents that did not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyState>,
}

/// The proxy as `status` saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyState {
    /// It answered on `proxy.sock`.
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Why it did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Each listener: `0.0.0.0:8080 project/service -> release (N backends)`.
    #[serde(default)]
    pub listeners: Vec<String>,
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
    /// When the deployed commit was made (deploys given `commit_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<String>,
}

/// How a fleet command (`deploy-controller deploy`, `rollback`) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetOutcome {
    /// Every host serves the target.
    Succeeded,
    /// A host failed its gates; every updated host went back to what it ran.
    RolledBack,
    /// The hosts do not all run one release (exit 7).
    Mixed,
    /// Refused before anything changed (config, gates, pre-pull, lease).
    Refused,
}

impl FleetOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetOutcome::Succeeded => "succeeded",
            FleetOutcome::RolledBack => "rolled_back",
            FleetOutcome::Mixed => "mixed",
            FleetOutcome::Refused => "refused",
        }
    }
}

/// An error answer from the daemon's API. Build it with [`ApiError::new`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub outcome: Outcome,
    pub message: String,
    /// `Locked` by an environment lease: who holds it and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Box<Lease>>,
    /// `Denied` by authorization: which identity, environment and role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<Box<Denial>>,
}

impl ApiError {
    pub fn new(outcome: Outcome, message: impl Into<String>) -> ApiError {
        ApiError {
            outcome,
            message: message.into(),
            holder: None,
            denied: None,
        }
    }
}

// ---------------------------------------------------------------------------
// The fleet API: what `deploy-controller` and the agent's HTTPS
// API (mutual TLS) exchange besides deploy / rollback / status / history.
// The same routes answer on the unix socket, where the local user counts as
// a deployer.
// ---------------------------------------------------------------------------

/// What an mTLS identity may do on an agent (agent.toml `[grants]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// status, history, audit, release records.
    Reader,
    /// Also deploy, rollback, pre-pull and the environment lock.
    Deployer,
    /// Reads, and approves a release for deploy (`deploy-controller
    /// approve`, the `approvals` gate). Cannot deploy, and a deployer
    /// cannot approve: whoever ships a release is not who approved it.
    Approver,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Deployer => "deployer",
            Role::Approver => "approver",
        }
    }

    /// Whether this granted role may do what `required` allows: every role
    /// reads; deploying and approving each need their own role.
    pub fn permits(self, required: Role) -> bool {
        required == Role::Reader || self == required
    }
}

/// `POST /v1/approvals`: the caller (a certificate with the `approver`
/// role) approves `release` of `project` for deploy. Audited on the host
/// as `release.approved`; the controller's `approvals` gate counts these
/// records by distinct identity.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    pub project: String,
    pub release: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The audit action of an approval.
pub const APPROVAL_ACTION: &str = "release.approved";

/// The answer to an approval: the audit record's sequence number and time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalRecorded {
    pub who: String,
    pub project: String,
    pub release: String,
    pub seq: i64,
    pub ts: String,
}

/// Why an mTLS request was refused with 403.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// `mtls:<certificate CN>`.
    pub identity: String,
    /// The agent's `environment`.
    pub environment: String,
    /// The role the request needs.
    pub required: Role,
    /// The role the identity has here (`None`: no grant at all).
    pub granted: Option<Role>,
}

/// `POST /v1/pull`: pull and pin every image of a release without changing
/// anything that runs (the controller's pre-pull).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    pub project: String,
    pub release: String,
    pub compose_path: String,
    pub compose_text: String,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Service name to `repo@sha256:…`: pull exactly these (promotion).
    #[serde(default)]
    pub pinned: BTreeMap<String, String>,
}

/// The answer to `POST /v1/pull`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullResult {
    pub host: String,
    pub project: String,
    pub release: String,
    /// Service name to pinned image (`repo@sha256:…`).
    pub digests: BTreeMap<String, String>,
    /// The release serving the project on this host now, if any.
    pub serving: Option<String>,
    pub duration_ms: u64,
}

/// `POST /v1/lock` and `POST /v1/lock/renew`: take or extend the
/// environment lease for `ttl_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub deployment_id: String,
    pub ttl_ms: u64,
    /// What the holder is doing, for whoever is refused (e.g. `deploy of v2`).
    #[serde(default)]
    pub purpose: Option<String>,
    /// SSH fallback: the identity (`mtls:<CN>`) that holds this
    /// deployment's lease and that the caller takes it over from, because
    /// the controller lost the agent's HTTPS API mid-deployment and carries
    /// on over SSH. Honoured only for a caller over SSH, only for the same
    /// deployment id, and only with `hand_over_token` (see
    /// `Store::hand_over_lease`); audited as `lock.handed_over`, or
    /// `lock.refused` when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hand_over_from: Option<String>,
    /// With `hand_over_from`: the proof that the caller is the lease's
    /// holder, the [`LeaseGranted::token`] of the newest `lock` answer the
    /// holder had. The deployment id is no proof: `lock_status` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hand_over_token: Option<LeaseToken>,
}

/// The secret of an environment lease: handed to the caller that took the
/// lease (in [`LeaseGranted::token`]) and to nobody else, asked for when
/// the lease is handed over to another identity. The agent keeps only its
/// SHA-256. Its `Debug` does not show it, so that it stays out of logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseToken(String);

impl LeaseToken {
    pub fn new(secret: impl Into<String>) -> LeaseToken {
        LeaseToken(secret.into())
    }

    /// The secret itself: to hash it or to send it, never to show it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseToken(…)")
    }
}

/// `DELETE /v1/lock`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiveUpLeaseRequest {
    pub deployment_id: String,
}

/// The environment lease held on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The environment it locks (the agent's `environment`).
    pub environment: String,
    pub deployment_id: String,
    /// Who took it: `mtls:<CN>`, `unix:<user>` or `ssh:<user> (claimed: …)`
    /// (see [`Caller`](crate::Caller)).
    pub identity: String,
    #[serde(default)]
    pub purpose: Option<String>,
    /// UTC, RFC 3339.
    pub acquired_at: String,
    /// UTC, RFC 3339: after this anyone may take it over.
    pub expires_at: String,
}

/// The answer to a successful lock request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseGranted {
    pub lease: Lease,
    /// An expired lease of another deployment that this one replaced.
    #[serde(default)]
    pub took_over: Option<Lease>,
    /// The lease's secret, new with every `lock` answer (the newest one is
    /// the one that counts): what a hand-over of this lease needs
    /// ([`LeaseRequest::hand_over_token`]). Only in this answer, to this
    /// caller; never in [`Lease`], which anyone may read. Absent from an
    /// agent that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<LeaseToken>,
}

/// `GET /v1/release?project=&release=`: a release as this host recorded it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub host: String,
    pub project: String,
    pub release: String,
    /// `deploying`, `good`, `failed` or `pruned`.
    pub state: String,
    pub created_at: String,
    /// Service name to pinned image (`repo@sha256:…`).
    pub digests: BTreeMap<String, String>,
    /// It serves the project now.
    pub serving: bool,
}

// ---------------------------------------------------------------------------
// The SSH transport: `deploy-agent serve-stdio`, which
// `deploy-controller` runs over SSH when a host's agent cannot be reached.
// One request on stdin, JSON lines on stdout (each flushed as it is
// written), the exit status that of the operation. See docs/ssh.md.
// ---------------------------------------------------------------------------

/// What `deploy-agent serve-stdio` reads: one JSON object on one line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioRequest {
    pub op: crate::ops::Op,
    /// The op's request, as the HTTPS API takes it: a [`DeployRequest`],
    /// [`RollbackRequest`], [`PullRequest`], [`LeaseRequest`],
    /// [`GiveUpLeaseRequest`], or a [`Query`](crate::ops::Query) for reads; `null` for `ping`
    /// and `lock_status`.
    #[serde(default)]
    pub request: serde_json::Value,
    /// What the controller says about itself (recorded, not trusted: the
    /// SSH login is what authenticates the caller).
    #[serde(default)]
    pub caller: StdioCaller,
}

/// What the controller says about itself in a `serve-stdio` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioCaller {
    /// Its identity: the CN of its client certificate, e.g. `ci-production`.
    #[serde(default)]
    pub controller: Option<String>,
    /// Set when the controller accepted this host's key as new in this
    /// session (`--accept-new-host-keys`): `<type> SHA256:<fingerprint>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_host_key: Option<String>,
}

/// Who called over SSH, as `serve-stdio` sees it from its environment
/// (sshd's `SSH_CONNECTION`, `SSH_USER_AUTH`) plus what the controller
/// said. `serve-stdio` hands it to the daemon in the `x-deploy-agent-via`
/// header (base64 of this JSON), which the daemon honours on its unix
/// socket only.
///
/// All of it is a **claim**: sshd sets those variables, but so can any
/// local user who runs `serve-stdio` itself, and any client of agent.sock
/// can write the header. Only the Unix user the request runs as is a fact
/// (the kernel's `SO_PEERCRED`, or this process's uid), and it is kept
/// beside this, in [`Caller::Ssh`](crate::Caller::Ssh), never read from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshCaller {
    /// The Unix user `serve-stdio` says it runs as (the SSH login, unless a
    /// `command` prefix like sudo changed it; then `sudo_user` is the login).
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo_user: Option<String>,
    /// `SHA256:…` of the public key the login used, from the file sshd
    /// names in `$SSH_USER_AUTH` (`ExposeAuthInfo yes`), else `unknown`.
    pub key_fingerprint: String,
    /// e.g. `ssh-ed25519`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
    /// The client's address (first field of `$SSH_CONNECTION`), else `unknown`.
    pub client_ip: String,
    /// The client's port (second field of `$SSH_CONNECTION`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_host_key: Option<String>,
    /// The `serve-stdio` op (the daemon records the op it actually serves).
    pub op: String,
}

impl SshCaller {
    /// The identity the engine, the audit log and the environment lease
    /// record for this caller, with `user` the Unix user the request runs
    /// as, as the kernel reported it:
    /// `ssh:<user> (claimed: key=SHA256:… from=<ip> controller=<CN>)`.
    /// What is in parentheses is what the caller said, labelled so. Stable
    /// for one controller on one machine with one key (no port), so that a
    /// lease taken over SSH is recognised on the next SSH call; and two
    /// Unix users never share one, whatever they claim.
    pub fn who(&self, user: &str) -> String {
        let mut claims = Vec::new();
        if let Some(s) = &self.sudo_user {
            claims.push(format!("sudo_user={}", claimed(s)));
        }
        claims.push(format!("key={}", claimed(&self.key_fingerprint)));
        claims.push(format!("from={}", claimed(&self.client_ip)));
        if let Some(c) = &self.controller {
            claims.push(format!("controller={}", claimed(c)));
        }
        format!("ssh:{user} (claimed: {})", claims.join(" "))
    }
}

/// A claimed value as [`SshCaller::who`] writes it: as it is when it is
/// plain (letters, digits, `-_.:@+/=`), else quoted, so that no claim can
/// close the parentheses or pass for another field.
fn claimed(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@+/=".contains(c));
    if plain {
        value.to_string()
    } else {
        format!("{value:?}")
    }
}

/// One line of `serve-stdio`'s output. Progress and result lines are the
/// same JSON as [`Event`]'s (`"type": "progress" | "result"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StdioLine {
    /// First line: who does the work and for whom.
    Hello(StdioHello),
    Progress(Progress),
    Result(OperationResult),
    /// The answer of a non-streaming op (the HTTPS API's JSON body).
    Answer {
        status: u16,
        body: serde_json::Value,
    },
    /// A refusal or failure, with the HTTP status the HTTPS API would have
    /// answered (403, 409, 404, …).
    Error {
        status: u16,
        error: ApiError,
    },
}

/// Who does the work of a request that came through `serve-stdio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServedBy {
    /// Handed to `deploy-agent run` over agent.sock.
    Daemon,
    /// No daemon answered: this process does the work under the host lock.
    InProcess,
}

impl ServedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ServedBy::Daemon => "daemon",
            ServedBy::InProcess => "in_process",
        }
    }
}

/// The first line of `serve-stdio`'s output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StdioHello {
    pub served_by: ServedBy,
    /// The identity recorded for the caller (see [`SshCaller::who`]).
    pub who: String,
    pub host: String,
    /// `deploy-agent --version`.
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> SshCaller {
        SshCaller {
            user: "deploy".into(),
            key_fingerprint: "SHA256:abc+/9".into(),
            client_ip: "10.0.0.5".into(),
            client_port: Some(51234),
            controller: Some("ci-production".into()),
            op: "deploy".into(),
            ..SshCaller::default()
        }
    }

    #[test]
    fn the_ssh_identity_labels_what_the_caller_claims() {
        let c = caller();
        assert_eq!(
            c.who("deploy"),
            "ssh:deploy (claimed: key=SHA256:abc+/9 from=10.0.0.5 controller=ci-production)"
        );
        // The user is the one given (the kernel's), never the claimed one.
        let forged = SshCaller {
            user: "root".into(),
            ..c.clone()
        };
        assert!(forged.who("mallory").starts_with("ssh:mallory (claimed: "));
        let sudo = SshCaller {
            sudo_user: Some("alice".into()),
            controller: None,
            ..c.clone()
        };
        assert_eq!(
            sudo.who("deploy-agent"),
            "ssh:deploy-agent (claimed: sudo_user=alice key=SHA256:abc+/9 from=10.0.0.5)"
        );
        // A claim cannot close the parentheses or pass for another field.
        let sly = SshCaller {
            controller: Some("ci) key=SHA256:real".into()),
            ..c
        };
        assert_eq!(
            sly.who("deploy"),
            "ssh:deploy (claimed: key=SHA256:abc+/9 from=10.0.0.5 controller=\"ci) key=SHA256:real\")"
        );
    }

    #[test]
    fn lease_tokens_are_optional_on_the_wire_and_hidden_from_debug() {
        // Older peers: a request and an answer without them still parse.
        let req: LeaseRequest =
            serde_json::from_str(r#"{"deployment_id":"d1","ttl_ms":1000}"#).unwrap();
        assert_eq!(req.hand_over_token, None);
        let lease = r#"{"environment":"p","deployment_id":"d1","identity":"mtls:ci","acquired_at":"a","expires_at":"b"}"#;
        let granted: LeaseGranted =
            serde_json::from_str(&format!(r#"{{"lease":{lease}}}"#)).unwrap();
        assert!(granted.token.is_none());
        let granted: LeaseGranted =
            serde_json::from_str(&format!(r#"{{"lease":{lease},"token":"s3cret"}}"#)).unwrap();
        assert_eq!(
            granted.token.as_ref().map(LeaseToken::expose),
            Some("s3cret")
        );
        assert!(!format!("{granted:?}").contains("s3cret"));
        // Unknown request fields are still refused.
        assert!(
            serde_json::from_str::<LeaseRequest>(
                r#"{"deployment_id":"d1","ttl_ms":1000,"token":"x"}"#
            )
            .is_err()
        );
        let req = LeaseRequest {
            hand_over_from: Some("mtls:ci".into()),
            hand_over_token: Some(LeaseToken::new("s3cret")),
            ..req
        };
        let json = serde_json::to_string(&req).unwrap();
        assert!(json.contains(r#""hand_over_token":"s3cret""#), "{json}");
        assert!(!format!("{req:?}").contains("s3cret"));
    }
}
