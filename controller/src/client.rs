//! The agent API client: HTTPS with mutual TLS (reqwest + rustls), one
//! HTTP/2 connection per agent, JSON in and out, deploys and rollbacks
//! streamed as JSON lines ([`Event`]s, the last one the result).
//!
//! Errors are sorted the way the controller acts on them: the agent could
//! not be reached at all ([`CallError::Unreachable`]: refused, timed out,
//! TLS handshake refused — the SSH fallback will apply there), the agent
//! answered with a refusal ([`CallError::Api`]: denied, locked, config…),
//! or the answer made no sense ([`CallError::Protocol`]).
//!
//! **The SSH fallback (issue 5).** With `--transport auto` (the default), a
//! host whose inventory entry has SSH details is reached over SSH
//! (`deploy-agent serve-stdio`, see [`crate::ssh`]) when, and only when,
//! its agent could not be reached *before it saw the request*: the
//! connection was refused, did not open within `connect_timeout`, or the
//! TLS handshake failed (an expired or wrong certificate). An agent that
//! answered — 403, 409 locked, any 4xx/5xx, a policy refusal — is never
//! routed around: its answer is the result. Once a host has fallen back it
//! stays on SSH for the rest of the run (said once, loudly). If the lease
//! was taken over mutual TLS before the agent became unreachable, it is
//! handed over to the SSH identity first (`hand_over_from`).
//! `--transport agent` never uses SSH; `--transport ssh` uses nothing else.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_protocol::AuditRecord;
use deploy_protocol::{
    ApiError, ApprovalRecorded, ApprovalRequest, DeployRequest, Event, HistoryEntry, Lease,
    LockGranted, LockRequest, OperationResult, Outcome, PullRequest, PullResult, ReleaseInfo,
    RollbackRequest, StatusReport, StdioCaller, StdioLine, StdioOp, StdioQuery, StdioRequest,
    UnlockRequest,
};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::inventory::{Environment, Host, SshSettings, TlsFiles};
use crate::ssh::{self, Session};

/// How long to wait for a TCP connection and the TLS handshake (the
/// inventory's `connect_timeout` sets it per environment).
const CONNECT_TIMEOUT: Duration = crate::inventory::DEFAULT_CONNECT_TIMEOUT;
/// Limit for calls that are not operations (status, lock…).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for a pre-pull: big images over slow links take a while.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read the {what} {} ({key} in the inventory's tls table): {source}",
        path.display()
    )]
    Read {
        what: &'static str,
        key: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} is not usable: {message}", path.display())]
    Invalid {
        what: &'static str,
        path: std::path::PathBuf,
        message: String,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(
        "host {host}: cannot reach its agent at https://{addr}: {message}; check that `deploy-agent run` listens there \
         (api_listen) and that its certificate is from the inventory's CA"
    )]
    Unreachable {
        host: String,
        addr: String,
        message: String,
        /// Whether the agent may have seen the request: the SSH fallback
        /// applies only when it cannot have.
        delivery: Delivery,
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
        }
    }

    pub fn host(&self) -> &str {
        match self {
            CallError::Unreachable { host, .. }
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

/// What a failed HTTPS call tells of whether the agent saw the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It never reached the agent's HTTP layer: the connection was refused
    /// or timed out, or the TLS handshake was refused on either side. The
    /// SSH fallback applies.
    Never,
    /// The connection closed with no answer, while or right after the
    /// request was sent. With TLS 1.3 this is also how an agent refusing
    /// our certificate can look (it closes after the handshake, racing our
    /// first write), so another request tells: no answer again means the
    /// agent cannot be reached (SSH); an answer means it is up and this
    /// error stands.
    Lost,
    /// The agent may have acted on it (an answer came, or a timeout while
    /// waiting for one): never routed around.
    Possible,
}

/// What a reqwest error tells of whether the agent saw the request.
fn delivery(e: &reqwest::Error) -> Delivery {
    if e.is_connect() {
        return Delivery::Never;
    }
    let chain = error_chain(e);
    if chain.contains("received fatal alert") || chain.contains("invalid peer certificate") {
        return Delivery::Never;
    }
    let mut lost = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        // hyper dropped the request before sending it: the connection was
        // already closed (TLS 1.3: the agent refused our certificate).
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return Delivery::Never;
        }
        let closed = |io: &std::io::Error| {
            matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            )
        };
        lost |= s.downcast_ref::<std::io::Error>().is_some_and(closed)
            || s.downcast_ref::<h2::Error>()
                .and_then(h2::Error::get_io)
                .is_some_and(closed)
            || s.downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_incomplete_message() || h.is_closed());
        source = s.source();
    }
    if lost {
        Delivery::Lost
    } else {
        Delivery::Possible
    }
}

/// A reqwest client with the environment's client certificate and CA.
pub fn http_client(tls: &TlsFiles) -> Result<reqwest::Client, TlsError> {
    http_client_with(tls, CONNECT_TIMEOUT)
}

/// [`http_client`] with a connect timeout (TCP and TLS handshake).
pub fn http_client_with(
    tls: &TlsFiles,
    connect_timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    let read = |what, key, p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            what,
            key,
            path: p.to_path_buf(),
            source,
        })
    };
    let ca = read("CA certificate", "ca", &tls.ca)?;
    let cert = read("client certificate", "cert", &tls.cert)?;
    let key = read("client key", "key", &tls.key)?;
    let ca = reqwest::Certificate::from_pem(&ca).map_err(|e| TlsError::Invalid {
        what: "CA certificate",
        path: tls.ca.clone(),
        message: e.to_string(),
    })?;
    let identity =
        reqwest::Identity::from_pem(&[cert, b"\n".to_vec(), key].concat()).map_err(|e| {
            TlsError::Invalid {
                what: "client certificate and key",
                path: tls.cert.clone(),
                message: e.to_string(),
            }
        })?;
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(identity)
        .https_only(true)
        .connect_timeout(connect_timeout)
        .tcp_keepalive(Duration::from_secs(15))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .http2_keep_alive_while_idle(true)
        .build()
        .map_err(|e| TlsError::Invalid {
            what: "TLS client configuration",
            path: tls.cert.clone(),
            message: error_chain(&e),
        })
}

/// One agent: over its HTTPS API, or over SSH (see the module's doc).
#[derive(Clone)]
pub struct AgentClient {
    pub host: String,
    pub addr: String,
    http: reqwest::Client,
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
            route: Arc::new(Route::agent_only()),
        }
    }

    fn with_route(
        host: &Host,
        http: reqwest::Client,
        transport: Transport,
        env: &Environment,
        opts: &TransportOptions,
        identity: Option<String>,
        notice: &Notice,
    ) -> AgentClient {
        AgentClient {
            host: host.name.clone(),
            addr: host.agent.clone(),
            http,
            route: Arc::new(Route {
                transport,
                ssh: host.ssh.clone(),
                accept_new: opts.accept_new_host_keys,
                connect_timeout: env.connect_timeout,
                identity,
                notice: Some(notice.clone()),
                session: tokio::sync::Mutex::new(None),
                state: Mutex::new(RouteState::default()),
            }),
        }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("https://{}{path_and_query}", self.addr)
    }

    /// A transport error while sending (it may not have been delivered).
    fn transport(&self, e: &reqwest::Error) -> CallError {
        CallError::Unreachable {
            host: self.host.clone(),
            addr: self.addr.clone(),
            message: error_chain(e),
            delivery: delivery(e),
        }
    }

    /// A transport error after the agent answered (never a fallback).
    fn broken(&self, e: &reqwest::Error) -> CallError {
        CallError::Unreachable {
            host: self.host.clone(),
            addr: self.addr.clone(),
            message: error_chain(e),
            delivery: Delivery::Possible,
        }
    }

    fn protocol(&self, message: impl Into<String>) -> CallError {
        CallError::Protocol {
            host: self.host.clone(),
            message: message.into(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, CallError> {
        self.call_within(method, path, body, CALL_TIMEOUT).await
    }

    async fn call_within<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let mut req = self.http.request(method, self.url(path)).timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.broken(&e))?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| {
                self.protocol(format!(
                    "{path} answered {status} with {}: {e}",
                    snippet(&bytes)
                ))
            })
        } else {
            Err(self.api_error(status, &bytes, path))
        }
    }

    fn api_error(&self, status: StatusCode, bytes: &[u8], path: &str) -> CallError {
        match serde_json::from_slice::<ApiError>(bytes) {
            Ok(error) => CallError::Api {
                host: self.host.clone(),
                status: status.as_u16(),
                error,
            },
            Err(_) => self.protocol(format!("{path} answered {status}: {}", snippet(bytes))),
        }
    }

    async fn ping_agent(&self) -> Result<serde_json::Value, CallError> {
        let resp = self
            .http
            .get(self.url("/v1/ping"))
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.broken(&e))?;
        if status.is_success() {
            Ok(serde_json::Value::String("ok".into()))
        } else {
            Err(self.api_error(status, &bytes, "/v1/ping"))
        }
    }

    pub async fn ping(&self) -> Result<(), CallError> {
        self.routed(StdioOp::Ping, serde_json::Value::Null, CALL_TIMEOUT, || {
            self.ping_agent()
        })
        .await
        .map(|_| ())
    }

    pub async fn pull(&self, req: &PullRequest) -> Result<PullResult, CallError> {
        self.routed(StdioOp::Pull, to_value(req), PULL_TIMEOUT, || {
            self.call_within(Method::POST, "/v1/pull", Some(req), PULL_TIMEOUT)
        })
        .await
    }

    pub async fn lock(&self, req: &LockRequest) -> Result<LockGranted, CallError> {
        let (granted, via) = self
            .routed_via(StdioOp::Lock, to_value(req), CALL_TIMEOUT, || {
                self.call(Method::POST, "/v1/lock", Some(req))
            })
            .await?;
        if via == Via::Agent {
            self.route.held_over_mtls(req);
        }
        Ok(granted)
    }

    pub async fn renew(&self, req: &LockRequest) -> Result<Lease, CallError> {
        self.routed(StdioOp::Renew, to_value(req), CALL_TIMEOUT, || {
            self.call(Method::POST, "/v1/lock/renew", Some(req))
        })
        .await
    }

    pub async fn unlock(&self, req: &UnlockRequest) -> Result<Option<Lease>, CallError> {
        let r = self
            .routed(StdioOp::Unlock, to_value(req), CALL_TIMEOUT, || {
                self.call(Method::DELETE, "/v1/lock", Some(req))
            })
            .await;
        if r.is_ok() {
            self.route.released();
        }
        r
    }

    pub async fn status(&self, project: &str) -> Result<StatusReport, CallError> {
        let q = StdioQuery {
            project: Some(project.to_string()),
            ..StdioQuery::default()
        };
        let path = format!("/v1/status?project={}", encode(project));
        self.routed(StdioOp::Status, to_value(&q), CALL_TIMEOUT, || {
            self.call(Method::GET, &path, None::<&()>)
        })
        .await
    }

    pub async fn history(&self, project: &str) -> Result<Vec<HistoryEntry>, CallError> {
        let q = StdioQuery {
            project: Some(project.to_string()),
            ..StdioQuery::default()
        };
        let path = format!("/v1/history?project={}", encode(project));
        self.routed(StdioOp::History, to_value(&q), CALL_TIMEOUT, || {
            self.call(Method::GET, &path, None::<&()>)
        })
        .await
    }

    pub async fn audit(
        &self,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, CallError> {
        let mut path = format!("/v1/audit?limit={limit}");
        if let Some(p) = project {
            path.push_str(&format!("&project={}", encode(p)));
        }
        let q = StdioQuery {
            project: project.map(str::to_string),
            limit: Some(limit),
            ..StdioQuery::default()
        };
        self.routed(StdioOp::Audit, to_value(&q), CALL_TIMEOUT, || {
            self.call(Method::GET, &path, None::<&()>)
        })
        .await
    }

    /// Approves a release on this host (HTTPS only: an approval is the
    /// client certificate's identity, which SSH does not carry).
    pub async fn approve(&self, req: &ApprovalRequest) -> Result<ApprovalRecorded, CallError> {
        self.call(Method::POST, "/v1/approvals", Some(req)).await
    }

    /// The release record; `Ok(None)` when this host never ran it.
    pub async fn release(
        &self,
        project: &str,
        release: &str,
    ) -> Result<Option<ReleaseInfo>, CallError> {
        let path = format!(
            "/v1/release?project={}&release={}",
            encode(project),
            encode(release)
        );
        let q = StdioQuery {
            project: Some(project.to_string()),
            release: Some(release.to_string()),
            ..StdioQuery::default()
        };
        match self
            .routed(StdioOp::Release, to_value(&q), CALL_TIMEOUT, || {
                self.call(Method::GET, &path, None::<&()>)
            })
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(CallError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn deploy(
        &self,
        req: &DeployRequest,
        on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        self.routed_operation(StdioOp::Deploy, "/v1/deploy", req, on_event)
            .await
    }

    pub async fn rollback(
        &self,
        req: &RollbackRequest,
        on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        self.routed_operation(StdioOp::Rollback, "/v1/rollback", req, on_event)
            .await
    }

    /// POST an operation and read its streamed events to the result. No
    /// overall time limit: the agent's own deadlines and observation
    /// window bound it, and a lost connection is an error here.
    async fn operation(
        &self,
        path: &str,
        body: &impl Serialize,
        mut on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        let resp = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| self.broken(&e))?;
            return Err(self.api_error(status, &bytes, path));
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut result = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.broken(&e))?;
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: Event = serde_json::from_slice(&line).map_err(|e| {
                    self.protocol(format!("{path} streamed {}: {e}", snippet(&line)))
                })?;
                on_event(&event);
                if let Event::Result(r) = event {
                    result = Some(r);
                }
            }
        }
        result.ok_or_else(|| {
            self.protocol(format!(
                "{path}: the stream ended without a result (the agent may have restarted; it finishes the operation on its own: check `deploy-controller status`)"
            ))
        })
    }
}

// --- The SSH fallback (issue 5) ---------------------------------------------

/// `--transport`: how the controller reaches the agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The HTTPS API; SSH only for a host whose agent cannot be reached
    /// (refused, timeout, TLS handshake failure) and that has SSH details.
    #[default]
    Auto,
    /// The HTTPS API only.
    Agent,
    /// SSH only (every host needs SSH details).
    Ssh,
}

/// The transport flags of a command.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransportOptions {
    pub transport: Transport,
    /// Accept (and record in known_hosts) the key of a host that is not
    /// there yet. Never a changed key. Said loudly and audited on the host.
    pub accept_new_host_keys: bool,
}

/// Where the controller's warnings about a host's route go.
pub type Notice = Arc<dyn Fn(&str) + Send + Sync>;

/// Which way a call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Agent,
    Ssh,
}

/// Per-host routing state, shared by the clones of one [`AgentClient`].
struct Route {
    transport: Transport,
    ssh: Option<SshSettings>,
    accept_new: bool,
    connect_timeout: Duration,
    /// This controller's identity (its certificate's CN), told to the
    /// agent over SSH and used to hand the lease over.
    identity: Option<String>,
    notice: Option<Notice>,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    state: Mutex<RouteState>,
}

#[derive(Default)]
struct RouteState {
    /// Why this host is on SSH (sticky for the rest of the run).
    on_ssh: Option<String>,
    /// The lease this run took over mutual TLS (to hand over if the host
    /// falls back to SSH).
    held: Option<LockRequest>,
    pending_handover: Option<LockRequest>,
    /// A host key accepted as new in this run, not yet told to the agent.
    accepted_host_key: Option<String>,
    /// What the last answer over SSH said about the host: `daemon` or
    /// `in_process`.
    served_by: Option<String>,
}

impl Route {
    fn agent_only() -> Route {
        Route {
            transport: Transport::Agent,
            ssh: None,
            accept_new: false,
            connect_timeout: CONNECT_TIMEOUT,
            identity: None,
            notice: None,
            session: tokio::sync::Mutex::new(None),
            state: Mutex::new(RouteState::default()),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut RouteState) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn notice(&self, msg: &str) {
        match &self.notice {
            Some(n) => n(msg),
            None => eprintln!("warning: {msg}"),
        }
    }

    fn held_over_mtls(&self, req: &LockRequest) {
        self.with_state(|s| s.held = Some(req.clone()));
    }

    fn released(&self) {
        self.with_state(|s| {
            s.held = None;
            s.pending_handover = None;
        });
    }
}

/// How a host was reached, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteReport {
    /// `agent` or `ssh`.
    pub transport: &'static str,
    /// Why SSH was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Over SSH: `daemon` (the host's daemon did the work; only its HTTPS
    /// API was unreachable) or `in_process` (no daemon answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
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
        })
        .collect())
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

impl AgentClient {
    /// How this host was reached so far.
    pub fn route_report(&self) -> RouteReport {
        let (on_ssh, served_by) = self
            .route
            .with_state(|s| (s.on_ssh.clone(), s.served_by.clone()));
        match (self.route.transport, on_ssh) {
            (Transport::Ssh, None) => RouteReport {
                transport: "ssh",
                reason: Some("--transport ssh".into()),
                served_by,
            },
            (_, Some(reason)) => RouteReport {
                transport: "ssh",
                reason: Some(reason),
                served_by,
            },
            _ => RouteReport {
                transport: "agent",
                reason: None,
                served_by: None,
            },
        }
    }

    /// Whether the next call goes over SSH without trying the agent.
    fn ssh_now(&self) -> bool {
        match self.route.transport {
            Transport::Ssh => true,
            Transport::Agent => false,
            Transport::Auto => self.route.with_state(|s| s.on_ssh.is_some()),
        }
    }

    /// After a failed call to the agent: whether to carry on over SSH.
    async fn fall_back(&self, e: &CallError) -> bool {
        if self.route.transport != Transport::Auto {
            return false;
        }
        let Some(ssh) = &self.route.ssh else {
            return false;
        };
        let mut reason = match e {
            CallError::Unreachable { message, .. } => message.clone(),
            other => other.to_string(),
        };
        match e.delivery() {
            Delivery::Never => {}
            Delivery::Possible => return false,
            Delivery::Lost => match self.probe().await {
                Some(again) => reason = format!("{reason}; then {again}"),
                None => return false,
            },
        }
        let first = self.route.with_state(|s| {
            let first = s.on_ssh.is_none();
            s.on_ssh = Some(reason.clone());
            // A lease taken over mutual TLS moves to the SSH identity.
            if first && let Some(held) = s.held.take() {
                s.pending_handover = Some(held);
            }
            first
        });
        if first {
            self.route.notice(&format!(
                "host {}: its agent cannot be reached at https://{} ({reason}); falling back to SSH ({}) for this host",
                self.host,
                self.addr,
                ssh.target()
            ));
        }
        true
    }

    /// Asks the agent anything, after a connection that closed with no
    /// answer: `None` if it answers (it is up, so the failed call is not
    /// routed around), else why it did not.
    async fn probe(&self) -> Option<String> {
        let sent = self
            .http
            .get(self.url("/v1/lock"))
            .timeout(self.route.connect_timeout + Duration::from_secs(2))
            .send()
            .await;
        match sent {
            Ok(_) => None,
            Err(e) if delivery(&e) != Delivery::Possible => Some(error_chain(&e)),
            Err(_) => None,
        }
    }

    fn ssh_error(&self, message: String, agent: Option<&CallError>) -> CallError {
        CallError::Ssh {
            host: self.host.clone(),
            target: self
                .route
                .ssh
                .as_ref()
                .map(|s| s.target())
                .unwrap_or_else(|| "no ssh table".into()),
            message,
            agent: agent.map(|e| match e {
                CallError::Unreachable { message, .. } => message.clone(),
                other => other.to_string(),
            }),
            config: false,
        }
    }

    async fn routed<T, F, Fut>(
        &self,
        op: StdioOp,
        request: serde_json::Value,
        timeout: Duration,
        agent: F,
    ) -> Result<T, CallError>
    where
        T: DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        self.routed_via(op, request, timeout, agent)
            .await
            .map(|(v, _)| v)
    }

    async fn routed_via<T, F, Fut>(
        &self,
        op: StdioOp,
        request: serde_json::Value,
        timeout: Duration,
        agent: F,
    ) -> Result<(T, Via), CallError>
    where
        T: DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        if self.ssh_now() {
            return self
                .ssh_call(op, request, timeout, None)
                .await
                .map(|v| (v, Via::Ssh));
        }
        match agent().await {
            Ok(v) => Ok((v, Via::Agent)),
            Err(e) if self.fall_back(&e).await => self
                .ssh_call(op, request, timeout, Some(&e))
                .await
                .map(|v| (v, Via::Ssh)),
            Err(e) => Err(e),
        }
    }

    async fn routed_operation(
        &self,
        op: StdioOp,
        path: &str,
        req: &impl Serialize,
        mut on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        if self.ssh_now() {
            return self
                .ssh_operation(op, to_value(req), &mut on_event, None)
                .await;
        }
        match self.operation(path, req, &mut on_event).await {
            Err(e) if self.fall_back(&e).await => {
                self.ssh_operation(op, to_value(req), &mut on_event, Some(&e))
                    .await
            }
            r => r,
        }
    }

    /// The host's SSH session, connected on first use (and again if it
    /// dropped).
    async fn session(&self, agent: Option<&CallError>) -> Result<Arc<Session>, CallError> {
        let Some(settings) = &self.route.ssh else {
            return Err(self.ssh_error(
                "this host has no SSH details in the inventory".into(),
                agent,
            ));
        };
        let mut slot = self.route.session.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let session = Session::connect(
            &self.host,
            settings,
            self.route.accept_new,
            self.route.connect_timeout,
        )
        .await
        .map_err(|e| {
            let mut err = self.ssh_error(e.to_string(), agent);
            if let CallError::Ssh { config, .. } = &mut err {
                *config = matches!(e, ssh::SshError::Key { .. });
            }
            err
        })?;
        if let Some(k) = &session.accepted_host_key {
            self.route.notice(&format!(
                "host {}: ACCEPTED A NEW SSH HOST KEY {k} for {} and added it to {} (--accept-new-host-keys); \
                 the host's audit log records it",
                self.host,
                session.target(),
                settings.known_hosts.display()
            ));
            let k = k.clone();
            self.route.with_state(|s| s.accepted_host_key = Some(k));
        }
        let session = Arc::new(session);
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Runs one `serve-stdio` request; lines go to `on_line`.
    async fn stdio(
        &self,
        op: StdioOp,
        request: serde_json::Value,
        agent: Option<&CallError>,
        mut on_line: impl FnMut(StdioLine),
    ) -> Result<ssh::StdioOutcome, CallError> {
        let session = self.session(agent).await?;
        let Some(settings) = &self.route.ssh else {
            return Err(self.ssh_error("this host has no SSH details".into(), agent));
        };
        // A lease taken over mutual TLS is handed to the SSH identity first.
        let handover = self.route.with_state(|s| s.pending_handover.take());
        if let Some(mut held) = handover {
            held.hand_over_from = self.route.identity.as_ref().map(|i| format!("mtls:{i}"));
            let req = StdioRequest {
                op: StdioOp::Lock,
                request: to_value(&held),
                caller: self.caller(),
            };
            let mut refused = None;
            let r = ssh::serve_stdio(&session, settings, &req, |l| {
                if let StdioLine::Error { error, .. } = l {
                    refused = Some(error.message);
                }
            })
            .await;
            match (r, refused) {
                (Ok(_), None) => self.route.notice(&format!(
                    "host {}: the environment lock of deployment {} moved to this controller's SSH identity",
                    self.host, held.deployment_id
                )),
                (Ok(_), Some(m)) => self.route.notice(&format!(
                    "host {}: could not move the environment lock to the SSH identity: {m}",
                    self.host
                )),
                (Err(e), _) => self.route.notice(&format!(
                    "host {}: could not move the environment lock to the SSH identity: {e}",
                    self.host
                )),
            }
        }
        let req = StdioRequest {
            op,
            request,
            caller: self.caller(),
        };
        let served_by = &mut None;
        let outcome = ssh::serve_stdio(&session, settings, &req, |line| {
            if let StdioLine::Hello(h) = &line {
                *served_by = Some(h.served_by.clone());
            }
            on_line(line)
        })
        .await
        .map_err(|e| self.ssh_error(e.to_string(), agent))?;
        if let Some(by) = served_by.take() {
            let changed = self.route.with_state(|s| {
                let changed = s.served_by.as_deref() != Some(by.as_str());
                s.served_by = Some(by.clone());
                changed
            });
            if changed && by == "in_process" {
                self.route.notice(&format!(
                    "host {}: no deploy-agent daemon answers there; `deploy-agent serve-stdio` does the work itself, under the host lock",
                    self.host
                ));
            }
        }
        Ok(outcome)
    }

    /// What the controller tells the agent about itself.
    fn caller(&self) -> StdioCaller {
        StdioCaller {
            controller: self.route.identity.clone(),
            accepted_host_key: self.route.with_state(|s| s.accepted_host_key.take()),
        }
    }

    fn no_answer(
        &self,
        op: StdioOp,
        o: &ssh::StdioOutcome,
        agent: Option<&CallError>,
    ) -> CallError {
        let mut msg = format!(
            "`deploy-agent serve-stdio` ({}) ended with {} and no answer",
            op.as_str(),
            o.exec.describe()
        );
        if !o.exec.stderr.is_empty() {
            msg.push_str(&format!(": {}", snippet(o.exec.stderr.as_bytes())));
        }
        if !o.stray.is_empty() {
            msg.push_str(&format!(
                " (it printed: {})",
                snippet(o.stray.join(" | ").as_bytes())
            ));
        }
        if o.exec.exit_status == Some(127) {
            msg.push_str(
                "; is deploy-agent installed there? Check `command` in the inventory's ssh table",
            );
        }
        self.ssh_error(msg, agent)
    }

    async fn ssh_call<T: DeserializeOwned>(
        &self,
        op: StdioOp,
        request: serde_json::Value,
        timeout: Duration,
        agent: Option<&CallError>,
    ) -> Result<T, CallError> {
        let mut answer = None;
        let mut error = None;
        let run = self.stdio(op, request, agent, |line| match line {
            StdioLine::Answer { body, .. } => answer = Some(body),
            StdioLine::Error { status, error: e } => error = Some((status, e)),
            _ => {}
        });
        let outcome = tokio::time::timeout(timeout, run).await.map_err(|_| {
            self.ssh_error(
                format!(
                    "`deploy-agent serve-stdio` ({}) did not answer within {timeout:?}",
                    op.as_str()
                ),
                agent,
            )
        })??;
        match (answer, error) {
            (Some(body), _) => serde_json::from_value(body).map_err(|e| {
                self.protocol(format!(
                    "serve-stdio {} answered something unexpected: {e}",
                    op.as_str()
                ))
            }),
            (None, Some((status, error))) => Err(CallError::Api {
                host: self.host.clone(),
                status,
                error,
            }),
            (None, None) => Err(self.no_answer(op, &outcome, agent)),
        }
    }

    async fn ssh_operation(
        &self,
        op: StdioOp,
        request: serde_json::Value,
        on_event: &mut impl FnMut(&Event),
        agent: Option<&CallError>,
    ) -> Result<OperationResult, CallError> {
        let mut result = None;
        let mut error = None;
        let outcome = self
            .stdio(op, request, agent, |line| match line {
                StdioLine::Progress(p) => on_event(&Event::Progress(p)),
                StdioLine::Result(r) => {
                    on_event(&Event::Result(r.clone()));
                    result = Some(r);
                }
                StdioLine::Error { status, error: e } => error = Some((status, e)),
                _ => {}
            })
            .await?;
        match (result, error) {
            (Some(r), _) => Ok(r),
            (None, Some((status, error))) => Err(CallError::Api {
                host: self.host.clone(),
                status,
                error,
            }),
            (None, None) => Err(self.no_answer(op, &outcome, agent)),
        }
    }
}

// --- end SSH fallback ---------------------------------------------------------

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
