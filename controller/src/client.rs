//! The agent API client: HTTPS with mutual TLS (reqwest + rustls), one
//! HTTP/2 connection per agent, JSON in and out, deploys and rollbacks
//! streamed as JSON lines ([`Event`]s, the last one the result).
//!
//! Errors are sorted the way the controller acts on them: the agent could
//! not be reached at all ([`CallError::Unreachable`]: refused, timed out,
//! TLS handshake refused — the SSH fallback will apply there), the agent
//! answered with a refusal ([`CallError::Api`]: denied, locked, config…),
//! or the answer made no sense ([`CallError::Protocol`]).

use std::path::Path;
use std::time::Duration;

use deploy_agent::store::AuditRecord;
use deploy_agent::wire::{
    ApiError, DeployRequest, Event, HistoryEntry, Lease, LockGranted, LockRequest, OperationResult,
    Outcome, PullRequest, PullResult, ReleaseInfo, RollbackRequest, StatusReport, UnlockRequest,
};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::inventory::{Host, TlsFiles};

/// How long to wait for a TCP connection and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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
            CallError::Unreachable { .. } | CallError::Protocol { .. } => Outcome::EnvironmentError,
            CallError::Api { error, .. } => error.outcome,
        }
    }

    pub fn host(&self) -> &str {
        match self {
            CallError::Unreachable { host, .. }
            | CallError::Api { host, .. }
            | CallError::Protocol { host, .. } => host,
        }
    }
}

/// A reqwest client with the environment's client certificate and CA.
pub fn http_client(tls: &TlsFiles) -> Result<reqwest::Client, TlsError> {
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
        .connect_timeout(CONNECT_TIMEOUT)
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

/// One agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    pub host: String,
    pub addr: String,
    http: reqwest::Client,
}

impl AgentClient {
    pub fn new(host: &Host, http: reqwest::Client) -> AgentClient {
        AgentClient {
            host: host.name.clone(),
            addr: host.agent.clone(),
            http,
        }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("https://{}{path_and_query}", self.addr)
    }

    fn transport(&self, e: &reqwest::Error) -> CallError {
        CallError::Unreachable {
            host: self.host.clone(),
            addr: self.addr.clone(),
            message: error_chain(e),
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
        let bytes = resp.bytes().await.map_err(|e| self.transport(&e))?;
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

    pub async fn ping(&self) -> Result<(), CallError> {
        let resp = self
            .http
            .get(self.url("/v1/ping"))
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport(&e))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(self.api_error(status, &bytes, "/v1/ping"))
        }
    }

    pub async fn pull(&self, req: &PullRequest) -> Result<PullResult, CallError> {
        self.call_within(Method::POST, "/v1/pull", Some(req), PULL_TIMEOUT)
            .await
    }

    pub async fn lock(&self, req: &LockRequest) -> Result<LockGranted, CallError> {
        self.call(Method::POST, "/v1/lock", Some(req)).await
    }

    pub async fn renew(&self, req: &LockRequest) -> Result<Lease, CallError> {
        self.call(Method::POST, "/v1/lock/renew", Some(req)).await
    }

    pub async fn unlock(&self, req: &UnlockRequest) -> Result<Option<Lease>, CallError> {
        self.call(Method::DELETE, "/v1/lock", Some(req)).await
    }

    pub async fn status(&self, project: &str) -> Result<StatusReport, CallError> {
        self.call(
            Method::GET,
            &format!("/v1/status?project={}", encode(project)),
            None::<&()>,
        )
        .await
    }

    pub async fn history(&self, project: &str) -> Result<Vec<HistoryEntry>, CallError> {
        self.call(
            Method::GET,
            &format!("/v1/history?project={}", encode(project)),
            None::<&()>,
        )
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
        self.call(Method::GET, &path, None::<&()>).await
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
        match self.call(Method::GET, &path, None::<&()>).await {
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
        self.operation("/v1/deploy", req, on_event).await
    }

    pub async fn rollback(
        &self,
        req: &RollbackRequest,
        on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        self.operation("/v1/rollback", req, on_event).await
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
            let bytes = resp.bytes().await.map_err(|e| self.transport(&e))?;
            return Err(self.api_error(status, &bytes, path));
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut result = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.transport(&e))?;
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
