//! DORA figures of an environment from its hosts' history
//! (`deploy-controller dora`): deployment frequency, change failure rate,
//! time to restore, rollback rate.
//!
//! Functional core: [`figures`] takes the merged history and a period, no
//! I/O. The agents record one entry per host and operation, so entries are
//! first grouped into changes: a change is the deploys of one release that
//! started within [`SAME_CHANGE`] of each other (one fleet rollout, its
//! hosts and waves). Refusals (bad config, registry, lock, denied) changed
//! nothing and are not changes.
//!
//! Definitions (stated in the output too):
//! - a change **failed** when a host's deploy of it failed its health gate
//!   (the agent put the previous release back), or a rollback later took a
//!   host off it;
//! - **time to restore** of a failed change: for a failed health gate, the
//!   failing deploy's duration (the longest the bad release could have
//!   served, observation window included); for a rollback, from the end of
//!   the change's last deploy to the end of the rollback;
//! - **rollback rate**: operator rollbacks (not the automatic ones, which
//!   count as failed changes) per change.
//!
//! - **lead time** of a change that succeeded: from its commit's time (the
//!   `--commit-time` its deploy was given) to the end of its last deploy.
//!   Changes deployed without a commit time are left out, never guessed.
//!
//! The output says what it counted: the window, when the hosts' history
//! begins (per-day rates are over the whole window), how many deploys made
//! the changes, and why the others were not counted (refused, in progress,
//! outside the window).

use std::collections::BTreeMap;
use std::time::Duration;

use deploy_protocol::{HistoryEntry, OperationKind, Outcome};
use jiff::Timestamp;
use serde::Serialize;

/// Deploys of one release that start within this of the previous one are
/// one change (a fleet rollout's waves, its pauses included).
pub const SAME_CHANGE: Duration = Duration::from_secs(3600);

/// The figures of one period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub since: String,
    pub until: String,
    pub days: f64,
    /// Changes whose every deploy succeeded and that no rollback undid.
    pub deployments: usize,
    pub deployments_per_day: f64,
    pub changes: usize,
    pub failed_changes: usize,
    /// `failed_changes / changes`; `None` without changes.
    pub change_failure_rate: Option<f64>,
    /// Median and worst, in milliseconds; `None` without failures.
    pub time_to_restore_median_ms: Option<u64>,
    pub time_to_restore_worst_ms: Option<u64>,
    pub rollbacks: usize,
    /// `rollbacks / changes`; `None` without changes.
    pub rollback_rate: Option<f64>,
    /// Median lead time over the successful changes that had a commit time.
    pub lead_time_median_ms: Option<u64>,
    /// How many changes that median is of.
    pub lead_time_changes: usize,
    pub failures: Vec<FailedChange>,
    /// When the oldest operation any host recorded started (`None`: none).
    pub history_begins: Option<String>,
    /// The deploys (one per host) that made the changes.
    pub deploys_counted: usize,
    /// The deploys that were not counted, and why.
    pub not_counted: NotCounted,
}

/// Deploys (one per host) left out of the figures, by reason.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct NotCounted {
    /// Ended before any change, by outcome (`config_error`, `locked`…).
    pub refused: BTreeMap<String, usize>,
    /// No ending recorded yet.
    pub in_progress: usize,
    /// Started before the window.
    pub before_window: usize,
    /// Started at or after its end: a host's clock ahead of this one's?
    pub after_window: usize,
    /// A start time that is not a timestamp.
    pub unreadable: usize,
}

impl NotCounted {
    fn is_empty(&self) -> bool {
        *self == NotCounted::default()
    }

    /// `2 refused (config_error 1, locked 1), 1 in progress, …`.
    fn text(&self) -> String {
        let mut parts = Vec::new();
        let refused: usize = self.refused.values().sum();
        if refused > 0 {
            let by: Vec<String> = self
                .refused
                .iter()
                .map(|(o, n)| format!("{o} {n}"))
                .collect();
            parts.push(format!(
                "{refused} refused before changing anything ({})",
                by.join(", ")
            ));
        }
        if self.in_progress > 0 {
            parts.push(format!("{} still in progress", self.in_progress));
        }
        if self.before_window > 0 {
            parts.push(format!("{} before the window", self.before_window));
        }
        if self.after_window > 0 {
            parts.push(format!(
                "{} after its end (is a host's clock ahead of this one?)",
                self.after_window
            ));
        }
        if self.unreadable > 0 {
            parts.push(format!("{} with an unreadable start time", self.unreadable));
        }
        parts.join(", ")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedChange {
    pub release: String,
    pub started_at: String,
    /// What failed it: `health gate failed on HOST: …` or `rolled back on HOST`.
    pub why: String,
    pub restored_after_ms: Option<u64>,
}

/// One operation of one host, with parsed times.
struct Op<'a> {
    host: &'a str,
    entry: &'a HistoryEntry,
    started: Timestamp,
    finished: Option<Timestamp>,
}

/// A change: the deploys of one release close together in time.
struct Change<'a> {
    release: &'a str,
    ops: Vec<&'a Op<'a>>,
}

impl Change<'_> {
    fn started(&self) -> Timestamp {
        self.ops.iter().map(|o| o.started).min().unwrap_or_default()
    }
    fn last_start(&self) -> Timestamp {
        self.ops.iter().map(|o| o.started).max().unwrap_or_default()
    }
    fn finished(&self) -> Option<Timestamp> {
        self.ops.iter().filter_map(|o| o.finished).max()
    }
}

fn changed_something(o: Option<Outcome>) -> bool {
    matches!(
        o,
        Some(Outcome::Succeeded | Outcome::HealthGateFailed | Outcome::Interrupted)
    )
}

/// The figures of `[since, until)` from `history` (host, entry).
pub fn figures(history: &[(&str, HistoryEntry)], since: Timestamp, until: Timestamp) -> Figures {
    let mut not_counted = NotCounted::default();
    for (_, e) in history
        .iter()
        .filter(|(_, e)| e.operation == OperationKind::Deploy)
    {
        match e.started_at.parse::<Timestamp>() {
            Err(_) => not_counted.unreadable += 1,
            Ok(t) if t < since => not_counted.before_window += 1,
            Ok(t) if t >= until => not_counted.after_window += 1,
            Ok(_) => match e.outcome {
                None => not_counted.in_progress += 1,
                Some(o) if !changed_something(Some(o)) => {
                    *not_counted
                        .refused
                        .entry(o.as_str().to_string())
                        .or_insert(0) += 1
                }
                Some(_) => {}
            },
        }
    }
    let history_begins = history
        .iter()
        .filter_map(|(_, e)| e.started_at.parse::<Timestamp>().ok())
        .min()
        .map(|t| format!("{t:.0}"));
    let mut ops: Vec<Op> = history
        .iter()
        .filter_map(|(host, entry)| {
            let started = entry.started_at.parse::<Timestamp>().ok()?;
            let finished = entry
                .finished_at
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok());
            (started >= since && started < until && changed_something(entry.outcome)).then_some(
                Op {
                    host,
                    entry,
                    started,
                    finished,
                },
            )
        })
        .collect();
    ops.sort_by_key(|o| o.started);

    // Deploys grouped into changes, per release, in time order; a rollback
    // off a release ends its change (deploying it again is another one).
    let mut changes: Vec<Change> = Vec::new();
    let mut open: BTreeMap<&str, usize> = BTreeMap::new();
    for op in &ops {
        if op.entry.operation == OperationKind::Rollback {
            if op.entry.outcome == Some(Outcome::Succeeded)
                && let Some(left) = op.entry.previous.as_deref()
            {
                open.remove(left);
            }
            continue;
        }
        if op.entry.operation != OperationKind::Deploy {
            continue;
        }
        let release = op.entry.release.as_str();
        let joins = open.get(release).is_some_and(|&i| {
            let gap = op.started.duration_since(changes[i].last_start());
            gap.unsigned_abs() <= SAME_CHANGE
        });
        if joins {
            if let Some(&i) = open.get(release) {
                changes[i].ops.push(op);
            }
        } else {
            open.insert(release, changes.len());
            changes.push(Change {
                release,
                ops: vec![op],
            });
        }
    }
    // Operator rollbacks, grouped the same way (by the release they left).
    let rollback_ops: Vec<&Op> = ops
        .iter()
        .filter(|o| {
            o.entry.operation == OperationKind::Rollback
                && o.entry.outcome == Some(Outcome::Succeeded)
        })
        .collect();
    let mut rollbacks = 0;
    let mut last_rollback: Option<(&str, Timestamp)> = None;
    for op in &rollback_ops {
        let from = op.entry.previous.as_deref().unwrap_or("");
        let same = last_rollback.is_some_and(|(r, at)| {
            r == from && op.started.duration_since(at).unsigned_abs() <= SAME_CHANGE
        });
        if !same {
            rollbacks += 1;
        }
        last_rollback = Some((from, op.started));
    }

    let mut failures = Vec::new();
    let mut failed = vec![false; changes.len()];
    for (i, change) in changes.iter().enumerate() {
        let gate = change
            .ops
            .iter()
            .find(|o| o.entry.outcome == Some(Outcome::HealthGateFailed));
        if let Some(o) = gate {
            let restored = o.finished.map(|f| ms(f.duration_since(o.started)));
            failures.push(FailedChange {
                release: change.release.to_string(),
                started_at: format!("{:.0}", change.started()),
                why: format!(
                    "health gate failed on {}: {}",
                    o.host,
                    o.entry.message.as_deref().unwrap_or("no message")
                ),
                restored_after_ms: restored,
            });
            failed[i] = true;
            continue;
        }
        // A later rollback off this release (before another change of it).
        let next_change = changes
            .iter()
            .filter(|c| c.release == change.release && c.started() > change.started())
            .map(Change::started)
            .min();
        let undone = rollback_ops.iter().find(|r| {
            r.entry.previous.as_deref() == Some(change.release)
                && r.started >= change.started()
                && next_change.is_none_or(|next| r.started < next)
        });
        if let Some(r) = undone {
            let restored = match (change.finished(), r.finished) {
                (Some(done), Some(back)) if back >= done => Some(ms(back.duration_since(done))),
                _ => None,
            };
            failures.push(FailedChange {
                release: change.release.to_string(),
                started_at: format!("{:.0}", change.started()),
                why: format!("rolled back on {}", r.host),
                restored_after_ms: restored,
            });
            failed[i] = true;
        }
    }

    let mut leads: Vec<u64> = changes
        .iter()
        .zip(&failed)
        .filter(|(_, failed)| !**failed)
        .map(|(c, _)| c)
        .filter_map(|c| {
            let commit = c
                .ops
                .iter()
                .find_map(|o| o.entry.commit_time.as_deref())?
                .parse::<Timestamp>()
                .ok()?;
            let done = c.finished()?;
            (done >= commit).then(|| ms(done.duration_since(commit)))
        })
        .collect();
    leads.sort_unstable();

    let days = until.duration_since(since).as_secs_f64() / 86_400.0;
    let n = changes.len();
    let deployments = n - failures.len();
    let mut restores: Vec<u64> = failures
        .iter()
        .filter_map(|f| f.restored_after_ms)
        .collect();
    restores.sort_unstable();
    let rate = |k: usize| (n > 0).then(|| k as f64 / n as f64);
    Figures {
        since: format!("{since:.0}"),
        until: format!("{until:.0}"),
        days,
        deployments,
        deployments_per_day: if days > 0.0 {
            deployments as f64 / days
        } else {
            0.0
        },
        changes: n,
        failed_changes: failures.len(),
        change_failure_rate: rate(failures.len()),
        time_to_restore_median_ms: median(&restores),
        time_to_restore_worst_ms: restores.last().copied(),
        rollbacks,
        rollback_rate: rate(rollbacks),
        lead_time_median_ms: median(&leads),
        lead_time_changes: leads.len(),
        failures,
        history_begins,
        deploys_counted: changes.iter().map(|c| c.ops.len()).sum(),
        not_counted,
    }
}

fn ms(d: jiff::SignedDuration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(0)
}

fn median(sorted: &[u64]) -> Option<u64> {
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}

/// The figures as text, with their definitions and what was counted.
pub fn text(env: &str, project: &str, hosts: usize, f: &Figures) -> String {
    let dur = |ms: u64| humantime::format_duration(Duration::from_millis(ms)).to_string();
    // A rate over no change is not 0% or 100%: say there was none.
    let pct = |r: Option<f64>| {
        r.map_or("none: no change in the window".to_string(), |r| {
            format!("{:.1}%", r * 100.0)
        })
    };
    let mut s = format!("DORA figures of {env} ({project}) from {hosts} host(s)' history\n");
    s.push_str(&format!(
        "  window                {} .. {} ({:.1} days)\n",
        f.since, f.until, f.days
    ));
    match &f.history_begins {
        None => s.push_str("  history               no operation recorded on any host\n"),
        Some(first) if *first > f.since => {
            let span = match (first.parse::<Timestamp>(), f.until.parse::<Timestamp>()) {
                (Ok(a), Ok(b)) if b > a => {
                    format!(", {} before the window ends", dur(ms(b.duration_since(a))))
                }
                _ => String::new(),
            };
            s.push_str(&format!(
                "  history               begins {first}{span}: per-day rates are over the whole {:.1} days\n",
                f.days
            ))
        }
        Some(_) => {}
    }
    s.push_str(&format!(
        "  counted               {} deploy(s) (one per host), making {} change(s) (a release's deploys within {} of each other are one change)\n",
        f.deploys_counted,
        f.changes,
        dur(u64::try_from(SAME_CHANGE.as_millis()).unwrap_or(u64::MAX))
    ));
    if !f.not_counted.is_empty() {
        s.push_str(&format!(
            "  not counted           {}\n",
            f.not_counted.text()
        ));
    }
    s.push_str(&format!(
        "  deployment frequency  {} deployment(s) (changes that succeeded), {:.2} per day, {:.1} per week\n",
        f.deployments,
        f.deployments_per_day,
        f.deployments_per_day * 7.0
    ));
    s.push_str(&format!(
        "  change failure rate   {} of {} change(s) failed: {}\n",
        f.failed_changes,
        f.changes,
        pct(f.change_failure_rate)
    ));
    let restore = match (f.time_to_restore_median_ms, f.time_to_restore_worst_ms) {
        (Some(median), Some(worst)) => format!("median {}, worst {}", dur(median), dur(worst)),
        _ if f.changes == 0 => "none: no change in the window".to_string(),
        _ if f.failed_changes == 0 => "no failure yet".to_string(),
        _ => "unknown: no failed change has a recorded restore time".to_string(),
    };
    s.push_str(&format!("  time to restore       {restore}\n"));
    s.push_str(&format!(
        "  rollback rate         {} operator rollback(s) for {} change(s): {}\n",
        f.rollbacks,
        f.changes,
        pct(f.rollback_rate)
    ));
    if f.lead_time_changes == 0 {
        s.push_str(
            "  lead time             unknown: no successful change was deployed with --commit-time\n",
        );
    } else {
        s.push_str(&format!(
            "  lead time             median {} over {} change(s) with a commit time\n",
            dur(f.lead_time_median_ms.unwrap_or_default()),
            f.lead_time_changes
        ));
    }
    for x in &f.failures {
        s.push_str(&format!(
            "  failed: {} at {}: {} ({})\n",
            x.release,
            x.started_at,
            x.why,
            x.restored_after_ms.map_or_else(
                || "restore time unknown: its end or its rollback's is not recorded".to_string(),
                |ms| format!("restored after {}", dur(ms))
            )
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        op: OperationKind,
        release: &str,
        previous: Option<&str>,
        outcome: Option<Outcome>,
        started: &str,
        secs: i64,
    ) -> HistoryEntry {
        let start: Timestamp = started.parse().unwrap();
        let end = start + jiff::SignedDuration::from_secs(secs);
        HistoryEntry {
            operation: op,
            project: "shop".into(),
            release: release.into(),
            previous: previous.map(str::to_string),
            outcome,
            who: "ci".into(),
            started_at: format!("{start}"),
            finished_at: outcome.map(|_| format!("{end}")),
            duration_ms: Some(secs as u64 * 1000),
            message: (outcome == Some(Outcome::HealthGateFailed))
                .then(|| "error rate 20% over 2m".to_string()),
            commit_time: None,
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    use OperationKind::{Deploy, Rollback};
    use Outcome::{ConfigError, HealthGateFailed, Succeeded};

    #[test]
    fn a_fleet_rollout_is_one_change_and_refusals_are_none() {
        let h = vec![
            (
                "a",
                entry(
                    Deploy,
                    "r1",
                    None,
                    Some(Succeeded),
                    "2026-11-02T10:00:00Z",
                    30,
                ),
            ),
            (
                "b",
                entry(
                    Deploy,
                    "r1",
                    None,
                    Some(Succeeded),
                    "2026-11-02T10:00:40Z",
                    30,
                ),
            ),
            (
                "c",
                entry(
                    Deploy,
                    "r1",
                    None,
                    Some(Succeeded),
                    "2026-11-02T10:01:20Z",
                    30,
                ),
            ),
            (
                "a",
                entry(
                    Deploy,
                    "r2",
                    Some("r1"),
                    Some(ConfigError),
                    "2026-11-03T10:00:00Z",
                    1,
                ),
            ),
            (
                "a",
                entry(Deploy, "r2", Some("r1"), None, "2026-11-03T11:00:00Z", 1),
            ),
            (
                "a",
                entry(
                    Deploy,
                    "r3",
                    Some("r1"),
                    Some(Succeeded),
                    "2026-11-04T10:00:00Z",
                    30,
                ),
            ),
            // Before the period.
            (
                "a",
                entry(
                    Deploy,
                    "r0",
                    None,
                    Some(Succeeded),
                    "2026-10-01T10:00:00Z",
                    30,
                ),
            ),
        ];
        let f = figures(&h, ts("2026-11-01T00:00:00Z"), ts("2026-11-11T00:00:00Z"));
        assert_eq!((f.changes, f.deployments, f.failed_changes), (2, 2, 0));
        assert_eq!(f.change_failure_rate, Some(0.0));
        assert!((f.deployments_per_day - 0.2).abs() < 1e-9, "{f:?}");
        assert_eq!(f.time_to_restore_median_ms, None);
        assert_eq!(f.rollbacks, 0);
    }

    #[test]
    fn the_same_release_again_later_is_another_change() {
        let h = vec![
            (
                "a",
                entry(
                    Deploy,
                    "r1",
                    None,
                    Some(Succeeded),
                    "2026-11-02T10:00:00Z",
                    30,
                ),
            ),
            (
                "a",
                entry(
                    Deploy,
                    "r1",
                    None,
                    Some(Succeeded),
                    "2026-11-05T10:00:00Z",
                    30,
                ),
            ),
        ];
        let f = figures(&h, ts("2026-11-01T00:00:00Z"), ts("2026-11-11T00:00:00Z"));
        assert_eq!(f.changes, 2);
    }

    #[test]
    fn failed_gates_and_rollbacks_fail_changes_with_their_restore_times() {
        let h = vec![
            (
                "a",
                entry(
                    Deploy,
                    "r1",
                    None,
                    Some(Succeeded),
                    "2026-11-02T10:00:00Z",
                    30,
                ),
            ),
            // r2: the canary's gate failed; the agent restored r1 in 90 s.
            (
                "a",
                entry(
                    Deploy,
                    "r2",
                    Some("r1"),
                    Some(HealthGateFailed),
                    "2026-11-03T10:00:00Z",
                    90,
                ),
            ),
            // r3 deployed on two hosts, rolled back by an operator 10 min later.
            (
                "a",
                entry(
                    Deploy,
                    "r3",
                    Some("r1"),
                    Some(Succeeded),
                    "2026-11-04T10:00:00Z",
                    30,
                ),
            ),
            (
                "b",
                entry(
                    Deploy,
                    "r3",
                    Some("r1"),
                    Some(Succeeded),
                    "2026-11-04T10:00:40Z",
                    20,
                ),
            ),
            (
                "a",
                entry(
                    Rollback,
                    "r1",
                    Some("r3"),
                    Some(Succeeded),
                    "2026-11-04T10:10:00Z",
                    2,
                ),
            ),
            (
                "b",
                entry(
                    Rollback,
                    "r1",
                    Some("r3"),
                    Some(Succeeded),
                    "2026-11-04T10:10:00Z",
                    3,
                ),
            ),
            (
                "a",
                entry(
                    Deploy,
                    "r4",
                    Some("r1"),
                    Some(Succeeded),
                    "2026-11-05T10:00:00Z",
                    30,
                ),
            ),
        ];
        let f = figures(&h, ts("2026-11-01T00:00:00Z"), ts("2026-11-11T00:00:00Z"));
        assert_eq!((f.changes, f.failed_changes, f.deployments), (4, 2, 2));
        assert_eq!(f.change_failure_rate, Some(0.5));
        assert_eq!(f.rollbacks, 1, "one fleet rollback, two hosts");
        assert_eq!(f.rollback_rate, Some(0.25));
        assert_eq!(f.failures[0].release, "r2");
        assert!(
            f.failures[0]
                .why
                .contains("health gate failed on a: error rate"),
            "{f:?}"
        );
        assert_eq!(f.failures[0].restored_after_ms, Some(90_000));
        assert_eq!(f.failures[1].release, "r3");
        assert_eq!(f.failures[1].why, "rolled back on a");
        // r3's last deploy ended 10:01:00; the rollback (host a) at 10:10:02.
        assert_eq!(f.failures[1].restored_after_ms, Some(542_000));
        assert_eq!(f.time_to_restore_median_ms, Some((90_000 + 542_000) / 2));
        assert_eq!(f.time_to_restore_worst_ms, Some(542_000));
        let t = text("production", "shop", 2, &f);
        assert!(t.contains("2 of 4 change(s) failed: 50.0%"), "{t}");
        assert!(t.contains("lead time             unknown"), "{t}");
        assert_eq!(f.lead_time_median_ms, None);
    }

    #[test]
    fn lead_time_is_from_the_commit_to_the_end_of_the_change() {
        let with_commit = |host: &'static str, release: &str, commit: &str, started: &str, secs| {
            let mut e = entry(Deploy, release, None, Some(Succeeded), started, secs);
            e.commit_time = Some(commit.to_string());
            (host, e)
        };
        let h = vec![
            // r1: committed 09:00, its last host done at 10:01:30.
            with_commit(
                "a",
                "r1",
                "2026-11-02T09:00:00Z",
                "2026-11-02T10:00:00Z",
                30,
            ),
            with_commit(
                "b",
                "r1",
                "2026-11-02T09:00:00Z",
                "2026-11-02T10:01:00Z",
                30,
            ),
            // r2: committed 11:00, done 12:00:30.
            with_commit(
                "a",
                "r2",
                "2026-11-02T11:00:00Z",
                "2026-11-02T12:00:00Z",
                30,
            ),
            // r3 failed its gate: no lead time.
            (
                "a",
                entry(
                    Deploy,
                    "r3",
                    None,
                    Some(HealthGateFailed),
                    "2026-11-02T13:00:00Z",
                    30,
                ),
            ),
            // r4 without a commit time: left out.
            (
                "a",
                entry(
                    Deploy,
                    "r4",
                    None,
                    Some(Succeeded),
                    "2026-11-02T14:00:00Z",
                    30,
                ),
            ),
        ];
        let f = figures(&h, ts("2026-11-01T00:00:00Z"), ts("2026-11-11T00:00:00Z"));
        assert_eq!(f.lead_time_changes, 2);
        // (1h01m30s + 1h00m30s) / 2
        assert_eq!(f.lead_time_median_ms, Some((3_690_000 + 3_630_000) / 2));
        let t = text("e", "p", 2, &f);
        assert!(
            t.contains("lead time             median 1h 1m over 2 change(s)"),
            "{t}"
        );
    }

    #[test]
    fn nothing_recorded_gives_no_rates() {
        let f = figures(&[], ts("2026-11-01T00:00:00Z"), ts("2026-11-11T00:00:00Z"));
        assert_eq!(
            (f.changes, f.change_failure_rate, f.rollback_rate),
            (0, None, None)
        );
        let t = text("e", "p", 1, &f);
        assert!(!t.contains("n/a"), "{t}");
        assert!(
            t.contains(
                "change failure rate   0 of 0 change(s) failed: none: no change in the window"
            ),
            "{t}"
        );
        assert!(
            t.contains("time to restore       none: no change in the window"),
            "{t}"
        );
        assert!(t.contains("no operation recorded on any host"), "{t}");
    }

    fn ok(release: &str, previous: Option<&str>, started: &str) -> (&'static str, HistoryEntry) {
        (
            "a",
            entry(Deploy, release, previous, Some(Succeeded), started, 40),
        )
    }

    #[test]
    fn a_first_morning_of_six_successful_deploys_reads_as_such() {
        let h = vec![
            ok("r1", None, "2026-11-03T08:05:00Z"),
            ok("r2", Some("r1"), "2026-11-03T08:40:00Z"),
            ok("r3", Some("r2"), "2026-11-03T09:20:00Z"),
            ok("r4", Some("r3"), "2026-11-03T10:00:00Z"),
            ok("r5", Some("r4"), "2026-11-03T11:10:00Z"),
            ok("r6", Some("r5"), "2026-11-03T11:55:00Z"),
        ];
        let f = figures(&h, ts("2026-10-04T12:00:00Z"), ts("2026-11-03T12:00:00Z"));
        assert_eq!((f.changes, f.deployments, f.failed_changes), (6, 6, 0));
        assert_eq!(f.deploys_counted, 6);
        assert_eq!(f.change_failure_rate, Some(0.0));
        assert!(f.failures.is_empty());
        assert!(f.not_counted.is_empty());
        assert_eq!(f.history_begins.as_deref(), Some("2026-11-03T08:05:00Z"));
        let t = text("production", "shop", 1, &f);
        for said in [
            "window                2026-10-04T12:00:00Z .. 2026-11-03T12:00:00Z (30.0 days)",
            "history               begins 2026-11-03T08:05:00Z, 3h 55m before the window ends: per-day rates are over the whole 30.0 days",
            "counted               6 deploy(s) (one per host), making 6 change(s)",
            "deployment frequency  6 deployment(s) (changes that succeeded), 0.20 per day",
            "change failure rate   0 of 6 change(s) failed: 0.0%",
            "time to restore       no failure yet",
            "rollback rate         0 operator rollback(s) for 6 change(s): 0.0%",
        ] {
            assert!(t.contains(said), "{said:?} in:\n{t}");
        }
        assert!(!t.contains("n/a") && !t.contains("not counted"), "{t}");
    }

    #[test]
    fn deploys_not_counted_are_said_with_why() {
        let h = vec![
            ok("r1", None, "2026-11-03T08:05:00Z"),
            (
                "a",
                entry(
                    Deploy,
                    "r2",
                    Some("r1"),
                    Some(ConfigError),
                    "2026-11-03T08:10:00Z",
                    1,
                ),
            ),
            (
                "b",
                entry(
                    Deploy,
                    "r2",
                    Some("r1"),
                    Some(Outcome::Locked),
                    "2026-11-03T08:11:00Z",
                    1,
                ),
            ),
            (
                "a",
                entry(Deploy, "r3", Some("r1"), None, "2026-11-03T11:50:00Z", 1),
            ),
            ok("r0", None, "2026-10-01T08:05:00Z"),
            // A host whose clock is ahead of the controller's.
            ok("r9", Some("r1"), "2026-11-03T12:30:00Z"),
        ];
        let f = figures(&h, ts("2026-11-01T00:00:00Z"), ts("2026-11-03T12:00:00Z"));
        assert_eq!((f.changes, f.deploys_counted), (1, 1));
        let n = &f.not_counted;
        assert_eq!(
            n.refused,
            BTreeMap::from([("config_error".to_string(), 1), ("locked".to_string(), 1)])
        );
        assert_eq!(
            (n.in_progress, n.before_window, n.after_window, n.unreadable),
            (1, 1, 1, 0)
        );
        let t = text("production", "shop", 2, &f);
        assert!(
            t.contains(
                "not counted           2 refused before changing anything (config_error 1, locked 1), \
                 1 still in progress, 1 before the window, 1 after its end (is a host's clock ahead of this one?)"
            ),
            "{t}"
        );
        // The history began before the window: no note about it.
        assert!(!t.contains("history               begins"), "{t}");
    }

    #[test]
    fn a_rollback_fails_only_the_change_it_left() {
        let h = vec![
            ok("r1", None, "2026-11-03T08:00:00Z"),
            ok("r2", Some("r1"), "2026-11-03T08:10:00Z"),
            // r2 rolled back, fixed and deployed again within the hour:
            // another change of r2, which succeeded.
            (
                "a",
                entry(
                    Rollback,
                    "r1",
                    Some("r2"),
                    Some(Succeeded),
                    "2026-11-03T08:20:00Z",
                    2,
                ),
            ),
            ok("r2", Some("r1"), "2026-11-03T08:30:00Z"),
            ok("r3", Some("r2"), "2026-11-03T09:00:00Z"),
        ];
        let f = figures(&h, ts("2026-11-01T00:00:00Z"), ts("2026-11-04T00:00:00Z"));
        assert_eq!((f.changes, f.failed_changes, f.deployments), (4, 1, 3));
        assert_eq!(f.failures[0].release, "r2");
        assert_eq!(f.failures[0].started_at, "2026-11-03T08:10:00Z");
        // From the end of r2's deploy (08:10:40) to the rollback's (08:20:02).
        assert_eq!(f.failures[0].restored_after_ms, Some(562_000));
        let t = text("production", "shop", 1, &f);
        assert!(
            t.contains("time to restore       median 9m 22s, worst 9m 22s"),
            "{t}"
        );
        assert!(
            t.contains(
                "failed: r2 at 2026-11-03T08:10:00Z: rolled back on a (restored after 9m 22s)"
            ),
            "{t}"
        );
    }
}
