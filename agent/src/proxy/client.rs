//! The daemon's side of the control socket.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{ControlRequest, ControlResponse, ProxyStatus, Route};
use super::{
    CLIENT_TIMEOUT, DRAIN_POLL_INTERVAL, HANDOVER_RETRIES, HANDOVER_RETRY_PAUSE, ProxyError,
};

/// Talks to a running proxy over its control socket, one connection per
/// call. Every call is bounded by a timeout, so a wedged proxy makes the
/// daemon report an error instead of hanging a deploy.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ProxyClient {
    /// A client for the proxy listening on `socket` (`STATE_DIR/proxy.sock`).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ProxyClient {
            socket: socket.into(),
            timeout: CLIENT_TIMEOUT,
        }
    }

    /// The control socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Checks that the proxy is up and answering.
    pub async fn ping(&self) -> Result<(), ProxyError> {
        self.expect_ok(ControlRequest::Ping).await
    }

    /// Creates or atomically replaces the route for `route.bind`. When this
    /// returns `Ok`, the route is persisted and every new request uses it.
    pub async fn set_route(&self, route: Route) -> Result<(), ProxyError> {
        self.expect_ok(ControlRequest::SetRoute { route }).await
    }

    /// Stops listening on `bind`; requests in flight finish.
    pub async fn remove_route(&self, bind: SocketAddr) -> Result<(), ProxyError> {
        self.expect_ok(ControlRequest::RemoveRoute { bind }).await
    }

    /// Routes, in-flight counts and response counters.
    pub async fn status(&self) -> Result<ProxyStatus, ProxyError> {
        match self.call(&ControlRequest::Status).await? {
            ControlResponse::Status { status } => Ok(status),
            ControlResponse::Error { message } => Err(ProxyError::Rejected { message }),
            other => Err(unexpected("a status", &other)),
        }
    }

    /// Waits until none of `containers` has a request (HTTP) or connection
    /// (TCP) in flight on the route at `bind`: `Ok(true)` once drained,
    /// `Ok(false)` if `timeout` passed first.
    ///
    /// A route that no longer exists counts as drained: its listener is gone
    /// and the proxy reports nothing more about it.
    pub async fn wait_drained(
        &self,
        bind: SocketAddr,
        containers: &[String],
        timeout: Duration,
    ) -> Result<bool, ProxyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.status().await?;
            let busy: u64 = status
                .routes
                .iter()
                .filter(|route| route.route.bind == bind)
                .flat_map(|route| {
                    containers
                        .iter()
                        .filter_map(|c| route.in_flight.get(c).copied())
                })
                .sum();
            if busy == 0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() + DRAIN_POLL_INTERVAL > deadline {
                return Ok(false);
            }
            tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
        }
    }

    async fn expect_ok(&self, request: ControlRequest) -> Result<(), ProxyError> {
        match self.call(&request).await? {
            ControlResponse::Ok => Ok(()),
            ControlResponse::Error { message } => Err(ProxyError::Rejected { message }),
            other => Err(unexpected("ok", &other)),
        }
    }

    /// Sends one request and reads its answer, within the client timeout.
    ///
    /// While a proxy hands over to its successor, a request can reach the
    /// old one as it stops: it answers `HandedOver`, or closes the
    /// connection unanswered, having done nothing. Such a request is sent
    /// again (every request is idempotent), and reaches the successor.
    async fn call(&self, request: &ControlRequest) -> Result<ControlResponse, ProxyError> {
        let attempts = async {
            let mut tries = 0;
            loop {
                tries += 1;
                match self.exchange(request).await {
                    Ok(ControlResponse::HandedOver { .. }) | Err(ProxyError::Unanswered { .. })
                        if tries < HANDOVER_RETRIES =>
                    {
                        tokio::time::sleep(HANDOVER_RETRY_PAUSE).await;
                    }
                    Ok(ControlResponse::HandedOver { pid }) => {
                        return Err(ProxyError::Protocol {
                            detail: format!(
                                "the proxy on {} keeps answering that it handed over to process {pid}",
                                self.socket.display()
                            ),
                        });
                    }
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(self.timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::Timeout {
                socket: self.socket.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(&self, request: &ControlRequest) -> Result<ControlResponse, ProxyError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|err| self.connect_error(err))?;
        let (read, mut write) = stream.into_split();

        let mut line = serde_json::to_vec(request).map_err(|err| ProxyError::Protocol {
            detail: format!("cannot encode the request: {err}"),
        })?;
        line.push(b'\n');
        write
            .write_all(&line)
            .await
            .map_err(|err| self.io_error("cannot send the request to", err))?;

        let mut answer = String::new();
        let read = BufReader::new(read)
            .read_line(&mut answer)
            .await
            .map_err(|err| self.io_error("cannot read the answer from", err))?;
        if read == 0 {
            return Err(ProxyError::Unanswered {
                socket: self.socket.clone(),
            });
        }
        serde_json::from_str(&answer).map_err(|err| ProxyError::Protocol {
            detail: format!("invalid answer {:?}: {err}", answer.trim_end()),
        })
    }

    fn connect_error(&self, err: io::Error) -> ProxyError {
        match err.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ProxyError::NotRunning {
                socket: self.socket.clone(),
                state_dir: self
                    .socket
                    .parent()
                    .filter(|dir| !dir.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from(".")),
                source: err,
            },
            io::ErrorKind::PermissionDenied => ProxyError::io(
                format!(
                    "cannot connect to the proxy on {} (run as root or as a member of the socket's group)",
                    self.socket.display()
                ),
                err,
            ),
            _ => self.io_error("cannot connect to the proxy on", err),
        }
    }

    fn io_error(&self, what: &str, err: io::Error) -> ProxyError {
        ProxyError::io(format!("{what} {}", self.socket.display()), err)
    }
}

fn unexpected(expected: &str, got: &ControlResponse) -> ProxyError {
    ProxyError::Protocol {
        detail: format!("expected {expected} answer, got {got:?}"),
    }
}
