//! The agent's HTTPS API with mutual TLS: the request of a [`Call`] built
//! from the operation table, its answer read back, and what a failure
//! tells of whether the agent saw the request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deploy_protocol::jsonl::Splitter;
use deploy_protocol::ops::{Call, Input, Output};
use deploy_protocol::{ApiError, Event, OperationResult, Query};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};

use super::{AgentClient, CONNECT_TIMEOUT, CallError, error_chain, snippet};
use crate::inventory::TlsFiles;

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

/// Why an agent refused this controller's client certificate, from the
/// TLS alert it sent: an answer from the agent, so never routed around over
/// SSH (an expired CI certificate must be renewed, not hidden).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRefusal {
    /// `certificate_expired`: expired, or not valid yet.
    Expired,
    /// `unknown_ca`: not issued by the CA the agent trusts.
    UnknownCa,
    /// `decrypt_error`: its signature does not verify with the agent's CA
    /// (a certificate from another CA of the same name).
    BadSignature,
    /// `unsupported_certificate`: not for client authentication.
    BadUsage,
    /// `bad_certificate`: malformed or unacceptable.
    BadCertificate,
    /// `certificate_revoked`.
    Revoked,
    /// `certificate_required`: none was sent.
    Required,
    /// `certificate_unknown` or `access_denied`: refused, reason unsaid.
    Refused,
}

impl CertRefusal {
    /// The refusal an alert from the agent means, if it is about our
    /// certificate (other alerts, e.g. `handshake_failure`, are not).
    pub fn from_alert(alert: rustls::AlertDescription) -> Option<CertRefusal> {
        use rustls::AlertDescription as A;
        Some(match alert {
            A::CertificateExpired => CertRefusal::Expired,
            A::UnknownCA => CertRefusal::UnknownCa,
            A::DecryptError => CertRefusal::BadSignature,
            A::UnsupportedCertificate => CertRefusal::BadUsage,
            A::BadCertificate => CertRefusal::BadCertificate,
            A::CertificateRevoked => CertRefusal::Revoked,
            A::CertificateRequired => CertRefusal::Required,
            A::CertificateUnknown | A::AccessDenied => CertRefusal::Refused,
            _ => return None,
        })
    }

    /// The refusal an error chain names (`received fatal alert: …`, as
    /// rustls words it), if any.
    pub fn in_chain(chain: &str) -> Option<CertRefusal> {
        use rustls::AlertDescription as A;
        let name = chain.split("received fatal alert: ").nth(1)?;
        let name: String = name
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        [
            A::CertificateExpired,
            A::UnknownCA,
            A::DecryptError,
            A::UnsupportedCertificate,
            A::BadCertificate,
            A::CertificateRevoked,
            A::CertificateRequired,
            A::CertificateUnknown,
            A::AccessDenied,
        ]
        .into_iter()
        .find(|a| format!("{a:?}") == name)
        .and_then(CertRefusal::from_alert)
    }

    /// The alert's name in the TLS specification.
    pub fn alert(self) -> &'static str {
        match self {
            CertRefusal::Expired => "certificate_expired",
            CertRefusal::UnknownCa => "unknown_ca",
            CertRefusal::BadSignature => "decrypt_error",
            CertRefusal::BadUsage => "unsupported_certificate",
            CertRefusal::BadCertificate => "bad_certificate",
            CertRefusal::Revoked => "certificate_revoked",
            CertRefusal::Required => "certificate_required",
            CertRefusal::Refused => "certificate_unknown",
        }
    }

    /// What the agent found wrong with it.
    pub fn why(self) -> &'static str {
        match self {
            CertRefusal::Expired => "it has expired (or is not valid yet)",
            CertRefusal::UnknownCa => "it is not issued by the CA the agent trusts (unknown CA)",
            CertRefusal::BadSignature => {
                "its signature does not verify with the CA the agent trusts (a certificate from another CA of the same name?)"
            }
            CertRefusal::BadUsage => {
                "it is not a client certificate (bad usage: it lacks the clientAuth extended key usage)"
            }
            CertRefusal::BadCertificate => "the agent cannot accept it (bad certificate)",
            CertRefusal::Revoked => "it is revoked",
            CertRefusal::Required => "the agent requires a client certificate and got none",
            CertRefusal::Refused => "the agent did not say why",
        }
    }

    /// What to do about it.
    pub fn advice(self) -> &'static str {
        match self {
            CertRefusal::Expired | CertRefusal::Revoked => {
                "issue a new one (`deploy-controller pki issue --dir CA_DIR --name CN --kind client`) and point the inventory's tls `cert` and `key` at it"
            }
            CertRefusal::UnknownCa | CertRefusal::BadSignature => {
                "the agent trusts the CA of its agent.toml `tls_ca`: issue this certificate from that CA, or fix the inventory's tls `cert`"
            }
            CertRefusal::BadUsage => {
                "issue a client certificate (`deploy-controller pki issue --dir CA_DIR --name CN --kind client`) and point the inventory's tls `cert` and `key` at it"
            }
            CertRefusal::BadCertificate | CertRefusal::Required | CertRefusal::Refused => {
                "check the inventory's tls `cert` and `key`; the agent's log (`TLS handshake refused: …`) says why it refused it"
            }
        }
    }
}

/// A second look after a connection that closed right after the TLS
/// handshake: with TLS 1.3 an agent refuses our certificate only after the
/// handshake, and the HTTP client loses its alert. One handshake of our
/// own, with the same CA and certificate, and a request (`ping`) reads it.
pub struct TlsCheck {
    config: Arc<rustls::ClientConfig>,
    /// The client certificate (its path, for messages).
    pub cert: PathBuf,
    /// Its validity period, as read here (`None`: unreadable).
    validity: Option<(jiff::Timestamp, jiff::Timestamp)>,
}

impl TlsCheck {
    pub fn new(tls: &TlsFiles) -> Result<TlsCheck, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let (ca, cert, key) = (read(&tls.ca)?, read(&tls.cert)?, read(&tls.key)?);
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.map_err(|e| format!("{}: {e}", tls.ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", tls.ca.display()))?;
        }
        let chain = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
        let validity = chain.first().and_then(|c| {
            let (_, x) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
            let at = |t: x509_parser::time::ASN1Time| jiff::Timestamp::from_second(t.timestamp());
            Some((
                at(x.validity().not_before).ok()?,
                at(x.validity().not_after).ok()?,
            ))
        });
        let key = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| format!("{}: {e}", tls.key.display()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsCheck {
            config: Arc::new(config),
            cert: tls.cert.clone(),
            validity,
        })
    }

    /// The agent's refusal of our certificate, if its TLS alert says so.
    /// `None`: it accepted it, or could not be asked (then the first error
    /// stands).
    pub async fn refusal(self: &Arc<Self>, addr: &str, timeout: Duration) -> Option<CertRefusal> {
        let (check, addr) = (self.clone(), addr.to_string());
        tokio::task::spawn_blocking(move || check.refusal_blocking(&addr, timeout))
            .await
            .ok()
            .flatten()
    }

    fn refusal_blocking(&self, addr: &str, timeout: Duration) -> Option<CertRefusal> {
        use std::io::{Read, Write};
        use std::net::ToSocketAddrs;
        let sock = addr.to_socket_addrs().ok()?.next()?;
        let tcp = std::net::TcpStream::connect_timeout(&sock, timeout).ok()?;
        tcp.set_read_timeout(Some(timeout)).ok()?;
        tcp.set_write_timeout(Some(timeout)).ok()?;
        let host = match addr.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => addr,
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).ok()?;
        let conn = rustls::ClientConnection::new(self.config.clone(), name).ok()?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
            deploy_protocol::Op::Ping.spec().path
        );
        let mut byte = [0u8; 1];
        let error = tls
            .write_all(request.as_bytes())
            .and_then(|()| tls.flush())
            .and_then(|()| tls.read(&mut byte))
            .err()?;
        match error.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::AlertReceived(alert) => CertRefusal::from_alert(*alert),
            _ => None,
        }
    }

    /// The certificate, and for an expiry refusal what its validity
    /// period says here, for the message.
    pub fn describe(&self, refusal: CertRefusal) -> String {
        let path = self.cert.display();
        match (refusal, self.validity) {
            (CertRefusal::Expired, Some((from, until))) => {
                let now = jiff::Timestamp::now();
                if now > until {
                    format!("{path}, which expired {until:.0}")
                } else if now < from {
                    format!("{path}, valid only from {from:.0}")
                } else {
                    format!(
                        "{path}, valid until {until:.0} by this machine's clock: check the agent's clock"
                    )
                }
            }
            _ => path.to_string(),
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
    /// waiting for one), or it answered the TLS handshake by refusing our
    /// certificate ([`CertRefusal`]): never routed around.
    Possible,
}

/// What a reqwest error tells of whether the agent saw the request.
pub(super) fn delivery(e: &reqwest::Error) -> Delivery {
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

impl AgentClient {
    pub(super) fn url(&self, path_and_query: &str) -> String {
        format!("https://{}{path_and_query}", self.addr)
    }

    /// A transport error while sending (it may not have been delivered).
    /// An agent that refused our certificate says so in a TLS alert: in the
    /// error itself, or, when the connection closed right after the
    /// handshake (TLS 1.3), to a handshake of our own ([`TlsCheck`]).
    pub(super) async fn transport(&self, e: &reqwest::Error) -> CallError {
        let message = error_chain(e);
        let delivery = delivery(e);
        let mut refusal = CertRefusal::in_chain(&message);
        if refusal.is_none()
            && delivery != Delivery::Possible
            && !e.is_connect()
            && let Some(check) = &self.tls
        {
            refusal = check.refusal(&self.addr, self.route.connect_timeout).await;
        }
        match refusal {
            Some(refusal) => self.certificate_refused(refusal),
            None => CallError::Unreachable {
                host: self.host.clone(),
                addr: self.addr.clone(),
                message,
                delivery,
            },
        }
    }

    fn certificate_refused(&self, refusal: CertRefusal) -> CallError {
        CallError::CertificateRefused {
            host: self.host.clone(),
            addr: self.addr.clone(),
            cert: self.tls.as_ref().map(|c| c.describe(refusal)),
            refusal,
        }
    }

    /// A transport error after the agent answered (never a fallback).
    pub(super) fn broken(&self, e: &reqwest::Error) -> CallError {
        CallError::Unreachable {
            host: self.host.clone(),
            addr: self.addr.clone(),
            message: error_chain(e),
            delivery: Delivery::Possible,
        }
    }

    pub(super) fn protocol(&self, message: impl Into<String>) -> CallError {
        CallError::Protocol {
            host: self.host.clone(),
            message: message.into(),
        }
    }

    /// The method and URL of a call, and its JSON body if it has one.
    pub(super) fn request_of<C: Call>(
        &self,
        input: &serde_json::Value,
    ) -> Result<(Method, String, Option<serde_json::Value>), CallError> {
        let spec = C::OP.spec();
        let method = match spec.method {
            deploy_protocol::ops::Method::Get => Method::GET,
            deploy_protocol::ops::Method::Post => Method::POST,
            deploy_protocol::ops::Method::Delete => Method::DELETE,
        };
        Ok(match spec.input {
            Input::Nothing => (method, self.url(spec.path), None),
            Input::Query => {
                let q: Query = serde_json::from_value(input.clone())
                    .map_err(|e| self.protocol(format!("{} query: {e}", C::OP.name())))?;
                (method, self.url(&C::OP.path_and_query(&q)), None)
            }
            Input::Body => (method, self.url(spec.path), Some(input.clone())),
        })
    }

    /// One call over HTTPS, its answer as the table says.
    pub(super) async fn https<C: Call>(
        &self,
        input: &serde_json::Value,
        timeout: Duration,
    ) -> Result<C::Response, CallError> {
        let (method, url, body) = self.request_of::<C>(input)?;
        let path = C::OP.spec().path;
        let mut req = self.http.request(method, url).timeout(timeout);
        if let Some(b) = &body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Err(self.transport(&e).await),
        };
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.broken(&e))?;
        if !status.is_success() {
            return Err(self.api_error(status, &bytes, path));
        }
        let parsed = match C::OP.spec().output {
            Output::Text => serde_json::from_value(serde_json::Value::String(
                String::from_utf8_lossy(&bytes).to_string(),
            )),
            _ => serde_json::from_slice(&bytes),
        };
        parsed.map_err(|e| {
            self.protocol(format!(
                "{path} answered {status} with {}: {e}",
                snippet(&bytes)
            ))
        })
    }

    pub(super) fn api_error(&self, status: StatusCode, bytes: &[u8], path: &str) -> CallError {
        match serde_json::from_slice::<ApiError>(bytes) {
            Ok(error) => CallError::Api {
                host: self.host.clone(),
                status: status.as_u16(),
                error,
            },
            Err(_) => self.protocol(format!("{path} answered {status}: {}", snippet(bytes))),
        }
    }

    /// A deploy or rollback over HTTPS: its streamed events read to the
    /// result. No overall time limit: the agent's own deadlines and
    /// observation window bound it, and a lost connection is an error here.
    pub(super) async fn https_operation<C: Call<Response = OperationResult>>(
        &self,
        req: &C::Request,
        mut on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        let path = C::OP.spec().path;
        let resp = match self.http.post(self.url(path)).json(req).send().await {
            Ok(r) => r,
            Err(e) => return Err(self.transport(&e).await),
        };
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| self.broken(&e))?;
            return Err(self.api_error(status, &bytes, path));
        }
        let mut stream = resp.bytes_stream();
        let mut lines = Splitter::new();
        let mut result = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.broken(&e))?;
            lines
                .push(&chunk)
                .map_err(|e| self.protocol(format!("{path}: {e}")))?;
            while let Some(line) = lines.next_line() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_about_our_certificate_are_refusals_and_others_are_not() {
        let chain = |alert: &str| {
            format!(
                "error sending request for url (https://127.0.0.1:7443/v1/status): client error (SendRequest): \
                 connection error: received fatal alert: {alert}"
            )
        };
        assert_eq!(
            CertRefusal::in_chain(&chain("CertificateExpired")),
            Some(CertRefusal::Expired)
        );
        assert_eq!(
            CertRefusal::in_chain(&chain("UnknownCA")),
            Some(CertRefusal::UnknownCa)
        );
        assert_eq!(
            CertRefusal::in_chain(&chain("UnsupportedCertificate")),
            Some(CertRefusal::BadUsage)
        );
        assert_eq!(
            CertRefusal::in_chain(&chain("BadCertificate")),
            Some(CertRefusal::BadCertificate)
        );
        assert_eq!(
            CertRefusal::in_chain(&chain("CertificateRequired")),
            Some(CertRefusal::Required)
        );
        assert_eq!(
            CertRefusal::in_chain(&chain("DecryptError")),
            Some(CertRefusal::BadSignature)
        );
        // Not about our certificate: no common version or cipher suite.
        assert_eq!(CertRefusal::in_chain(&chain("HandshakeFailure")), None);
        assert_eq!(CertRefusal::in_chain(&chain("ProtocolVersion")), None);
        // We refused the agent's certificate: not an answer from it.
        assert_eq!(
            CertRefusal::in_chain("client error (Connect): invalid peer certificate: Expired"),
            None
        );
        assert_eq!(
            CertRefusal::in_chain("operation was canceled: connection closed"),
            None
        );
    }

    #[test]
    fn every_refusal_says_why_and_what_to_do() {
        for r in [
            CertRefusal::Expired,
            CertRefusal::UnknownCa,
            CertRefusal::BadSignature,
            CertRefusal::BadUsage,
            CertRefusal::BadCertificate,
            CertRefusal::Revoked,
            CertRefusal::Required,
            CertRefusal::Refused,
        ] {
            assert!(!r.why().is_empty() && !r.advice().is_empty());
            assert!(
                r.alert()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            );
        }
        assert!(CertRefusal::Expired.why().contains("expired"));
        assert!(CertRefusal::UnknownCa.why().contains("unknown CA"));
        assert!(CertRefusal::BadUsage.why().contains("bad usage"));
    }

    #[test]
    fn a_refused_certificate_is_an_answer_with_exit_6() {
        let e = CallError::CertificateRefused {
            host: "p1".into(),
            addr: "10.0.0.1:7443".into(),
            cert: Some("ci.pem, which expired 2026-12-01T00:00:00Z".into()),
            refusal: CertRefusal::Expired,
        };
        assert_eq!(e.delivery(), Delivery::Possible, "never routed around");
        assert_eq!(e.outcome().exit_code(), crate::exit::DENIED);
        let m = e.to_string();
        assert!(
            m.starts_with(
                "host p1: its agent at https://10.0.0.1:7443 refused this controller's client certificate (ci.pem, which expired 2026-12-01T00:00:00Z): it has expired"
            ),
            "{m}"
        );
        assert!(
            m.contains("certificate_expired") && m.contains("pki issue"),
            "{m}"
        );
        assert!(!m.contains("listens there"), "{m}");
    }

    #[test]
    fn an_unreachable_agent_is_told_by_what_failed() {
        let unreachable = |message: &str| {
            CallError::Unreachable {
                host: "p1".into(),
                addr: "10.0.0.1:7443".into(),
                message: message.into(),
                delivery: Delivery::Never,
            }
            .to_string()
        };
        let m = unreachable("client error (Connect): tcp connect error: Connection refused");
        assert!(m.contains("`deploy-agent run` listens there"), "{m}");
        let m = unreachable("client error (Connect): invalid peer certificate: Expired");
        assert!(
            m.contains("the agent's certificate") && m.contains("tls_cert"),
            "{m}"
        );
        assert!(!m.contains("listens there"), "{m}");
    }
}
