//! The proxy's control protocol: one JSON object per line over the unix
//! socket `STATE_DIR/proxy.sock`, one response line per request.
//!
//! The control daemon is the only writer. The proxy persists its routes to
//! `STATE_DIR/proxy-routes.json` before answering `Ok`, so a restarted proxy
//! serves the same routes, and a restarted daemon finds them in place.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::spec::ProxyMode;

/// Where traffic goes for one published address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// The published address the proxy listens on, e.g. `0.0.0.0:8080`.
    pub bind: SocketAddr,
    pub project: String,
    pub service: String,
    pub mode: ProxyMode,
    /// Active backends. Requests (HTTP) or connections (TCP) are spread over
    /// them round-robin, by weight. Empty: the listener stays bound and
    /// answers 503 (HTTP) or closes connections (TCP).
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Container address on its Docker network, e.g. `172.18.0.5:80`.
    pub addr: SocketAddr,
    pub release: String,
    /// Container name; identifies the backend across route changes.
    pub container: String,
    /// Relative share of traffic. Default 1. 0: standby, receiving only the
    /// retry of a request that no weighted backend could take (the warm
    /// previous release during the observation window).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Ping,
    /// Create or replace the route for `route.bind`, atomically: every
    /// request or connection accepted after the answer uses the new backends;
    /// those in flight finish on the backend they started on.
    SetRoute {
        route: Route,
    },
    /// Stop listening on `bind` (in-flight requests finish).
    RemoveRoute {
        bind: SocketAddr,
    },
    Status,
    /// A successor proxy (process `pid`, started with `--take-over`) asks
    /// for the listening sockets. The answer is a handover message with the
    /// sockets attached (see `handover`), not a [`ControlResponse`].
    HandOver {
        pid: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    Ok,
    Status {
        status: ProxyStatus,
    },
    Error {
        message: String,
    },
    /// This proxy handed its listeners and control socket to process `pid`;
    /// connect again (the socket path now leads to it). Nothing was done.
    HandedOver {
        pid: u32,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub pid: u32,
    pub routes: Vec<RouteStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub route: Route,
    /// In-flight requests (HTTP) or open connections (TCP) per container,
    /// including containers no longer in `route.backends` that still have
    /// some (they are draining).
    pub in_flight: BTreeMap<String, u64>,
    /// Responses per release since the route was created, by status class.
    pub releases: BTreeMap<String, ClassCounts>,
}

/// Response counts by status class. `failed` counts requests the proxy could
/// not forward (it answered 502/503 itself); they are also counted in `s5xx`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounts {
    pub s1xx: u64,
    pub s2xx: u64,
    pub s3xx: u64,
    pub s4xx: u64,
    pub s5xx: u64,
    pub failed: u64,
}
