//! TCP mode: each accepted connection is spliced to one backend connection.
//!
//! There are no status codes in TCP; for the per-release counters a
//! forwarded connection counts as a 2xx, and a connection the proxy had to
//! close because no backend accepted it counts as failed (and 5xx), like the
//! HTTP mode's own 502/503.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::StatusCode;
use tokio::net::TcpStream;

use super::CONNECT_TIMEOUT;
use super::routes::RouteTable;

/// Forwards one client connection until either side closes it.
pub(crate) async fn serve_connection(
    mut inbound: TcpStream,
    peer: SocketAddr,
    bind: SocketAddr,
    table: Arc<ArcSwap<RouteTable>>,
) {
    let mut avoid = None;
    for attempt in 1..=2 {
        let current = table.load();
        let Some(lease) = current.pick(avoid) else {
            tracing::debug!(%bind, %peer, "no backend for TCP connection, closing it");
            current.unrouted.record_failure();
            return;
        };
        drop(current);
        let target = lease.target();

        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.addr)).await;
        let mut outbound = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(%bind, backend = %target.addr, attempt, "cannot connect to backend: {err}");
                if attempt == 2 {
                    target.counts.record_failure();
                }
                avoid = Some(target.addr);
                continue;
            }
            Err(_) => {
                tracing::debug!(%bind, backend = %target.addr, attempt, "connecting to backend timed out after {CONNECT_TIMEOUT:?}");
                if attempt == 2 {
                    target.counts.record_failure();
                }
                avoid = Some(target.addr);
                continue;
            }
        };
        target.counts.record(StatusCode::OK);
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        // The lease lives until the splice ends: an open connection is "in
        // flight" for drain purposes.
        match tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
            Ok((up, down)) => {
                tracing::trace!(%bind, %peer, backend = %target.addr, up, down, "TCP connection closed");
            }
            Err(err) => {
                tracing::debug!(%bind, %peer, backend = %target.addr, "TCP connection ended with an error: {err}");
            }
        }
        return;
    }
    tracing::warn!(%bind, %peer, "no backend accepted the TCP connection, closing it");
}
