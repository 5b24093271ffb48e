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

    // Deploys grouped into changes, per release, in time order.
    let mut changes: Vec<Change> = Vec::new();
    let mut open: BTreeMap<&str, usize> = BTreeMap::new();
    for op in ops
        .iter()
        .filter(|o| o.entry.operation == OperationKind::Deploy)
    {
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
        let undone = rollback_ops.iter().find(|r| {
            r.entry.previous.as_deref() == Some(change.release) && r.started >= change.started()
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

/// The figures as text, with their definitions.
pub fn text(env: &str, project: &str, hosts: usize, f: &Figures) -> String {
    let pct = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{:.1}%", r * 100.0));
    let dur = |ms: Option<u64>| {
        ms.map_or("n/a".to_string(), |ms| {
            humantime::format_duration(Duration::from_millis(ms)).to_string()
        })
    };
    let mut s = format!(
        "DORA figures of {env} ({project}), {} .. {} ({:.1} days), from {hosts} host(s)' history\n",
        f.since, f.until, f.days
    );
    s.push_str(&format!(
        "  deployment frequency  {} deployment(s), {:.2} per day, {:.1} per week\n",
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
    s.push_str(&format!(
        "  time to restore       median {}, worst {}\n",
        dur(f.time_to_restore_median_ms),
        dur(f.time_to_restore_worst_ms)
    ));
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
            dur(f.lead_time_median_ms),
            f.lead_time_changes
        ));
    }
    for x in &f.failures {
        s.push_str(&format!(
            "  failed: {} at {}: {} (restored after {})\n",
            x.release,
            x.started_at,
            x.why,
            dur(x.restored_after_ms)
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
        assert!(text("e", "p", 1, &f).contains("n/a"));
    }
}
