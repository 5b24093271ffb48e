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
//! shortened chain is still valid), so every append also moves two heads,
//! each naming the newest record:
//! - the `audit_head` table (one row), updated in the same transaction as
//!   the insert: it never lags, and emptying or shortening the audit table
//!   leaves it pointing past the end;
//! - `<db path>.audit-head` (`"<seq> <hash>\n"`), a file outside the
//!   database, written under SQLite's write lock right after each commit, so
//!   it never goes backwards; it may lag one record behind after a crash
//!   (accepted). It catches a database swapped for an older copy. A new store
//!   starts with `0 <GENESIS_HASH>`, so the file exists before the first
//!   record and "missing" always means "removed".
//!
//! Every operation is audited when it starts, so an empty log next to
//! finished operations was emptied too, even if both heads were reset.
//!
//! Once tampering is detectable it stays detectable. An append never
//! "repairs" a head that disagrees with the log: it first appends an
//! [`TAMPER_ACTION`] record (by `agent`) saying what it found, then the
//! record it was asked for, numbered past every seq either head names so the
//! hole stays visible, and only then moves the heads. Verification reports
//! that record, like every break in the chain, until an operator appends an
//! [`ACK_ACTION`] record ([`Store::acknowledge_audit`]): who, when, why, and
//! exactly which problems, each pinned by the recomputed hash of the record
//! where it shows, so that anything changed afterwards is reported again.
//! Appends are not refused: the agent audits every deploy and rollback
//! before acting, so refusing would turn a tampered file into an outage, and
//! the records written meanwhile are what an investigation needs.
//!
//! Triggers refusing UPDATE and DELETE on the tables stop accidents; the
//! chain and the heads are what catch a deliberate edit.
//!
//! Limits: someone who can write both the database and the head file can
//! rewrite history and re-chain it consistently. Anchoring closes that gap:
//! [`Store::audit_head`] gives the head in a printable form to keep off the
//! host (the controller, a log collector), and [`Store::verify_audit_against`]
//! later checks that the log still holds, unchanged, every record up to it.

use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[cfg(test)]
use deploy_protocol::audit::hashed_payload;
pub use deploy_protocol::audit::{AuditRecord, GENESIS_HASH, canonical_json};
use deploy_protocol::audit::{Hashed, chain_hash};

use super::{Store, StoreError, clamp_limit, conversion_error, opt_u64, timestamp_now};

/// The action of the record an append writes, before its own, when it finds
/// the heads disagreeing with the log.
pub const TAMPER_ACTION: &str = "audit.tamper_detected";

/// The action of an operator's acknowledgement of audit log problems.
pub const ACK_ACTION: &str = "audit.acknowledged";

/// Actions only the store itself writes: a caller able to append an
/// acknowledgement could silence verification.
const RESERVED_ACTION_PREFIX: &str = "audit.";

/// What a caller records. The store adds `seq`, `ts` and the hashes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Who caused it: unix user, certificate CN, or `agent`.
    pub who: String,
    /// Dotted `subject.event`, e.g. `deploy.started`, `rollback.failed`,
    /// `reconcile.repaired`. The `audit.` subject is the store's own.
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

/// A point in the log: a record's seq and hash, printed and parsed as
/// `"<seq> <hash>"` (the head file's format); `0 <GENESIS_HASH>` is the
/// empty log.
///
/// Each hash covers the one before it, so a head pins every record up to
/// its seq: kept away from the host, it lets [`Store::verify_audit_against`]
/// prove later that those records are all still there, unchanged. It says
/// nothing about records appended after it; the next head kept does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: i64,
    pub hash: String,
}

impl AuditHead {
    /// The head of the empty log.
    pub fn genesis() -> AuditHead {
        AuditHead {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }

    /// Why this cannot be a head of any log, if it cannot.
    fn problem(&self) -> Option<String> {
        if self.seq < 0 {
            Some(format!("seq {} is negative", self.seq))
        } else if self.seq == 0 && self.hash != GENESIS_HASH {
            Some("seq 0 (the empty log) goes with the genesis hash, 64 zeros".to_owned())
        } else if !is_sha256_hex(&self.hash) {
            Some(format!(
                "{:?} is not a SHA-256 hash (64 lowercase hex digits)",
                self.hash
            ))
        } else {
            None
        }
    }
}

impl fmt::Display for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.hash)
    }
}

impl FromStr for AuditHead {
    type Err = InvalidAuditHead;

    /// Parses `"<seq> <hash>"`; surrounding whitespace (a trailing newline)
    /// is ignored.
    fn from_str(text: &str) -> Result<AuditHead, InvalidAuditHead> {
        let invalid = |why: String| InvalidAuditHead {
            text: text.trim().to_owned(),
            why,
        };
        let mut parts = text.split_ascii_whitespace();
        let (Some(seq), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid("it is not two fields".to_owned()));
        };
        let seq = seq
            .parse::<i64>()
            .map_err(|e| invalid(format!("seq {seq:?}: {e}")))?;
        let head = AuditHead {
            seq,
            hash: hash.to_owned(),
        };
        match head.problem() {
            Some(why) => Err(invalid(why)),
            None => Ok(head),
        }
    }
}

/// Text that is not an [`AuditHead`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an audit head \"<seq> <sha256 hex>\": {why}")]
pub struct InvalidAuditHead {
    pub text: String,
    pub why: String,
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The result of checking the chain, in short: the first problem not
/// acknowledged, if any ([`AuditReport`] has them all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AuditVerification {
    /// No problem, or only acknowledged ones; `head` is the newest hash
    /// ([`GENESIS_HASH`] for an empty log).
    Intact { records: u64, head: String },
    /// The first problem not acknowledged, at record `seq`.
    Broken { seq: i64, reason: String },
}

/// What kind of problem verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// Records are missing from the numbering.
    Deleted,
    /// A record is out of order or duplicated (in an exported log).
    OutOfOrder,
    /// A record's fields do not match its hash.
    Modified,
    /// A record does not follow the one before it: replaced or re-chained.
    Relinked,
    /// An [`TAMPER_ACTION`] record: an append found the heads disagreeing
    /// with the log.
    TamperDetected,
    /// The head file is missing, malformed, or names a record the log does
    /// not have, or has with another hash.
    HeadFile,
    /// The database's head is missing, behind the log, or names the newest
    /// record with another hash.
    HeadRecord,
    /// The newest records are gone: the database's head names a record past
    /// the end, or the log is empty although operations finished.
    Truncated,
    /// The log no longer holds the records up to a head kept elsewhere.
    Anchor,
}

impl BreakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakKind::Deleted => "deleted",
            BreakKind::OutOfOrder => "out_of_order",
            BreakKind::Modified => "modified",
            BreakKind::Relinked => "relinked",
            BreakKind::TamperDetected => "tamper_detected",
            BreakKind::HeadFile => "head_file",
            BreakKind::HeadRecord => "head_record",
            BreakKind::Truncated => "truncated",
            BreakKind::Anchor => "anchor",
        }
    }
}

impl fmt::Display for BreakKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem found by verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditBreak {
    /// The first record concerned (for a deletion, the first missing seq).
    pub seq: i64,
    pub kind: BreakKind,
    /// What happened, for a human.
    pub reason: String,
    /// For a problem in the chain, what pins it: the SHA-256 (hex) of the
    /// stored hash of the record before it, `"\n"`, and the recomputed hash
    /// of the record where it shows (for a deletion: the records on either
    /// side of the hole). An acknowledgement names it, so that a later change
    /// to either record is a new, unacknowledged problem. `None` for a
    /// problem of the heads (the next append turns it into a
    /// [`TAMPER_ACTION`] record) or of an anchor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// A problem an [`ACK_ACTION`] record accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcknowledgedBreak {
    #[serde(flatten)]
    pub problem: AuditBreak,
    /// The seq of the acknowledging record.
    pub acknowledged_in: i64,
    pub acknowledged_by: String,
    pub acknowledged_because: Option<String>,
}

/// Everything verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Records in the log.
    pub records: u64,
    /// The newest record ([`AuditHead::genesis`] for an empty log).
    pub head: AuditHead,
    /// Problems nobody acknowledged, by seq: the log is intact when empty.
    pub breaks: Vec<AuditBreak>,
    /// Problems acknowledged, in the order of the log; still listed so that
    /// a reader sees what was accepted, by whom and why.
    pub acknowledged: Vec<AcknowledgedBreak>,
}

impl AuditReport {
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty()
    }

    /// The short form: intact, or the first unacknowledged problem (saying
    /// how many more there are).
    pub fn verification(&self) -> AuditVerification {
        match self.breaks.first() {
            None => AuditVerification::Intact {
                records: self.records,
                head: self.head.hash.clone(),
            },
            Some(first) => {
                let more = self.breaks.len() - 1;
                let reason = match more {
                    0 => first.reason.clone(),
                    1 => format!("{} (and 1 more problem after it)", first.reason),
                    n => format!("{} (and {n} more problems after it)", first.reason),
                };
                AuditVerification::Broken {
                    seq: first.seq,
                    reason,
                }
            }
        }
    }
}

/// What [`Store::acknowledge_audit`] recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditAcknowledgement {
    /// The [`ACK_ACTION`] record.
    pub record: AuditRecord,
    /// The [`TAMPER_ACTION`] record written just before it, when the heads
    /// disagreed with the log at that moment.
    pub tamper_record: Option<AuditRecord>,
    /// The problems it acknowledges.
    pub acknowledged: Vec<AuditBreak>,
}

/// The `detail` of an [`ACK_ACTION`] record.
#[derive(Serialize, Deserialize)]
struct AckDetail {
    acknowledged: Vec<AuditBreak>,
}

/// Checks a complete exported log (it must start at seq 1), e.g. the lines of
/// `deploy-agent audit export`. Without the heads it cannot tell whether the
/// newest records were cut off; [`verify_records_report`] with a head kept
/// elsewhere can.
pub fn verify_records<'a>(records: impl IntoIterator<Item = &'a AuditRecord>) -> AuditVerification {
    verify_records_report(records, None).verification()
}

/// Checks a complete exported log, and that it still holds every record up
/// to `anchor` unchanged (see [`Store::verify_audit_against`]), e.g. what
/// the controller fetched from a host against the head it kept. An
/// invalid anchor is reported as a problem.
pub fn verify_records_report<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    anchor: Option<&AuditHead>,
) -> AuditReport {
    let mut walk = ChainWalk::new(anchor.map(|a| a.seq));
    for r in records {
        walk.step(WalkRecord::from_record(r));
    }
    walk.into_report(Vec::new(), anchor)
}

/// One record as the walk sees it.
struct WalkRecord {
    seq: i64,
    prev_hash: String,
    hash: String,
    /// The recomputed hash, or why the stored fields cannot be read.
    computed: Result<String, String>,
    who: String,
    action: String,
    reason: Option<String>,
    /// What an [`ACK_ACTION`] record names; `None` for any other record, and
    /// for an acknowledgement that cannot be read (it acknowledges nothing).
    acknowledges: Option<Vec<AuditBreak>>,
}

impl WalkRecord {
    fn from_record(r: &AuditRecord) -> WalkRecord {
        WalkRecord {
            seq: r.seq,
            prev_hash: r.prev_hash.clone(),
            hash: r.hash.clone(),
            computed: Ok(r.compute_hash()),
            who: r.who.clone(),
            action: r.action.clone(),
            reason: r.reason.clone(),
            acknowledges: if r.action == ACK_ACTION {
                serde_json::from_value::<AckDetail>(r.detail.clone())
                    .ok()
                    .map(|d| d.acknowledged)
            } else {
                None
            },
        }
    }
}

/// Walks records in seq order, checking numbering, hashes and links. It
/// goes on after a problem (from the stored hash), so that one problem
/// cannot hide another, and so that acknowledgements further on can be
/// matched against what was found before them.
struct ChainWalk {
    expected_seq: i64,
    prev_hash: String,
    records: u64,
    last: AuditHead,
    /// Problems found and not (yet) acknowledged, in the order found.
    breaks: Vec<AuditBreak>,
    acknowledged: Vec<AcknowledgedBreak>,
    /// A seq whose stored hash the caller needs (the head file's or an
    /// anchor's), and that hash once seen.
    watched: Vec<(i64, Option<String>)>,
}

impl ChainWalk {
    fn new(watch: impl IntoIterator<Item = i64>) -> ChainWalk {
        ChainWalk {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            records: 0,
            last: AuditHead::genesis(),
            breaks: Vec::new(),
            acknowledged: Vec::new(),
            watched: watch.into_iter().map(|seq| (seq, None)).collect(),
        }
    }

    fn hash_at(&self, seq: i64) -> Option<String> {
        self.watched
            .iter()
            .find(|(s, _)| *s == seq)
            .and_then(|(_, h)| h.clone())
    }

    fn problem(&mut self, seq: i64, kind: BreakKind, reason: String, fingerprint: &str) {
        self.breaks.push(AuditBreak {
            seq,
            kind,
            reason,
            fingerprint: Some(fingerprint.to_owned()),
        });
    }

    fn step(&mut self, r: WalkRecord) {
        let seq = r.seq;
        let expected = self.expected_seq;
        // What pins a problem here for an acknowledgement: this record's
        // content as it is now (unreadable: its stored hash) and the record
        // before it, as the chain continues from it.
        let fingerprint = {
            let this = match &r.computed {
                Ok(computed) => computed.as_str(),
                Err(_) => r.hash.as_str(),
            };
            let mut h = Sha256::new();
            h.update(self.prev_hash.as_bytes());
            h.update(b"\n");
            h.update(this.as_bytes());
            hex::encode(h.finalize())
        };
        if seq < expected {
            self.problem(
                seq,
                BreakKind::OutOfOrder,
                format!("record {seq} is out of order or duplicated (expected record {expected})"),
                &fingerprint,
            );
            return;
        }
        let after_hole = seq > expected;
        if after_hole {
            let before = if expected == 1 {
                format!("the log starts at record {seq}")
            } else {
                format!("record {} is followed by record {seq}", expected - 1)
            };
            let reason = if seq == expected + 1 {
                format!("record {expected} was deleted ({before})")
            } else {
                format!("records {expected} to {} were deleted ({before})", seq - 1)
            };
            self.problem(expected, BreakKind::Deleted, reason, &fingerprint);
        }
        let intact = match &r.computed {
            Err(why) => {
                let reason = format!("record {seq} was modified: it is malformed ({why})");
                self.problem(seq, BreakKind::Modified, reason, &fingerprint);
                false
            }
            Ok(computed) if *computed != r.hash => {
                let reason = format!("record {seq} was modified: hash mismatch");
                self.problem(seq, BreakKind::Modified, reason, &fingerprint);
                false
            }
            Ok(_) => true,
        };
        // After a hole the predecessor is gone: its link cannot be checked.
        if intact && !after_hole && r.prev_hash != self.prev_hash {
            let reason = format!(
                "record {seq} does not follow record {}: prev_hash mismatch (records were replaced or re-chained)",
                seq - 1
            );
            self.problem(seq, BreakKind::Relinked, reason, &fingerprint);
        }
        self.expected_seq = seq.saturating_add(1);
        for (watched, hash) in &mut self.watched {
            if *watched == seq {
                *hash = Some(r.hash.clone());
            }
        }
        self.records += 1;
        self.last = AuditHead {
            seq,
            hash: r.hash.clone(),
        };
        self.prev_hash = r.hash;
        // A record whose content is not its own says nothing trustworthy.
        if !intact {
            return;
        }
        if r.action == TAMPER_ACTION {
            let found = r.reason.as_deref().unwrap_or("no details recorded");
            let reason = format!(
                "record {seq} records that the audit log was tampered with, found when appending: {found}"
            );
            self.problem(seq, BreakKind::TamperDetected, reason, &fingerprint);
        }
        if let Some(named) = &r.acknowledges {
            self.acknowledge(seq, &r.who, r.reason.as_deref(), named);
        }
    }

    /// Moves the problems an acknowledgement at `ack_seq` names from
    /// `breaks` to `acknowledged`. Only problems found before it, exactly as
    /// named (seq, kind and the record's hash), qualify.
    fn acknowledge(
        &mut self,
        ack_seq: i64,
        who: &str,
        because: Option<&str>,
        named: &[AuditBreak],
    ) {
        for n in named {
            if n.seq >= ack_seq || n.fingerprint.is_none() {
                continue;
            }
            let Some(i) = self
                .breaks
                .iter()
                .position(|b| b.seq == n.seq && b.kind == n.kind && b.fingerprint == n.fingerprint)
            else {
                continue;
            };
            let problem = self.breaks.remove(i);
            self.acknowledged.push(AcknowledgedBreak {
                problem,
                acknowledged_in: ack_seq,
                acknowledged_by: who.to_owned(),
                acknowledged_because: because.map(str::to_owned),
            });
        }
    }

    /// The report: the chain's problems, `more` (those of the heads), and
    /// those against `anchor`.
    fn into_report(self, more: Vec<AuditBreak>, anchor: Option<&AuditHead>) -> AuditReport {
        let hash_at_anchor = anchor.and_then(|a| self.hash_at(a.seq));
        let mut breaks = self.breaks;
        breaks.extend(more);
        let mut acknowledged = self.acknowledged;
        if let Some(anchor) = anchor {
            breaks.extend(anchor_breaks(
                anchor,
                &self.last,
                hash_at_anchor.as_deref(),
                &mut acknowledged,
            ));
        }
        breaks.sort_by_key(|b| b.seq);
        AuditReport {
            records: self.records,
            head: self.last,
            breaks,
            acknowledged,
        }
    }
}

/// Problems of the log measured against `anchor`: the record it names must
/// be there with its hash (which covers every record before it), and no
/// problem up to it may have been acknowledged after it was taken (an
/// acknowledgement does not change the hashes, but the records it excuses
/// are no longer what was anchored). Those problems move from
/// `acknowledged` back to the problems.
fn anchor_breaks(
    anchor: &AuditHead,
    last: &AuditHead,
    hash_at_anchor: Option<&str>,
    acknowledged: &mut Vec<AcknowledgedBreak>,
) -> Vec<AuditBreak> {
    let mut out = Vec::new();
    let broken = |seq: i64, reason: String| AuditBreak {
        seq,
        kind: BreakKind::Anchor,
        reason,
        fingerprint: None,
    };
    if let Some(why) = anchor.problem() {
        out.push(broken(
            anchor.seq.max(0),
            format!("the anchored head \"{anchor}\" is not a head of any log: {why}"),
        ));
        return out;
    }
    if anchor.seq > 0 {
        let s = anchor.seq;
        match hash_at_anchor {
            None if s > last.seq && last.seq == 0 => out.push(broken(
                1,
                format!(
                    "the audit log was truncated: it is empty, but the anchored head \"{anchor}\" names record {s}"
                ),
            )),
            None if s > last.seq => out.push(broken(
                last.seq + 1,
                format!(
                    "records after {} were deleted: the anchored head \"{anchor}\" names record {s}, but the log ends at record {}",
                    last.seq, last.seq
                ),
            )),
            None => out.push(broken(
                s,
                format!("record {s}, which the anchored head \"{anchor}\" names, was deleted"),
            )),
            Some(hash) if hash != anchor.hash => out.push(broken(
                s,
                format!(
                    "the log was rewritten up to record {s}: its hash is {hash}, but the anchored head is \"{anchor}\""
                ),
            )),
            Some(_) => {}
        }
    }
    let mut kept = Vec::with_capacity(acknowledged.len());
    for a in acknowledged.drain(..) {
        if a.problem.seq <= anchor.seq && a.acknowledged_in > anchor.seq {
            out.push(broken(
                a.problem.seq,
                format!(
                    "{} (acknowledged in record {}, after the anchored head \"{anchor}\": the anchored records changed since, or were already broken)",
                    a.problem.reason, a.acknowledged_in
                ),
            ));
        } else {
            kept.push(a);
        }
    }
    *acknowledged = kept;
    out
}

/// What the head file says.
#[derive(Debug, Clone)]
enum Head {
    Missing,
    Malformed(String),
    At(AuditHead),
}

fn parse_head(text: &str) -> Head {
    match text.parse::<AuditHead>() {
        Ok(head) => Head::At(head),
        Err(e) => Head::Malformed(e.to_string()),
    }
}

/// The end of the log and what the two heads say about it.
struct Tail {
    /// The newest record ([`AuditHead::genesis`] for an empty log).
    last: AuditHead,
    /// The `audit_head` row; `None` when it was deleted.
    db_head: Option<AuditHead>,
    /// The head file; `None` when it could not be read (then not checked).
    file: Option<Head>,
    /// The stored hash of the record the head file names, when there is one.
    hash_at_file_seq: Option<String>,
    /// Finished operations; only counted when the log is empty.
    finished_ops: u64,
}

impl Tail {
    /// The heads' problems. Read in one snapshot with the table, the
    /// database's head must match it exactly; the head file is written after
    /// the commit, so it may lag behind (naming an older record with that
    /// record's hash), never lead.
    fn breaks(&self, head_path: &Path) -> Vec<AuditBreak> {
        let last = &self.last;
        let after = last.seq.saturating_add(1);
        let head_path = head_path.display();
        let mut out = Vec::new();
        let mut push = |seq: i64, kind: BreakKind, reason: String| {
            out.push(AuditBreak {
                seq,
                kind,
                reason,
                fingerprint: None,
            })
        };
        match &self.db_head {
            None => push(
                after,
                BreakKind::HeadRecord,
                format!(
                    "the database's audit head (table audit_head) was deleted, so records after {} may have been deleted too",
                    last.seq
                ),
            ),
            Some(db) if db.seq > last.seq && last.seq == 0 => push(
                1,
                BreakKind::Truncated,
                format!(
                    "the audit log was truncated: it is empty, but the database's audit head names record {}, so records 1 to {} were deleted",
                    db.seq, db.seq
                ),
            ),
            Some(db) if db.seq > last.seq => push(
                after,
                BreakKind::Truncated,
                format!(
                    "records after {} were deleted (the log was truncated): the database's audit head names record {}",
                    last.seq, db.seq
                ),
            ),
            Some(db) if db.seq < last.seq => push(
                db.seq.saturating_add(1),
                BreakKind::HeadRecord,
                format!(
                    "records {} to {} were not appended by deploy-agent: the database's audit head names record {}",
                    db.seq.saturating_add(1),
                    last.seq,
                    db.seq
                ),
            ),
            Some(db) if db.hash != last.hash => push(
                last.seq,
                BreakKind::HeadRecord,
                format!(
                    "record {} was replaced: its hash differs from the database's audit head",
                    last.seq
                ),
            ),
            Some(_) => {}
        }
        let db_truncated = self.db_head.as_ref().is_some_and(|db| db.seq > last.seq);
        let db_empty = self.db_head.as_ref().is_some_and(|db| db.seq == 0);
        match &self.file {
            None => {}
            Some(Head::Missing) if last.seq == 0 && db_empty => {}
            Some(Head::Missing) => push(
                after,
                BreakKind::HeadFile,
                format!(
                    "the audit head file {head_path} is missing, so records after {} may have been deleted \
                     (if the database was restored from a backup, acknowledge that once checked)",
                    last.seq
                ),
            ),
            Some(Head::Malformed(why)) => push(
                after,
                BreakKind::HeadFile,
                format!(
                    "the audit head file {head_path} is malformed ({why}), so records after {} may have been deleted",
                    last.seq
                ),
            ),
            Some(Head::At(head)) if head.seq > last.seq => push(
                after,
                BreakKind::HeadFile,
                format!(
                    "records after {} were deleted: the audit head file {head_path} names record {} ({}) \
                     (if the database was restored from a backup, acknowledge that once checked)",
                    last.seq, head.seq, head.hash
                ),
            ),
            // A record the file names but the log lacks is a hole in the
            // chain, reported as a deletion.
            Some(Head::At(head)) => match &self.hash_at_file_seq {
                Some(hash) if head.seq > 0 && *hash != head.hash => push(
                    head.seq,
                    BreakKind::HeadFile,
                    format!(
                        "record {} was replaced: its hash differs from the one in the audit head file {head_path}",
                        head.seq
                    ),
                ),
                _ => {}
            },
        }
        if last.seq == 0 && self.finished_ops > 0 && !db_truncated {
            push(
                1,
                BreakKind::Truncated,
                format!(
                    "the audit log was truncated: it is empty, but the store has {} finished operation(s), and every operation is audited",
                    self.finished_ops
                ),
            );
        }
        out
    }

    /// The largest seq the log or either head names: numbering continues
    /// after it, so an append never reuses a deleted record's number and the
    /// hole stays visible.
    fn highest_seq(&self) -> i64 {
        let mut seq = self.last.seq;
        if let Some(db) = &self.db_head {
            seq = seq.max(db.seq);
        }
        if let Some(Head::At(head)) = &self.file {
            seq = seq.max(head.seq);
        }
        seq
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

/// A row as the walk sees it, its hash recomputed from the stored text
/// without parsing `detail` (so a malformed detail is a mismatch, not an
/// error); a row whose fields cannot be read at all is a modified record.
fn walk_record(r: &Row<'_>, seq: i64) -> WalkRecord {
    match raw_walk_record(r, seq) {
        Ok(rec) => rec,
        Err(e) => WalkRecord {
            seq,
            prev_hash: r.get(10).unwrap_or_default(),
            hash: r.get(11).unwrap_or_default(),
            computed: Err(e.to_string()),
            who: String::new(),
            action: String::new(),
            reason: None,
            acknowledges: None,
        },
    }
}

fn raw_walk_record(r: &Row<'_>, seq: i64) -> rusqlite::Result<WalkRecord> {
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
    let acknowledges = if action == ACK_ACTION {
        serde_json::from_str::<AckDetail>(&detail)
            .ok()
            .map(|d| d.acknowledged)
    } else {
        None
    };
    Ok(WalkRecord {
        seq,
        prev_hash,
        hash,
        computed: Ok(computed),
        who,
        action,
        reason,
        acknowledges,
    })
}

/// The newest record of the table ([`AuditHead::genesis`] when empty).
fn newest_record(conn: &Connection) -> rusqlite::Result<AuditHead> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok(AuditHead {
                    seq: r.get(0)?,
                    hash: r.get(1)?,
                })
            },
        )
        .optional()?
        .unwrap_or_else(AuditHead::genesis))
}

/// The `audit_head` row, `None` if it was deleted.
fn db_head(conn: &Connection) -> rusqlite::Result<Option<AuditHead>> {
    conn.query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
        Ok(AuditHead {
            seq: r.get(0)?,
            hash: r.get(1)?,
        })
    })
    .optional()
}

fn set_db_head(conn: &Connection, head: &AuditHead) -> rusqlite::Result<()> {
    let n = conn.execute(
        "UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1",
        params![head.seq, head.hash],
    )?;
    // Its deletion was recorded (a tamper record) before we got here.
    if n == 0 {
        conn.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2)",
            params![head.seq, head.hash],
        )?;
    }
    Ok(())
}

fn finished_operations(conn: &Connection) -> rusqlite::Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM operations WHERE finished_at IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The tail without walking the chain: what an append checks.
fn read_tail(conn: &Connection, file: Option<Head>) -> rusqlite::Result<Tail> {
    let last = newest_record(conn)?;
    let db_head = db_head(conn)?;
    let hash_at_file_seq = match &file {
        Some(Head::At(head)) if head.seq > 0 && head.seq <= last.seq => conn
            .query_row("SELECT hash FROM audit WHERE seq = ?1", [head.seq], |r| {
                r.get(0)
            })
            .optional()?,
        _ => None,
    };
    let finished_ops = if last.seq == 0 {
        finished_operations(conn)?
    } else {
        0
    };
    Ok(Tail {
        last,
        db_head,
        file,
        hash_at_file_seq,
        finished_ops,
    })
}

/// Inserts `e` as record `seq` after `prev_hash`, and returns it as stored.
///
/// A `duration_ms` above `i64::MAX` is stored (and hashed) as `i64::MAX`.
fn insert_record(
    conn: &Connection,
    seq: i64,
    prev_hash: &str,
    e: &AuditEntry,
) -> rusqlite::Result<AuditRecord> {
    let ts = timestamp_now();
    let detail = canonical_json(&e.detail);
    let duration_ms = e.duration_ms.map(|d| d.min(i64::MAX as u64));
    let hash = chain_hash(
        prev_hash,
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
    conn.execute(
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
    )?;
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
        prev_hash: prev_hash.to_owned(),
        hash,
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

    /// The seq after `seq`; only an absurd head (a forged one) overflows.
    fn seq_after(&self, seq: i64, op: &'static str) -> Result<i64, StoreError> {
        seq.checked_add(1).ok_or_else(|| StoreError::Corrupt {
            path: self.path.clone(),
            op,
            detail: format!(
                "the audit log or one of its heads names record {seq}, the largest possible number"
            ),
        })
    }

    /// Appends a record and returns it as stored.
    ///
    /// Reading the tail and inserting happen in one IMMEDIATE transaction,
    /// so concurrent appenders (daemon and CLI) queue on SQLite's write lock
    /// and form a single chain. If either head disagrees with the log (the
    /// head file is missing, malformed or ahead, the newest records are
    /// gone, the log was emptied), the problem is first recorded as a
    /// [`TAMPER_ACTION`] record, and the new record numbered past every seq
    /// a head names: an append must never make tampering look like an
    /// intact log. The append itself goes ahead (see the module doc).
    ///
    /// Actions starting with `audit.` are the store's own and refused.
    /// A `duration_ms` above `i64::MAX` is stored (and hashed) as `i64::MAX`.
    pub fn append_audit(&self, e: &AuditEntry) -> Result<AuditRecord, StoreError> {
        const OP: &str = "appending to the audit log";
        if e.action.starts_with(RESERVED_ACTION_PREFIX) {
            return Err(StoreError::ReservedAuditAction {
                action: e.action.clone(),
            });
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        // Read under the write lock: head writes happen under it too. An
        // unreadable file is left unchecked rather than blocking deploys;
        // verification reports it.
        let file = match self.read_head() {
            Ok(head) => Some(head),
            Err(err) => {
                tracing::warn!(%err, "cannot read the audit head file; appending without checking it");
                None
            }
        };
        let tail = read_tail(&tx, file).map_err(self.sql(OP))?;
        let mut seq = self.seq_after(tail.highest_seq(), OP)?;
        let mut prev_hash = tail.last.hash.clone();
        let found = tail.breaks(&self.head_path);
        if !found.is_empty() {
            let tamper = self.insert_tamper_record(&tx, seq, &prev_hash, &found, &tail.last)?;
            seq = self.seq_after(tamper.seq, OP)?;
            prev_hash = tamper.hash;
        }
        let record = insert_record(&tx, seq, &prev_hash, e).map_err(self.sql(OP))?;
        set_db_head(
            &tx,
            &AuditHead {
                seq,
                hash: record.hash.clone(),
            },
        )
        .map_err(self.sql(OP))?;
        tx.commit().map_err(self.sql(OP))?;
        // The record is committed: failing now would invite a retry and a
        // duplicate record. A head file that lags behind is harmless (verify
        // accepts it); a missing one is reported by verify.
        if let Err(err) = self.write_head(&mut conn) {
            tracing::warn!(%err, "audit record {seq} saved, but the audit head file was not updated");
        }
        Ok(record)
    }

    /// Inserts the [`TAMPER_ACTION`] record saying what an append found.
    fn insert_tamper_record(
        &self,
        conn: &Connection,
        seq: i64,
        prev_hash: &str,
        found: &[AuditBreak],
        last: &AuditHead,
    ) -> Result<AuditRecord, StoreError> {
        const OP: &str = "recording audit log tampering";
        let reasons = found
            .iter()
            .map(|b| b.reason.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let mut e = AuditEntry::new("agent", TAMPER_ACTION);
        e.reason = Some(reasons.clone());
        e.detail = serde_json::json!({
            "found": found,
            "log_ended_at": last.to_string(),
        });
        let record = insert_record(conn, seq, prev_hash, &e).map_err(self.sql(OP))?;
        tracing::error!(
            seq,
            found = %reasons,
            "the audit log was tampered with; recorded as audit record {seq}, \
             which `deploy-agent audit verify` reports until it is acknowledged"
        );
        Ok(record)
    }

    /// Writes the table's newest seq and hash to the head file while holding
    /// the write lock, so heads written by concurrent processes can never go
    /// backwards (each writes the latest committed record, in lock order).
    fn write_head(&self, conn: &mut Connection) -> Result<(), StoreError> {
        const OP: &str = "updating the audit head";
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let head = newest_record(&tx).map_err(self.sql(OP))?;
        write_atomically(&self.head_path, &format!("{head}\n")).map_err(|source| {
            StoreError::AuditHead {
                path: self.head_path.clone(),
                op: "write",
                source,
            }
        })?;
        tx.commit().map_err(self.sql(OP))
    }

    /// Creates the head file (`0 <GENESIS_HASH>`) for a store whose log is
    /// empty and was never written, so that from the first append on the
    /// file always exists and a concurrent verifier never mistakes "not
    /// written yet" for "deleted". A missing head next to a log that has, or
    /// had, records is left missing: recreating it would erase the evidence
    /// that verification reports and the next append records.
    pub(super) fn ensure_audit_head(&self) -> Result<(), StoreError> {
        const OP: &str = "creating the audit head";
        if self.head_path.exists() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let tail = read_tail(&tx, Some(Head::Missing)).map_err(self.sql(OP))?;
        if tail.breaks(&self.head_path).is_empty() && !self.head_path.exists() {
            let genesis = AuditHead::genesis();
            write_atomically(&self.head_path, &format!("{genesis}\n")).map_err(|source| {
                StoreError::AuditHead {
                    path: self.head_path.clone(),
                    op: "create",
                    source,
                }
            })?;
        }
        tx.commit().map_err(self.sql(OP))
    }

    /// The newest record's seq and hash ([`AuditHead::genesis`] for an empty
    /// log), to keep away from the host: its `Display` (`"<seq> <hash>"`) is
    /// the stable printed form, and parses back with `str::parse`.
    ///
    /// It reports the log as it is, broken or not: whoever keeps heads
    /// should first check the log against the previous one
    /// ([`Store::verify_audit_against`]), then keep the new one.
    pub fn audit_head(&self) -> Result<AuditHead, StoreError> {
        newest_record(&self.conn()).map_err(self.sql("reading the audit head"))
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

    /// Recomputes every hash in seq order and checks both heads; the short
    /// form of [`Store::verify_audit_report`]. An error means verification
    /// could not run.
    pub fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        Ok(self.verify_audit_report()?.verification())
    }

    /// Recomputes every hash in seq order, checks both heads and that an
    /// empty log has no finished operations beside it, and lists every
    /// problem, acknowledged or not.
    ///
    /// The head file is read *before* the records: it only ever names
    /// committed records, so a snapshot taken afterwards contains whatever it
    /// names even while another process appends. The records, the
    /// database's head and the operations are read in one snapshot, so they
    /// agree exactly. No lock is needed.
    pub fn verify_audit_report(&self) -> Result<AuditReport, StoreError> {
        self.report(None)
    }

    /// [`Store::verify_audit_report`], and also checks that the log still
    /// holds every record up to `anchor` (a head from [`Store::audit_head`]
    /// kept away from the host) unchanged: record `anchor.seq` must be there
    /// with `anchor.hash`, which covers all records before it, and no
    /// problem up to it may have been acknowledged since. Records appended
    /// after the anchor are only as safe as the on-host checks make them.
    pub fn verify_audit_against(&self, anchor: &AuditHead) -> Result<AuditReport, StoreError> {
        if let Some(why) = anchor.problem() {
            return Err(StoreError::InvalidAuditHead(InvalidAuditHead {
                text: anchor.to_string(),
                why,
            }));
        }
        self.report(Some(anchor))
    }

    fn report(&self, anchor: Option<&AuditHead>) -> Result<AuditReport, StoreError> {
        const OP: &str = "verifying the audit log";
        let file = self.read_head()?;
        let mut conn = self.conn();
        // A read transaction: one snapshot for everything read below.
        let tx = conn.transaction().map_err(self.sql(OP))?;
        let (walk, tail) = self.walk_in(&tx, file, anchor.map(|a| a.seq), OP)?;
        let heads = tail.breaks(&self.head_path);
        Ok(walk.into_report(heads, anchor))
    }

    /// Walks the whole table and reads the tail in `conn`'s snapshot.
    fn walk_in(
        &self,
        conn: &Connection,
        file: Head,
        anchor_seq: Option<i64>,
        op: &'static str,
    ) -> Result<(ChainWalk, Tail), StoreError> {
        let file_seq = match &file {
            Head::At(head) => Some(head.seq),
            _ => None,
        };
        let mut walk = ChainWalk::new(file_seq.into_iter().chain(anchor_seq));
        {
            let mut stmt = conn
                .prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"))
                .map_err(self.sql(op))?;
            let mut rows = stmt.query([]).map_err(self.sql(op))?;
            while let Some(row) = rows.next().map_err(self.sql(op))? {
                let seq: i64 = row.get(0).map_err(self.sql(op))?;
                walk.step(walk_record(row, seq));
            }
        }
        let db_head = db_head(conn).map_err(self.sql(op))?;
        let finished_ops = if walk.last.seq == 0 {
            finished_operations(conn).map_err(self.sql(op))?
        } else {
            0
        };
        let tail = Tail {
            last: walk.last.clone(),
            db_head,
            hash_at_file_seq: file_seq.and_then(|s| walk.hash_at(s)),
            file: Some(file),
            finished_ops,
        };
        Ok((walk, tail))
    }

    /// Records that `who` looked into the problems verification reports at
    /// or before record `through`, and accepts them because of `reason`: an
    /// [`ACK_ACTION`] record naming each one, after which verification lists
    /// them as acknowledged instead of failing. Everything happens under the
    /// write lock, so exactly what was checked is acknowledged.
    ///
    /// If the heads disagree with the log right now (say the head file is
    /// missing), that is first recorded as a [`TAMPER_ACTION`] record, like
    /// any append does, and acknowledged with the rest when it is reported
    /// at or before `through`. That is also how a database restored from a
    /// backup is accepted: the heads then move to its newest record.
    ///
    /// Problems found later, including a later change to a record whose
    /// problem was acknowledged, are reported again. Fails, recording
    /// nothing, when there is nothing to acknowledge at or before `through`
    /// or `who` or `reason` is empty.
    pub fn acknowledge_audit(
        &self,
        who: &str,
        through: i64,
        reason: &str,
    ) -> Result<AuditAcknowledgement, StoreError> {
        const OP: &str = "acknowledging audit log problems";
        if who.trim().is_empty() {
            return Err(StoreError::AuditAcknowledge {
                why: "the acknowledgement must name who makes it".to_owned(),
            });
        }
        if reason.trim().is_empty() {
            return Err(StoreError::AuditAcknowledge {
                why: "a reason is required: say what was found and why it is accepted (it is kept in the audit log)"
                    .to_owned(),
            });
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let file = self.read_head()?;
        let (mut walk, tail) = self.walk_in(&tx, file, None, OP)?;
        let heads = tail.breaks(&self.head_path);
        let mut chosen: Vec<AuditBreak> = walk
            .breaks
            .iter()
            .filter(|b| b.seq <= through)
            .cloned()
            .collect();
        let heads_chosen = heads.iter().any(|b| b.seq <= through);
        if chosen.is_empty() && !heads_chosen {
            let first = walk.breaks.iter().chain(&heads).min_by_key(|b| b.seq);
            let why = match first {
                None => "the audit log is intact: there is nothing to acknowledge".to_owned(),
                Some(b) => format!(
                    "there is no problem at or before record {through}; the first one is at record {}: {}",
                    b.seq, b.reason
                ),
            };
            return Err(StoreError::AuditAcknowledge { why });
        }
        let mut seq = self.seq_after(tail.highest_seq(), OP)?;
        let mut prev_hash = tail.last.hash.clone();
        let mut tamper_record = None;
        if !heads.is_empty() {
            let tamper = self.insert_tamper_record(&tx, seq, &prev_hash, &heads, &tail.last)?;
            // The tamper record, and the hole its numbering may leave, are
            // what the heads' problems become: walk it to name them exactly
            // as verification will.
            let before = walk.breaks.len();
            walk.step(WalkRecord::from_record(&tamper));
            if heads_chosen {
                chosen.extend(walk.breaks[before..].iter().cloned());
            }
            seq = self.seq_after(tamper.seq, OP)?;
            prev_hash = tamper.hash.clone();
            tamper_record = Some(tamper);
        }
        let mut e = AuditEntry::new(who, ACK_ACTION);
        e.reason = Some(reason.to_owned());
        e.detail = serde_json::json!({ "acknowledged": chosen });
        let record = insert_record(&tx, seq, &prev_hash, &e).map_err(self.sql(OP))?;
        set_db_head(
            &tx,
            &AuditHead {
                seq,
                hash: record.hash.clone(),
            },
        )
        .map_err(self.sql(OP))?;
        tx.commit().map_err(self.sql(OP))?;
        if let Err(err) = self.write_head(&mut conn) {
            tracing::warn!(%err, "audit record {seq} saved, but the audit head file was not updated");
        }
        tracing::warn!(
            who,
            through,
            seq,
            acknowledged = chosen.len(),
            "audit log problems acknowledged"
        );
        Ok(AuditAcknowledgement {
            record,
            tamper_record,
            acknowledged: chosen,
        })
    }
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
