//! The agent's HTTPS API with mutual TLS: the request of a [`Call`] built
//! from the operation table, its answer read back, and what a failure
//! tells of whether the agent saw the request.

use std::path::Path;
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
    pub(super) fn transport(&self, e: &reqwest::Error) -> CallError {
        CallError::Unreachable {
            host: self.host.clone(),
            addr: self.addr.clone(),
            message: error_chain(e),
            delivery: delivery(e),
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
        let resp = req.send().await.map_err(|e| self.transport(&e))?;
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
        let resp = self
            .http
            .post(self.url(path))
            .json(req)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
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
