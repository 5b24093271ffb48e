//! `deploy-agent proxy`: the data path.
//!
//! A separate long-lived process owns the published ports and forwards
//! traffic to containers, so that the control daemon can be restarted or
//! upgraded without dropping a connection. The daemon switches routes over a
//! unix socket ([`protocol`]); the switch is one atomic pointer swap per
//! listener, and nothing the data path does ever waits on the control path.
//!
//! Map:
//! - `server` — the process main loop ([`run`]), control socket, registry.
//! - `listener` — binding a published address, and its accept loop.
//! - `http`, `tcp` — forwarding in each mode.
//! - `routes` — the lock-free route table and its counters.
//! - `persist` — `proxy-routes.json`.
//! - `handover` — a successor proxy takes the listening sockets over, so
//!   the proxy itself is upgraded without refusing a connection.
//! - `client` — [`ProxyClient`], used by the daemon.

use std::time::Duration;

mod client;
mod error;
mod handover;
mod http;
mod listener;
mod persist;
pub mod protocol;
mod routes;
mod server;
mod tcp;
#[cfg(test)]
mod tests;

pub use client::ProxyClient;
pub use error::ProxyError;
pub use server::{Options, Successor, run, run_with};

/// The control socket's file name in the state directory.
pub const SOCKET_FILE: &str = "proxy.sock";

/// The persisted routes' file name in the state directory.
pub const ROUTES_FILE: &str = "proxy-routes.json";

/// How long the proxy waits for a backend to accept a connection. Containers
/// are on the same host: if it takes longer, the container is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an idle keep-alive connection to a backend stays pooled. Shorter
/// than the keep-alive timeout of common app servers (Node 5 s, gunicorn
/// 2 s), so the proxy drops idle connections before the backend does and
/// rarely sends a request on a connection being closed under it.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long shutdown waits for in-flight requests and open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Bound on every control call made by [`ProxyClient`].
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often [`ProxyClient::wait_drained`] polls the proxy's status.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long a proxy that handed over keeps its open connections: HTTP/1
/// clients leave at their next response (`Connection: close`), so this
/// bounds only idle keep-alive and long TCP connections.
const HANDOVER_PATIENCE: Duration = Duration::from_secs(30);

/// How long the running proxy waits for its successor to be ready, and the
/// successor for each answer of the running proxy.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`ProxyClient`] sends a request again that met a handover.
const HANDOVER_RETRIES: u32 = 20;

/// Pause between those attempts.
const HANDOVER_RETRY_PAUSE: Duration = Duration::from_millis(50);
