//! Read-only aggregates for the Prometheus metrics (`GET /metrics`).
//!
//! The counters are derived from the store rather than kept in memory, so
//! that a restarted or upgraded agent reports the same totals: Prometheus
//! treats a counter that goes back to zero as a reset, which would make
//! `increase(deploy_agent_operations_total[1d])` lie across every upgrade.

use rusqlite::params;

use super::{Store, StoreError, opt_u64};

/// Finished operations of one project, kind and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationCount {
    pub project: String,
    /// `deploy`, `rollback` (the `OperationKind` names).
    pub kind: String,
    /// An `Outcome` name, e.g. `succeeded`, `health_gate_failed`.
    pub outcome: String,
    pub count: u64,
}

/// The duration distribution of finished operations of one kind and outcome,
/// as a Prometheus histogram wants it: cumulative counts per upper bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationBuckets {
    pub kind: String,
    pub outcome: String,
    /// `cumulative[i]`: operations that took at most `bounds_ms[i]`.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_ms: u64,
}

/// Requests refused before any change (config, registry, lock, environment
/// errors): they are audited, not stored as operations. Counted
/// incrementally from `after_seq`, because the audit log is append-only and
/// grows for years: each scrape reads only the records added since the last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusals {
    /// The highest audit sequence number included.
    pub through_seq: i64,
    /// (project, kind, outcome) → count, for records after `after_seq`.
    pub counts: Vec<OperationCount>,
}

impl Store {
    /// Finished operations by project, kind and outcome.
    pub fn operation_counts(&self) -> Result<Vec<OperationCount>, StoreError> {
        const OP: &str = "counting operations for metrics";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT project, kind, outcome, COUNT(*) FROM operations
                 WHERE outcome IS NOT NULL GROUP BY project, kind, outcome
                 ORDER BY project, kind, outcome",
            )
            .map_err(self.sql(OP))?;
        stmt.query_map([], |r| {
            Ok(OperationCount {
                project: r.get(0)?,
                kind: r.get(1)?,
                outcome: r.get(2)?,
                count: opt_u64(r, 3)?.unwrap_or(0),
            })
        })
        .map_err(self.sql(OP))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(self.sql(OP))
    }

    /// Durations of finished operations by kind and outcome, bucketed by
    /// `bounds_ms` (ascending) in one query.
    pub fn operation_durations(
        &self,
        bounds_ms: &[u64],
    ) -> Result<Vec<DurationBuckets>, StoreError> {
        const OP: &str = "summing operation durations for metrics";
        // The bounds are our own constants, written as integer literals.
        let buckets: String = bounds_ms
            .iter()
            .map(|b| format!(", SUM(duration_ms <= {b})"))
            .collect();
        let sql = format!(
            "SELECT kind, outcome, COUNT(*), SUM(duration_ms){buckets} FROM operations
             WHERE outcome IS NOT NULL AND duration_ms IS NOT NULL
             GROUP BY kind, outcome ORDER BY kind, outcome"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql).map_err(self.sql(OP))?;
        stmt.query_map([], |r| {
            let mut cumulative = Vec::with_capacity(bounds_ms.len());
            for i in 0..bounds_ms.len() {
                cumulative.push(opt_u64(r, 4 + i)?.unwrap_or(0));
            }
            Ok(DurationBuckets {
                kind: r.get(0)?,
                outcome: r.get(1)?,
                count: opt_u64(r, 2)?.unwrap_or(0),
                sum_ms: opt_u64(r, 3)?.unwrap_or(0),
                cumulative,
            })
        })
        .map_err(self.sql(OP))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(self.sql(OP))
    }

    /// Refused requests recorded in the audit log after `after_seq`.
    pub fn refusals_since(&self, after_seq: i64) -> Result<Refusals, StoreError> {
        const OP: &str = "counting refused requests for metrics";
        let conn = self.conn();
        // Fix the upper end first: records appended while we count are left
        // for the next call instead of being counted twice or missed.
        let through_seq: i64 = conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))
            .map_err(self.sql(OP))?;
        let mut stmt = conn
            .prepare(
                "SELECT COALESCE(project, ''), substr(action, 1, length(action) - length('.refused')),
                        COALESCE(outcome, 'unknown'), COUNT(*)
                 FROM audit WHERE seq > ?1 AND seq <= ?2 AND action LIKE '%.refused'
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            )
            .map_err(self.sql(OP))?;
        let counts = stmt
            .query_map(params![after_seq, through_seq], |r| {
                Ok(OperationCount {
                    project: r.get(0)?,
                    kind: r.get(1)?,
                    outcome: r.get(2)?,
                    count: opt_u64(r, 3)?.unwrap_or(0),
                })
            })
            .map_err(self.sql(OP))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql(OP))?;
        Ok(Refusals {
            through_seq: through_seq.max(after_seq),
            counts,
        })
    }
}
