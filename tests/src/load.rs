//! Continuous HTTP load against `127.0.0.1:PORT`, recording every response.
//!
//! Two kinds of client share the load: a pooled keep-alive client (hyper-util's
//! legacy client) and one new TCP connection per request (`Connection:
//! close`). Each worker sends at a fixed rate (ticks missed while a response
//! is slow are sent right after, so the average holds), never more than one
//! request at a time. The loop stops when asked or, at the latest, after
//! `max_duration`.
//!
//! What a report must show is independent of how fast the machine is: no
//! failed request, the served release going through the expected sequence
//! (requests in flight at a switch may be answered by either side of it, see
//! [`LoadReport::check_sequence`]), at least [`MIN_REQUESTS`] answered, and
//! both kinds of client crossing every switch. How many requests per second a
//! machine manages is a benchmark's business (scripts/bench.sh), not a test's.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, HttpInfo};
use hyper_util::rt::TokioExecutor;

use crate::http::{HttpResponse, body_text, error_chain, get_new_connection};

/// A load report says something only over at least this many answered
/// requests (the tests wait for 100 or more before they act).
pub const MIN_REQUESTS: usize = 100;

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
    /// Keep-alive requests: the local port of the connection that carried
    /// it, which tells the pool's connections apart. `None` otherwise.
    pub connection: Option<u16>,
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
                Ok((r, connection)) => Record {
                    mode: self.mode,
                    sent,
                    done,
                    status: Some(r.status),
                    body: r.body,
                    error: None,
                    connection,
                },
                Err(e) => Record {
                    mode: self.mode,
                    sent,
                    done,
                    status: None,
                    body: String::new(),
                    error: Some(e),
                    connection: None,
                },
            });
        }
        records
    }

    /// The response, and for keep-alive requests the connection's local port.
    async fn one(&self) -> Result<(HttpResponse, Option<u16>), String> {
        match self.mode {
            Mode::NewConnection => {
                Ok((get_new_connection(self.port, &self.path, None).await?, None))
            }
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
                let connection = resp
                    .extensions()
                    .get::<HttpInfo>()
                    .map(|info| info.local_addr().port());
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("GET {}: reading body: {}", self.uri, error_chain(&e)))?
                    .to_bytes();
                Ok((
                    HttpResponse {
                        status,
                        body: body_text(&body),
                    },
                    connection,
                ))
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

/// What [`LoadReport::sequence`] found.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// When each release after the first began serving: the send time of
    /// the first request it answered.
    pub switches: Vec<Instant>,
    /// Requests sent after a switch (by that measure) but answered by the
    /// release before it: they were in flight at the switch.
    pub reordered: Vec<Reordered>,
}

/// A request answered by the release before a switch though sent after the
/// first request the next release answered.
#[derive(Debug, Clone)]
pub struct Reordered {
    pub release: String,
    pub sent: Instant,
    /// How long after that first request it was sent.
    pub after_switch: Duration,
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
    /// that order, each switch happening once. Returns the switch instants:
    /// the send time of the first request answered by each release after the
    /// first.
    ///
    /// See [`LoadReport::sequence`] for what counts as a switch happening
    /// once.
    pub fn check_sequence(&self, expected: &[&str]) -> Result<Vec<Instant>, String> {
        self.sequence(expected).map(|s| s.switches)
    }

    /// [`LoadReport::check_sequence`], with the requests that crossed a switch
    /// out of send order.
    ///
    /// The proxy picks a request's backend at some instant between the
    /// request's `sent` and its `done`; it switches a route atomically. So
    /// requests in flight at a switch may be answered by either release, in
    /// any order: one sent earlier by the new release, one sent later by the
    /// old, however long they take (a loaded machine stretches that window to
    /// hundreds of milliseconds). What a proxy that switched once can never
    /// do is answer a request with the old release when a response of the
    /// new release had already *completed* before that request was sent:
    /// that is a switch back, a flap, and nothing tolerates it, not even a
    /// retry that the proxy sent to the previous release as its standby.
    pub fn sequence(&self, expected: &[&str]) -> Result<Sequence, String> {
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
        // settled[p - 1]: of the responses of phase p or later so far, the
        // one that completed first; the switch to phase p had happened by
        // then.
        let mut settled: Vec<&Record> = Vec::new();
        let mut reordered: Vec<Reordered> = Vec::new();
        for r in &oks {
            let b = r.body.as_str();
            let k = if b == expected[phase] {
                phase
            } else if let Some(j) = (0..phase)
                .rev()
                .find(|&j| expected[j] == b)
                .filter(|&j| r.sent < settled[j].done)
            {
                // In flight at the switch to phase j + 1 (the latest earlier
                // phase it can belong to: the most lenient).
                reordered.push(Reordered {
                    release: b.to_string(),
                    sent: r.sent,
                    after_switch: r.sent.saturating_duration_since(switches[j]),
                });
                j
            } else if expected.get(phase + 1) == Some(&b) {
                phase += 1;
                switches.push(r.sent);
                settled.push(r);
                phase
            } else {
                let proof = match (0..phase).rev().find(|&j| expected[j] == b) {
                    Some(j) => format!(
                        "; a response of {:?} to a request sent at {} had completed at {} \
                         already, before this request was sent: the route switched back",
                        settled[j].body,
                        self.at(settled[j].sent),
                        self.at(settled[j].done),
                    ),
                    None => String::new(),
                };
                return Err(format!(
                    "{b:?} was served to a request sent at {} while {:?} was serving{}{proof}; \
                     expected the served release to go {expected:?} exactly. {}\n{}",
                    self.at(r.sent),
                    expected[phase],
                    match switches.last() {
                        Some(s) => format!(" (since {})", self.at(*s)),
                        None => String::new(),
                    },
                    self.summary(),
                    self.around(r.sent),
                ));
            };
            // Its completion bounds the switches up to its phase.
            for s in settled.iter_mut().take(k) {
                if r.done < s.done {
                    *s = r;
                }
            }
        }
        if phase + 1 != expected.len() {
            return Err(format!(
                "the served release never became {:?} (expected {expected:?}). {}",
                expected[phase + 1],
                self.summary()
            ));
        }
        Ok(Sequence {
            switches,
            reordered,
        })
    }

    /// Both kinds of client crossed each switch of `sequence`: a keep-alive
    /// connection was answered by the release before the switch and then by
    /// the release after it (it was in use across the switch and followed
    /// it), and new connections were answered on both sides of it. Zero
    /// failed requests says something about a switch only if traffic went
    /// through it; unlike a rate, this does not depend on the machine's
    /// speed.
    pub fn check_switches_crossed(
        &self,
        expected: &[&str],
        sequence: &Sequence,
    ) -> Result<(), String> {
        let switches = &sequence.switches;
        for (i, &at) in switches.iter().enumerate() {
            let (before, after) = (expected[i], expected[i + 1]);
            let from = i.checked_sub(1).map(|p| switches[p]);
            let until = switches.get(i + 1).copied();
            let answered_before = |r: &&Record| {
                r.ok() && r.body == before && r.sent < at && from.is_none_or(|f| r.sent >= f)
            };
            let answered_after = |r: &&Record| {
                r.ok() && r.body == after && r.sent >= at && until.is_none_or(|u| r.sent < u)
            };
            let of = |mode: Mode| self.records.iter().filter(move |r| r.mode == mode);
            let mut missing = Vec::new();
            if self.config.keepalive_workers > 0 {
                let used_before: HashSet<u16> = of(Mode::KeepAlive)
                    .filter(answered_before)
                    .filter_map(|r| r.connection)
                    .collect();
                if !of(Mode::KeepAlive)
                    .filter(answered_after)
                    .filter_map(|r| r.connection)
                    .any(|c| used_before.contains(&c))
                {
                    missing.push(format!(
                        "no keep-alive connection was answered by {before:?} and then by {after:?}"
                    ));
                }
            }
            if self.config.new_connection_workers > 0
                && !(of(Mode::NewConnection).any(|r| answered_before(&r))
                    && of(Mode::NewConnection).any(|r| answered_after(&r)))
            {
                missing.push(format!(
                    "new connections were not answered by both {before:?} before it and {after:?} after it"
                ));
            }
            if !missing.is_empty() {
                return Err(format!(
                    "the switch from {before:?} to {after:?} at {} was not crossed by the load: {}. {}",
                    self.at(at),
                    missing.join("; "),
                    self.summary()
                ));
            }
        }
        Ok(())
    }

    /// Zero failed requests, at least [`MIN_REQUESTS`] answered, the served
    /// release went through `expected` exactly, and both kinds of client
    /// crossed every switch. Returns the switch instants.
    pub fn assert_clean(&self, expected: &[&str]) -> Vec<Instant> {
        self.assert_zero_failures();
        self.assert_enough_requests();
        let sequence = self
            .sequence(expected)
            .unwrap_or_else(|e| panic!("load loop: {e}"));
        if let Err(e) = self.check_switches_crossed(expected, &sequence) {
            panic!("load loop: {e}");
        }
        if let Some(latest) = sequence.reordered.iter().map(|r| r.after_switch).max() {
            eprintln!(
                "load loop: {} request(s) in flight at a switch were answered by the release \
                 before it, the last sent {:.0} ms after the first request the next one answered",
                sequence.reordered.len(),
                latest.as_secs_f64() * 1000.0
            );
        }
        sequence.switches
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

    /// At least [`MIN_REQUESTS`] answered, by each kind of client the loop
    /// runs.
    pub fn assert_enough_requests(&self) {
        let answered = |mode: Mode| {
            self.records
                .iter()
                .filter(|r| r.mode == mode && r.ok())
                .count()
        };
        let (keepalive, new_connection) =
            (answered(Mode::KeepAlive), answered(Mode::NewConnection));
        assert!(
            keepalive + new_connection >= MIN_REQUESTS
                && (keepalive > 0 || self.config.keepalive_workers == 0)
                && (new_connection > 0 || self.config.new_connection_workers == 0),
            "the load loop had only {keepalive} keep-alive and {new_connection} new-connection \
             requests answered (at least {MIN_REQUESTS} wanted, of each kind it sends). {}",
            self.summary()
        );
    }

    /// The requests sent around `t`, one line each, for messages.
    pub fn around(&self, t: Instant) -> String {
        let i = self.records.partition_point(|r| r.sent < t);
        let mut s = format!("requests sent around {}:", self.at(t));
        for r in &self.records[i.saturating_sub(8)..(i + 8).min(self.records.len())] {
            let _ = write!(
                s,
                "\n  sent {} done {} ({:>4} ms) {:<13} {}: {}",
                self.at(r.sent),
                self.at(r.done),
                r.done.duration_since(r.sent).as_millis(),
                match (r.mode, r.connection) {
                    (Mode::KeepAlive, Some(port)) => format!("keep-alive:{port}"),
                    (Mode::KeepAlive, None) => "keep-alive".to_string(),
                    (Mode::NewConnection, _) => "new".to_string(),
                },
                if r.sent == t { "=>" } else { "  " },
                match (&r.error, r.status) {
                    (Some(e), _) => e.clone(),
                    (None, Some(200..=299)) => r.body.clone(),
                    (None, Some(st)) => format!("HTTP {st} {:?}", r.body),
                    (None, None) => "no response".into(),
                }
            );
        }
        s
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

    /// (sent ms, latency ms, body, connection: a keep-alive port or 0 for a
    /// new connection).
    fn report_of(requests: &[(u64, u64, &str, u16)]) -> LoadReport {
        let t0 = Instant::now();
        let mut records: Vec<Record> = requests
            .iter()
            .map(|&(ms, latency, b, port)| Record {
                mode: if port == 0 {
                    Mode::NewConnection
                } else {
                    Mode::KeepAlive
                },
                sent: t0 + Duration::from_millis(ms),
                done: t0 + Duration::from_millis(ms + latency),
                status: Some(if b == "500" { 500 } else { 200 }),
                body: b.to_string(),
                error: None,
                connection: (port != 0).then_some(port),
            })
            .collect();
        records.sort_by_key(|r| r.sent);
        LoadReport {
            records,
            started: t0,
            stopped: t0 + Duration::from_secs(1),
            hit_time_limit: false,
            config: LoadConfig::new(1),
        }
    }

    /// Keep-alive requests on one connection, answered in 2 ms.
    fn report(bodies: &[(u64, &str)]) -> LoadReport {
        let requests: Vec<_> = bodies.iter().map(|&(ms, b)| (ms, 2, b, 1)).collect();
        report_of(&requests)
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
        // v2 answered the request sent at 20 ms only at 320 ms: the one sent
        // at 25 ms may have reached the proxy before the switch.
        let r = report_of(&[
            (0, 2, "v1", 1),
            (20, 300, "v2", 2),
            (25, 2, "v1", 3),
            (30, 2, "v2", 1),
        ]);
        let seq = r.sequence(&["v1", "v2"]).expect("in flight at the switch");
        assert_eq!(seq.switches, vec![r.started + Duration::from_millis(20)]);
        assert_eq!(seq.reordered.len(), 1);
        assert_eq!(seq.reordered[0].after_switch, Duration::from_millis(5));
    }

    #[test]
    fn a_slow_machine_stretches_the_tolerance_as_far_as_the_responses_take() {
        // Nothing of v2 had completed before 900 ms: a v1 answer to a request
        // sent at 700 ms is no flap, however long after 100 ms that is.
        let r = report_of(&[
            (0, 900, "v1", 0),
            (100, 800, "v2", 1),
            (700, 100, "v1", 2),
            (950, 5, "v2", 1),
        ]);
        let seq = r.sequence(&["v1", "v2"]).expect("in flight at the switch");
        assert_eq!(seq.reordered[0].after_switch, Duration::from_millis(600));
    }

    #[test]
    fn the_old_release_answering_later_is_a_flap() {
        let r = report(&[(0, "v1"), (20, "v2"), (600, "v1"), (700, "v2")]);
        let e = r.check_sequence(&["v1", "v2"]).unwrap_err();
        assert!(e.contains("\"v1\" was served"), "{e}");
        assert!(e.contains("switched back"), "{e}");
        assert!(e.contains("=>"), "the requests around it are listed: {e}");
    }

    #[test]
    fn a_response_of_the_new_release_completed_before_the_request_was_sent_is_proof_of_a_flap() {
        // Only 3 ms after the first v2 request, but that one had its answer at
        // 22 ms: the route had switched before 25 ms, and went back.
        let r = report(&[(0, "v1"), (20, "v2"), (25, "v1"), (30, "v2")]);
        let e = r.check_sequence(&["v1", "v2"]).unwrap_err();
        assert!(e.contains("completed at +0.022s"), "{e}");
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
        // v2 at 410 ms was sent before v1's first answer (450 ms): in flight
        // at the switch to v1, not yet the switch back, which comes at 900 ms.
        let r = report_of(&[
            (0, 2, "v2", 1),
            (400, 50, "v1", 2),
            (410, 2, "v2", 3),
            (900, 2, "v2", 1),
        ]);
        let s = r
            .check_sequence(&["v2", "v1", "v2"])
            .expect("in flight, then switch");
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

    #[test]
    fn each_switch_must_be_crossed_by_a_keep_alive_connection_and_new_connections() {
        let expected = ["v1", "v2"];
        // Connection 7 was answered by v1, then by v2.
        let r = report_of(&[
            (0, 2, "v1", 7),
            (5, 2, "v1", 0),
            (20, 2, "v2", 0),
            (30, 2, "v2", 7),
        ]);
        let seq = r.sequence(&expected).unwrap();
        r.check_switches_crossed(&expected, &seq).expect("crossed");
        // v2 came on a connection that v1 never answered.
        let r = report_of(&[
            (0, 2, "v1", 7),
            (5, 2, "v1", 0),
            (20, 2, "v2", 0),
            (30, 2, "v2", 8),
        ]);
        let seq = r.sequence(&expected).unwrap();
        let e = r.check_switches_crossed(&expected, &seq).unwrap_err();
        assert!(e.contains("no keep-alive connection"), "{e}");
        // No new connection after the switch.
        let r = report_of(&[(0, 2, "v1", 7), (5, 2, "v1", 0), (20, 2, "v2", 7)]);
        let seq = r.sequence(&expected).unwrap();
        let e = r.check_switches_crossed(&expected, &seq).unwrap_err();
        assert!(e.contains("new connections"), "{e}");
    }
}
