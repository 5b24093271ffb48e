//! Continuous HTTP load against `127.0.0.1:PORT`, recording every response.
//!
//! Two kinds of client share the load: a pooled keep-alive client (hyper-util's
//! legacy client) and one new TCP connection per request (`Connection:
//! close`). Each worker sends at a fixed rate (ticks missed while a response
//! is slow are sent right after, so the average holds), never more than one
//! request at a time. The loop stops when asked or, at the latest, after
//! `max_duration`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::http::{HttpResponse, body_text, error_chain, get_new_connection};

/// Requests sent within this time after a switch of the served release may
/// still be answered by the release before it: the client stamps a request
/// when it sends it, and two requests on different connections can reach the
/// proxy in the other order. Anything later is a flap.
pub const SWITCH_TOLERANCE: Duration = Duration::from_millis(250);

/// The load the issue asks for: at least this many requests per second.
pub const MIN_RATE: f64 = 200.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    NewConnection,
}

/// One request and what came back.
#[derive(Debug, Clone)]
pub struct Record {
    pub mode: Mode,
    pub sent: Instant,
    pub done: Instant,
    /// `None` when no response came (transport error or timeout).
    pub status: Option<u16>,
    /// The body, trimmed.
    pub body: String,
    pub error: Option<String>,
}

impl Record {
    /// A 2xx response.
    pub fn ok(&self) -> bool {
        self.error.is_none() && matches!(self.status, Some(200..=299))
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Target: `http://127.0.0.1:{port}{path}`.
    pub port: u16,
    pub path: String,
    /// Requests per second, all workers together.
    pub rate: f64,
    pub keepalive_workers: usize,
    pub new_connection_workers: usize,
    /// The loop stops by itself after this long.
    pub max_duration: Duration,
    pub request_timeout: Duration,
}

impl LoadConfig {
    /// 300 requests/s to `/`, half keep-alive, half a new connection each.
    /// 20 workers: each sends every 67 ms, so the rate holds as long as
    /// responses take less than that on average (2 shared cores, debug
    /// builds).
    pub fn new(port: u16) -> LoadConfig {
        LoadConfig {
            port,
            path: "/".to_string(),
            rate: 300.0,
            keepalive_workers: 10,
            new_connection_workers: 10,
            max_duration: Duration::from_secs(120),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// A request to `path` every `every`, each on its own connection, each
    /// allowed `request_timeout` (for requests that take seconds, like
    /// `/cgi-bin/slow`).
    pub fn slow_requests(port: u16, path: &str, every: Duration) -> LoadConfig {
        LoadConfig {
            port,
            path: path.to_string(),
            rate: 1.0 / every.as_secs_f64(),
            keepalive_workers: 0,
            new_connection_workers: 12,
            max_duration: Duration::from_secs(120),
            request_timeout: Duration::from_secs(15),
        }
    }
}

/// A running load loop; [`LoadLoop::stop`] ends it and returns the report.
pub struct LoadLoop {
    stop: Arc<AtomicBool>,
    responses: Arc<AtomicU64>,
    thread: Option<JoinHandle<Vec<Record>>>,
    started: Instant,
    deadline: Instant,
    config: LoadConfig,
}

impl LoadLoop {
    /// [`LoadConfig::new`]: 300 requests/s to `http://127.0.0.1:{port}/`.
    pub fn start(port: u16) -> LoadLoop {
        LoadLoop::with_config(LoadConfig::new(port))
    }

    pub fn with_config(config: LoadConfig) -> LoadLoop {
        assert!(config.rate > 0.0, "load rate must be positive");
        let workers = config.keepalive_workers + config.new_connection_workers;
        assert!(workers > 0, "a load loop needs at least one worker");
        let stop = Arc::new(AtomicBool::new(false));
        let responses = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + config.max_duration;
        let thread = {
            let (stop, responses, config) = (stop.clone(), responses.clone(), config.clone());
            std::thread::Builder::new()
                .name(format!("load-{}", config.port))
                .spawn(move || run(config, stop, responses, deadline))
                .expect("spawn the load loop thread")
        };
        LoadLoop {
            stop,
            responses,
            thread: Some(thread),
            started,
            deadline,
            config,
        }
    }

    /// Responses received so far (any status).
    pub fn responses(&self) -> u64 {
        self.responses.load(Ordering::Relaxed)
    }

    /// Waits until `n` responses came back; panics after `timeout`.
    pub fn wait_for_responses(&self, n: u64, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.responses() < n {
            assert!(
                Instant::now() < end,
                "load loop on 127.0.0.1:{}{}: only {} responses after {timeout:?} (wanted {n})",
                self.config.port,
                self.config.path,
                self.responses()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops sending, waits for the requests in flight, and reports.
    pub fn stop(mut self) -> LoadReport {
        let stopped = Instant::now().min(self.deadline);
        self.stop.store(true, Ordering::Relaxed);
        let mut records = match self.thread.take().expect("stopped twice").join() {
            Ok(r) => r,
            Err(_) => panic!("the load loop thread panicked"),
        };
        records.sort_by_key(|r| r.sent);
        LoadReport {
            records,
            started: self.started,
            stopped,
            hit_time_limit: Instant::now() >= self.deadline,
            config: self.config.clone(),
        }
    }
}

impl Drop for LoadLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    config: LoadConfig,
    stop: Arc<AtomicBool>,
    responses: Arc<AtomicU64>,
    deadline: Instant,
) -> Vec<Record> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime for the load loop");
    rt.block_on(async move {
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build_http();
        let workers = config.keepalive_workers + config.new_connection_workers;
        let period = Duration::from_secs_f64(workers as f64 / config.rate);
        let uri: hyper::Uri = format!("http://127.0.0.1:{}{}", config.port, config.path)
            .parse()
            .expect("load loop URI");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..workers {
            let mode = if i < config.keepalive_workers {
                Mode::KeepAlive
            } else {
                Mode::NewConnection
            };
            let w = Worker {
                mode,
                client: client.clone(),
                uri: uri.clone(),
                port: config.port,
                path: config.path.clone(),
                period,
                stagger: period.mul_f64(i as f64 / workers as f64),
                stop: stop.clone(),
                responses: responses.clone(),
                deadline: tokio::time::Instant::from_std(deadline),
                timeout: config.request_timeout,
            };
            tasks.spawn(w.run());
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r.expect("load worker panicked"));
        }
        all
    })
}

struct Worker {
    mode: Mode,
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: hyper::Uri,
    port: u16,
    path: String,
    period: Duration,
    stagger: Duration,
    stop: Arc<AtomicBool>,
    responses: Arc<AtomicU64>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Worker {
    async fn run(self) -> Vec<Record> {
        let mut records = Vec::new();
        tokio::time::sleep(self.stagger).await;
        let mut ticker = tokio::time::interval(self.period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            ticker.tick().await;
            if self.stop.load(Ordering::Relaxed) || tokio::time::Instant::now() >= self.deadline {
                break;
            }
            let sent = Instant::now();
            let result = match tokio::time::timeout(self.timeout, self.one()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no response within {:?}", self.timeout)),
            };
            let done = Instant::now();
            self.responses.fetch_add(1, Ordering::Relaxed);
            records.push(match result {
                Ok(r) => Record {
                    mode: self.mode,
                    sent,
                    done,
                    status: Some(r.status),
                    body: r.body,
                    error: None,
                },
                Err(e) => Record {
                    mode: self.mode,
                    sent,
                    done,
                    status: None,
                    body: String::new(),
                    error: Some(e),
                },
            });
        }
        records
    }

    async fn one(&self) -> Result<HttpResponse, String> {
        match self.mode {
            Mode::NewConnection => get_new_connection(self.port, &self.path, None).await,
            Mode::KeepAlive => {
                let req = Request::get(self.uri.clone())
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| e.to_string())?;
                let resp = self
                    .client
                    .request(req)
                    .await
                    .map_err(|e| format!("GET {}: {}", self.uri, error_chain(&e)))?;
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("GET {}: reading body: {}", self.uri, error_chain(&e)))?
                    .to_bytes();
                Ok(HttpResponse {
                    status,
                    body: body_text(&body),
                })
            }
        }
    }
}

/// What a load loop saw.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Every request, ordered by the time it was sent.
    pub records: Vec<Record>,
    pub started: Instant,
    /// When the loop was told to stop (or hit its time limit).
    pub stopped: Instant,
    /// The loop ran into `max_duration` before it was stopped.
    pub hit_time_limit: bool,
    pub config: LoadConfig,
}

impl LoadReport {
    pub fn total(&self) -> usize {
        self.records.len()
    }

    /// Transport errors, timeouts and non-2xx responses.
    pub fn failures(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| !r.ok()).collect()
    }

    pub fn count(&self, mode: Mode) -> usize {
        self.records.iter().filter(|r| r.mode == mode).count()
    }

    /// Requests per second over the loop's run.
    pub fn rate(&self) -> f64 {
        let secs = self.stopped.duration_since(self.started).as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.total() as f64 / secs
        }
    }

    /// The bodies of the 2xx responses in the order their requests were
    /// sent, consecutive repeats collapsed: e.g. `["v1", "v2"]`.
    pub fn bodies_in_order(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.records.iter().filter(|r| r.ok()) {
            if out.last() != Some(&r.body) {
                out.push(r.body.clone());
            }
        }
        out
    }

    /// The 2xx responses must show exactly the releases in `expected`, in
    /// that order, each switch happening once (requests sent within
    /// [`SWITCH_TOLERANCE`] after a switch may still see the release before
    /// it). Returns the switch instants: the send time of the first request
    /// answered by each release after the first.
    pub fn check_sequence(&self, expected: &[&str]) -> Result<Vec<Instant>, String> {
        let Some((&first_expected, _)) = expected.split_first() else {
            return Err("check_sequence: empty expected sequence".into());
        };
        let oks: Vec<&Record> = self.records.iter().filter(|r| r.ok()).collect();
        let Some(first) = oks.first() else {
            return Err(format!("no 2xx response at all. {}", self.summary()));
        };
        if first.body != first_expected {
            return Err(format!(
                "the first response served {:?}, expected {first_expected:?}. {}",
                first.body,
                self.summary()
            ));
        }
        let mut phase = 0usize;
        let mut switches: Vec<Instant> = Vec::new();
        for r in &oks {
            let b = r.body.as_str();
            if b == expected[phase] {
                continue;
            }
            if phase > 0
                && b == expected[phase - 1]
                && r.sent < switches[phase - 1] + SWITCH_TOLERANCE
            {
                continue;
            }
            if phase + 1 < expected.len() && b == expected[phase + 1] {
                phase += 1;
                switches.push(r.sent);
                continue;
            }
            return Err(format!(
                "{b:?} was served to a request sent at {} while {:?} was serving{}; expected the \
                 served release to go {expected:?} exactly. {}",
                self.at(r.sent),
                expected[phase],
                match switches.last() {
                    Some(s) => format!(" (since {})", self.at(*s)),
                    None => String::new(),
                },
                self.summary()
            ));
        }
        if phase + 1 != expected.len() {
            return Err(format!(
                "the served release never became {:?} (expected {expected:?}). {}",
                expected[phase + 1],
                self.summary()
            ));
        }
        Ok(switches)
    }

    /// Zero failed requests, at least [`MIN_RATE`] requests/s, and the served
    /// release went through `expected` exactly. Returns the switch instants.
    pub fn assert_clean(&self, expected: &[&str]) -> Vec<Instant> {
        self.assert_zero_failures();
        self.assert_min_rate();
        match self.check_sequence(expected) {
            Ok(s) => s,
            Err(e) => panic!("load loop: {e}"),
        }
    }

    pub fn assert_zero_failures(&self) {
        assert!(
            !self.hit_time_limit,
            "the load loop ran into its time limit of {:?} before it was stopped. {}",
            self.config.max_duration,
            self.summary()
        );
        assert!(self.total() > 0, "the load loop sent no request");
        assert!(
            self.failures().is_empty(),
            "{} of {} requests failed. {}",
            self.failures().len(),
            self.total(),
            self.summary()
        );
    }

    pub fn assert_min_rate(&self) {
        assert!(
            self.rate() >= MIN_RATE,
            "the load loop reached only {:.0} requests/s (at least {MIN_RATE} wanted). {}",
            self.rate(),
            self.summary()
        );
    }

    /// Requests in flight at `t` (sent before, answered after).
    pub fn in_flight_at(&self, t: Instant) -> Vec<&Record> {
        self.records
            .iter()
            .filter(|r| r.sent < t && r.done > t)
            .collect()
    }

    /// `t` relative to the start of the loop, e.g. `+1.234s`.
    pub fn at(&self, t: Instant) -> String {
        if t >= self.started {
            format!("+{:.3}s", t.duration_since(self.started).as_secs_f64())
        } else {
            format!("-{:.3}s", self.started.duration_since(t).as_secs_f64())
        }
    }

    /// Response time percentiles over all requests: (p50, p99, max).
    pub fn latency(&self) -> (Duration, Duration, Duration) {
        let mut l: Vec<Duration> = self
            .records
            .iter()
            .map(|r| r.done.duration_since(r.sent))
            .collect();
        if l.is_empty() {
            return Default::default();
        }
        l.sort();
        let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99), l[l.len() - 1])
    }

    /// One paragraph for messages: counts, rate, served releases, the first
    /// failures.
    pub fn summary(&self) -> String {
        let failures = self.failures();
        let (p50, p99, max) = self.latency();
        let mut s = format!(
            "Load on 127.0.0.1:{}{}: {} requests in {:.1}s ({:.0}/s; {} keep-alive, {} new-connection; \
             latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms), {} failed; served in order: {}",
            self.config.port,
            self.config.path,
            self.total(),
            self.stopped.duration_since(self.started).as_secs_f64(),
            self.rate(),
            self.count(Mode::KeepAlive),
            self.count(Mode::NewConnection),
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            failures.len(),
            self.bodies_in_order().join(" -> ")
        );
        for r in failures.iter().take(10) {
            let _ = write!(
                s,
                "\n  failed: sent {} ({:?}, {} ms): {}",
                self.at(r.sent),
                r.mode,
                r.done.duration_since(r.sent).as_millis(),
                match (&r.error, r.status) {
                    (Some(e), _) => e.clone(),
                    (None, Some(st)) => format!("HTTP {st} {:?}", r.body),
                    (None, None) => "no response".into(),
                }
            );
        }
        if failures.len() > 10 {
            let _ = write!(s, "\n  … and {} more", failures.len() - 10);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(bodies: &[(u64, &str)]) -> LoadReport {
        let t0 = Instant::now();
        let records = bodies
            .iter()
            .map(|&(ms, b)| Record {
                mode: Mode::KeepAlive,
                sent: t0 + Duration::from_millis(ms),
                done: t0 + Duration::from_millis(ms + 2),
                status: Some(if b == "500" { 500 } else { 200 }),
                body: b.to_string(),
                error: None,
            })
            .collect();
        LoadReport {
            records,
            started: t0,
            stopped: t0 + Duration::from_secs(1),
            hit_time_limit: false,
            config: LoadConfig::new(1),
        }
    }

    #[test]
    fn a_clean_switch_is_one_change() {
        let r = report(&[(0, "v1"), (10, "v1"), (20, "v2"), (30, "v2")]);
        let s = r.check_sequence(&["v1", "v2"]).expect("clean switch");
        assert_eq!(s, vec![r.started + Duration::from_millis(20)]);
        assert_eq!(r.bodies_in_order(), vec!["v1", "v2"]);
    }

    #[test]
    fn reordering_right_at_the_switch_is_tolerated() {
        let r = report(&[(0, "v1"), (20, "v2"), (25, "v1"), (30, "v2")]);
        r.check_sequence(&["v1", "v2"]).expect("within tolerance");
    }

    #[test]
    fn the_old_release_answering_later_is_a_flap() {
        let r = report(&[(0, "v1"), (20, "v2"), (600, "v1"), (700, "v2")]);
        let e = r.check_sequence(&["v1", "v2"]).unwrap_err();
        assert!(e.contains("\"v1\" was served"), "{e}");
    }

    #[test]
    fn a_missing_switch_is_reported() {
        let r = report(&[(0, "v1"), (20, "v1")]);
        let e = r.check_sequence(&["v1", "v2"]).unwrap_err();
        assert!(e.contains("never became \"v2\""), "{e}");
    }

    #[test]
    fn the_first_release_must_be_the_expected_one() {
        let r = report(&[(0, "v2"), (20, "v2")]);
        assert!(r.check_sequence(&["v1", "v2"]).is_err());
    }

    #[test]
    fn back_and_forth_sequences_are_followed() {
        let r = report(&[(0, "v2"), (400, "v1"), (410, "v2"), (900, "v2")]);
        // v2 at 410 ms is within the tolerance of the switch to v1: jitter,
        // not yet the switch back, which comes at 900 ms.
        let s = r
            .check_sequence(&["v2", "v1", "v2"])
            .expect("jitter then switch");
        assert_eq!(s[1], r.started + Duration::from_millis(900));
        let r = report(&[(0, "v2"), (400, "v1"), (800, "v2"), (900, "v2")]);
        let s = r.check_sequence(&["v2", "v1", "v2"]).expect("v2 v1 v2");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn errors_count_as_failures_not_releases() {
        let r = report(&[(0, "v1"), (10, "500"), (20, "v1")]);
        assert_eq!(r.failures().len(), 1);
        r.check_sequence(&["v1"]).expect("500 is not a release");
        assert!(r.summary().contains("HTTP 500"), "{}", r.summary());
    }
}
