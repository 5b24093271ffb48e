//! The fleet rollout as a pure state machine: which hosts to deploy next,
//! when to pause, when to stop, which hosts to roll back, and how it ended.
//! No I/O: the deploy command ([`crate::deploy`]) takes each [`Action`]
//! (in parallel for a whole wave) and feeds back one [`Observation`] per
//! host, then asks for the next action.
//!
//! The rules:
//! - hosts go in waves: the canary hosts first, then batches (N hosts or N%
//!   of the environment, rounded up), in inventory order;
//! - the strategy's `pause` is taken between two waves;
//! - a canary host failing stops the rollout; a batch host failing counts
//!   against `max_failed` (default 0: the first failure stops it);
//! - stopping rolls every host that is on the new release back to the
//!   release it had before, all at once; the failed host itself was already
//!   put back by its agent (a failed deploy leaves the previous release
//!   serving), unless it reported otherwise;
//! - the ending says whether every host is where it should be; anything
//!   else (a rollback that failed, a host whose state is unknown, a host with
//!   nothing to roll back to, failures tolerated by `max_failed`) is
//!   [`Verdict::Mixed`], which lists each host's release: mixed versions are
//!   never left behind silently.

use std::time::Duration;

use deploy_protocol::Outcome;

/// Which hosts go first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Canary {
    /// The first N hosts in inventory order (0: no canary wave).
    Count(usize),
    /// These hosts, by name.
    Hosts(Vec<String>),
}

/// How many hosts at a time after the canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    Count(usize),
    /// Percent of the environment's hosts, rounded up (at least 1 host).
    Percent(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    pub canary: Canary,
    pub batch: Batch,
    /// Between two waves.
    pub pause: Duration,
    /// Batch hosts that may fail before the rollout stops (canary: none).
    pub max_failed: usize,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            canary: Canary::Count(1),
            batch: Batch::Count(1),
            pause: Duration::ZERO,
            max_failed: 0,
        }
    }
}

/// A set of hosts deployed in parallel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    pub canary: bool,
    /// 1-based among the batches; 0 for the canary wave.
    pub number: usize,
    /// Indexes into the environment's hosts.
    pub hosts: Vec<usize>,
}

/// Splits `hosts` (inventory order) into waves. Canary names are checked
/// against the inventory when it is loaded; unknown ones are ignored here.
pub fn plan(hosts: &[String], s: &Strategy) -> Vec<Wave> {
    let canary: Vec<usize> = match &s.canary {
        Canary::Count(n) => (0..hosts.len().min(*n)).collect(),
        Canary::Hosts(names) => hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| names.contains(h))
            .map(|(i, _)| i)
            .collect(),
    };
    let rest: Vec<usize> = (0..hosts.len()).filter(|i| !canary.contains(i)).collect();
    let size = match s.batch {
        Batch::Count(n) => n.max(1),
        Batch::Percent(p) => (hosts.len() * p as usize).div_ceil(100).max(1),
    };
    let mut waves = Vec::new();
    if !canary.is_empty() {
        waves.push(Wave {
            canary: true,
            number: 0,
            hosts: canary,
        });
    }
    for (i, chunk) in rest.chunks(size).enumerate() {
        waves.push(Wave {
            canary: false,
            number: i + 1,
            hosts: chunk.to_vec(),
        });
    }
    waves
}

/// What a host serves, as far as the controller knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Release(String),
    Nothing,
    /// Its agent could not tell (unreachable, connection lost).
    Unknown,
}

impl Seen {
    pub fn from_option(r: Option<String>) -> Seen {
        r.map(Seen::Release).unwrap_or(Seen::Nothing)
    }

    fn is(&self, release: Option<&str>) -> bool {
        match (self, release) {
            (Seen::Release(a), Some(b)) => a == b,
            (Seen::Nothing, None) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Release(r) => f.write_str(r),
            Seen::Nothing => f.write_str("nothing"),
            Seen::Unknown => f.write_str("unknown"),
        }
    }
}

/// A host that failed its deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub host: String,
    pub canary: bool,
    pub outcome: Outcome,
    /// The health gate that decided, when one did.
    pub gate: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostState {
    Pending,
    Deploying,
    /// Now on the target; `previous` is what it served before.
    Updated {
        previous: Option<String>,
    },
    /// Its deploy failed; `serving` is what it serves after it.
    Failed {
        serving: Seen,
    },
    RollingBack {
        to: String,
    },
    RolledBack {
        to: String,
    },
    RollbackFailed {
        to: String,
        message: String,
        serving: Seen,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deploy the target on these hosts, in parallel.
    Deploy(Wave),
    Pause(Duration),
    /// Roll these hosts back, in parallel: (host index, release).
    Rollback(Vec<(usize, String)>),
    /// Observations of the last action are still missing.
    Wait,
    Done(Verdict),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Deployed {
        host: usize,
        previous: Option<String>,
    },
    DeployFailed {
        host: usize,
        outcome: Outcome,
        gate: Option<String>,
        message: String,
        serving: Seen,
    },
    Paused,
    RolledBack {
        host: usize,
    },
    RollbackFailed {
        host: usize,
        message: String,
        serving: Seen,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every host serves the target.
    Succeeded,
    /// A host failed; every host is back on (or never left) the release it
    /// had before.
    RolledBack { failure: Failure },
    /// Hosts serve different releases (or their state is unknown); `hosts`
    /// says why, one line per host that is not where it should be.
    Mixed {
        failure: Option<Failure>,
        hosts: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Forward,
    RollingBack,
    Done,
}

/// The rollout of one release over one environment.
#[derive(Debug, Clone)]
pub struct FleetRollout {
    target: String,
    names: Vec<String>,
    /// What each host served before (from the pre-pull).
    before: Vec<Option<String>>,
    states: Vec<HostState>,
    waves: Vec<Wave>,
    next_wave: usize,
    pause: Duration,
    pausing: bool,
    paused_before: Option<usize>,
    max_failed: usize,
    failures: Vec<Failure>,
    canary_hosts: Vec<usize>,
    /// Hosts that could not be rolled back: (index, why).
    stuck: Vec<(usize, String)>,
    phase: Phase,
    verdict: Option<Verdict>,
}

impl FleetRollout {
    /// `names[i]` served `before[i]` when the rollout began.
    pub fn new(
        target: &str,
        names: Vec<String>,
        before: Vec<Option<String>>,
        strategy: &Strategy,
    ) -> FleetRollout {
        let waves = plan(&names, strategy);
        let canary_hosts = waves
            .iter()
            .filter(|w| w.canary)
            .flat_map(|w| w.hosts.clone())
            .collect();
        let n = names.len();
        let mut before = before;
        before.resize(n, None);
        FleetRollout {
            target: target.to_string(),
            names,
            before,
            states: vec![HostState::Pending; n],
            waves,
            next_wave: 0,
            pause: strategy.pause,
            pausing: false,
            paused_before: None,
            max_failed: strategy.max_failed,
            failures: Vec::new(),
            canary_hosts,
            stuck: Vec::new(),
            phase: Phase::Forward,
            verdict: None,
        }
    }

    pub fn waves(&self) -> &[Wave] {
        &self.waves
    }

    pub fn states(&self) -> &[HostState] {
        &self.states
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn before(&self, host: usize) -> Option<&str> {
        self.before.get(host).and_then(|b| b.as_deref())
    }

    /// What `host` serves now, as far as the rollout knows.
    pub fn serving(&self, host: usize) -> Seen {
        match &self.states[host] {
            HostState::Pending => Seen::from_option(self.before[host].clone()),
            HostState::Deploying | HostState::RollingBack { .. } => Seen::Unknown,
            HostState::Updated { .. } => Seen::Release(self.target.clone()),
            HostState::Failed { serving } | HostState::RollbackFailed { serving, .. } => {
                serving.clone()
            }
            HostState::RolledBack { to } => Seen::Release(to.clone()),
        }
    }

    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    fn in_flight(&self) -> bool {
        self.pausing
            || self
                .states
                .iter()
                .any(|s| matches!(s, HostState::Deploying | HostState::RollingBack { .. }))
    }

    fn must_stop(&self) -> bool {
        let canary_failed = self.failures.iter().any(|f| f.canary);
        let batch_failed = self.failures.iter().filter(|f| !f.canary).count();
        canary_failed || batch_failed > self.max_failed
    }

    /// The next thing to do.
    pub fn next_action(&mut self) -> Action {
        if let Some(v) = &self.verdict {
            return Action::Done(v.clone());
        }
        if self.in_flight() {
            return Action::Wait;
        }
        match self.phase {
            Phase::Forward if self.must_stop() => {
                self.phase = Phase::RollingBack;
                let set = self.rollback_set();
                if set.is_empty() {
                    return self.finish();
                }
                for (h, to) in &set {
                    self.states[*h] = HostState::RollingBack { to: to.clone() };
                }
                Action::Rollback(set)
            }
            Phase::Forward if self.next_wave < self.waves.len() => {
                if self.next_wave > 0
                    && !self.pause.is_zero()
                    && self.paused_before != Some(self.next_wave)
                {
                    self.pausing = true;
                    return Action::Pause(self.pause);
                }
                let wave = self.waves[self.next_wave].clone();
                self.next_wave += 1;
                for h in &wave.hosts {
                    self.states[*h] = HostState::Deploying;
                }
                Action::Deploy(wave)
            }
            Phase::Forward | Phase::RollingBack | Phase::Done => self.finish(),
        }
    }

    /// Which hosts go back, and to what: those on the target that had
    /// another release before. Hosts that had nothing are noted as stuck.
    fn rollback_set(&mut self) -> Vec<(usize, String)> {
        let mut set = Vec::new();
        for h in 0..self.states.len() {
            let prev = match &self.states[h] {
                HostState::Updated { previous } => previous.clone().or(self.before[h].clone()),
                HostState::Failed {
                    serving: Seen::Release(r),
                } if *r == self.target => self.before[h].clone(),
                _ => continue,
            };
            match prev {
                Some(p) if p == self.target => {} // it had the target already
                Some(p) => set.push((h, p)),
                None => self.stuck.push((
                    h,
                    format!(
                        "it served nothing before {}, so there is no release to roll back to",
                        self.target
                    ),
                )),
            }
        }
        set
    }

    /// Feeds back what happened to one host (or the pause).
    pub fn observe(&mut self, o: Observation) {
        match o {
            Observation::Paused => {
                if self.pausing {
                    self.pausing = false;
                    self.paused_before = Some(self.next_wave);
                }
            }
            Observation::Deployed { host, previous } => {
                if self.states.get(host) == Some(&HostState::Deploying) {
                    self.states[host] = HostState::Updated { previous };
                }
            }
            Observation::DeployFailed {
                host,
                outcome,
                gate,
                message,
                serving,
            } => {
                if self.states.get(host) == Some(&HostState::Deploying) {
                    self.failures.push(Failure {
                        host: self.names[host].clone(),
                        canary: self.canary_hosts.contains(&host),
                        outcome,
                        gate,
                        message,
                    });
                    self.states[host] = HostState::Failed { serving };
                }
            }
            Observation::RolledBack { host } => {
                if let Some(HostState::RollingBack { to }) = self.states.get(host) {
                    self.states[host] = HostState::RolledBack { to: to.clone() };
                }
            }
            Observation::RollbackFailed {
                host,
                message,
                serving,
            } => {
                if let Some(HostState::RollingBack { to }) = self.states.get(host) {
                    self.states[host] = HostState::RollbackFailed {
                        to: to.clone(),
                        message,
                        serving,
                    };
                }
            }
        }
    }

    fn finish(&mut self) -> Action {
        self.phase = Phase::Done;
        let failure = self.failures.first().cloned();
        let stopped = self.must_stop();
        let mut off = Vec::new();
        for h in 0..self.states.len() {
            let serving = self.serving(h);
            // Where the host should be: back where it was after a stop,
            // on the target after a complete rollout.
            let want_before = stopped;
            let ok = if want_before {
                serving.is(self.before[h].as_deref())
            } else {
                serving.is(Some(&self.target))
            };
            if ok {
                continue;
            }
            let name = &self.names[h];
            let had = self.before[h].as_deref().unwrap_or("nothing");
            let why = match &self.states[h] {
                HostState::RollbackFailed { to, message, .. } => {
                    format!(
                        "{name}: serves {serving} (had {had}); its rollback to {to} failed: {message}"
                    )
                }
                HostState::Failed { .. } => {
                    format!(
                        "{name}: serves {serving} after its deploy of {} failed (had {had})",
                        self.target
                    )
                }
                _ => match self.stuck.iter().find(|(i, _)| *i == h) {
                    Some((_, why)) => format!("{name}: serves {serving}; {why}"),
                    None => format!("{name}: serves {serving} (had {had})"),
                },
            };
            off.push(why);
        }
        let verdict = match (off.is_empty(), failure) {
            (true, None) => Verdict::Succeeded,
            (true, Some(f)) if stopped => Verdict::RolledBack { failure: f },
            // Every host ended on the target despite a tolerated failure.
            (true, Some(_)) => Verdict::Succeeded,
            (false, failure) => Verdict::Mixed {
                failure,
                hosts: off,
            },
        };
        self.verdict = Some(verdict.clone());
        Action::Done(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{i}")).collect()
    }

    fn strategy(canary: Canary, batch: Batch) -> Strategy {
        Strategy {
            canary,
            batch,
            pause: Duration::ZERO,
            max_failed: 0,
        }
    }

    fn hosts_of(waves: &[Wave]) -> Vec<Vec<usize>> {
        waves.iter().map(|w| w.hosts.clone()).collect()
    }

    #[test]
    fn plans() {
        let s = strategy(Canary::Count(1), Batch::Count(2));
        assert_eq!(hosts_of(&plan(&names(3), &s)), vec![vec![0], vec![1, 2]]);
        assert_eq!(
            hosts_of(&plan(&names(6), &s)),
            vec![vec![0], vec![1, 2], vec![3, 4], vec![5]]
        );
        let w = plan(&names(3), &s);
        assert!(w[0].canary && w[0].number == 0);
        assert!(!w[1].canary && w[1].number == 1);
        // No canary.
        let s = strategy(Canary::Count(0), Batch::Count(2));
        assert_eq!(hosts_of(&plan(&names(3), &s)), vec![vec![0, 1], vec![2]]);
        assert!(!plan(&names(3), &s)[0].canary);
        // More canaries than hosts.
        let s = strategy(Canary::Count(5), Batch::Count(1));
        assert_eq!(hosts_of(&plan(&names(2), &s)), vec![vec![0, 1]]);
        // Named canaries, anywhere in the list.
        let s = strategy(
            Canary::Hosts(vec!["h2".into(), "h0".into()]),
            Batch::Count(1),
        );
        assert_eq!(
            hosts_of(&plan(&names(4), &s)),
            vec![vec![0, 2], vec![1], vec![3]]
        );
        // Percentages of the whole environment, rounded up.
        let s = strategy(Canary::Count(1), Batch::Percent(50));
        assert_eq!(
            hosts_of(&plan(&names(5), &s)),
            vec![vec![0], vec![1, 2, 3], vec![4]]
        );
        let s = strategy(Canary::Count(0), Batch::Percent(1));
        assert_eq!(plan(&names(3), &s).len(), 3);
        let s = strategy(Canary::Count(0), Batch::Percent(100));
        assert_eq!(hosts_of(&plan(&names(3), &s)), vec![vec![0, 1, 2]]);
        // Batch 0 is treated as 1 (the inventory refuses it anyway).
        let s = strategy(Canary::Count(0), Batch::Count(0));
        assert_eq!(plan(&names(2), &s).len(), 2);
        assert!(plan(&[], &Strategy::default()).is_empty());
    }

    fn rollout(n: usize, before: &str, s: &Strategy) -> FleetRollout {
        FleetRollout::new("v3", names(n), vec![Some(before.to_string()); n], s)
    }

    fn deployed(h: usize) -> Observation {
        Observation::Deployed {
            host: h,
            previous: Some("v2".into()),
        }
    }

    fn failed(h: usize) -> Observation {
        Observation::DeployFailed {
            host: h,
            outcome: Outcome::HealthGateFailed,
            gate: Some("web: http GET /health".into()),
            message: "unhealthy".into(),
            serving: Seen::Release("v2".into()),
        }
    }

    fn expect_deploy(r: &mut FleetRollout) -> Vec<usize> {
        match r.next_action() {
            Action::Deploy(w) => w.hosts,
            other => panic!("expected a deploy, got {other:?}"),
        }
    }

    #[test]
    fn canary_then_batches_with_pauses() {
        let mut s = strategy(Canary::Count(1), Batch::Count(2));
        s.pause = Duration::from_secs(5);
        let mut r = rollout(5, "v2", &s);
        assert_eq!(expect_deploy(&mut r), vec![0]);
        assert_eq!(
            r.next_action(),
            Action::Wait,
            "the canary is still deploying"
        );
        r.observe(deployed(0));
        assert_eq!(r.next_action(), Action::Pause(Duration::from_secs(5)));
        assert_eq!(r.next_action(), Action::Wait, "pausing");
        r.observe(Observation::Paused);
        assert_eq!(expect_deploy(&mut r), vec![1, 2]);
        r.observe(deployed(2));
        assert_eq!(r.next_action(), Action::Wait, "host 1 is still deploying");
        r.observe(deployed(1));
        assert_eq!(r.next_action(), Action::Pause(Duration::from_secs(5)));
        r.observe(Observation::Paused);
        assert_eq!(expect_deploy(&mut r), vec![3, 4]);
        r.observe(deployed(3));
        r.observe(deployed(4));
        assert_eq!(r.next_action(), Action::Done(Verdict::Succeeded));
        assert_eq!(
            r.next_action(),
            Action::Done(Verdict::Succeeded),
            "stays done"
        );
        for h in 0..5 {
            assert_eq!(r.serving(h), Seen::Release("v3".into()));
        }
    }

    #[test]
    fn no_pause_when_zero_and_a_stray_paused_is_ignored() {
        let s = strategy(Canary::Count(1), Batch::Count(1));
        let mut r = rollout(2, "v2", &s);
        r.observe(Observation::Paused);
        assert_eq!(expect_deploy(&mut r), vec![0]);
        r.observe(deployed(0));
        assert_eq!(expect_deploy(&mut r), vec![1]);
        r.observe(deployed(1));
        assert_eq!(r.next_action(), Action::Done(Verdict::Succeeded));
    }

    #[test]
    fn a_failed_canary_stops_everything_and_needs_no_rollback() {
        let s = strategy(Canary::Count(1), Batch::Count(2));
        let mut r = rollout(3, "v2", &s);
        assert_eq!(expect_deploy(&mut r), vec![0]);
        r.observe(failed(0));
        let Action::Done(Verdict::RolledBack { failure }) = r.next_action() else {
            panic!("expected a rolled back verdict")
        };
        assert_eq!(failure.host, "h0");
        assert!(failure.canary);
        assert_eq!(failure.gate.as_deref(), Some("web: http GET /health"));
        assert_eq!(r.states()[1], HostState::Pending, "the batch never started");
        assert_eq!(r.states()[2], HostState::Pending);
    }

    #[test]
    fn a_canary_failure_stops_even_with_max_failed() {
        let mut s = strategy(Canary::Count(1), Batch::Count(2));
        s.max_failed = 5;
        let mut r = rollout(3, "v2", &s);
        expect_deploy(&mut r);
        r.observe(failed(0));
        assert!(matches!(
            r.next_action(),
            Action::Done(Verdict::RolledBack { .. })
        ));
    }

    #[test]
    fn a_failed_batch_host_rolls_back_every_updated_host() {
        let s = strategy(Canary::Count(1), Batch::Count(2));
        let mut r = rollout(5, "v2", &s);
        expect_deploy(&mut r);
        r.observe(deployed(0));
        assert_eq!(expect_deploy(&mut r), vec![1, 2]);
        r.observe(deployed(1));
        r.observe(failed(2));
        assert_eq!(
            r.next_action(),
            Action::Rollback(vec![(0, "v2".into()), (1, "v2".into())])
        );
        assert_eq!(r.next_action(), Action::Wait);
        r.observe(Observation::RolledBack { host: 1 });
        r.observe(Observation::RolledBack { host: 0 });
        let Action::Done(Verdict::RolledBack { failure }) = r.next_action() else {
            panic!("expected rolled back")
        };
        assert_eq!(failure.host, "h2");
        assert!(!failure.canary);
        assert_eq!(
            r.states()[3],
            HostState::Pending,
            "the next batch never started"
        );
        for h in 0..5 {
            assert_eq!(r.serving(h), Seen::Release("v2".into()), "host {h}");
        }
    }

    #[test]
    fn a_failed_host_still_on_the_target_is_rolled_back_too() {
        let s = strategy(Canary::Count(0), Batch::Count(2));
        let mut r = rollout(2, "v2", &s);
        expect_deploy(&mut r);
        r.observe(deployed(0));
        r.observe(Observation::DeployFailed {
            host: 1,
            outcome: Outcome::EnvironmentError,
            gate: None,
            message: "connection lost".into(),
            serving: Seen::Release("v3".into()),
        });
        assert_eq!(
            r.next_action(),
            Action::Rollback(vec![(0, "v2".into()), (1, "v2".into())])
        );
        r.observe(Observation::RolledBack { host: 0 });
        r.observe(Observation::RolledBack { host: 1 });
        let Action::Done(Verdict::RolledBack { failure }) = r.next_action() else {
            panic!()
        };
        assert_eq!(failure.outcome, Outcome::EnvironmentError);
    }

    #[test]
    fn a_failed_rollback_is_mixed_and_names_each_host() {
        let s = strategy(Canary::Count(1), Batch::Count(2));
        let mut r = rollout(3, "v2", &s);
        expect_deploy(&mut r);
        r.observe(deployed(0));
        expect_deploy(&mut r);
        r.observe(deployed(1));
        r.observe(failed(2));
        assert!(matches!(r.next_action(), Action::Rollback(_)));
        r.observe(Observation::RolledBack { host: 0 });
        r.observe(Observation::RollbackFailed {
            host: 1,
            message: "agent unreachable".into(),
            serving: Seen::Unknown,
        });
        let Action::Done(Verdict::Mixed { failure, hosts }) = r.next_action() else {
            panic!("expected mixed")
        };
        assert_eq!(failure.unwrap().host, "h2");
        assert_eq!(hosts.len(), 1, "{hosts:?}");
        assert!(hosts[0].starts_with("h1: serves unknown"), "{hosts:?}");
        assert!(hosts[0].contains("agent unreachable"), "{hosts:?}");
    }

    #[test]
    fn an_unknown_failed_host_is_mixed() {
        let s = strategy(Canary::Count(1), Batch::Count(1));
        let mut r = rollout(2, "v2", &s);
        expect_deploy(&mut r);
        r.observe(Observation::DeployFailed {
            host: 0,
            outcome: Outcome::EnvironmentError,
            gate: None,
            message: "connection reset".into(),
            serving: Seen::Unknown,
        });
        let Action::Done(Verdict::Mixed { hosts, .. }) = r.next_action() else {
            panic!()
        };
        assert!(hosts[0].contains("h0: serves unknown"), "{hosts:?}");
    }

    #[test]
    fn the_first_deploy_cannot_be_rolled_back() {
        let s = strategy(Canary::Count(1), Batch::Count(1));
        let mut r = FleetRollout::new("v1", names(2), vec![None, None], &s);
        expect_deploy(&mut r);
        r.observe(Observation::Deployed {
            host: 0,
            previous: None,
        });
        expect_deploy(&mut r);
        r.observe(Observation::DeployFailed {
            host: 1,
            outcome: Outcome::HealthGateFailed,
            gate: None,
            message: "unhealthy".into(),
            serving: Seen::Nothing,
        });
        let Action::Done(Verdict::Mixed { hosts, .. }) = r.next_action() else {
            panic!("expected mixed")
        };
        assert_eq!(hosts.len(), 1);
        assert!(hosts[0].contains("h0: serves v1"), "{hosts:?}");
        assert!(hosts[0].contains("no release to roll back to"), "{hosts:?}");
    }

    #[test]
    fn hosts_that_had_the_target_already_stay() {
        let s = strategy(Canary::Count(0), Batch::Count(3));
        let mut r = FleetRollout::new(
            "v3",
            names(3),
            vec![Some("v3".into()), Some("v2".into()), Some("v2".into())],
            &s,
        );
        expect_deploy(&mut r);
        r.observe(Observation::Deployed {
            host: 0,
            previous: Some("v3".into()),
        });
        r.observe(deployed(1));
        r.observe(failed(2));
        assert_eq!(r.next_action(), Action::Rollback(vec![(1, "v2".into())]));
        r.observe(Observation::RolledBack { host: 1 });
        assert!(matches!(
            r.next_action(),
            Action::Done(Verdict::RolledBack { .. })
        ));
    }

    #[test]
    fn max_failed_tolerates_batch_failures_but_reports_mixed() {
        let mut s = strategy(Canary::Count(1), Batch::Count(1));
        s.max_failed = 1;
        let mut r = rollout(3, "v2", &s);
        expect_deploy(&mut r);
        r.observe(deployed(0));
        assert_eq!(expect_deploy(&mut r), vec![1]);
        r.observe(failed(1));
        assert_eq!(expect_deploy(&mut r), vec![2], "one failure is tolerated");
        r.observe(deployed(2));
        let Action::Done(Verdict::Mixed { failure, hosts }) = r.next_action() else {
            panic!("expected mixed")
        };
        assert_eq!(failure.unwrap().host, "h1");
        assert_eq!(
            hosts,
            vec!["h1: serves v2 after its deploy of v3 failed (had v2)".to_string()]
        );
    }

    #[test]
    fn exceeding_max_failed_stops_and_rolls_back() {
        let mut s = strategy(Canary::Count(0), Batch::Count(1));
        s.max_failed = 1;
        let mut r = rollout(4, "v2", &s);
        expect_deploy(&mut r);
        r.observe(failed(0));
        expect_deploy(&mut r);
        r.observe(deployed(1));
        expect_deploy(&mut r);
        r.observe(failed(2));
        assert_eq!(r.next_action(), Action::Rollback(vec![(1, "v2".into())]));
        r.observe(Observation::RolledBack { host: 1 });
        let Action::Done(Verdict::RolledBack { failure }) = r.next_action() else {
            panic!()
        };
        assert_eq!(failure.host, "h0", "the first failure is reported");
        assert_eq!(r.failures().len(), 2);
    }

    #[test]
    fn observations_that_do_not_fit_are_ignored() {
        let s = strategy(Canary::Count(1), Batch::Count(1));
        let mut r = rollout(2, "v2", &s);
        // Nothing is deploying yet.
        r.observe(deployed(1));
        r.observe(failed(1));
        r.observe(Observation::RolledBack { host: 0 });
        r.observe(deployed(99));
        assert!(r.failures().is_empty());
        assert_eq!(expect_deploy(&mut r), vec![0]);
        r.observe(deployed(0));
        r.observe(failed(0)); // already reported
        assert_eq!(expect_deploy(&mut r), vec![1]);
        r.observe(deployed(1));
        assert_eq!(r.next_action(), Action::Done(Verdict::Succeeded));
    }

    #[test]
    fn an_empty_environment_is_done_at_once() {
        let mut r = FleetRollout::new("v1", vec![], vec![], &Strategy::default());
        assert_eq!(r.next_action(), Action::Done(Verdict::Succeeded));
    }

    #[test]
    fn seen_compares_and_prints() {
        assert!(Seen::Release("a".into()).is(Some("a")));
        assert!(!Seen::Release("a".into()).is(None));
        assert!(Seen::Nothing.is(None));
        assert!(!Seen::Unknown.is(None));
        assert_eq!(Seen::Unknown.to_string(), "unknown");
        assert_eq!(Seen::from_option(None), Seen::Nothing);
    }
}
