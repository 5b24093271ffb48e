//! The audit record as it leaves the host (`audit export`, `GET /v1/audit`)
//! and its hash chain.
//!
//! Each record's `hash` is
//! `hex(sha256(prev_hash + "\n" + canonical_json({seq, ts, who, action, project,
//! release, outcome, duration_ms, reason, detail})))`, where the first record's
//! `prev_hash` is [`GENESIS_HASH`]. Canonical JSON (see [`canonical_json`]) is
//! compact, with object keys sorted by their UTF-8 bytes, absent values as
//! `null`, so anyone can recompute a hash from an exported record. The
//! agent's store (`deploy_agent::store::audit`) appends and verifies.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A stored audit record; one JSON line of `deploy-agent audit export`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// 1, 2, 3, … without gaps: a gap means a deletion.
    pub seq: i64,
    /// UTC RFC 3339, assigned by the store.
    pub ts: String,
    pub who: String,
    pub action: String,
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record should have given its fields and `prev_hash`;
    /// lets an exported log be checked away from the host.
    pub fn compute_hash(&self) -> String {
        chain_hash(
            &self.prev_hash,
            &Hashed {
                seq: self.seq,
                ts: &self.ts,
                who: &self.who,
                action: &self.action,
                project: self.project.as_deref(),
                release: self.release.as_deref(),
                outcome: self.outcome.as_deref(),
                duration_ms: self.duration_ms,
                reason: self.reason.as_deref(),
                detail: &canonical_json(&self.detail),
            },
        )
    }
}

/// Serialises `v` canonically: no whitespace, object keys sorted by their
/// UTF-8 bytes, strings escaped minimally (`\"`, `\\`, `\b \f \n \r \t`,
/// other control characters as lowercase `\u00xx`), numbers as serde_json
/// prints them. It does not depend on serde_json's `preserve_order` feature,
/// which another crate in the build could switch on.
pub fn canonical_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(k, out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_opt_string(s: Option<&str>, out: &mut String) {
    match s {
        Some(s) => write_json_string(s, out),
        None => out.push_str("null"),
    }
}

/// The hashed fields of a record. `detail` is already canonical JSON text:
/// verification hashes the stored text as is, so even a change that keeps
/// the JSON meaning (reformatting) shows up.
pub struct Hashed<'a> {
    pub seq: i64,
    pub ts: &'a str,
    pub who: &'a str,
    pub action: &'a str,
    pub project: Option<&'a str>,
    pub release: Option<&'a str>,
    pub outcome: Option<&'a str>,
    pub duration_ms: Option<u64>,
    pub reason: Option<&'a str>,
    pub detail: &'a str,
}

/// The canonical JSON object of the hashed fields, keys in sorted order
/// (written by hand so the stored detail text is embedded verbatim; a test
/// checks it against [`canonical_json`]).
pub fn hashed_payload(f: &Hashed<'_>) -> String {
    let mut out = String::with_capacity(256 + f.detail.len());
    out.push_str("{\"action\":");
    write_json_string(f.action, &mut out);
    out.push_str(",\"detail\":");
    out.push_str(f.detail);
    out.push_str(",\"duration_ms\":");
    match f.duration_ms {
        Some(d) => out.push_str(&d.to_string()),
        None => out.push_str("null"),
    }
    out.push_str(",\"outcome\":");
    write_opt_string(f.outcome, &mut out);
    out.push_str(",\"project\":");
    write_opt_string(f.project, &mut out);
    out.push_str(",\"reason\":");
    write_opt_string(f.reason, &mut out);
    out.push_str(",\"release\":");
    write_opt_string(f.release, &mut out);
    out.push_str(",\"seq\":");
    out.push_str(&f.seq.to_string());
    out.push_str(",\"ts\":");
    write_json_string(f.ts, &mut out);
    out.push_str(",\"who\":");
    write_json_string(f.who, &mut out);
    out.push('}');
    out
}

pub fn chain_hash(prev_hash: &str, f: &Hashed<'_>) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(hashed_payload(f).as_bytes());
    hex::encode(h.finalize())
}
