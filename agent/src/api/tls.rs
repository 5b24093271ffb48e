//! The HTTPS listener (`api_listen`): rustls with a mandatory client
//! certificate from `tls_ca`, HTTP/2 and HTTP/1.1 (ALPN), serving the
//! daemon's router behind [`authz`](super::authz).
//!
//! A client without a certificate, with one from another CA, or with an
//! expired one never gets past the handshake (rustls' WebPKI verifier); the
//! refusal is logged with the peer address. After the handshake, every
//! request is authorized by the certificate's identity (CN) and the role
//! agent.toml grants it here; the router sees the caller as
//! `Caller::Mtls` (an axum `ConnectInfo<Peer>`, exactly like the unix
//! socket's), so the engine and the audit log name the certificate.
//!
//! The listener faces the network, so no client holds the daemon's
//! resources for long, or all of them ([`limits`](super::limits)):
//! - at most `api_max_connections` connections at once, handshakes
//!   included: one more is closed as soon as it is accepted, so the HTTPS
//!   API never takes the descriptors agent.sock, the store and Docker need;
//! - once the identity is known (right after the handshake): at most
//!   `api_max_connections_per_identity` per identity; one more, and any
//!   connection of an identity with no grant here, only gets its first
//!   request answered (503, or the usual 403) and is closed; at most
//!   [`MAX_REFUSING`] such connections at once, more are closed at once;
//! - timeouts: the handshake, the first request and every HTTP/1.1
//!   request's headers, a request body that stops arriving, and a
//!   connection with no request in flight for `api_idle_timeout_secs`.
//!   A request is in flight until its answer is sent completely, so a
//!   streamed answer (a deploy's progress, for many minutes) is never cut.
//!
//! Refusals are counted ([`HTTPS`]) and logged at most once per
//! [`LOG_PERIOD`] per limit and identity; a 403 is audited as `api.denied`
//! at most once per identity per [`AUDIT_PERIOD`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::response::Response;
use http::{Method, Request, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tower::ServiceExt;

use super::Peer;
use super::authz;
use super::limits::{Caps, Connections, MAX_REFUSING, Slot, Throttle};
use crate::config::AgentConfig;
use crate::metrics::HTTPS;
use crate::store::{AuditEntry, Store};
use crate::wire::{ApiError, Denial, Outcome, Role};
use deploy_protocol::Caller;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a connection's first request, an
/// HTTP/1.1 request's headers, or the next part of a request body (less
/// when `api_idle_timeout_secs` is less).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PINGs: how often, and how long the answer may take before the
/// peer counts as gone (its connection is closed; an operation it started
/// goes on).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests at once on one HTTP/2 connection (deploy-controller makes one
/// connection per agent and a few requests at once on it).
const MAX_STREAMS: u32 = 32;
/// How long a connection being closed (a GOAWAY sent, nothing in flight)
/// may take to finish before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Refusals at a limit are logged at most once per this, per limit and
/// identity.
const LOG_PERIOD: Duration = Duration::from_secs(10);
/// A 403 is audited at most once per identity per this; the others are
/// logged, and counted in the next record.
const AUDIT_PERIOD: Duration = Duration::from_secs(60);

/// The HTTPS API's timeouts from agent.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `api_idle_timeout_secs`: no request in flight for this long.
    pub idle: Duration,
    /// The first request, HTTP/1.1 headers, a pause in a request body.
    pub request: Duration,
}

impl Timeouts {
    pub fn of(cfg: &AgentConfig) -> Timeouts {
        let idle = Duration::from_secs(cfg.api_idle_timeout_secs.max(1));
        Timeouts {
            idle,
            request: idle.min(REQUEST_TIMEOUT),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(
        "cannot read the {what} {} (agent.toml `{key}`): {message}; check the path and its permissions \
         (`deploy-controller pki issue --kind agent` writes it)",
        path.display()
    )]
    Read {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{} (agent.toml `{key}`) holds no {what} in PEM form", path.display())]
    Empty {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    #[error(
        "the TLS settings are unusable: {0}; check that tls_cert and tls_key belong together and that tls_ca is the CA certificate"
    )]
    Config(String),
    #[error(
        "cannot listen on {addr} (agent.toml `api_listen`): {source}; is another process using that port?"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Builds the rustls server configuration: the agent's certificate, and a
/// verifier that requires a client certificate issued by `ca`.
pub fn server_config(cert: &Path, key: &Path, ca: &Path) -> Result<ServerConfig, TlsSetupError> {
    let read_err = |what, key_name, path: &Path, e: &dyn std::fmt::Display| TlsSetupError::Read {
        what,
        key: key_name,
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut roots = RootCertStore::empty();
    let ca_certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| read_err("CA certificate", "tls_ca", ca, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err("CA certificate", "tls_ca", ca, &e))?;
    if ca_certs.is_empty() {
        return Err(TlsSetupError::Empty {
            what: "certificate",
            key: "tls_ca",
            path: ca.to_path_buf(),
        });
    }
    for c in ca_certs {
        roots
            .add(c)
            .map_err(|e| TlsSetupError::Config(format!("tls_ca {}: {e}", ca.display())))?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err("certificate", "tls_cert", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err("certificate", "tls_cert", cert, &e))?;
    if chain.is_empty() {
        return Err(TlsSetupError::Empty {
            what: "certificate",
            key: "tls_cert",
            path: cert.to_path_buf(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| read_err("private key", "tls_key", key, &e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// What every connection shares.
struct Shared {
    environment: String,
    grants: BTreeMap<String, Role>,
    store: Arc<Store>,
    connections: Arc<Connections>,
    timeouts: Timeouts,
    /// Refusal log lines, by limit and identity.
    logs: Throttle,
    /// `api.denied` audit records, by identity.
    audits: Throttle,
}

/// The bound listener, before it serves.
pub struct TlsApi {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl TlsApi {
    /// Loads the certificates and binds `api_listen`; `Ok(None)` when the
    /// config has no `api_listen`.
    pub async fn bind(
        cfg: &AgentConfig,
        store: Arc<Store>,
    ) -> Result<Option<TlsApi>, TlsSetupError> {
        let Some(addr) = cfg.api_listen else {
            return Ok(None);
        };
        let (Some(cert), Some(key), Some(ca)) = (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca) else {
            // AgentConfig::parse refuses this; a config built in code may not.
            return Err(TlsSetupError::Config(
                "api_listen is set but tls_cert, tls_key or tls_ca is missing".into(),
            ));
        };
        let server = server_config(cert, key, ca)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TlsSetupError::Bind { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Some(TlsApi {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            addr,
            shared: Arc::new(Shared {
                environment: crate::config::environment(cfg).to_string(),
                grants: cfg.grants.clone(),
                store,
                connections: Connections::new(Caps {
                    total: cfg.api_max_connections.max(1),
                    per_identity: cfg
                        .api_max_connections_per_identity
                        .clamp(1, cfg.api_max_connections.max(1)),
                    refusing: MAX_REFUSING,
                }),
                timeouts: Timeouts::of(cfg),
                logs: Throttle::new(LOG_PERIOD),
                audits: Throttle::new(AUDIT_PERIOD),
            }),
        }))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts connections until the task is aborted.
    pub fn serve(self, app: Router) -> JoinHandle<()> {
        let caps = self.shared.connections.caps();
        tracing::info!(
            address = %self.addr,
            environment = %self.shared.environment,
            max_connections = caps.total,
            max_per_identity = caps.per_identity,
            idle_timeout_secs = self.shared.timeouts.idle.as_secs(),
            "HTTPS API (mutual TLS) ready"
        );
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match self.listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        // (api_max_connections keeps this side from being
                        // the cause.)
                        tracing::warn!("HTTPS API: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = self.shared.connections.admit() else {
                    drop(tcp);
                    self.shared.refused(Refusal::MaxConnections, "", remote);
                    continue;
                };
                let accepted = Accepted::new(slot);
                // Progress events are small writes streamed one by one: with
                // Nagle on, each waits for the controller's delayed ACK (~40 ms).
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("HTTPS API: TCP_NODELAY on {remote}: {e}");
                }
                let acceptor = self.acceptor.clone();
                let app = app.clone();
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    serve_connection(tcp, remote, accepted, acceptor, app, shared).await;
                });
            }
        })
    }
}

/// An accepted connection's place under `api_max_connections`, counted in
/// the `deploy_agent_https_connections` gauge.
struct Accepted {
    _slot: Slot,
}

impl Accepted {
    fn new(slot: Slot) -> Accepted {
        HTTPS.open.fetch_add(1, Ordering::Relaxed);
        Accepted { _slot: slot }
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        HTTPS.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection is refused (the index is its
/// `deploy_agent_https_connections_refused_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    MaxConnections = 0,
    MaxPerIdentity = 1,
    NoGrant = 2,
}

/// Which timeout closed a connection (the index is its
/// `deploy_agent_https_connections_timed_out_total` phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    Handshake = 0,
    FirstRequest = 1,
    Idle = 2,
}

impl Shared {
    /// Counts a refusal, and logs it unless one like it was logged less
    /// than [`LOG_PERIOD`] ago.
    fn refused(&self, why: Refusal, identity: &str, remote: SocketAddr) {
        HTTPS.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        let key = format!("{why:?} {identity}");
        let Some(quiet) = self.logs.report(&key, Instant::now()) else {
            return;
        };
        let since = if quiet > 0 {
            format!(
                " ({quiet} more like it in the last {}s)",
                LOG_PERIOD.as_secs()
            )
        } else {
            String::new()
        };
        let caps = self.connections.caps();
        match why {
            Refusal::MaxConnections => tracing::warn!(
                peer = %remote,
                "HTTPS API: connection closed on accept: {} connections are open, the most api_max_connections allows{since}; \
                 if these are legitimate clients, raise api_max_connections in agent.toml",
                caps.total
            ),
            Refusal::MaxPerIdentity => tracing::warn!(
                peer = %remote,
                identity = %Caller::mtls(identity),
                "HTTPS API: identity {} already has {} connections open, the most api_max_connections_per_identity allows; \
                 answering 503 and closing{since}",
                Caller::mtls(identity),
                caps.per_identity
            ),
            // The 403 itself is logged (and audited) by `deny`.
            Refusal::NoGrant => tracing::debug!(
                peer = %remote,
                identity = %Caller::mtls(identity),
                "HTTPS API: identity {} has no role in environment {}; answering its first request 403 and closing{since}",
                Caller::mtls(identity),
                self.environment
            ),
        }
    }

    /// A refused connection closed without an answer: [`MAX_REFUSING`]
    /// others are being refused already.
    fn refusals_busy(&self, why: Refusal, identity: &str, remote: SocketAddr) {
        let key = format!("busy {identity}");
        if let Some(quiet) = self.logs.report(&key, Instant::now()) {
            let since = if quiet > 0 {
                format!(" ({quiet} more in the last {}s)", LOG_PERIOD.as_secs())
            } else {
                String::new()
            };
            tracing::warn!(
                peer = %remote,
                identity = %Caller::mtls(identity),
                "HTTPS API: connection of {} closed after the handshake without an answer ({}): \
                 {MAX_REFUSING} other refused connections are still being answered{since}",
                Caller::mtls(identity),
                match why {
                    Refusal::NoGrant => "no role in this environment",
                    _ => "over api_max_connections_per_identity",
                }
            );
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    _accepted: Accepted,
    acceptor: TlsAcceptor,
    app: Router,
    shared: Arc<Shared>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(peer = %remote, "HTTPS API: TLS handshake refused: {e}");
            return;
        }
        Err(_) => {
            HTTPS.timed_out[Timeout::Handshake as usize].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %remote, "HTTPS API: TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| authz::certificate_identity(der.as_ref()));
    let Some(identity) = identity else {
        tracing::warn!(peer = %remote, "HTTPS API: the client certificate names no identity (no CN, no DNS SAN); closing");
        return;
    };
    // The identity is known: an identity with no grant, or over its cap,
    // holds no place of its own; its one answer uses a refusal place.
    let admitted = if !shared.grants.contains_key(&identity) {
        Err(Refusal::NoGrant)
    } else {
        shared
            .connections
            .admit_identity(&identity)
            .map_err(|_| Refusal::MaxPerIdentity)
    };
    let (_slot, refusal) = match admitted {
        Ok(slot) => (slot, None),
        Err(why) => {
            shared.refused(why, &identity, remote);
            match shared.connections.admit_refusal() {
                Ok(slot) => (slot, Some(why)),
                Err(_) => {
                    shared.refusals_busy(why, &identity, remote);
                    return;
                }
            }
        }
    };
    if refusal.is_none() {
        serve_http(tls, remote, identity, refusal, app, shared).await;
        return;
    }
    // A refused connection has one answer to give, however its client
    // behaves (it could keep sending requests while being closed).
    let lifetime = shared.timeouts.request + CLOSE_GRACE;
    let served = serve_http(tls, remote, identity, refusal, app, shared);
    if tokio::time::timeout(lifetime, served).await.is_err() {
        tracing::debug!(peer = %remote, "HTTPS API: a refused connection was still open after {lifetime:?}; dropping it");
    }
}

/// Serves HTTP on an admitted connection until the client closes it, it
/// breaks, or it has nothing in flight for too long: before its first
/// request, `request`; after, `api_idle_timeout_secs`; a refused
/// connection, as soon as its first answer is sent.
async fn serve_http(
    tls: TlsStream<TcpStream>,
    remote: SocketAddr,
    identity: String,
    refusal: Option<Refusal>,
    app: Router,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let activity: Activity = Arc::new(watch::Sender::new(Load {
        in_flight: 0,
        requests: 0,
        idle_since: started,
    }));
    let mut load = activity.subscribe();
    let peer = Peer {
        caller: Caller::mtls(identity.clone()),
    };
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = InFlight::start(&activity);
            let app = app.clone();
            let shared = shared.clone();
            let identity = identity.clone();
            let peer = peer.clone();
            async move {
                let response = answer(req, remote, &identity, peer, refusal, app, &shared).await;
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.timeouts.request);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);

    let idle = if refusal.is_some() {
        Duration::ZERO
    } else {
        shared.timeouts.idle
    };
    let quiet_at = tokio::select! {
        ended = conn.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!(peer = %remote, "HTTPS API connection ended: {e}");
            }
            return;
        }
        at = quiet(&mut load, shared.timeouts.request, idle, started) => at,
    };
    match (quiet_at.requests, refusal) {
        (0, _) => {
            HTTPS.timed_out[Timeout::FirstRequest as usize].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %remote, "HTTPS API: no request within {:?} of the handshake; closing", shared.timeouts.request);
        }
        (_, None) => {
            HTTPS.timed_out[Timeout::Idle as usize].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %remote, "HTTPS API: no request for {idle:?}; closing");
        }
        (_, Some(_)) => {}
    }
    // HTTP/2: GOAWAY (a request that crossed it is still answered);
    // HTTP/1.1: no more requests; before either, close.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        ended = conn.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!(peer = %remote, "HTTPS API connection ended while closing: {e}");
            }
        }
        _ = quiet(&mut load, CLOSE_GRACE, CLOSE_GRACE, Instant::now()) => {
            tracing::debug!(peer = %remote, "HTTPS API: the connection did not finish closing within {CLOSE_GRACE:?}; dropping it");
        }
    }
}

/// The answer to one request: the router's, a 403 for an identity without
/// the role, or a 503 over the identity's cap.
async fn answer(
    req: Request<Incoming>,
    remote: SocketAddr,
    identity: &str,
    peer: Peer,
    refusal: Option<Refusal>,
    app: Router,
    shared: &Shared,
) -> Response {
    if refusal == Some(Refusal::MaxPerIdentity) {
        return over_identity_cap(shared, identity);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match authz::authorize(
        &shared.grants,
        &shared.environment,
        identity,
        &method,
        &path,
    ) {
        Ok(_) => {
            let request_timeout = shared.timeouts.request;
            let mut req = req.map(|body| Body::new(Paced::new(body, request_timeout)));
            req.extensions_mut().insert(ConnectInfo(peer));
            match app.oneshot(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
        Err(denial) => deny(shared, remote, denial, &method, &path),
    }
}

/// A 503 for a connection over `api_max_connections_per_identity`.
fn over_identity_cap(shared: &Shared, identity: &str) -> Response {
    let api = ApiError::new(
        Outcome::EnvironmentError,
        format!(
            "identity {} already has {} HTTPS connections open to this agent, the most api_max_connections_per_identity allows; \
             this connection is closed. Close connections you do not use (the agent closes one with no request in flight after {}s), \
             or raise api_max_connections_per_identity in this agent's agent.toml",
            Caller::mtls(identity),
            shared.connections.caps().per_identity,
            shared.timeouts.idle.as_secs()
        ),
    );
    super::api_error_response(StatusCode::SERVICE_UNAVAILABLE, &api)
}

/// What a connection has in flight.
#[derive(Debug, Clone, Copy)]
struct Load {
    in_flight: usize,
    /// Requests so far.
    requests: u64,
    /// When the last request in flight ended (or the connection began).
    idle_since: Instant,
}

type Activity = Arc<watch::Sender<Load>>;

/// One request in flight, from its arrival until its answer's body is sent
/// or dropped.
struct InFlight(Activity);

impl InFlight {
    fn start(activity: &Activity) -> InFlight {
        activity.send_modify(|l| {
            l.in_flight += 1;
            l.requests += 1;
        });
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|l| {
            l.in_flight = l.in_flight.saturating_sub(1);
            if l.in_flight == 0 {
                l.idle_since = Instant::now();
            }
        });
    }
}

/// Resolves when nothing has been in flight for `first` (before the first
/// request) or `idle` (after), counted from `floor` at the earliest; with
/// the load at that moment.
async fn quiet(
    load: &mut watch::Receiver<Load>,
    first: Duration,
    idle: Duration,
    floor: Instant,
) -> Load {
    loop {
        let now = *load.borrow_and_update();
        if now.in_flight == 0 {
            let limit = if now.requests == 0 { first } else { idle };
            let deadline = now.idle_since.max(floor) + limit;
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return now,
                changed = load.changed() => if changed.is_err() { return now },
            }
        } else if load.changed().await.is_err() {
            return now;
        }
    }
}

/// An answer's body that keeps its request in flight until it is sent.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that fails when none of it arrives for `limit` while it
/// is being read.
struct Paced {
    body: Incoming,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Paced {
    fn new(body: Incoming, limit: Duration) -> Paced {
        Paced {
            body,
            limit,
            timer: None,
        }
    }
}

impl hyper::body::Body for Paced {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.timer = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "no part of the request body arrived for {}s; send the body without pauses",
                limit.as_secs()
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A 403 that says who, where and which role; audited as `api.denied` at
/// most once per identity per [`AUDIT_PERIOD`] (the record counts the
/// denials in between, which are logged only).
fn deny(
    shared: &Shared,
    remote: SocketAddr,
    denial: Denial,
    method: &Method,
    path: &str,
) -> Response {
    let message = authz::denial_message(&denial, method, path);
    let mut api = ApiError::new(Outcome::Denied, message.clone());
    match shared.audits.report(&denial.identity, Instant::now()) {
        Some(not_audited) => {
            tracing::warn!(peer = %remote, identity = %denial.identity, "{message}");
            let mut entry = AuditEntry::new(denial.identity.clone(), "api.denied");
            entry.outcome = Some(Outcome::Denied.as_str().to_string());
            entry.detail = serde_json::json!({
                "method": method.as_str(),
                "path": path,
                "environment": denial.environment,
                "required_role": denial.required,
                "granted_role": denial.granted,
                "peer": remote.to_string(),
            });
            if not_audited > 0 {
                entry.detail["not_audited"] = not_audited.into();
            }
            if let Err(e) = shared.store.append_audit(&entry) {
                tracing::error!("cannot audit a denied request: {e}");
                api.message.push_str(&format!(
                    " (and the audit record could not be written: {e})"
                ));
            }
        }
        None => tracing::debug!(
            peer = %remote,
            identity = %denial.identity,
            "{message} (not audited: this identity's last denial was, less than {}s ago)",
            AUDIT_PERIOD.as_secs()
        ),
    }
    api.denied = Some(Box::new(denial));
    super::api_error_response(StatusCode::FORBIDDEN, &api)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn activity() -> (Activity, watch::Receiver<Load>) {
        let a: Activity = Arc::new(watch::Sender::new(Load {
            in_flight: 0,
            requests: 0,
            idle_since: Instant::now(),
        }));
        let rx = a.subscribe();
        (a, rx)
    }

    #[tokio::test]
    async fn a_request_in_flight_is_never_idle_however_long_it_lasts() {
        let (a, mut rx) = activity();
        let start = Instant::now();
        // A streamed answer: in flight until its body is dropped.
        let answer = InFlight::start(&a);
        let waited = tokio::time::timeout(ms(500), quiet(&mut rx, ms(20), ms(20), start)).await;
        assert!(
            waited.is_err(),
            "quiet with a request in flight: {waited:?}"
        );
        drop(answer);
        let load = tokio::time::timeout(
            Duration::from_secs(10),
            quiet(&mut rx, ms(20), ms(20), start),
        )
        .await
        .expect("idle once the answer is sent");
        assert_eq!((load.in_flight, load.requests), (0, 1));
    }

    #[tokio::test]
    async fn the_first_request_has_its_own_deadline() {
        let (a, mut rx) = activity();
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        // Nothing sent yet: the short first-request limit applies, not idle.
        let load =
            tokio::time::timeout(Duration::from_secs(10), quiet(&mut rx, ms(20), hour, start))
                .await
                .expect("the first-request deadline");
        assert_eq!(load.requests, 0);
        // After a request, the idle limit applies, not the first one.
        drop(InFlight::start(&a));
        let waited = tokio::time::timeout(ms(300), quiet(&mut rx, ms(1), hour, start)).await;
        assert!(waited.is_err(), "{waited:?}");
        let load =
            tokio::time::timeout(Duration::from_secs(10), quiet(&mut rx, hour, ms(20), start))
                .await
                .expect("the idle deadline");
        assert_eq!(load.requests, 1);
    }

    #[tokio::test]
    async fn overlapping_requests_keep_a_connection_busy_until_the_last_ends() {
        let (a, mut rx) = activity();
        let start = Instant::now();
        let first = InFlight::start(&a);
        let second = InFlight::start(&a);
        drop(first);
        let waited = tokio::time::timeout(ms(300), quiet(&mut rx, ms(1), ms(1), start)).await;
        assert!(
            waited.is_err(),
            "one request is still in flight: {waited:?}"
        );
        drop(second);
        let load =
            tokio::time::timeout(Duration::from_secs(10), quiet(&mut rx, ms(1), ms(1), start))
                .await
                .expect("idle");
        assert_eq!((load.in_flight, load.requests), (0, 2));
    }

    #[test]
    fn the_request_timeout_is_at_most_the_idle_timeout() {
        let cfg = |secs| AgentConfig {
            api_idle_timeout_secs: secs,
            ..AgentConfig::default()
        };
        assert_eq!(
            Timeouts::of(&cfg(60)),
            Timeouts {
                idle: Duration::from_secs(60),
                request: REQUEST_TIMEOUT
            }
        );
        assert_eq!(Timeouts::of(&cfg(2)).request, Duration::from_secs(2));
    }
}
