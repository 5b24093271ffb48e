//! The embedded state store: releases kept for rollback, which release serves
//! each project, operations in progress, images the agent pulled, and the
//! tamper-evident audit log (see [`audit`]).
//!
//! One SQLite file is shared by the control daemon and the CLI, which are
//! separate processes, hence:
//! - WAL mode, so readers (`deploy-agent status`) never block the daemon's
//!   writes and vice versa;
//! - `synchronous=FULL`, so a record is on disk before a method returns: the
//!   engine persists an operation's state before each step and must be able
//!   to trust it after a power cut;
//! - a 10 s busy timeout, so two writers queue instead of failing;
//! - every read-then-write runs in an IMMEDIATE transaction, because in WAL
//!   mode a deferred transaction that upgrades to a write can fail with
//!   `SQLITE_BUSY` without ever calling the busy handler.
//!
//! All methods are synchronous: each is one short transaction (milliseconds),
//! cheaper than a hop to a blocking thread pool.
//!
//! Timestamps are UTC RFC 3339 strings with millisecond precision (see
//! [`timestamp_now`]); a fixed width keeps them comparable as text.

pub mod audit;
pub mod lease;
mod schema;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::wire::{self, OperationKind, Outcome};

pub use audit::{
    ACK_ACTION, AcknowledgedBreak, AuditAcknowledgement, AuditBreak, AuditEntry, AuditHead,
    AuditRecord, AuditReport, AuditVerification, BreakKind, GENESIS_HASH, InvalidAuditHead,
    TAMPER_ACTION,
};
pub use stats::{DurationBuckets, OperationCount, Refusals};

/// How long a statement waits for another process's write lock before
/// giving up. Writes are milliseconds long; 10 s means something is wrong.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong in the store. Each message says what happened
/// and what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open state store {}: {source}; check --state-dir and permissions \
         (the directory must exist and be writable: SQLite creates -wal and -shm files next to the database)",
        path.display()
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state store {} cannot use WAL journal mode (SQLite kept {mode:?}); \
         the daemon and the CLI share it safely only in WAL mode: put --state-dir on a local filesystem",
        path.display()
    )]
    NoWal { path: PathBuf, mode: String },
    #[error(
        "state store {} has schema version {found}, but this deploy-agent only knows up to {supported}; \
         it was written by a newer deploy-agent: upgrade this binary (do not downgrade a host's agent)",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "cannot migrate state store {} to schema version {version}: {source}; \
         nothing was changed (the migration is one transaction); check disk space and permissions",
        path.display()
    )]
    Migrate {
        path: PathBuf,
        version: i64,
        source: rusqlite::Error,
    },
    #[error(
        "state store {} is busy: another deploy-agent process held its write lock for more than {}s while {op}; \
         retry, and check for a stuck deploy-agent process",
        path.display(), BUSY_TIMEOUT.as_secs()
    )]
    Busy { path: PathBuf, op: &'static str },
    #[error(
        "state store {} failed while {op}: {source}; check disk space and permissions, \
         and run `deploy-agent audit verify` if the file may be damaged",
        path.display()
    )]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "state store {} holds an unreadable value while {op}: {detail}; \
         the file was edited outside deploy-agent or is damaged: run `deploy-agent audit verify` and restore from backup if needed",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        op: &'static str,
        detail: String,
    },
    #[error(
        "{what} is not in the state store; check the name (`deploy-agent history` lists what is known)"
    )]
    NotFound { what: String },
    #[error(
        "operation {id} has already finished; its record cannot change \
         (this is a bug in the caller, or two processes tried to finish the same operation)"
    )]
    OperationFinished { id: i64 },
    #[error("cannot {op} audit head file {}: {source}; check permissions on the state directory", path.display())]
    AuditHead {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "audit action {action:?} was not recorded: actions starting with \"audit.\" are reserved for the audit log's own records; \
         this is a bug in the caller"
    )]
    ReservedAuditAction { action: String },
    #[error(
        "nothing was acknowledged: {why}; `deploy-agent audit verify` lists the problems with their record numbers"
    )]
    AuditAcknowledge { why: String },
    #[error("{0}; use a head exactly as `deploy-agent audit head` printed it")]
    InvalidAuditHead(InvalidAuditHead),
}

/// The lifecycle of a release as the store sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// Being deployed now (or interrupted while being deployed).
    Deploying,
    /// Passed its health gate and served; a rollback target.
    Good,
    /// Failed its health gate; never a rollback target.
    Failed,
    /// Retention removed its containers and images; the record stays for history.
    Pruned,
}

impl ReleaseState {
    pub const ALL: [ReleaseState; 4] = [
        ReleaseState::Deploying,
        ReleaseState::Good,
        ReleaseState::Failed,
        ReleaseState::Pruned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseState::Deploying => "deploying",
            ReleaseState::Good => "good",
            ReleaseState::Failed => "failed",
            ReleaseState::Pruned => "pruned",
        }
    }

    /// The inverse of [`ReleaseState::as_str`].
    pub fn parse(s: &str) -> Option<ReleaseState> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for ReleaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of `ReleaseState::from_str`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown release state {0:?} (expected deploying, good, failed or pruned)")]
pub struct UnknownReleaseState(pub String);

impl FromStr for ReleaseState {
    type Err = UnknownReleaseState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReleaseState::parse(s).ok_or_else(|| UnknownReleaseState(s.to_owned()))
    }
}

/// One release of one project, kept so it can be rolled back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub project: String,
    pub release: String,
    /// UTC RFC 3339; use [`timestamp_now`] so that ordering is exact.
    pub created_at: String,
    pub state: ReleaseState,
    /// The configuration snapshot (opaque to the store). It can contain
    /// secrets from env files: keep the state directory private.
    pub spec_json: String,
    /// Service name to pinned image (`repo@sha256:…`).
    pub digests: BTreeMap<String, String>,
    /// Local image ids the release uses (for retention and pruning).
    pub image_ids: Vec<String>,
}

/// Which release serves a project.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Serving {
    pub current: Option<String>,
    pub previous: Option<String>,
    /// When `current` started serving (UTC RFC 3339); `None` when nothing serves.
    pub since: Option<String>,
}

/// What [`Store::begin_operation`] records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOperation {
    pub kind: OperationKind,
    pub project: String,
    /// The release the operation puts in service.
    pub release: String,
    /// The release serving when it started.
    pub previous: Option<String>,
    /// Who asked (unix user, certificate CN, `agent` for reconciliation).
    pub who: String,
    pub reason: Option<String>,
    /// When the deployed commit was made (RFC 3339), if the caller said.
    pub commit_time: Option<String>,
}

/// An operation that has not finished: what reconciliation resumes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub id: i64,
    pub kind: OperationKind,
    pub project: String,
    pub release: String,
    pub previous: Option<String>,
    pub who: String,
    /// The reason given when it began.
    pub reason: Option<String>,
    pub started_at: String,
    /// The last step saved with [`Store::save_step`] (the step about to run).
    pub step: Option<String>,
    pub state_json: Option<String>,
}

/// An image the agent has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub image_id: String,
    pub reference: String,
    /// True only if the image was absent before the agent pulled it; only
    /// such images may be pruned, so the agent never deletes an operator's image.
    pub pulled_by_agent: bool,
    pub first_seen: String,
}

/// Now, as the store writes timestamps: UTC, RFC 3339, exactly three
/// fractional digits (e.g. `2026-11-03T09:15:02.120Z`). The fixed width makes
/// string order equal time order.
pub use deploy_protocol::timestamp::now as timestamp_now;

/// The shared SQLite state file. `Send + Sync`: one connection behind a
/// mutex, because every operation is a short transaction and SQLite
/// serialises writers anyway.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// `<db path>.audit-head`: see [`audit`].
    head_path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the state file at `path` and brings its
    /// schema up to date. The parent directory must exist: creating it with
    /// the right owner and mode is the installer's job, not a side effect.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        // The busy timeout first: switching to WAL needs a lock that the
        // other process may hold while it does the same.
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Two processes creating the store at once (the daemon and a CLI on
        // a fresh host) both switch it to WAL: each holds a shared lock and
        // wants an exclusive one, so SQLite answers BUSY at once instead of
        // waiting (that would deadlock). The loser retries; by then the
        // file is in WAL mode and the switch is a no-op.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        let mode: String = loop {
            match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.map_err(open_err)?,
            }
        };
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        schema::migrate(&mut conn).map_err(|e| match e {
            schema::MigrateError::TooNew { found } => StoreError::TooNew {
                path: path.to_path_buf(),
                found,
                supported: schema::SCHEMA_VERSION,
            },
            schema::MigrateError::Sqlite { version, source } => StoreError::Migrate {
                path: path.to_path_buf(),
                version,
                source,
            },
        })?;
        let mut head = path.as_os_str().to_owned();
        head.push(".audit-head");
        let store = Store {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            head_path: PathBuf::from(head),
        };
        store.ensure_audit_head()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection. A panic while holding the lock cannot leave the
    /// connection half-way through a transaction (rusqlite rolls back on
    /// drop), so a poisoned lock is safe to reuse.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps a SQLite error for operation `op` to the error the caller shows.
    fn sql(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| match source {
            rusqlite::Error::SqliteFailure(e, _)
                if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
            {
                StoreError::Busy {
                    path: self.path.clone(),
                    op,
                }
            }
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt {
                path: self.path.clone(),
                op,
                detail: source.to_string(),
            },
            source => StoreError::Sqlite {
                path: self.path.clone(),
                op,
                source,
            },
        }
    }

    // ---- releases -------------------------------------------------------

    /// Inserts the release, or replaces every field of an existing one with
    /// the same (project, release).
    pub fn put_release(&self, r: &ReleaseRecord) -> Result<(), StoreError> {
        const OP: &str = "saving a release";
        let digests = to_json(&r.digests);
        let image_ids = to_json(&r.image_ids);
        self.conn()
            .execute(
                "INSERT INTO releases (project, release, created_at, state, spec_json, digests_json, image_ids_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (project, release) DO UPDATE SET
                    created_at = excluded.created_at, state = excluded.state,
                    spec_json = excluded.spec_json, digests_json = excluded.digests_json,
                    image_ids_json = excluded.image_ids_json",
                params![
                    r.project,
                    r.release,
                    r.created_at,
                    r.state.as_str(),
                    r.spec_json,
                    digests,
                    image_ids
                ],
            )
            .map_err(self.sql(OP))?;
        Ok(())
    }

    pub fn release(
        &self,
        project: &str,
        release: &str,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        const OP: &str = "reading a release";
        self.conn()
            .query_row(
                &format!(
                    "SELECT {RELEASE_COLUMNS} FROM releases WHERE project = ?1 AND release = ?2"
                ),
                params![project, release],
                release_from_row,
            )
            .optional()
            .map_err(self.sql(OP))
    }

    /// All releases of `project`, newest `created_at` first (ties: the one
    /// inserted last first). Sorted on parsed timestamps, not text, so a
    /// caller's differently formatted `created_at` still orders correctly.
    pub fn releases(&self, project: &str) -> Result<Vec<ReleaseRecord>, StoreError> {
        const OP: &str = "listing releases";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {RELEASE_COLUMNS}, rowid FROM releases WHERE project = ?1"
            ))
            .map_err(self.sql(OP))?;
        let rows = stmt
            .query_map([project], |row| {
                Ok((release_from_row(row)?, row.get::<_, i64>(7)?))
            })
            .map_err(self.sql(OP))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql(OP))?;
        let mut keyed: Vec<_> = rows
            .into_iter()
            .map(|(r, rowid)| (r.created_at.parse::<jiff::Timestamp>().ok(), rowid, r))
            .collect();
        keyed.sort_by(|a, b| (&b.0, b.1).cmp(&(&a.0, a.1)));
        Ok(keyed.into_iter().map(|(_, _, r)| r).collect())
    }

    /// Fails with [`StoreError::NotFound`] if the release is unknown, so a
    /// typo cannot silently do nothing.
    pub fn set_release_state(
        &self,
        project: &str,
        release: &str,
        state: ReleaseState,
    ) -> Result<(), StoreError> {
        const OP: &str = "updating a release's state";
        let n = self
            .conn()
            .execute(
                "UPDATE releases SET state = ?3 WHERE project = ?1 AND release = ?2",
                params![project, release, state.as_str()],
            )
            .map_err(self.sql(OP))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: format!("release {release} of project {project}"),
            });
        }
        Ok(())
    }

    /// Projects with at least one release, sorted by name.
    pub fn projects(&self) -> Result<Vec<String>, StoreError> {
        const OP: &str = "listing projects";
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT DISTINCT project FROM releases ORDER BY project")
            .map_err(self.sql(OP))?;
        stmt.query_map([], |r| r.get(0))
            .map_err(self.sql(OP))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(self.sql(OP))
    }

    // ---- serving --------------------------------------------------------

    pub fn serving(&self, project: &str) -> Result<Option<Serving>, StoreError> {
        const OP: &str = "reading the serving release";
        self.conn()
            .query_row(
                "SELECT current, previous, since FROM serving WHERE project = ?1",
                [project],
                |r| {
                    Ok(Serving {
                        current: r.get(0)?,
                        previous: r.get(1)?,
                        since: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(self.sql(OP))
    }

    /// Records which release serves `project`. `since` becomes now when
    /// `current` changes (and `None` when nothing serves); re-recording the
    /// same `current` keeps the original `since`, so `status` shows how long
    /// a release has really been serving.
    pub fn set_serving(
        &self,
        project: &str,
        current: Option<&str>,
        previous: Option<&str>,
    ) -> Result<(), StoreError> {
        const OP: &str = "recording the serving release";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let old: Option<(Option<String>, Option<String>)> = tx
            .query_row(
                "SELECT current, since FROM serving WHERE project = ?1",
                [project],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql(OP))?;
        let since = match (old, current) {
            (_, None) => None,
            (Some((old_current, old_since)), Some(c)) if old_current.as_deref() == Some(c) => {
                old_since.or_else(|| Some(timestamp_now()))
            }
            _ => Some(timestamp_now()),
        };
        tx.execute(
            "INSERT INTO serving (project, current, previous, since) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (project) DO UPDATE SET
                current = excluded.current, previous = excluded.previous, since = excluded.since",
            params![project, current, previous, since],
        )
        .map_err(self.sql(OP))?;
        tx.commit().map_err(self.sql(OP))
    }

    // ---- operations -----------------------------------------------------

    /// Records the start of an operation; returns its id.
    pub fn begin_operation(&self, op: &NewOperation) -> Result<i64, StoreError> {
        const OP: &str = "recording the start of an operation";
        let conn = self.conn();
        conn.execute(
            "INSERT INTO operations (kind, project, release, previous, who, reason, started_at, commit_time)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                op.kind.as_str(),
                op.project,
                op.release,
                op.previous,
                op.who,
                op.reason,
                timestamp_now(),
                op.commit_time
            ],
        )
        .map_err(self.sql(OP))?;
        Ok(conn.last_insert_rowid())
    }

    /// Persists the step an operation is about to run and the state needed
    /// to resume or undo it. Durable when this returns (synchronous=FULL).
    pub fn save_step(&self, id: i64, step: &str, state_json: &str) -> Result<(), StoreError> {
        const OP: &str = "saving an operation step";
        let conn = self.conn();
        let n = conn
            .execute(
                "UPDATE operations SET step = ?2, state_json = ?3 WHERE id = ?1 AND finished_at IS NULL",
                params![id, step, state_json],
            )
            .map_err(self.sql(OP))?;
        if n == 0 {
            return Err(self.why_not_open(&conn, id, OP));
        }
        Ok(())
    }

    /// Closes an operation with its outcome. The duration is measured from
    /// `started_at`, so it includes any time the agent was down.
    pub fn finish_operation(
        &self,
        id: i64,
        outcome: Outcome,
        message: &str,
    ) -> Result<(), StoreError> {
        const OP: &str = "recording the end of an operation";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let row: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT started_at, finished_at FROM operations WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql(OP))?;
        let started_at = match row {
            None => return Err(not_found_operation(id)),
            Some((_, Some(_))) => return Err(StoreError::OperationFinished { id }),
            Some((started_at, None)) => started_at,
        };
        let now = jiff::Timestamp::now();
        let duration_ms = started_at
            .parse::<jiff::Timestamp>()
            .ok()
            .and_then(|s| i64::try_from(now.duration_since(s).as_millis()).ok())
            .map(|ms| ms.max(0));
        tx.execute(
            "UPDATE operations SET finished_at = ?2, outcome = ?3, message = ?4, duration_ms = ?5 WHERE id = ?1",
            params![id, format!("{now:.3}"), outcome.as_str(), message, duration_ms],
        )
        .map_err(self.sql(OP))?;
        tx.commit().map_err(self.sql(OP))
    }

    /// One operation, finished or not.
    pub fn operation(&self, id: i64) -> Result<Option<OperationRecord>, StoreError> {
        const OP: &str = "reading an operation";
        self.conn()
            .query_row(
                &format!("SELECT {OPERATION_COLUMNS} FROM operations WHERE id = ?1"),
                [id],
                operation_from_row,
            )
            .optional()
            .map_err(self.sql(OP))
    }

    /// Unfinished operations (of `project`, or all), oldest first: what the
    /// agent must reconcile after a crash, in the order they began.
    pub fn open_operations(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<OperationRecord>, StoreError> {
        const OP: &str = "listing unfinished operations";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {OPERATION_COLUMNS} FROM operations
                 WHERE finished_at IS NULL AND (?1 IS NULL OR project = ?1) ORDER BY id"
            ))
            .map_err(self.sql(OP))?;
        stmt.query_map([project], operation_from_row)
            .map_err(self.sql(OP))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql(OP))
    }

    /// The newest `limit` operations of `project`, newest first (including
    /// unfinished ones, whose outcome is `None`).
    pub fn history(
        &self,
        project: &str,
        limit: usize,
    ) -> Result<Vec<wire::HistoryEntry>, StoreError> {
        const OP: &str = "reading history";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT kind, project, release, previous, outcome, who, started_at, finished_at, duration_ms, message, commit_time
                 FROM operations WHERE project = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(self.sql(OP))?;
        stmt.query_map(params![project, clamp_limit(limit)], |r| {
            Ok(wire::HistoryEntry {
                operation: text_enum(r, 0)?,
                project: r.get(1)?,
                release: r.get(2)?,
                previous: r.get(3)?,
                outcome: opt_text_enum(r, 4)?,
                who: r.get(5)?,
                started_at: r.get(6)?,
                finished_at: r.get(7)?,
                duration_ms: opt_u64(r, 8)?,
                message: r.get(9)?,
                commit_time: r.get(10)?,
            })
        })
        .map_err(self.sql(OP))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(self.sql(OP))
    }

    /// Explains why an UPDATE of operation `id` touched nothing.
    fn why_not_open(&self, conn: &Connection, id: i64, op: &'static str) -> StoreError {
        match conn
            .query_row("SELECT 1 FROM operations WHERE id = ?1", [id], |_| Ok(()))
            .optional()
        {
            Ok(Some(())) => StoreError::OperationFinished { id },
            Ok(None) => not_found_operation(id),
            Err(e) => self.sql(op)(e),
        }
    }

    // ---- images ---------------------------------------------------------

    /// Records an image. The first record for an id wins: a later call never
    /// changes it, so an image the operator had before the agent pulled it
    /// again can never become prunable.
    pub fn record_image(
        &self,
        image_id: &str,
        reference: &str,
        pulled_by_agent: bool,
    ) -> Result<(), StoreError> {
        const OP: &str = "recording an image";
        self.conn()
            .execute(
                "INSERT INTO images (image_id, reference, pulled_by_agent, first_seen)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (image_id) DO NOTHING",
                params![image_id, reference, pulled_by_agent, timestamp_now()],
            )
            .map_err(self.sql(OP))?;
        Ok(())
    }

    pub fn image(&self, image_id: &str) -> Result<Option<ImageRecord>, StoreError> {
        const OP: &str = "reading an image";
        self.conn()
            .query_row(
                "SELECT image_id, reference, pulled_by_agent, first_seen FROM images WHERE image_id = ?1",
                [image_id],
                image_from_row,
            )
            .optional()
            .map_err(self.sql(OP))
    }

    /// All recorded images, by id.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        const OP: &str = "listing images";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT image_id, reference, pulled_by_agent, first_seen FROM images ORDER BY image_id",
            )
            .map_err(self.sql(OP))?;
        stmt.query_map([], image_from_row)
            .map_err(self.sql(OP))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql(OP))
    }

    /// Drops an image's record (after it was removed). Unknown ids are fine:
    /// forgetting is idempotent so a retried prune does not fail.
    pub fn forget_image(&self, image_id: &str) -> Result<(), StoreError> {
        const OP: &str = "forgetting an image";
        self.conn()
            .execute("DELETE FROM images WHERE image_id = ?1", [image_id])
            .map_err(self.sql(OP))?;
        Ok(())
    }
}

fn not_found_operation(id: i64) -> StoreError {
    StoreError::NotFound {
        what: format!("operation {id}"),
    }
}

/// SQLite takes a signed limit; anything beyond i64 is "all".
fn clamp_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Maps with string keys and vectors of strings cannot fail to serialise.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

const RELEASE_COLUMNS: &str =
    "project, release, created_at, state, spec_json, digests_json, image_ids_json";

fn release_from_row(r: &Row<'_>) -> rusqlite::Result<ReleaseRecord> {
    let state: String = r.get(3)?;
    Ok(ReleaseRecord {
        project: r.get(0)?,
        release: r.get(1)?,
        created_at: r.get(2)?,
        state: ReleaseState::parse(&state)
            .ok_or_else(|| conversion_error(3, Box::new(UnknownReleaseState(state.clone()))))?,
        spec_json: r.get(4)?,
        digests: json_col(r, 5)?,
        image_ids: json_col(r, 6)?,
    })
}

const OPERATION_COLUMNS: &str =
    "id, kind, project, release, previous, who, reason, started_at, step, state_json";

fn operation_from_row(r: &Row<'_>) -> rusqlite::Result<OperationRecord> {
    Ok(OperationRecord {
        id: r.get(0)?,
        kind: text_enum(r, 1)?,
        project: r.get(2)?,
        release: r.get(3)?,
        previous: r.get(4)?,
        who: r.get(5)?,
        reason: r.get(6)?,
        started_at: r.get(7)?,
        step: r.get(8)?,
        state_json: r.get(9)?,
    })
}

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        image_id: r.get(0)?,
        reference: r.get(1)?,
        pulled_by_agent: r.get(2)?,
        first_seen: r.get(3)?,
    })
}

/// Reads a non-negative INTEGER column as `u64` (rusqlite only converts
/// unsigned types with its `fallible_uint` feature, which we do not enable).
fn opt_u64(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    match r.get::<_, Option<i64>>(idx)? {
        None => Ok(None),
        Some(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)),
    }
}

fn conversion_error(
    idx: usize,
    e: Box<dyn std::error::Error + Send + Sync + 'static>,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e)
}

/// Reads a JSON text column.
fn json_col<T: DeserializeOwned>(r: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = r.get(idx)?;
    serde_json::from_str(&s).map_err(|e| conversion_error(idx, Box::new(e)))
}

/// Reads a snake_case enum stored as its serde name (the wire enums'
/// `as_str`), so the store needs no parser of its own per enum.
fn text_enum<T: DeserializeOwned>(r: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = r.get(idx)?;
    serde_json::from_value(serde_json::Value::String(s))
        .map_err(|e| conversion_error(idx, Box::new(e)))
}

fn opt_text_enum<T: DeserializeOwned>(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<T>> {
    match r.get::<_, Option<String>>(idx)? {
        None => Ok(None),
        Some(s) => serde_json::from_value(serde_json::Value::String(s))
            .map(Some)
            .map_err(|e| conversion_error(idx, Box::new(e))),
    }
}
