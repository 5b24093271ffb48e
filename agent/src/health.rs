//! The `HealthGate`: decides from a stream of probe results whether a
//! container is healthy, still starting, or has failed. Pure: the engine
//! feeds it observations and sleeps between them.
//!
//! Why a probe that got no answer only fails the gate at the deadline (until
//! the container has once been healthy): a container that refuses
//! connections while it boots is normal, and a gate that failed after three
//! refusals would make every slow-starting app undeployable unless its owner
//! tuned `start_period`. An app that *answers* unhealthy (HTTP 500, exec
//! exit 1, Docker "unhealthy") is up and saying so: `unhealthy_after` of
//! those fail the gate at once, as do as many failures of any kind once the
//! container has been healthy (it is flapping).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::spec::{HealthSettings, Probe};

/// One probe attempt, as the engine saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Success,
    /// No answer: refused, timed out, not ready.
    Failure(String),
    /// The app answered, and the answer is "unhealthy".
    Unhealthy(String),
    /// The container is not running any more (exited, or restarted by
    /// Docker): fails the gate at once, whatever the counters say.
    ContainerDown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Pending,
    Unhealthy(String),
}

#[derive(Debug, Clone)]
pub struct HealthGate {
    settings: HealthSettings,
    successes: u32,
    failures: u32,
    /// Consecutive failures where the app answered (counted before any success).
    answered_failures: u32,
    ever_succeeded: bool,
    last_error: Option<String>,
}

impl HealthGate {
    pub fn new(settings: HealthSettings) -> HealthGate {
        HealthGate {
            settings,
            successes: 0,
            failures: 0,
            answered_failures: 0,
            ever_succeeded: false,
            last_error: None,
        }
    }

    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    /// Judge after a probe taken `elapsed` after the container started.
    pub fn observe(&mut self, elapsed: Duration, result: ProbeResult) -> Verdict {
        let s = &self.settings;
        match result {
            ProbeResult::ContainerDown(why) => return Verdict::Unhealthy(why),
            ProbeResult::Success => {
                self.successes += 1;
                self.failures = 0;
                self.answered_failures = 0;
                self.ever_succeeded = true;
                // `Running` means "kept running through the start period".
                let settled =
                    !matches!(s.probe, Probe::Running { .. }) || elapsed >= s.start_period;
                if self.successes >= s.healthy_after.max(1) && settled {
                    return Verdict::Healthy;
                }
            }
            ProbeResult::Failure(ref why) | ProbeResult::Unhealthy(ref why) => {
                let answered = matches!(result, ProbeResult::Unhealthy(_));
                let why = why.clone();
                self.successes = 0;
                if elapsed >= s.start_period {
                    self.failures += 1;
                    if answered {
                        self.answered_failures += 1;
                    }
                }
                if !answered {
                    self.answered_failures = 0;
                }
                let counts = if self.ever_succeeded {
                    self.failures
                } else {
                    self.answered_failures
                };
                if counts >= s.unhealthy_after.max(1) {
                    return Verdict::Unhealthy(format!(
                        "{counts} consecutive probe failures, last: {why}"
                    ));
                }
                self.last_error = Some(why);
            }
        }
        if elapsed >= s.deadline {
            let last = self
                .last_error
                .clone()
                .unwrap_or_else(|| "still settling".to_string());
            return Verdict::Unhealthy(format!(
                "not healthy within the {} deadline (last probe: {last})",
                humantime::format_duration(s.deadline)
            ));
        }
        Verdict::Pending
    }
}

// --- Counters for the metrics ---------------------------------------------

pub const PROBE_KINDS: [&str; 5] = ["http", "tcp", "exec", "docker", "running"];
pub const PROBE_RESULTS: [&str; 3] = ["success", "failure", "container_down"];

/// Probe results of this process, by probe kind and result. Lock-free: the
/// health gate records every probe.
pub static PROBES: ProbeCounters = ProbeCounters::new();

pub struct ProbeCounters {
    counts: [[AtomicU64; PROBE_RESULTS.len()]; PROBE_KINDS.len()],
}

impl Default for ProbeCounters {
    fn default() -> Self {
        ProbeCounters::new()
    }
}

impl ProbeCounters {
    pub const fn new() -> ProbeCounters {
        ProbeCounters {
            counts: [const { [const { AtomicU64::new(0) }; PROBE_RESULTS.len()] };
                PROBE_KINDS.len()],
        }
    }

    /// Counts one probe of `probe` that gave `result`.
    pub fn record(&self, probe: &Probe, result: &ProbeResult) {
        let kind = match probe {
            Probe::Http { .. } => 0,
            Probe::Tcp { .. } => 1,
            Probe::Exec { .. } => 2,
            Probe::Docker => 3,
            Probe::Running { .. } => 4,
        };
        let outcome = match result {
            ProbeResult::Success => 0,
            ProbeResult::Failure(_) | ProbeResult::Unhealthy(_) => 1,
            ProbeResult::ContainerDown(_) => 2,
        };
        self.counts[kind][outcome].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, kind: usize, result: usize) -> u64 {
        self.counts[kind][result].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(probe: Probe) -> HealthSettings {
        HealthSettings {
            probe,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            healthy_after: 2,
            unhealthy_after: 3,
            start_period: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
        }
    }

    fn http() -> Probe {
        Probe::Http {
            path: "/health".into(),
            port: 80,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn healthy_after_n_consecutive_successes() {
        let mut g = HealthGate::new(settings(http()));
        assert_eq!(g.observe(ms(0), ProbeResult::Success), Verdict::Pending);
        assert_eq!(g.observe(ms(100), ProbeResult::Success), Verdict::Healthy);
    }

    #[test]
    fn a_failure_resets_the_success_count() {
        let mut g = HealthGate::new(settings(http()));
        g.observe(ms(0), ProbeResult::Success);
        g.observe(ms(100), ProbeResult::Failure("503".into()));
        assert_eq!(g.observe(ms(200), ProbeResult::Success), Verdict::Pending);
        assert_eq!(g.observe(ms(300), ProbeResult::Success), Verdict::Healthy);
    }

    #[test]
    fn failures_while_booting_only_fail_at_the_deadline() {
        let mut g = HealthGate::new(settings(http()));
        for i in 0..99 {
            assert_eq!(
                g.observe(ms(i * 100), ProbeResult::Failure("refused".into())),
                Verdict::Pending
            );
        }
        match g.observe(ms(10_000), ProbeResult::Failure("refused".into())) {
            Verdict::Unhealthy(m) => {
                assert!(m.contains("deadline"), "{m}");
                assert!(m.contains("refused"), "{m}");
            }
            v => panic!("expected unhealthy, got {v:?}"),
        }
    }

    #[test]
    fn an_app_that_answers_unhealthy_fails_after_unhealthy_after_without_waiting() {
        let mut g = HealthGate::new(settings(http()));
        let bad = || ProbeResult::Unhealthy("GET /health answered 500".into());
        // In the start period answers do not count.
        assert_eq!(g.observe(ms(0), bad()), Verdict::Pending);
        assert_eq!(g.observe(ms(1000), bad()), Verdict::Pending);
        assert_eq!(g.observe(ms(1100), bad()), Verdict::Pending);
        match g.observe(ms(1200), bad()) {
            Verdict::Unhealthy(m) => {
                assert!(m.starts_with("3 consecutive") && m.contains("500"), "{m}")
            }
            v => panic!("expected unhealthy, got {v:?}"),
        }
    }

    #[test]
    fn a_refusal_between_unhealthy_answers_restarts_their_count() {
        let mut g = HealthGate::new(settings(http()));
        let bad = || ProbeResult::Unhealthy("500".into());
        g.observe(ms(1000), bad());
        g.observe(ms(1100), bad());
        g.observe(ms(1200), ProbeResult::Failure("refused".into()));
        assert_eq!(g.observe(ms(1300), bad()), Verdict::Pending);
        assert_eq!(g.observe(ms(1400), bad()), Verdict::Pending);
        assert!(matches!(g.observe(ms(1500), bad()), Verdict::Unhealthy(_)));
    }

    #[test]
    fn flapping_after_a_success_fails_after_unhealthy_after() {
        let mut g = HealthGate::new(settings(http()));
        g.observe(ms(1000), ProbeResult::Success);
        assert_eq!(
            g.observe(ms(1100), ProbeResult::Failure("500".into())),
            Verdict::Pending
        );
        assert_eq!(
            g.observe(ms(1200), ProbeResult::Failure("500".into())),
            Verdict::Pending
        );
        match g.observe(ms(1300), ProbeResult::Failure("500".into())) {
            Verdict::Unhealthy(m) => assert!(m.starts_with("3 consecutive"), "{m}"),
            v => panic!("expected unhealthy, got {v:?}"),
        }
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let mut g = HealthGate::new(settings(http()));
        g.observe(ms(0), ProbeResult::Success);
        for t in [100, 200, 300, 400, 500] {
            assert_eq!(
                g.observe(ms(t), ProbeResult::Failure("x".into())),
                Verdict::Pending
            );
        }
    }

    #[test]
    fn container_down_fails_at_once() {
        let mut g = HealthGate::new(settings(http()));
        g.observe(ms(0), ProbeResult::Success);
        assert_eq!(
            g.observe(
                ms(10),
                ProbeResult::ContainerDown("exited with code 1".into())
            ),
            Verdict::Unhealthy("exited with code 1".into())
        );
    }

    #[test]
    fn running_probe_waits_for_the_start_period() {
        let mut s = settings(Probe::Running { port: Some(80) });
        s.healthy_after = 1;
        let mut g = HealthGate::new(s);
        assert_eq!(g.observe(ms(0), ProbeResult::Success), Verdict::Pending);
        assert_eq!(g.observe(ms(500), ProbeResult::Success), Verdict::Pending);
        assert_eq!(g.observe(ms(1000), ProbeResult::Success), Verdict::Healthy);
    }

    #[test]
    fn deadline_passes_even_with_successes_below_threshold() {
        let mut s = settings(http());
        s.healthy_after = 5;
        let mut g = HealthGate::new(s);
        assert!(matches!(
            g.observe(ms(10_000), ProbeResult::Success),
            Verdict::Unhealthy(_)
        ));
    }
}
