//! The `ObservationGate`: judges a release after the switch (and at each
//! canary step) from probe results and the proxy's response counts. Pure:
//! the engine feeds it what it sees.
//!
//! Why the error rate is judged over a trailing period with a minimum count:
//! one 500 out of two requests is 50%, and an idle service must never be
//! rolled back on no data; a rate that holds over the period with enough
//! requests behind it is a signal.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::health::ProbeResult;
use crate::spec::ObserveSettings;

/// Cumulative response counts of the release being watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traffic {
    /// Time since the watch began.
    pub at: Duration,
    pub responses: u64,
    pub errors: u64,
}

#[derive(Debug, Clone)]
pub struct ObservationGate {
    settings: ObserveSettings,
    /// Length of this watch (the window, or a canary hold).
    length: Duration,
    samples: VecDeque<Traffic>,
    failures: BTreeMap<String, u32>,
}

impl ObservationGate {
    pub fn new(settings: ObserveSettings, length: Duration, baseline: Traffic) -> Self {
        ObservationGate {
            settings,
            length,
            samples: VecDeque::from([baseline]),
            failures: BTreeMap::new(),
        }
    }

    /// A probe of one replica. `Some(reason)`: the gate failed.
    pub fn probe(&mut self, replica: &str, result: ProbeResult) -> Option<String> {
        match result {
            ProbeResult::ContainerDown(why) => Some(format!("{replica}: {why}")),
            ProbeResult::Success => {
                self.failures.insert(replica.to_string(), 0);
                None
            }
            ProbeResult::Failure(why) | ProbeResult::Unhealthy(why) => {
                let n = self.failures.entry(replica.to_string()).or_insert(0);
                *n += 1;
                (*n >= self.settings.unhealthy_after.max(1))
                    .then(|| format!("{replica}: {n} consecutive probe failures, last: {why}"))
            }
        }
    }

    /// New cumulative counts. `Some(reason)`: the error-rate gate failed.
    pub fn traffic(&mut self, now: Traffic) -> Option<String> {
        self.samples.push_back(now);
        // Judge over the trailing period, or the whole watch when it is shorter.
        let period = self.settings.error_rate_for.min(self.length);
        let first = self.samples.front().copied().unwrap_or_default();
        if now.at.saturating_sub(first.at) < period {
            return None;
        }
        // Keep the newest sample at or before `now - period` as the base.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|s| now.at.saturating_sub(s.at) >= period)
        {
            self.samples.pop_front();
        }
        let base = self.samples.front().copied().unwrap_or_default();
        let responses = now.responses.saturating_sub(base.responses);
        let errors = now.errors.saturating_sub(base.errors);
        if responses < self.settings.min_requests.max(1) {
            return None;
        }
        let rate = errors as f64 / responses as f64;
        (rate > self.settings.max_error_rate).then(|| {
            format!(
                "error rate {:.1}% ({errors} of {responses} responses were 5xx) over the last {}, above {:.1}%",
                rate * 100.0,
                humantime::format_duration(Duration::from_secs(period.as_secs().max(1))),
                self.settings.max_error_rate * 100.0
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ObserveSettings {
        ObserveSettings {
            window: Duration::from_secs(60),
            unhealthy_after: 3,
            max_error_rate: 0.05,
            error_rate_for: Duration::from_secs(10),
            min_requests: 20,
        }
    }

    fn t(secs: u64, responses: u64, errors: u64) -> Traffic {
        Traffic {
            at: Duration::from_secs(secs),
            responses,
            errors,
        }
    }

    #[test]
    fn consecutive_probe_failures_per_replica() {
        let mut g = ObservationGate::new(settings(), Duration::from_secs(60), t(0, 0, 0));
        assert_eq!(g.probe("a", ProbeResult::Failure("x".into())), None);
        assert_eq!(g.probe("b", ProbeResult::Failure("x".into())), None);
        assert_eq!(g.probe("a", ProbeResult::Failure("x".into())), None);
        assert_eq!(g.probe("a", ProbeResult::Success), None);
        assert_eq!(g.probe("a", ProbeResult::Failure("x".into())), None);
        assert_eq!(g.probe("b", ProbeResult::Failure("x".into())), None);
        let r = g.probe("b", ProbeResult::Failure("500".into()));
        assert!(r.is_some_and(|m| m.starts_with("b: 3 consecutive") && m.contains("500")));
    }

    #[test]
    fn a_container_going_down_fails_at_once() {
        let mut g = ObservationGate::new(settings(), Duration::from_secs(60), t(0, 0, 0));
        assert_eq!(
            g.probe("a", ProbeResult::ContainerDown("exited with code 1".into())),
            Some("a: exited with code 1".into())
        );
    }

    #[test]
    fn error_rate_above_threshold_over_the_period_fails() {
        let mut g = ObservationGate::new(settings(), Duration::from_secs(60), t(0, 100, 0));
        assert_eq!(g.traffic(t(5, 150, 10)), None, "period not over yet");
        let r = g.traffic(t(10, 200, 20));
        assert!(
            r.as_deref()
                .is_some_and(|m| m.contains("20.0%") && m.contains("20 of 100")),
            "{r:?}"
        );
    }

    #[test]
    fn error_rate_below_threshold_passes() {
        let mut g = ObservationGate::new(settings(), Duration::from_secs(60), t(0, 0, 0));
        for s in 1..=30 {
            assert_eq!(g.traffic(t(s, s * 100, s * 4)), None);
        }
    }

    #[test]
    fn too_few_requests_are_not_judged() {
        let mut g = ObservationGate::new(settings(), Duration::from_secs(60), t(0, 0, 0));
        assert_eq!(g.traffic(t(10, 2, 2)), None);
        assert_eq!(g.traffic(t(20, 4, 4)), None);
    }

    #[test]
    fn only_the_trailing_period_counts() {
        let mut g = ObservationGate::new(settings(), Duration::from_secs(60), t(0, 0, 0));
        // A bad start...
        assert!(g.traffic(t(10, 100, 50)).is_some());
        // ...then ten clean seconds: the trailing period is clean.
        let mut g = ObservationGate::new(settings(), Duration::from_secs(60), t(0, 0, 0));
        g.samples.push_back(t(5, 100, 50));
        assert_eq!(g.traffic(t(15, 300, 50)), None);
    }

    #[test]
    fn a_short_watch_is_judged_over_its_whole_length() {
        let mut g = ObservationGate::new(settings(), Duration::from_secs(3), t(0, 0, 0));
        assert!(g.traffic(t(3, 100, 30)).is_some());
    }
}
