//! Prometheus metrics: `GET /metrics` on the daemon's API socket, and on
//! `metrics_listen` (plain TCP) when agent.toml sets it.
//!
//! The text exposition format (version 0.0.4) is written by hand: it is a
//! few lines of `name{label="value"} number`, and a client crate would bring
//! a registry, global state and a dependency for what [`Text`] does in
//! forty lines.
//!
//! Where each figure comes from, and why:
//! - operations by outcome and their durations: the state store, so that a
//!   restart or an upgrade of the agent does not reset the counters (the
//!   store holds every operation; refusals are read from the append-only
//!   audit log, incrementally);
//! - probe results: counters in this process ([`crate::health::PROBES`]), since the daemon
//!   started (operations that the CLI runs in its own process, when no daemon
//!   answers, are not counted here);
//! - proxy responses by release and status class: the proxy's own counters
//!   (`ProxyClient::status`), which count since its route was created;
//! - webhook notifications sent and failed: counters in this process
//!   ([`crate::notify::NOTIFICATIONS`]), like the probes;
//! - the reconciliation loop and operations in progress: the daemon's
//!   [`StatusBoard`];
//! - the HTTPS API's connections, open and refused or closed at a limit:
//!   counters in this process ([`HTTPS`], counted by `api::tls`).

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::engine::Engine;
use crate::service::StatusBoard;

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The version and commit this binary was built from (agent/build.rs).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("DEPLOY_GIT_COMMIT");

/// Upper bounds (ms) of the operation duration histogram: from a warm
/// rollback (well under a second) to a slow rollout with long health gates.
const DURATION_BOUNDS_MS: [u64; 12] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000, 1_800_000,
];

/// How long a scrape waits for the proxy's counters before reporting it down.
const PROXY_TIMEOUT: Duration = Duration::from_secs(2);

/// (project, kind, outcome) → count.
type Counts = BTreeMap<(String, String, String), u64>;

/// What a scrape reads.
pub struct Metrics {
    engine: Arc<Engine>,
    board: Arc<StatusBoard>,
    /// Refusals counted so far: audit records up to `.0` are in `.1`.
    refusals: Mutex<(i64, Counts)>,
}

/// `GET /metrics`, for the API router and the plain TCP listener.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        metrics.render().await,
    )
}

impl Metrics {
    pub fn new(engine: Arc<Engine>, board: Arc<StatusBoard>) -> Metrics {
        Metrics {
            engine,
            board,
            refusals: Mutex::new((0, BTreeMap::new())),
        }
    }

    /// The whole exposition.
    pub async fn render(&self) -> String {
        let mut t = Text::default();
        t.family(
            "deploy_agent_build_info",
            "gauge",
            "The version and git commit of this deploy-agent (always 1).",
        );
        t.sample(
            "deploy_agent_build_info",
            &[("version", VERSION), ("commit", COMMIT)],
            1,
        );
        t.family(
            "deploy_agent_up",
            "gauge",
            "1 while the control daemon answers.",
        );
        t.sample("deploy_agent_up", &[], 1);

        let store_ok = self.store_metrics(&mut t);
        t.family(
            "deploy_agent_store_up",
            "gauge",
            "1 when the state store could be read for this scrape.",
        );
        t.sample("deploy_agent_store_up", &[], u8::from(store_ok));

        self.loop_metrics(&mut t);
        probe_metrics(&mut t);
        notification_metrics(&mut t);
        https_metrics(&mut t);
        self.proxy_metrics(&mut t).await;
        t.out
    }

    /// Operations by outcome, their durations, and what serves. `false` if
    /// the store could not be read (the error is logged and left out).
    fn store_metrics(&self, t: &mut Text) -> bool {
        let store = &self.engine.store;
        let counts = match store.operation_counts() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics: {e}");
                return false;
            }
        };
        let mut totals = Counts::new();
        for c in counts {
            *totals.entry((c.project, c.kind, c.outcome)).or_default() += c.count;
        }
        match self.refusals() {
            Ok(refused) => {
                for (k, n) in refused {
                    *totals.entry(k).or_default() += n;
                }
            }
            Err(e) => {
                tracing::warn!("metrics: {e}");
                return false;
            }
        }
        t.family(
            "deploy_agent_operations_total",
            "counter",
            "Deploys and rollbacks by project and outcome (succeeded, health_gate_failed, interrupted, config_error, registry_error, locked, environment_error), including refused requests.",
        );
        for ((project, kind, outcome), n) in &totals {
            t.sample(
                "deploy_agent_operations_total",
                &[("project", project), ("kind", kind), ("outcome", outcome)],
                n,
            );
        }

        let durations = match store.operation_durations(&DURATION_BOUNDS_MS) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("metrics: {e}");
                return false;
            }
        };
        let name = "deploy_agent_operation_duration_seconds";
        t.family(
            name,
            "histogram",
            "How long finished deploys (rollouts) and rollbacks took, by outcome.",
        );
        for d in &durations {
            let labels = [("kind", d.kind.as_str()), ("outcome", d.outcome.as_str())];
            for (bound, n) in DURATION_BOUNDS_MS.iter().zip(&d.cumulative) {
                let le = seconds(*bound);
                t.sample(
                    &format!("{name}_bucket"),
                    &[labels[0], labels[1], ("le", &le)],
                    n,
                );
            }
            t.sample(
                &format!("{name}_bucket"),
                &[labels[0], labels[1], ("le", "+Inf")],
                d.count,
            );
            t.sample(&format!("{name}_sum"), &labels, seconds(d.sum_ms));
            t.sample(&format!("{name}_count"), &labels, d.count);
        }

        let projects = match store.projects() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("metrics: {e}");
                return false;
            }
        };
        t.family(
            "deploy_agent_serving_release",
            "gauge",
            "1 for the release that serves each project.",
        );
        for project in &projects {
            match store.serving(project) {
                Ok(Some(s)) => {
                    if let Some(current) = &s.current {
                        t.sample(
                            "deploy_agent_serving_release",
                            &[("project", project), ("release", current)],
                            1,
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("metrics: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Refusals so far: the audit records added since the last scrape are
    /// counted and added to the running totals.
    fn refusals(
        &self,
    ) -> Result<BTreeMap<(String, String, String), u64>, crate::store::StoreError> {
        let mut cache = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let new = self.engine.store.refusals_since(cache.0)?;
        for c in new.counts {
            *cache.1.entry((c.project, c.kind, c.outcome)).or_default() += c.count;
        }
        cache.0 = new.through_seq;
        Ok(cache.1.clone())
    }

    fn loop_metrics(&self, t: &mut Text) {
        let s = self.board.snapshot();
        t.family(
            "deploy_agent_operations_in_progress",
            "gauge",
            "Deploys and rollbacks the daemon is running now.",
        );
        t.sample(
            "deploy_agent_operations_in_progress",
            &[],
            s.operations_in_progress,
        );
        t.family(
            "deploy_agent_reconcile_passes_total",
            "counter",
            "Reconciliation passes since the daemon started.",
        );
        t.sample("deploy_agent_reconcile_passes_total", &[], s.passes);
        t.family(
            "deploy_agent_reconcile_failed_passes_total",
            "counter",
            "Reconciliation passes that ended in an error since the daemon started.",
        );
        t.sample(
            "deploy_agent_reconcile_failed_passes_total",
            &[],
            s.failed_passes,
        );
        t.family(
            "deploy_agent_reconcile_pass_running_seconds",
            "gauge",
            "How long the reconciliation pass in progress has run (0 when idle).",
        );
        t.sample(
            "deploy_agent_reconcile_pass_running_seconds",
            &[],
            s.pass_running_secs,
        );
        t.family(
            "deploy_agent_reconcile_stuck",
            "gauge",
            "1 when the pass in progress ran past reconcile_timeout_secs (watchdog pings stopped).",
        );
        t.sample("deploy_agent_reconcile_stuck", &[], u8::from(s.stuck));
        if let (Some(end), Some(took)) = (s.last_pass_end, s.last_pass_secs) {
            t.family(
                "deploy_agent_reconcile_last_pass_timestamp_seconds",
                "gauge",
                "UNIX time when the last reconciliation pass ended.",
            );
            t.sample(
                "deploy_agent_reconcile_last_pass_timestamp_seconds",
                &[],
                end,
            );
            t.family(
                "deploy_agent_reconcile_last_pass_duration_seconds",
                "gauge",
                "How long the last reconciliation pass took.",
            );
            t.sample(
                "deploy_agent_reconcile_last_pass_duration_seconds",
                &[],
                took,
            );
        }
    }

    async fn proxy_metrics(&self, t: &mut Text) {
        let status = tokio::time::timeout(PROXY_TIMEOUT, self.engine.proxy.status()).await;
        let status = match status {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!("metrics: proxy status: {e}");
                None
            }
            Err(_) => {
                tracing::debug!("metrics: the proxy did not answer within {PROXY_TIMEOUT:?}");
                None
            }
        };
        t.family(
            "deploy_agent_proxy_up",
            "gauge",
            "1 when the proxy (deploy-proxy) answered this scrape.",
        );
        t.sample("deploy_agent_proxy_up", &[], u8::from(status.is_some()));
        let Some(status) = status else {
            return;
        };
        let responses = "deploy_agent_proxy_responses_total";
        t.family(
            responses,
            "counter",
            "Responses the proxy returned, by route, release and status class (since the route was created).",
        );
        // (project, service, listen) of each route, with its figures.
        let mut failed: Vec<([String; 3], String, u64)> = Vec::new();
        let mut in_flight: Vec<([String; 3], u64)> = Vec::new();
        for r in &status.routes {
            let route = [
                r.route.project.clone(),
                r.route.service.clone(),
                r.route.bind.to_string(),
            ];
            for (release, c) in &r.releases {
                for (class, n) in [
                    ("1xx", c.s1xx),
                    ("2xx", c.s2xx),
                    ("3xx", c.s3xx),
                    ("4xx", c.s4xx),
                    ("5xx", c.s5xx),
                ] {
                    t.sample(
                        responses,
                        &[
                            ("project", &route[0]),
                            ("service", &route[1]),
                            ("listen", &route[2]),
                            ("release", release),
                            ("class", class),
                        ],
                        n,
                    );
                }
                failed.push((route.clone(), release.clone(), c.failed));
            }
            in_flight.push((route, r.in_flight.values().sum::<u64>()));
        }
        let name = "deploy_agent_proxy_failed_requests_total";
        t.family(
            name,
            "counter",
            "Requests the proxy could not forward and answered 502/503 itself (also counted as 5xx).",
        );
        for (route, release, n) in &failed {
            t.sample(
                name,
                &[
                    ("project", &route[0]),
                    ("service", &route[1]),
                    ("listen", &route[2]),
                    ("release", release),
                ],
                n,
            );
        }
        let name = "deploy_agent_proxy_in_flight";
        t.family(
            name,
            "gauge",
            "Requests (HTTP) or connections (TCP) in flight on each route.",
        );
        for (route, n) in &in_flight {
            t.sample(
                name,
                &[
                    ("project", &route[0]),
                    ("service", &route[1]),
                    ("listen", &route[2]),
                ],
                n,
            );
        }
    }
}

fn probe_metrics(t: &mut Text) {
    let name = "deploy_agent_probes_total";
    t.family(
        name,
        "counter",
        "Health probes by probe kind and result, since the daemon started.",
    );
    for (k, kind) in crate::health::PROBE_KINDS.iter().enumerate() {
        for (r, result) in crate::health::PROBE_RESULTS.iter().enumerate() {
            t.sample(
                name,
                &[("probe", kind), ("result", result)],
                crate::health::PROBES.get(k, r),
            );
        }
    }
}

fn notification_metrics(t: &mut Text) {
    let name = "deploy_agent_notifications_total";
    t.family(
        name,
        "counter",
        "Webhook notifications ([notify] in agent.toml) by outcome: sent (the receiver answered 2xx) or failed (every attempt failed, or dropped), since the daemon started.",
    );
    for (outcome, c) in [
        ("sent", &crate::notify::NOTIFICATIONS.sent),
        ("failed", &crate::notify::NOTIFICATIONS.failed),
    ] {
        t.sample(name, &[("outcome", outcome)], c.load(Ordering::Relaxed));
    }
}

/// The HTTPS API's connections, since the daemon started: counted by
/// `api::tls`, here because the API depends on this module (not the other
/// way round).
pub static HTTPS: HttpsCounters = HttpsCounters::new();

/// Why a connection was refused at a limit (`reason` label).
pub const HTTPS_REFUSALS: [&str; 3] = ["max_connections", "max_per_identity", "no_grant"];
/// What a connection timed out waiting for (`phase` label).
pub const HTTPS_TIMEOUTS: [&str; 3] = ["handshake", "first_request", "idle"];

pub struct HttpsCounters {
    /// Connections open now, handshakes included.
    pub open: AtomicU64,
    /// By [`HTTPS_REFUSALS`].
    pub refused: [AtomicU64; 3],
    /// By [`HTTPS_TIMEOUTS`].
    pub timed_out: [AtomicU64; 3],
}

impl HttpsCounters {
    pub const fn new() -> HttpsCounters {
        HttpsCounters {
            open: AtomicU64::new(0),
            refused: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            timed_out: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
}

impl Default for HttpsCounters {
    fn default() -> Self {
        HttpsCounters::new()
    }
}

fn https_metrics(t: &mut Text) {
    t.family(
        "deploy_agent_https_connections",
        "gauge",
        "Connections to the HTTPS API open now, TLS handshakes included.",
    );
    t.sample(
        "deploy_agent_https_connections",
        &[],
        HTTPS.open.load(Ordering::Relaxed),
    );
    let name = "deploy_agent_https_connections_refused_total";
    t.family(
        name,
        "counter",
        "HTTPS API connections refused at a limit, since the daemon started: max_connections (closed on accept), max_per_identity (answered 503), no_grant (a certificate with no role here: answered 403 once).",
    );
    for (reason, c) in HTTPS_REFUSALS.iter().zip(&HTTPS.refused) {
        t.sample(name, &[("reason", reason)], c.load(Ordering::Relaxed));
    }
    let name = "deploy_agent_https_connections_timed_out_total";
    t.family(
        name,
        "counter",
        "HTTPS API connections closed by a timeout, since the daemon started: in the TLS handshake, waiting for a first request (or HTTP/1.1 headers), or idle (no request in flight).",
    );
    for (phase, c) in HTTPS_TIMEOUTS.iter().zip(&HTTPS.timed_out) {
        t.sample(name, &[("phase", phase)], c.load(Ordering::Relaxed));
    }
}

/// Milliseconds as seconds, without float noise for whole values.
fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{}", ms as f64 / 1000.0)
    }
}

/// The text exposition format.
#[derive(Default)]
struct Text {
    out: String,
}

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text escapes backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{ProbeCounters, ProbeResult};
    use crate::spec::Probe;

    #[test]
    fn text_format_escapes_labels() {
        let mut t = Text::default();
        t.family("x_total", "counter", "Some \\ help\nline.");
        t.sample("x_total", &[("a", "q\"uo\\te\nd"), ("b", "plain")], 3);
        t.sample("y", &[], 0.5);
        assert_eq!(
            t.out,
            "# HELP x_total Some \\\\ help\\nline.\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"uo\\\\te\\nd\",b=\"plain\"} 3\ny 0.5\n"
        );
    }

    #[test]
    fn seconds_are_exact() {
        assert_eq!(seconds(250), "0.25");
        assert_eq!(seconds(1_000), "1");
        assert_eq!(seconds(1_800_000), "1800");
        assert_eq!(seconds(1_234), "1.234");
    }

    #[test]
    fn probes_are_counted_by_kind_and_result() {
        let c = ProbeCounters::new();
        c.record(&Probe::Tcp { port: 80 }, &ProbeResult::Success);
        c.record(&Probe::Tcp { port: 80 }, &ProbeResult::Success);
        c.record(&Probe::Docker, &ProbeResult::ContainerDown("gone".into()));
        assert_eq!(c.get(1, 0), 2);
        assert_eq!(c.get(3, 2), 1);
        assert_eq!(c.get(0, 0), 0);
    }
}
