//! The fleet side of the agent's API (issue 4): what `deploy-controller`
//! needs besides deploy / rollback / status / history, and the HTTPS server
//! with mutual TLS that serves the daemon's whole router to the network.
//!
//! - [`routes`]: `POST /v1/pull` (pre-pull and pin, nothing changes),
//!   `GET /v1/audit`, `GET /v1/release`, and the environment lease
//!   (`GET|POST|DELETE /v1/lock`, `POST /v1/lock/renew`). They are merged
//!   into the daemon's router, so they answer on the unix socket (the local
//!   user counts as a deployer) and over mTLS alike.
//! - [`tls`]: the HTTPS listener (`api_listen` in agent.toml). Each request
//!   is authorized ([`authz`]) by the client certificate's identity and the
//!   role `[grants]` gives it in this agent's `environment`; a refusal is a
//!   403 with an [`ApiError`] saying who, where and what role, and an
//!   `api.denied` audit record. The identity becomes [`Peer::who`] as
//!   `mtls:<CN>`, so every record names the certificate.
//! - [`check_lease`]: while a controller holds the environment lease, only
//!   its deployment may deploy or roll back on this host.

pub mod authz;
pub mod pull;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::config::{AgentConfig, environment};
use crate::daemon::Peer;
use crate::engine::{Engine, OpError};
use crate::store::lease::LeaseError;
use crate::store::{AuditEntry, Store};
use crate::wire::{
    APPROVAL_ACTION, ApiError, ApprovalRecorded, ApprovalRequest, LockGranted, LockRequest,
    Outcome, PullRequest, ReleaseInfo, UnlockRequest,
};

/// Shortest and longest lease a controller may ask for.
pub const MIN_LEASE: Duration = Duration::from_millis(500);
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// Refuses a deploy or rollback while another deployment holds this
/// environment's lease. `who` is the caller's identity: the lease's owner
/// is its deployment id *and* the identity that took it.
pub fn check_lease(
    store: &Store,
    config: &AgentConfig,
    deployment_id: Option<&str>,
    who: &str,
) -> Result<(), OpError> {
    let env = environment(config);
    let Some(lease) = store.active_lease(env, jiff::Timestamp::now())? else {
        return Ok(());
    };
    if deployment_id == Some(lease.deployment_id.as_str()) && who == lease.identity {
        return Ok(());
    }
    Err(OpError::new(
        Outcome::Locked,
        format!(
            "environment {env} is locked by deployment {} ({}{}) until {}: a fleet deployment is in progress on this host; \
             wait for it to end (or for its lock to expire) and retry",
            lease.deployment_id,
            lease.identity,
            lease
                .purpose
                .as_ref()
                .map(|p| format!(", {p}"))
                .unwrap_or_default(),
            lease.expires_at
        ),
    ))
}

/// The HTTP status of an error answer.
pub fn status_of(outcome: Outcome) -> StatusCode {
    match outcome {
        Outcome::ConfigError => StatusCode::BAD_REQUEST,
        Outcome::Denied => StatusCode::FORBIDDEN,
        Outcome::Locked => StatusCode::CONFLICT,
        Outcome::RegistryError => StatusCode::BAD_GATEWAY,
        Outcome::EnvironmentError => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(e: ApiError) -> Response {
    (status_of(e.outcome), Json(e)).into_response()
}

fn op_error(e: OpError) -> Response {
    error(ApiError::new(e.outcome, e.message))
}

/// The routes of this module, to merge into the daemon's router.
pub fn routes(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/pull", post(pull))
        .route("/v1/audit", get(audit))
        .route("/v1/release", get(release))
        .route("/v1/lock", get(lock_get).post(lock).delete(unlock))
        .route("/v1/lock/renew", post(renew))
        .route("/v1/approvals", post(approve))
        .with_state(engine)
}

/// An approval, from an mTLS identity only: the role check (approver) has
/// run in the TLS layer. Over the local socket or SSH there is no such
/// identity, so there is no approving there.
async fn approve(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<ApprovalRequest>,
) -> Response {
    respond(record_approval(&engine, &peer.who, &req))
}

pub fn record_approval(
    engine: &Engine,
    who: &str,
    req: &ApprovalRequest,
) -> Result<ApprovalRecorded, Refusal> {
    if !who.starts_with("mtls:") {
        return Err(ApiError::new(
            Outcome::Denied,
            format!(
                "{who} cannot approve: approvals come from a client certificate with the approver role \
                 (deploy-controller approve), never over the local socket or SSH"
            ),
        )
        .into());
    }
    for (what, v) in [("project", &req.project), ("release", &req.release)] {
        if v.is_empty() || v.len() > 128 || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ApiError::new(
                Outcome::ConfigError,
                format!("{what} {v:?} must be 1-128 printable characters without spaces"),
            )
            .into());
        }
    }
    let mut entry = AuditEntry::new(who, APPROVAL_ACTION);
    entry.project = Some(req.project.clone());
    entry.release = Some(req.release.clone());
    entry.outcome = Some(Outcome::Succeeded.as_str().to_string());
    entry.reason = req.reason.clone();
    let record = engine.store.append_audit(&entry).map_err(|e| {
        Refusal::from(ApiError::new(
            Outcome::EnvironmentError,
            format!("the approval was not recorded: its audit record could not be written: {e}"),
        ))
    })?;
    tracing::info!(who, project = %req.project, release = %req.release, "release approved");
    Ok(ApprovalRecorded {
        who: who.to_string(),
        project: req.project.clone(),
        release: req.release.clone(),
        seq: record.seq,
        ts: record.ts,
    })
}

async fn pull(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<PullRequest>,
) -> Response {
    match pull::pre_pull(&engine, &req).await {
        Ok(r) => {
            tracing::info!(who = %peer.who, project = %req.project, release = %req.release, "pre-pulled {} image(s)", r.digests.len());
            Json(r).into_response()
        }
        Err(e) => {
            tracing::warn!(who = %peer.who, project = %req.project, release = %req.release, "pre-pull failed: {}", e.message);
            op_error(e)
        }
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    project: Option<String>,
    limit: Option<usize>,
}

async fn audit(State(engine): State<Arc<Engine>>, Query(q): Query<AuditQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(100_000);
    match engine.store.audit(q.project.as_deref(), limit) {
        Ok(records) => Json(records).into_response(),
        Err(e) => op_error(e.into()),
    }
}

#[derive(Deserialize)]
struct ReleaseQuery {
    project: Option<String>,
    release: Option<String>,
}

async fn release(State(engine): State<Arc<Engine>>, Query(q): Query<ReleaseQuery>) -> Response {
    respond(release_info(&engine, q.project, q.release))
}

fn check_request(deployment_id: &str, ttl_ms: Option<u64>) -> Result<Duration, ApiError> {
    if deployment_id.is_empty()
        || deployment_id.len() > 128
        || deployment_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::new(
            Outcome::ConfigError,
            format!(
                "deployment_id {deployment_id:?} must be 1-128 printable characters without spaces"
            ),
        ));
    }
    let ttl = Duration::from_millis(ttl_ms.unwrap_or(60_000));
    if !(MIN_LEASE..=MAX_LEASE).contains(&ttl) {
        return Err(ApiError::new(
            Outcome::ConfigError,
            format!(
                "ttl_ms {} is out of range: a lease lasts between {} ms and {} ms",
                ttl.as_millis(),
                MIN_LEASE.as_millis(),
                MAX_LEASE.as_millis()
            ),
        ));
    }
    Ok(ttl)
}

fn audit_lock(
    engine: &Engine,
    who: &str,
    action: &str,
    detail: serde_json::Value,
) -> Result<(), ApiError> {
    let mut entry = AuditEntry::new(who, action);
    entry.detail = detail;
    engine.store.append_audit(&entry).map(|_| ()).map_err(|e| {
        ApiError::new(
            Outcome::EnvironmentError,
            format!(
                "the lock request was not completed: its audit record could not be written: {e}"
            ),
        )
    })
}

fn lease_error(e: LeaseError) -> ApiError {
    let message = e.to_string();
    match e {
        LeaseError::Held(holder) => {
            let mut a = ApiError::new(
                Outcome::Locked,
                format!(
                    "{message}; wait for that deployment to finish, or retry with --lock-wait DURATION"
                ),
            );
            a.holder = Some(holder);
            a
        }
        LeaseError::NotHolder { current, .. } => {
            let mut a = ApiError::new(
                Outcome::Locked,
                format!(
                    "{message}; the lock was lost (it expired, and another deployment may have taken it over)"
                ),
            );
            a.holder = current;
            a
        }
        LeaseError::Store(_) => ApiError::new(Outcome::EnvironmentError, message),
    }
}

async fn lock_get(State(engine): State<Arc<Engine>>) -> Response {
    respond(current_lease(&engine))
}

async fn lock(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<LockRequest>,
) -> Response {
    respond(take_lease(&engine, &peer.who, &req))
}

async fn renew(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<LockRequest>,
) -> Response {
    respond(renew_lease(&engine, &peer.who, &req))
}

async fn unlock(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<UnlockRequest>,
) -> Response {
    respond(give_up_lease(&engine, &peer.who, &req))
}

fn respond<T: serde::Serialize>(r: Result<T, Refusal>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(r) => (r.status, Json(r.error)).into_response(),
    }
}

// --- The lease and release records as functions (issue 5) -----------------
// The HTTPS API's handlers above and `deploy-agent serve-stdio` (the SSH
// transport, when no daemon answers) both call these, so a request does
// the same thing and leaves the same audit records whichever way it came.

/// An error answer and the HTTP status it goes with.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    pub error: ApiError,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Refusal {
        Refusal {
            status: status_of(error.outcome),
            error,
        }
    }
}

impl From<OpError> for Refusal {
    fn from(e: OpError) -> Refusal {
        ApiError::new(e.outcome, e.message).into()
    }
}

/// `GET /v1/lock`: the lease in force, if any.
pub fn current_lease(engine: &Engine) -> Result<Option<crate::wire::Lease>, Refusal> {
    let env = environment(&engine.config);
    engine
        .store
        .active_lease(env, jiff::Timestamp::now())
        .map_err(|e| OpError::from(e).into())
}

/// `POST /v1/lock`: take (or extend) the environment lease for `who`;
/// with `hand_over_from`, take it over from that identity within the same
/// deployment (SSH callers only).
pub fn take_lease(engine: &Engine, who: &str, req: &LockRequest) -> Result<LockGranted, Refusal> {
    let ttl = check_request(&req.deployment_id, Some(req.ttl_ms))?;
    let env = environment(&engine.config).to_string();
    let now = jiff::Timestamp::now();
    let result = match &req.hand_over_from {
        Some(from) => {
            if !who.starts_with("ssh:") {
                return Err(ApiError::new(
                    Outcome::ConfigError,
                    "hand_over_from is only accepted from a caller over SSH (deploy-agent serve-stdio)",
                )
                .into());
            }
            engine
                .store
                .hand_over_lease(
                    &env,
                    &req.deployment_id,
                    from,
                    who,
                    req.purpose.as_deref(),
                    ttl,
                    now,
                )
                .map(|(a, handed)| (a, handed.then(|| from.clone())))
        }
        None => engine
            .store
            .acquire_lease(
                &env,
                &req.deployment_id,
                who,
                req.purpose.as_deref(),
                ttl,
                now,
            )
            .map(|a| (a, None)),
    };
    match result {
        Ok((a, handed_from)) => {
            if let Some(from) = handed_from {
                let detail = serde_json::json!({
                    "environment": env,
                    "deployment_id": req.deployment_id,
                    "purpose": req.purpose,
                    "expires_at": a.lease.expires_at,
                    "from": from,
                });
                audit_lock(engine, who, "lock.handed_over", detail)?;
                tracing::warn!(who = %who, deployment = %req.deployment_id, "lock.handed_over for environment {env} from {from}");
            } else if !a.extended {
                let action = if a.took_over.is_some() {
                    "lock.taken_over"
                } else {
                    "lock.acquired"
                };
                let detail = serde_json::json!({
                    "environment": env,
                    "deployment_id": req.deployment_id,
                    "purpose": req.purpose,
                    "expires_at": a.lease.expires_at,
                    "previous_holder": a.took_over,
                });
                audit_lock(engine, who, action, detail)?;
                tracing::info!(who = %who, deployment = %req.deployment_id, "{action} for environment {env}");
            }
            Ok(LockGranted {
                lease: a.lease,
                took_over: a.took_over,
            })
        }
        Err(e) => {
            let api = lease_error(e);
            if let Some(h) = &api.holder {
                let detail = serde_json::json!({
                    "environment": env,
                    "deployment_id": req.deployment_id,
                    "holder": h,
                });
                audit_lock(engine, who, "lock.refused", detail)?;
            }
            Err(api.into())
        }
    }
}

/// `POST /v1/lock/renew`.
pub fn renew_lease(
    engine: &Engine,
    who: &str,
    req: &LockRequest,
) -> Result<crate::wire::Lease, Refusal> {
    let ttl = check_request(&req.deployment_id, Some(req.ttl_ms))?;
    let env = environment(&engine.config);
    engine
        .store
        .renew_lease(env, &req.deployment_id, who, ttl, jiff::Timestamp::now())
        .map_err(|e| lease_error(e).into())
}

/// `DELETE /v1/lock`.
pub fn give_up_lease(
    engine: &Engine,
    who: &str,
    req: &UnlockRequest,
) -> Result<Option<crate::wire::Lease>, Refusal> {
    check_request(&req.deployment_id, None)?;
    let env = environment(&engine.config).to_string();
    let released = engine
        .store
        .release_lease(&env, &req.deployment_id, who)
        .map_err(lease_error)?;
    if released.is_some() {
        let detail = serde_json::json!({
            "environment": env,
            "deployment_id": req.deployment_id,
        });
        audit_lock(engine, who, "lock.released", detail)?;
    }
    Ok(released)
}

/// `GET /v1/release?project=&release=`: 404 when this host never ran it.
pub fn release_info(
    engine: &Engine,
    project: Option<String>,
    release: Option<String>,
) -> Result<ReleaseInfo, Refusal> {
    let (Some(project), Some(release)) = (project, release) else {
        return Err(ApiError::new(
            Outcome::ConfigError,
            "GET /v1/release needs ?project=P&release=R",
        )
        .into());
    };
    let Some(record) = engine
        .store
        .release(&project, &release)
        .map_err(OpError::from)?
    else {
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            error: ApiError::new(
                Outcome::ConfigError,
                format!(
                    "release {release} of project {project} was never deployed on this host (or its record was pruned)"
                ),
            ),
        });
    };
    let serving = engine
        .store
        .serving(&project)
        .map_err(OpError::from)?
        .and_then(|s| s.current)
        .as_deref()
        == Some(release.as_str());
    Ok(ReleaseInfo {
        host: hostname(),
        project,
        release,
        state: record.state.as_str().to_string(),
        created_at: record.created_at,
        digests: record.digests,
        serving,
    })
}

// --- end issue 5 -----------------------------------------------------------

/// The host name this agent reports.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_ENVIRONMENT;

    fn cfg(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(std::path::Path::new("agent.toml"), text).map_err(|e| e.to_string())
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
    fn only_the_lease_holder_deploys_while_it_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let config = cfg("environment = \"production\"").unwrap();
        assert!(check_lease(&store, &config, None, "unix:root").is_ok());
        store
            .acquire_lease(
                "production",
                "d1",
                "mtls:ci",
                Some("deploy of v2"),
                Duration::from_secs(60),
                jiff::Timestamp::now(),
            )
            .unwrap();
        assert!(check_lease(&store, &config, Some("d1"), "mtls:ci").is_ok());
        for (id, who) in [
            (None, "unix:root"),
            (Some("d2"), "mtls:ci"),
            (Some("d1"), "mtls:other"),
        ] {
            let e = check_lease(&store, &config, id, who).unwrap_err();
            assert_eq!(e.outcome, Outcome::Locked);
            assert!(
                e.message.contains("deployment d1 (mtls:ci, deploy of v2)"),
                "{}",
                e.message
            );
        }
        // Another environment's lease does not matter here.
        let staging = cfg("environment = \"staging\"").unwrap();
        assert!(check_lease(&store, &staging, None, "unix:root").is_ok());
    }

    #[test]
    fn error_statuses() {
        assert_eq!(status_of(Outcome::Denied), StatusCode::FORBIDDEN);
        assert_eq!(status_of(Outcome::Locked), StatusCode::CONFLICT);
        assert_eq!(status_of(Outcome::ConfigError), StatusCode::BAD_REQUEST);
        assert_eq!(status_of(Outcome::RegistryError), StatusCode::BAD_GATEWAY);
        assert_eq!(
            status_of(Outcome::EnvironmentError),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
