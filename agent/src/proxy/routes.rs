//! The per-listener route table the data path reads, and the counters it
//! updates.
//!
//! The data path never takes a lock: it loads the current [`RouteTable`] from
//! an `ArcSwap` (one atomic load), picks a backend with an atomic counter, and
//! bumps atomic counters that the control side created in advance. The
//! control side builds a complete new table for every `SetRoute` and swaps it
//! in with a single store, so a request sees either the old table or the new
//! one, never a mix.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::protocol::ClassCounts;
use super::{CONNECT_TIMEOUT, POOL_IDLE_TIMEOUT};
use crate::spec::ProxyMode;

/// The pooled HTTP client used to talk to one backend. Request bodies are
/// buffered (so that a failed connect can be retried), hence `Full<Bytes>`.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the client for one backend container.
///
/// Each backend gets its own connection pool, so that when a container leaves
/// the route its idle keep-alive connections go away with it: Docker reuses
/// container IP addresses, and a shared pool keyed by `ip:port` could hand a
/// request a dead connection to the previous owner of the address.
///
/// The pool idle timeout is short (shorter than the keep-alive timeout of
/// common app servers), which makes it unlikely that we send a request on a
/// connection the backend is closing at the same instant.
pub(crate) fn backend_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Response counts of one release, updated lock-free by the data path.
#[derive(Debug, Default)]
pub(crate) struct ReleaseCounters {
    s1xx: AtomicU64,
    s2xx: AtomicU64,
    s3xx: AtomicU64,
    s4xx: AtomicU64,
    s5xx: AtomicU64,
    failed: AtomicU64,
}

impl ReleaseCounters {
    /// Counts a response by its status class.
    pub(crate) fn record(&self, status: StatusCode) {
        let counter = match status.as_u16() {
            100..=199 => &self.s1xx,
            200..=299 => &self.s2xx,
            300..=399 => &self.s3xx,
            400..=499 => &self.s4xx,
            _ => &self.s5xx,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request or connection the proxy could not forward: it is a
    /// 5xx (the proxy answered 502/503 itself) and a failure.
    pub(crate) fn record_failure(&self) {
        self.s5xx.fetch_add(1, Ordering::Relaxed);
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counters that start from `counts` (handed over by a predecessor).
    pub(crate) fn from_counts(counts: ClassCounts) -> Self {
        ReleaseCounters {
            s1xx: AtomicU64::new(counts.s1xx),
            s2xx: AtomicU64::new(counts.s2xx),
            s3xx: AtomicU64::new(counts.s3xx),
            s4xx: AtomicU64::new(counts.s4xx),
            s5xx: AtomicU64::new(counts.s5xx),
            failed: AtomicU64::new(counts.failed),
        }
    }

    pub(crate) fn snapshot(&self) -> ClassCounts {
        ClassCounts {
            s1xx: self.s1xx.load(Ordering::Relaxed),
            s2xx: self.s2xx.load(Ordering::Relaxed),
            s3xx: self.s3xx.load(Ordering::Relaxed),
            s4xx: self.s4xx.load(Ordering::Relaxed),
            s5xx: self.s5xx.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// One backend as the data path sees it. Shared between successive route
/// tables as long as the backend stays in the route, so its pool and counters
/// carry over a `SetRoute` that only changes other backends or weights.
#[derive(Debug)]
pub(crate) struct BackendTarget {
    pub(crate) addr: SocketAddr,
    pub(crate) container: String,
    pub(crate) release: String,
    /// In-flight requests (HTTP) or open connections (TCP) of the container.
    pub(crate) in_flight: Arc<AtomicU64>,
    pub(crate) counts: Arc<ReleaseCounters>,
    pub(crate) client: HttpClient,
}

/// A backend picked for one request or connection. While it lives, the
/// backend's container counts one more in flight; it is dropped when the
/// response body has been sent (or the client went away), or when the TCP
/// connection closes. That is what makes `wait_drained` trustworthy.
#[derive(Debug)]
pub(crate) struct Lease {
    target: Arc<BackendTarget>,
}

impl Lease {
    fn new(target: Arc<BackendTarget>) -> Self {
        target.in_flight.fetch_add(1, Ordering::SeqCst);
        Lease { target }
    }

    pub(crate) fn target(&self) -> &BackendTarget {
        &self.target
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An immutable snapshot of where one listener sends traffic.
#[derive(Debug)]
pub(crate) struct RouteTable {
    pub(crate) mode: ProxyMode,
    /// Backends with weight > 0, in route order.
    backends: Vec<Arc<BackendTarget>>,
    /// Running sums of the weights of `backends`.
    cumulative: Vec<u64>,
    /// Backends with weight 0: they receive nothing, except the retry of a
    /// request whose every weighted backend failed to take it. The engine
    /// lists the warm previous release here during the observation window,
    /// so a new release that crashes costs latency, not failed requests.
    standby: Vec<Arc<BackendTarget>>,
    /// Round-robin position, shared by every request using this table.
    next: AtomicU64,
    /// Where requests that found no backend are counted (release "").
    pub(crate) unrouted: Arc<ReleaseCounters>,
}

impl RouteTable {
    /// `backends` pairs each target with its weight; zero weights are kept
    /// aside as standby (they receive only retries that have nowhere else to go).
    pub(crate) fn new(
        mode: ProxyMode,
        backends: impl IntoIterator<Item = (Arc<BackendTarget>, u32)>,
        unrouted: Arc<ReleaseCounters>,
    ) -> Self {
        let mut targets = Vec::new();
        let mut cumulative = Vec::new();
        let mut standby = Vec::new();
        let mut total = 0u64;
        for (target, weight) in backends {
            if weight == 0 {
                standby.push(target);
                continue;
            }
            total += u64::from(weight);
            targets.push(target);
            cumulative.push(total);
        }
        RouteTable {
            mode,
            backends: targets,
            cumulative,
            standby,
            next: AtomicU64::new(0),
            unrouted,
        }
    }

    /// Picks a backend by weighted round-robin and leases it.
    ///
    /// `avoid` is the address that just failed: if another backend exists,
    /// the pick moves past it (a retry must not hit the same dead container
    /// again when there is an alternative). `None` when the route has no
    /// backend with a positive weight.
    pub(crate) fn pick(&self, avoid: Option<SocketAddr>) -> Option<Lease> {
        let total = *self.cumulative.last()?;
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % total;
        let mut index = self.cumulative.partition_point(|&sum| sum <= slot);
        if let Some(avoid) = avoid
            && self.backends[index].addr == avoid
        {
            let len = self.backends.len();
            if let Some(other) = (1..len)
                .map(|step| (index + step) % len)
                .find(|&i| self.backends[i].addr != avoid)
            {
                index = other;
            } else if !self.standby.is_empty() {
                let s = usize::try_from(slot).unwrap_or(0) % self.standby.len();
                return Some(Lease::new(Arc::clone(&self.standby[s])));
            }
        }
        Some(Lease::new(Arc::clone(&self.backends[index])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16) -> Arc<BackendTarget> {
        Arc::new(BackendTarget {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            container: format!("c{port}"),
            release: "r".into(),
            in_flight: Arc::default(),
            counts: Arc::default(),
            client: backend_client(),
        })
    }

    #[tokio::test]
    async fn weighted_round_robin_follows_weights_and_skips_zero() {
        let table = RouteTable::new(
            ProxyMode::Http,
            [(target(1), 3), (target(2), 0), (target(3), 1)],
            Arc::default(),
        );
        let picks: Vec<u16> = (0..8)
            .map(|_| table.pick(None).map(|l| l.target().addr.port()))
            .collect::<Option<_>>()
            .unwrap();
        assert_eq!(picks, [1, 1, 1, 3, 1, 1, 1, 3]);
    }

    #[tokio::test]
    async fn standby_takes_only_retries_that_have_nowhere_else_to_go() {
        let table = RouteTable::new(
            ProxyMode::Http,
            [(target(1), 1), (target(2), 0)],
            Arc::default(),
        );
        for _ in 0..10 {
            let first = table.pick(None).map(|l| l.target().addr.port());
            assert_eq!(first, Some(1), "weight 0 receives no first attempts");
        }
        let retry = table.pick(Some(SocketAddr::from(([127, 0, 0, 1], 1))));
        assert_eq!(retry.map(|l| l.target().addr.port()), Some(2));
    }

    #[tokio::test]
    async fn pick_avoids_failed_backend_when_possible() {
        let table = RouteTable::new(
            ProxyMode::Http,
            [(target(1), 1), (target(2), 1)],
            Arc::default(),
        );
        for _ in 0..4 {
            let lease = table.pick(Some(SocketAddr::from(([127, 0, 0, 1], 1))));
            assert_eq!(lease.unwrap().target().addr.port(), 2);
        }
        let single = RouteTable::new(ProxyMode::Http, [(target(1), 1)], Arc::default());
        let lease = single.pick(Some(SocketAddr::from(([127, 0, 0, 1], 1))));
        assert_eq!(lease.unwrap().target().addr.port(), 1);
    }

    #[tokio::test]
    async fn lease_counts_in_flight_until_dropped() {
        let t = target(1);
        let table = RouteTable::new(ProxyMode::Tcp, [(Arc::clone(&t), 1)], Arc::default());
        assert!(
            RouteTable::new(ProxyMode::Tcp, [], Arc::default())
                .pick(None)
                .is_none()
        );
        let a = table.pick(None).unwrap();
        let b = table.pick(None).unwrap();
        assert_eq!(t.in_flight.load(Ordering::SeqCst), 2);
        drop(a);
        drop(b);
        assert_eq!(t.in_flight.load(Ordering::SeqCst), 0);
    }
}
