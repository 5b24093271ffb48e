//! One published address: the listening socket and its accept loop.
//!
//! The accept loop reads the route table's mode for every accepted
//! connection, so a mode change needs no rebind. Connections run in a
//! `JoinSet` owned by the loop: when the loop is told to stop it closes the
//! listening socket first (so a new listener can take the address), then lets
//! the open connections finish; aborting the loop's task aborts them all.
//!
//! Each running listener keeps a duplicate of its socket's descriptor, so
//! that a successor proxy can be handed the very same listening socket
//! (`super::handover`): connections waiting in its accept queue are then
//! accepted by the successor instead of being refused.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::http::{self, HttpContext};
use super::routes::RouteTable;
use super::tcp;
use crate::spec::ProxyMode;

/// How long a listener waits after a failed accept (e.g. out of file
/// descriptors) before trying again, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `addr` with SO_REUSEADDR, so that a restarted proxy can listen again
/// at once even while connections of its previous life sit in TIME_WAIT.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// How a listener stops.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    /// The route is gone or the proxy stops: idle keep-alive connections
    /// close at once, busy ones after their current request.
    Now,
    /// A successor took the socket over: every HTTP/1 response from now on
    /// says `Connection: close`, so clients leave for the successor between
    /// requests, never in the middle of sending one; connections still open
    /// after this long are then closed as with [`Stop::Now`].
    HandedOver(Duration),
}

/// A listener whose accept loop is running.
#[derive(Debug)]
pub(crate) struct RunningListener {
    stop: oneshot::Sender<Stop>,
    closed: oneshot::Receiver<()>,
    task: JoinHandle<()>,
    /// A duplicate of the listening socket's descriptor, for a successor.
    socket: OwnedFd,
}

impl RunningListener {
    /// Starts accepting connections on `listener`, routing them by `table`.
    /// Fails only if the socket's descriptor cannot be duplicated (out of
    /// file descriptors).
    pub(crate) fn spawn(
        listener: TcpListener,
        bind: SocketAddr,
        table: Arc<ArcSwap<RouteTable>>,
    ) -> io::Result<Self> {
        let socket = listener.as_fd().try_clone_to_owned()?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let (closed_tx, closed_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, bind, table, stop_rx, closed_tx));
        Ok(RunningListener {
            stop: stop_tx,
            closed: closed_rx,
            task,
            socket,
        })
    }

    /// The listening socket, as a successor proxy receives it.
    pub(crate) fn socket(&self) -> &OwnedFd {
        &self.socket
    }

    /// Stops accepting. Returns once this process no longer holds the
    /// listening socket, with the task that finishes when the open
    /// connections have.
    pub(crate) async fn stop(self, how: Stop) -> JoinHandle<()> {
        // Our duplicate first: once the loop drops its own, the address is
        // free (or the successor's alone).
        drop(self.socket);
        let _ = self.stop.send(how);
        // An error means the loop is gone already, socket included.
        let _ = self.closed.await;
        self.task
    }
}

async fn accept_loop(
    listener: TcpListener,
    bind: SocketAddr,
    table: Arc<ArcSwap<RouteTable>>,
    mut stop: oneshot::Receiver<Stop>,
    closed: oneshot::Sender<()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer enables hyper's 30 s header read timeout (slow-loris).
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let closing = Arc::new(AtomicBool::new(false));

    tracing::info!(%bind, "listening");
    let how = loop {
        tokio::select! {
            how = &mut stop => break how.unwrap_or(Stop::Now),
            Some(finished) = connections.join_next() => {
                if let Err(err) = finished
                    && err.is_panic()
                {
                    tracing::error!(%bind, "a connection task panicked: {err}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let mode = table.load().mode;
                    match mode {
                        ProxyMode::Http => {
                            let ctx = HttpContext {
                                table: Arc::clone(&table),
                                bind,
                                peer,
                                closing: Arc::clone(&closing),
                            };
                            let watcher = graceful.watcher();
                            let builder = builder.clone();
                            connections.spawn(async move {
                                serve_http(stream, ctx, builder, watcher).await;
                            });
                        }
                        ProxyMode::Tcp => {
                            connections.spawn(tcp::serve_connection(stream, peer, bind, Arc::clone(&table)));
                        }
                    }
                }
                Err(err) => {
                    tracing::error!(%bind, "cannot accept a connection: {err}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    };

    drop(listener);
    let _ = closed.send(());
    tracing::info!(%bind, open = connections.len(), "stopped listening; letting open connections finish");
    if let Stop::HandedOver(patience) = how {
        closing.store(true, Ordering::SeqCst);
        let finished = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(patience, finished).await.is_err() {
            tracing::info!(%bind, open = connections.len(), "connections still open after {patience:?}; closing the idle ones");
        }
    }
    // Idle keep-alive connections close now, busy ones after their current
    // request; TCP splices run until either side closes.
    let drain_http = graceful.shutdown();
    let drain_all = async { while connections.join_next().await.is_some() {} };
    tokio::join!(drain_http, drain_all);
    tracing::debug!(%bind, "all connections finished");
}

async fn serve_http(
    stream: TcpStream,
    ctx: HttpContext,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = stream.set_nodelay(true);
    let peer = ctx.peer;
    let bind = ctx.bind;
    let service = service_fn(move |req| http::serve_request(req, ctx.clone()));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(err) = watcher.watch(connection).await {
        // Mostly clients that went away mid-request; not the proxy's problem.
        tracing::debug!(%bind, %peer, "HTTP connection ended with an error: {err}");
    }
}
