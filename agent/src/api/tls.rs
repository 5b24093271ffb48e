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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use axum::response::Response;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::Peer;
use super::authz;
use crate::config::AgentConfig;
use crate::store::{AuditEntry, Store};
use crate::wire::{ApiError, Denial, Outcome, Role};
use deploy_protocol::Caller;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What the per-request authorization needs.
struct Authz {
    environment: String,
    grants: BTreeMap<String, Role>,
    store: Arc<Store>,
}

/// The bound listener, before it serves.
pub struct TlsApi {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    addr: SocketAddr,
    authz: Arc<Authz>,
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
            authz: Arc::new(Authz {
                environment: crate::config::environment(cfg).to_string(),
                grants: cfg.grants.clone(),
                store,
            }),
        }))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts connections until the task is aborted.
    pub fn serve(self, app: Router) -> JoinHandle<()> {
        tracing::info!(address = %self.addr, environment = %self.authz.environment, "HTTPS API (mutual TLS) ready");
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match self.listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("HTTPS API: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Progress events are small writes streamed one by one: with
                // Nagle on, each waits for the controller's delayed ACK (~40 ms).
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("HTTPS API: TCP_NODELAY on {remote}: {e}");
                }
                let acceptor = self.acceptor.clone();
                let app = app.clone();
                let authz = self.authz.clone();
                tokio::spawn(async move {
                    serve_connection(tcp, remote, acceptor, app, authz).await;
                });
            }
        })
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    authz: Arc<Authz>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(peer = %remote, "HTTPS API: TLS handshake refused: {e}");
            return;
        }
        Err(_) => {
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
    let peer = Peer {
        caller: Caller::mtls(identity.clone()),
    };
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let app = app.clone();
        let authz = authz.clone();
        let identity = identity.clone();
        let peer = peer.clone();
        async move {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            match authz::authorize(&authz.grants, &authz.environment, &identity, &method, &path) {
                Ok(_) => {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    app.oneshot(req).await
                }
                Err(denial) => Ok(deny(&authz, remote, denial, &method, &path)),
            }
        }
    });
    if let Err(e) = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(peer = %remote, "HTTPS API connection ended: {e}");
    }
}

/// A 403 that says who, where and which role; audited as `api.denied`.
fn deny(
    authz: &Authz,
    remote: SocketAddr,
    denial: Denial,
    method: &Method,
    path: &str,
) -> Response {
    let message = authz::denial_message(&denial, method, path);
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
    let mut api = ApiError::new(Outcome::Denied, message);
    if let Err(e) = authz.store.append_audit(&entry) {
        tracing::error!("cannot audit a denied request: {e}");
        api.message.push_str(&format!(
            " (and the audit record could not be written: {e})"
        ));
    }
    api.denied = Some(Box::new(denial));
    super::api_error_response(http::StatusCode::FORBIDDEN, &api)
}
