//! The audit log: append-only and hash-chained, so that editing or deleting
//! a record is detected by [`Store::verify_audit`].
//!
//! Each record's `hash` is
//! `hex(sha256(prev_hash + "\n" + canonical_json({seq, ts, who, action, project,
//! release, outcome, duration_ms, reason, detail})))`, where the first record's
//! `prev_hash` is [`GENESIS_HASH`]. Canonical JSON (see [`canonical_json`]) is
//! compact, with object keys sorted by their UTF-8 bytes, absent values as
//! `null`, so anyone can recompute a hash from an exported record.
//!
//! The chain alone cannot reveal that the *newest* records were deleted (the
//! shortened chain is still valid), so after each append the store also
//! writes `<db path>.audit-head` (`"<seq> <hash>\n"`). A head naming a record
//! the table no longer has means records were deleted. The head is written
//! under SQLite's write lock right after each commit, so it never goes
//! backwards, and it may lag one record behind after a crash (accepted). A
//! new store starts with `0 <GENESIS_HASH>`, so the file exists before the
//! first record and "missing" always means "removed". Triggers refusing
//! UPDATE and DELETE on the table stop accidents; the chain and the head file
//! are what catch a deliberate edit.
//!
//! Limits: someone who can write both the database and the head file can
//! rewrite history and re-chain it consistently. Shipping heads off the host
//! (the controller, a log collector) is what closes that gap.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

#[cfg(test)]
use deploy_protocol::audit::hashed_payload;
pub use deploy_protocol::audit::{AuditRecord, GENESIS_HASH, canonical_json};
use deploy_protocol::audit::{Hashed, chain_hash};

use super::{Store, StoreError, clamp_limit, conversion_error, opt_u64, timestamp_now};

/// What a caller records. The store adds `seq`, `ts` and the hashes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Who caused it: unix user, certificate CN, or `agent`.
    pub who: String,
    /// Dotted `subject.event`, e.g. `deploy.started`, `rollback.failed`,
    /// `reconcile.repaired`.
    pub action: String,
    pub project: Option<String>,
    pub release: Option<String>,
    /// An [`Outcome`](crate::wire::Outcome) name, when the action has one.
    pub outcome: Option<String>,
    pub duration_ms: Option<u64>,
    pub reason: Option<String>,
    /// Anything else worth keeping (`null` when nothing).
    pub detail: serde_json::Value,
}

impl AuditEntry {
    /// An entry with only `who` and `action` set.
    pub fn new(who: impl Into<String>, action: impl Into<String>) -> AuditEntry {
        AuditEntry {
            who: who.into(),
            action: action.into(),
            ..AuditEntry::default()
        }
    }
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AuditVerification {
    /// Every record checks out; `head` is the newest hash ([`GENESIS_HASH`]
    /// for an empty log).
    Intact { records: u64, head: String },
    /// The first problem found, at record `seq`.
    Broken { seq: i64, reason: String },
}

/// Checks a complete exported log (it must start at seq 1), e.g. the lines of
/// `deploy-agent audit export`. Without the head file it cannot tell whether
/// the newest records were cut off; compare the returned head with one
/// recorded elsewhere.
pub fn verify_records<'a>(records: impl IntoIterator<Item = &'a AuditRecord>) -> AuditVerification {
    let mut walk = ChainWalk::new();
    for r in records {
        if let Err(broken) = walk.step(r.seq, &r.prev_hash, &r.hash, &r.compute_hash()) {
            return broken;
        }
    }
    walk.intact()
}

/// Walks records in seq order, checking numbering, hashes and links.
struct ChainWalk {
    expected_seq: i64,
    prev_hash: String,
    records: u64,
}

impl ChainWalk {
    fn new() -> ChainWalk {
        ChainWalk {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            records: 0,
        }
    }

    fn last_seq(&self) -> i64 {
        self.expected_seq - 1
    }

    fn step(
        &mut self,
        seq: i64,
        prev_hash: &str,
        hash: &str,
        computed: &str,
    ) -> Result<(), AuditVerification> {
        let expected = self.expected_seq;
        if seq < expected {
            return Err(AuditVerification::Broken {
                seq,
                reason: format!(
                    "record {seq} is out of order or duplicated (expected record {expected})"
                ),
            });
        }
        if seq > expected {
            let reason = if seq == expected + 1 {
                format!(
                    "record {expected} was deleted (record {} is followed by record {seq})",
                    expected - 1
                )
            } else {
                format!(
                    "records {expected} to {} were deleted (record {} is followed by record {seq})",
                    seq - 1,
                    expected - 1
                )
            };
            return Err(AuditVerification::Broken {
                seq: expected,
                reason,
            });
        }
        if computed != hash {
            return Err(AuditVerification::Broken {
                seq,
                reason: format!("record {seq} was modified: hash mismatch"),
            });
        }
        if prev_hash != self.prev_hash {
            return Err(AuditVerification::Broken {
                seq,
                reason: format!(
                    "record {seq} does not follow record {}: prev_hash mismatch (records were replaced or re-chained)",
                    seq - 1
                ),
            });
        }
        self.expected_seq = seq + 1;
        self.prev_hash = hash.to_owned();
        self.records += 1;
        Ok(())
    }

    fn intact(self) -> AuditVerification {
        AuditVerification::Intact {
            records: self.records,
            head: self.prev_hash,
        }
    }
}

/// What the head file says.
enum Head {
    Missing,
    Malformed(String),
    At { seq: i64, hash: String },
}

fn parse_head(text: &str) -> Head {
    let mut parts = text.split_ascii_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(seq), Some(hash), None) => match seq.parse::<i64>() {
            // Seq 0 is the empty log, written when the store is created.
            Ok(0) if hash == GENESIS_HASH => Head::At {
                seq: 0,
                hash: hash.to_owned(),
            },
            Ok(seq)
                if seq > 0
                    && hash.len() == 64
                    && hash
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Head::At {
                    seq,
                    hash: hash.to_owned(),
                }
            }
            _ => Head::Malformed(format!(
                "{:?} is not \"<seq> <sha256 hex>\"",
                text.trim_end()
            )),
        },
        _ => Head::Malformed(format!(
            "{:?} is not \"<seq> <sha256 hex>\"",
            text.trim_end()
        )),
    }
}

const AUDIT_COLUMNS: &str =
    "seq, ts, who, action, project, release, outcome, duration_ms, reason, detail, prev_hash, hash";

fn record_from_row(r: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let detail: String = r.get(9)?;
    Ok(AuditRecord {
        seq: r.get(0)?,
        ts: r.get(1)?,
        who: r.get(2)?,
        action: r.get(3)?,
        project: r.get(4)?,
        release: r.get(5)?,
        outcome: r.get(6)?,
        duration_ms: opt_u64(r, 7)?,
        reason: r.get(8)?,
        detail: serde_json::from_str(&detail).map_err(|e| conversion_error(9, Box::new(e)))?,
        prev_hash: r.get(10)?,
        hash: r.get(11)?,
    })
}

/// Writes `text` to `path` so that a reader sees the old or the new content,
/// never a torn one, and the new content survives a power cut.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is only durable once the directory is synced.
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Store {
    /// The head file next to the database.
    pub fn audit_head_path(&self) -> &Path {
        &self.head_path
    }

    fn read_head(&self) -> Result<Head, StoreError> {
        match std::fs::read_to_string(&self.head_path) {
            Ok(text) => Ok(parse_head(&text)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Head::Missing),
            Err(source) => Err(StoreError::AuditHead {
                path: self.head_path.clone(),
                op: "read",
                source,
            }),
        }
    }

    /// Appends a record and returns it as stored.
    ///
    /// Reading the last hash and inserting happen in one IMMEDIATE
    /// transaction, so concurrent appenders (daemon and CLI) queue on
    /// SQLite's write lock and form a single chain. The new seq also skips
    /// past the head file's seq if the table is shorter than the head says:
    /// otherwise an append after someone deleted the newest records would
    /// reuse their numbers and move the head back over the evidence.
    ///
    /// A `duration_ms` above `i64::MAX` is stored (and hashed) as `i64::MAX`.
    pub fn append_audit(&self, e: &AuditEntry) -> Result<AuditRecord, StoreError> {
        const OP: &str = "appending to the audit log";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let last: Option<(i64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql(OP))?;
        let (last_seq, prev_hash) = last.unwrap_or_else(|| (0, GENESIS_HASH.to_owned()));
        // Read under the write lock: head writes happen under it too.
        let mut seq = last_seq + 1;
        match self.read_head() {
            Ok(Head::At { seq: head_seq, .. }) if head_seq > last_seq => {
                tracing::error!(
                    head = %self.head_path.display(),
                    head_seq,
                    last_seq,
                    "audit log is shorter than its head file says: records after {last_seq} were deleted; \
                     numbering continues after {head_seq} so verification keeps reporting it"
                );
                seq = head_seq + 1;
            }
            Ok(Head::Missing) if last_seq > 0 => tracing::warn!(
                head = %self.head_path.display(),
                "audit head file is missing; recreating it"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "cannot read the audit head file"),
        }
        let ts = timestamp_now();
        let detail = canonical_json(&e.detail);
        let duration_ms = e.duration_ms.map(|d| d.min(i64::MAX as u64));
        let hash = chain_hash(
            &prev_hash,
            &Hashed {
                seq,
                ts: &ts,
                who: &e.who,
                action: &e.action,
                project: e.project.as_deref(),
                release: e.release.as_deref(),
                outcome: e.outcome.as_deref(),
                duration_ms,
                reason: e.reason.as_deref(),
                detail: &detail,
            },
        );
        tx.execute(
            &format!("INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params![
                seq,
                ts,
                e.who,
                e.action,
                e.project,
                e.release,
                e.outcome,
                duration_ms.map(|d| d as i64),
                e.reason,
                detail,
                prev_hash,
                hash
            ],
        )
        .map_err(self.sql(OP))?;
        tx.commit().map_err(self.sql(OP))?;
        // The record is committed: failing now would invite a retry and a
        // duplicate record. A head that lags behind is harmless (verify
        // accepts it); a missing one is reported by verify.
        if let Err(err) = self.write_head(&mut conn) {
            tracing::warn!(%err, "audit record {seq} saved, but the audit head file was not updated");
        }
        Ok(AuditRecord {
            seq,
            ts,
            who: e.who.clone(),
            action: e.action.clone(),
            project: e.project.clone(),
            release: e.release.clone(),
            outcome: e.outcome.clone(),
            duration_ms,
            reason: e.reason.clone(),
            detail: e.detail.clone(),
            prev_hash,
            hash,
        })
    }

    /// Writes the table's newest seq and hash to the head file while holding
    /// the write lock, so heads written by concurrent processes can never go
    /// backwards (each writes the latest committed record, in lock order).
    fn write_head(&self, conn: &mut Connection) -> Result<(), StoreError> {
        const OP: &str = "updating the audit head";
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let last: Option<(i64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql(OP))?;
        let (seq, hash) = last.unwrap_or_else(|| (0, GENESIS_HASH.to_owned()));
        write_atomically(&self.head_path, &format!("{seq} {hash}\n")).map_err(|source| {
            StoreError::AuditHead {
                path: self.head_path.clone(),
                op: "write",
                source,
            }
        })?;
        tx.commit().map_err(self.sql(OP))
    }

    /// Creates the head file (`0 <GENESIS_HASH>`) for a store whose log is
    /// empty, so that from the first append on the file always exists and a
    /// concurrent verifier never mistakes "not written yet" for "deleted".
    /// A missing head next to a non-empty log is left missing: recreating it
    /// would erase the evidence that verification reports.
    pub(super) fn ensure_audit_head(&self) -> Result<(), StoreError> {
        const OP: &str = "creating the audit head";
        if self.head_path.exists() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let empty: bool = tx
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM audit)", [], |r| r.get(0))
            .map_err(self.sql(OP))?;
        if empty && !self.head_path.exists() {
            write_atomically(&self.head_path, &format!("0 {GENESIS_HASH}\n")).map_err(
                |source| StoreError::AuditHead {
                    path: self.head_path.clone(),
                    op: "create",
                    source,
                },
            )?;
        }
        tx.commit().map_err(self.sql(OP))
    }

    /// Points the head file at the table's newest record. Only for an
    /// operator who knowingly restored the database from a backup (whose log
    /// is legitimately shorter than the head): it erases the evidence of
    /// deleted records, so it is never called automatically.
    pub fn rewrite_audit_head(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        self.write_head(&mut conn)
    }

    /// The newest `limit` records (of `project`, or all), oldest first, as
    /// a log is read.
    pub fn audit(
        &self,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        const OP: &str = "reading the audit log";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {AUDIT_COLUMNS} FROM (
                    SELECT {AUDIT_COLUMNS} FROM audit WHERE (?1 IS NULL OR project = ?1)
                    ORDER BY seq DESC LIMIT ?2
                 ) ORDER BY seq"
            ))
            .map_err(self.sql(OP))?;
        stmt.query_map(params![project, clamp_limit(limit)], record_from_row)
            .map_err(self.sql(OP))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql(OP))
    }

    /// Recomputes every hash in seq order and checks the head file.
    ///
    /// The head file is read *before* the records: it only ever names
    /// committed records, so a snapshot taken afterwards contains whatever it
    /// names even while another process appends, and no lock is needed.
    /// Reports the first problem; an error means verification could not run.
    pub fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        const OP: &str = "verifying the audit log";
        let head = self.read_head()?;
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"))
            .map_err(self.sql(OP))?;
        let mut rows = stmt.query([]).map_err(self.sql(OP))?;
        let mut walk = ChainWalk::new();
        let mut hash_at_head: Option<String> = None;
        while let Some(row) = rows.next().map_err(self.sql(OP))? {
            let seq: i64 = row.get(0).map_err(self.sql(OP))?;
            let (prev_hash, hash, computed) = match raw_hashes(row, seq) {
                Ok(v) => v,
                Err(e) => {
                    return Ok(AuditVerification::Broken {
                        seq,
                        reason: format!("record {seq} was modified: it is malformed ({e})"),
                    });
                }
            };
            if let Err(broken) = walk.step(seq, &prev_hash, &hash, &computed) {
                return Ok(broken);
            }
            if matches!(&head, Head::At { seq: s, .. } if *s == seq) {
                hash_at_head = Some(hash);
            }
        }
        let last = walk.last_seq();
        let head_path = self.head_path.display();
        match head {
            Head::Missing if last > 0 => Ok(AuditVerification::Broken {
                seq: last + 1,
                reason: format!(
                    "the audit head file {head_path} is missing, so records after {last} may have been deleted \
                     (if the database was restored from a backup, re-anchor the audit head)"
                ),
            }),
            Head::Missing => Ok(walk.intact()),
            Head::Malformed(why) => Ok(AuditVerification::Broken {
                seq: last + 1,
                reason: format!(
                    "the audit head file {head_path} is malformed ({why}), so records after {last} may have been deleted"
                ),
            }),
            Head::At { seq, hash } if seq > last => Ok(AuditVerification::Broken {
                seq: last + 1,
                reason: format!(
                    "records after {last} were deleted: the audit head file {head_path} names record {seq} ({hash})"
                ),
            }),
            Head::At { seq, hash } => {
                if seq == 0 || hash_at_head.as_deref() == Some(hash.as_str()) {
                    Ok(walk.intact())
                } else {
                    Ok(AuditVerification::Broken {
                        seq,
                        reason: format!(
                            "record {seq} was replaced: its hash differs from the one in the audit head file {head_path}"
                        ),
                    })
                }
            }
        }
    }
}

/// Reads a row's stored hashes and recomputes its hash from the stored text,
/// without parsing `detail` (so a malformed detail is a mismatch, not an error).
fn raw_hashes(r: &Row<'_>, seq: i64) -> rusqlite::Result<(String, String, String)> {
    let ts: String = r.get(1)?;
    let who: String = r.get(2)?;
    let action: String = r.get(3)?;
    let project: Option<String> = r.get(4)?;
    let release: Option<String> = r.get(5)?;
    let outcome: Option<String> = r.get(6)?;
    let duration_ms = opt_u64(r, 7)?;
    let reason: Option<String> = r.get(8)?;
    let detail: String = r.get(9)?;
    let prev_hash: String = r.get(10)?;
    let hash: String = r.get(11)?;
    let computed = chain_hash(
        &prev_hash,
        &Hashed {
            seq,
            ts: &ts,
            who: &who,
            action: &action,
            project: project.as_deref(),
            release: release.as_deref(),
            outcome: outcome.as_deref(),
            duration_ms,
            reason: reason.as_deref(),
            detail: &detail,
        },
    );
    Ok((prev_hash, hash, computed))
}

#[cfg(test)]
pub(super) fn hashed_payload_for_test(r: &AuditRecord) -> String {
    hashed_payload(&Hashed {
        seq: r.seq,
        ts: &r.ts,
        who: &r.who,
        action: &r.action,
        project: r.project.as_deref(),
        release: r.release.as_deref(),
        outcome: r.outcome.as_deref(),
        duration_ms: r.duration_ms,
        reason: r.reason.as_deref(),
        detail: &canonical_json(&r.detail),
    })
}
