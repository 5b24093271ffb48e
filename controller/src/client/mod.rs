//! The agent API client: one [`AgentClient`] per host, whose typed calls
//! follow the operation table (`deploy_protocol::ops`): every call names
//! its [`Call`] type, and the method, path, query, body and answer all come
//! from there. Split by transport:
//!
//! - [`https`]: the agent's HTTPS API with mutual TLS (reqwest + rustls),
//!   one HTTP/2 connection per agent, JSON in and out, deploys and
//!   rollbacks streamed as JSON lines ([`Event`]s, the last one the result);
//! - [`over_ssh`]: `deploy-agent serve-stdio` over SSH (see [`crate::ssh`]);
//! - [`route`]: which of the two a call takes, and the fallback.
//!
//! Errors are sorted the way the controller acts on them: the agent could
//! not be reached at all ([`CallError::Unreachable`]: refused, timed out,
//! TLS handshake failed — the SSH fallback will apply there), the agent
//! refused our client certificate with a TLS alert
//! ([`CallError::CertificateRefused`]), the agent answered with a refusal
//! ([`CallError::Api`]: denied, locked, config…), or the answer made no
//! sense ([`CallError::Protocol`]).
//!
//! **The SSH fallback.** With `--transport auto` (the default), a
//! host whose inventory entry has SSH details is reached over SSH
//! when, and only when,
//! its agent could not be reached *before it saw the request*: the
//! connection was refused, did not open within `connect_timeout`, or the
//! TLS handshake failed for a reason that is not our certificate (e.g. the
//! agent's certificate expired or is not from the inventory's CA). An
//! agent that answered — 403, 409 locked, any 4xx/5xx, a policy refusal,
//! or a TLS alert refusing our certificate (expired, unknown CA, bad
//! usage: exit 6, so that an expired CI certificate is renewed rather
//! than hidden by SSH) — is never routed around: its answer is the
//! result. Once a host has fallen back it
//! stays on SSH for the rest of the run (said once, loudly). If the lease
//! was taken over mutual TLS before the agent became unreachable, it is
//! handed over to the SSH identity first (`hand_over_from`).
//! `--transport agent` never uses SSH; `--transport ssh` uses nothing else.

mod https;
mod over_ssh;
mod route;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deploy_protocol::ops::{Call, call};
use deploy_protocol::{
    ApiError, ApprovalRecorded, ApprovalRequest, AuditRecord, DeployRequest, Event,
    GiveUpLeaseRequest, HistoryEntry, Lease, LeaseGranted, LeaseRequest, OperationResult, Outcome,
    PullRequest, PullResult, Query, ReleaseInfo, RollbackRequest, StatusReport,
};
use serde::Serialize;

pub use https::{CertRefusal, Delivery, TlsCheck, TlsError, http_client, http_client_with};
pub use route::{Notice, RouteReport, Transport, TransportOptions};

use crate::inventory::{Environment, Host, TlsFiles};
use route::{Route, Via};

/// How long to wait for a TCP connection and the TLS handshake (the
/// inventory's `connect_timeout` sets it per environment).
const CONNECT_TIMEOUT: Duration = crate::inventory::DEFAULT_CONNECT_TIMEOUT;
/// Limit for calls that are not operations (status, lock…).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for a pre-pull: big images over slow links take a while.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(
        "host {host}: cannot reach its agent at https://{addr}: {message}; {}",
        unreachable_advice(message)
    )]
    Unreachable {
        host: String,
        addr: String,
        message: String,
        /// Whether the agent may have seen the request: the SSH fallback
        /// applies only when it cannot have.
        delivery: Delivery,
    },
    /// The agent refused this controller's client certificate in the TLS
    /// handshake (its alert says why): an answer, never routed around over
    /// SSH. Exit 6, like any refusal of who we are.
    #[error(
        "host {host}: its agent at https://{addr} refused this controller's client certificate{}: {} (TLS alert {}); {}",
        cert.as_ref().map(|c| format!(" ({c})")).unwrap_or_default(),
        refusal.why(),
        refusal.alert(),
        refusal.advice()
    )]
    CertificateRefused {
        host: String,
        addr: String,
        /// The inventory's certificate and what is known of its validity.
        cert: Option<String>,
        refusal: CertRefusal,
    },
    /// The host could not be reached over SSH either (or `--transport ssh`
    /// failed): host key refused, authentication, connection, or
    /// `deploy-agent serve-stdio` failing on the host.
    #[error("host {host}: {}over SSH ({target}): {message}", agent.as_ref().map(|a| format!("its agent is unreachable ({a}), and ")).unwrap_or_default())]
    Ssh {
        host: String,
        target: String,
        message: String,
        /// Why the agent's HTTPS API was not used, when it was tried first.
        agent: Option<String>,
        /// Our own SSH configuration is unusable (the key file or variable):
        /// exit 2 rather than 5.
        config: bool,
    },
    #[error("host {host}: {}", error.message)]
    Api {
        host: String,
        status: u16,
        error: ApiError,
    },
    #[error("host {host}: unexpected answer from its agent: {message}")]
    Protocol { host: String, message: String },
}

impl CallError {
    /// The outcome class, for exit codes.
    pub fn outcome(&self) -> Outcome {
        match self {
            CallError::Ssh { config: true, .. } => Outcome::ConfigError,
            CallError::Unreachable { .. } | CallError::Protocol { .. } | CallError::Ssh { .. } => {
                Outcome::EnvironmentError
            }
            CallError::Api { error, .. } => error.outcome,
            CallError::CertificateRefused { .. } => Outcome::Denied,
        }
    }

    pub fn host(&self) -> &str {
        match self {
            CallError::Unreachable { host, .. }
            | CallError::CertificateRefused { host, .. }
            | CallError::Api { host, .. }
            | CallError::Protocol { host, .. }
            | CallError::Ssh { host, .. } => host,
        }
    }

    /// Whether the agent may have seen the request (see [`Delivery`]).
    pub fn delivery(&self) -> Delivery {
        match self {
            CallError::Unreachable { delivery, .. } => *delivery,
            _ => Delivery::Possible,
        }
    }
}

/// What to check after an agent could not be reached.
fn unreachable_advice(message: &str) -> &'static str {
    if message.contains("invalid peer certificate") {
        "the agent's certificate is not one the inventory's CA (tls `ca`) vouches for: \
         check its agent.toml `tls_cert` (expired? issued for this address? from this CA?)"
    } else {
        "check that `deploy-agent run` listens there (agent.toml `api_listen`) and that nothing blocks the port"
    }
}

/// One agent: over its HTTPS API, or over SSH (see the module's doc).
#[derive(Clone)]
pub struct AgentClient {
    pub host: String,
    pub addr: String,
    http: reqwest::Client,
    /// Asks the agent why, when a connection closed right after the TLS
    /// handshake (see [`TlsCheck`]).
    tls: Option<Arc<TlsCheck>>,
    /// Shared by the clones of this client (the lease renewer's, the
    /// rollout's): the route and the SSH session are per host.
    route: Arc<Route>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("host", &self.host)
            .field("addr", &self.addr)
            .field("transport", &self.route.transport)
            .finish()
    }
}

impl AgentClient {
    /// A client of the HTTPS API only (no SSH fallback).
    pub fn new(host: &Host, http: reqwest::Client) -> AgentClient {
        AgentClient {
            host: host.name.clone(),
            addr: host.agent.clone(),
            http,
            tls: None,
            route: Arc::new(Route::agent_only()),
        }
    }

    /// Reads the agent's TLS alert with `check` when a connection closes
    /// right after the handshake.
    pub fn with_tls_check(mut self, check: Option<Arc<TlsCheck>>) -> AgentClient {
        self.tls = check;
        self
    }

    /// One call of the table, routed (HTTPS, or SSH when it falls back).
    async fn request<C: Call>(
        &self,
        req: &C::Request,
        timeout: Duration,
    ) -> Result<(C::Response, Via), CallError> {
        let input = to_value(req);
        self.routed_via(C::OP, input.clone(), timeout, || {
            self.https::<C>(&input, timeout)
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), CallError> {
        self.request::<call::Ping>(&(), CALL_TIMEOUT)
            .await
            .map(|_| ())
    }

    pub async fn pull(&self, req: &PullRequest) -> Result<PullResult, CallError> {
        Ok(self.request::<call::Pull>(req, PULL_TIMEOUT).await?.0)
    }

    pub async fn lock(&self, req: &LeaseRequest) -> Result<LeaseGranted, CallError> {
        let (granted, via) = self.request::<call::TakeLease>(req, CALL_TIMEOUT).await?;
        if via == Via::Agent {
            self.route.held_over_mtls(req, granted.token.clone());
        }
        Ok(granted)
    }

    pub async fn renew(&self, req: &LeaseRequest) -> Result<Lease, CallError> {
        Ok(self.request::<call::RenewLease>(req, CALL_TIMEOUT).await?.0)
    }

    pub async fn unlock(&self, req: &GiveUpLeaseRequest) -> Result<Option<Lease>, CallError> {
        let r = self.request::<call::GiveUpLease>(req, CALL_TIMEOUT).await;
        if r.is_ok() {
            self.route.released();
        }
        Ok(r?.0)
    }

    pub async fn status(&self, project: &str) -> Result<StatusReport, CallError> {
        Ok(self
            .request::<call::Status>(&Query::project(project), CALL_TIMEOUT)
            .await?
            .0)
    }

    pub async fn history(&self, project: &str) -> Result<Vec<HistoryEntry>, CallError> {
        Ok(self
            .request::<call::History>(&Query::project(project), CALL_TIMEOUT)
            .await?
            .0)
    }

    pub async fn audit(
        &self,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, CallError> {
        let q = Query {
            project: project.map(str::to_string),
            limit: Some(limit),
            ..Query::default()
        };
        Ok(self.request::<call::Audit>(&q, CALL_TIMEOUT).await?.0)
    }

    /// Approves a release on this host (HTTPS only: an approval is the
    /// client certificate's identity, which SSH does not carry).
    pub async fn approve(&self, req: &ApprovalRequest) -> Result<ApprovalRecorded, CallError> {
        self.https::<call::Approve>(&to_value(req), CALL_TIMEOUT)
            .await
    }

    /// The release record; `Ok(None)` when this host never ran it.
    pub async fn release(
        &self,
        project: &str,
        release: &str,
    ) -> Result<Option<ReleaseInfo>, CallError> {
        let q = Query {
            project: Some(project.to_string()),
            release: Some(release.to_string()),
            ..Query::default()
        };
        match self.request::<call::Release>(&q, CALL_TIMEOUT).await {
            Ok((r, _)) => Ok(Some(r)),
            Err(CallError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn deploy(
        &self,
        req: &DeployRequest,
        on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        self.routed_operation::<call::Deploy>(req, on_event).await
    }

    pub async fn rollback(
        &self,
        req: &RollbackRequest,
        on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        self.routed_operation::<call::Rollback>(req, on_event).await
    }
}

/// The identity an agent records for this client certificate: its CN,
/// else its first DNS name (as the agent computes it).
pub fn certificate_identity(cert: &Path) -> Option<String> {
    let pem = std::fs::read(cert).ok()?;
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    deploy_protocol::identity::certificate_identity(&block.contents)
}

/// The clients of `env`'s hosts, with the certificate `tls` and the
/// transport `opts`. Checks that `--transport ssh` has SSH details for
/// every host. Without a certificate every host is reached over SSH (the
/// inventory made sure each has SSH details).
pub fn clients(
    env: &Environment,
    tls: Option<&TlsFiles>,
    opts: &TransportOptions,
    notice: Notice,
) -> Result<Vec<AgentClient>, String> {
    let Some(tls) = tls else {
        if opts.transport == Transport::Agent {
            return Err(format!(
                "--transport agent: environment {} has no client certificate for the agents' HTTPS API; \
                 add `[environments.{}.tls]` (or a top-level `[tls]`) with ca, cert and key",
                env.name, env.name
            ));
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| error_chain(&e))?;
        return Ok(env
            .hosts
            .iter()
            .map(|h| {
                let c = AgentClient::with_route(
                    h,
                    http.clone(),
                    Transport::Ssh,
                    env,
                    opts,
                    None,
                    &notice,
                );
                c.route.with_state(|s| {
                    s.on_ssh = Some("the inventory has no client certificate: SSH only".into())
                });
                c
            })
            .collect());
    };
    if opts.transport == Transport::Ssh {
        let missing: Vec<&str> = env
            .hosts
            .iter()
            .filter(|h| h.ssh.is_none())
            .map(|h| h.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "--transport ssh: host(s) {} of environment {} have no SSH details; add an `ssh` table \
                 (user, key or key_env, known_hosts) to them or to the environment",
                missing.join(", "),
                env.name
            ));
        }
    }
    let http = match http_client_with(tls, env.connect_timeout) {
        Ok(c) => c,
        // SSH only: the HTTPS client is never used, its files need not exist.
        Err(_) if opts.transport == Transport::Ssh => reqwest::Client::builder()
            .build()
            .map_err(|e| error_chain(&e))?,
        Err(e) => return Err(e.to_string()),
    };
    let identity = certificate_identity(&tls.cert);
    let check = TlsCheck::new(tls).ok().map(Arc::new);
    Ok(env
        .hosts
        .iter()
        .map(|h| {
            AgentClient::with_route(
                h,
                http.clone(),
                opts.transport,
                env,
                opts,
                identity.clone(),
                &notice,
            )
            .with_tls_check(check.clone())
        })
        .collect())
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s.to_string()
    }
}

/// An error and its sources, `: `-separated (reqwest hides the TLS reason
/// in its sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        use deploy_protocol::ops::encode;
        assert_eq!(encode("web"), "web");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(encode("v1.2-rc_3~x"), "v1.2-rc_3~x");
    }

    #[test]
    fn snippets_are_short() {
        assert_eq!(snippet(b"  hi \n"), "hi");
        assert!(snippet(&[b'a'; 1000]).ends_with('…'));
    }
}
