use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::json;
use tempfile::TempDir;

use super::audit::{canonical_json, hashed_payload_for_test, verify_records};
use super::*;

fn fresh() -> (TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = Store::open(&path).unwrap();
    (dir, path, store)
}

fn release(project: &str, release: &str, created_at: &str) -> ReleaseRecord {
    ReleaseRecord {
        project: project.into(),
        release: release.into(),
        created_at: created_at.into(),
        state: ReleaseState::Deploying,
        spec_json: format!(r#"{{"release":"{release}"}}"#),
        digests: BTreeMap::from([("web".to_owned(), "reg/web@sha256:abc".to_owned())]),
        image_ids: vec!["sha256:1111".into(), "sha256:2222".into()],
    }
}

fn new_op(kind: OperationKind, project: &str, release: &str) -> NewOperation {
    NewOperation {
        kind,
        project: project.into(),
        release: release.into(),
        previous: Some("v0".into()),
        who: "alice".into(),
        reason: Some("ticket 42".into()),
        commit_time: None,
    }
}

fn entry(n: u32) -> AuditEntry {
    AuditEntry {
        who: "alice".into(),
        action: "deploy.started".into(),
        project: Some(if n.is_multiple_of(2) { "web" } else { "api" }.into()),
        release: Some(format!("v{n}")),
        outcome: None,
        duration_ms: Some(u64::from(n) * 10),
        reason: Some("because".into()),
        detail: json!({"n": n, "z": [1, "two", null], "a": {"y": true, "b": 1.5}}),
    }
}

fn append_n(store: &Store, n: u32) -> Vec<AuditRecord> {
    (1..=n)
        .map(|i| store.append_audit(&entry(i)).unwrap())
        .collect()
}

/// A raw connection, as someone tampering with the file would use.
fn raw(path: &std::path::Path) -> Connection {
    Connection::open(path).unwrap()
}

fn broken(v: AuditVerification) -> (i64, String) {
    match v {
        AuditVerification::Broken { seq, reason } => (seq, reason),
        other => panic!("expected Broken, got {other:?}"),
    }
}

#[test]
fn store_is_send_and_sync() {
    fn assert<T: Send + Sync>() {}
    assert::<Store>();
    assert::<StoreError>();
}

#[test]
fn open_sets_pragmas_and_schema_version() {
    let (_dir, path, store) = fresh();
    {
        let conn = store.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let busy: i64 = conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 10_000);
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::SCHEMA_VERSION);
    }
    drop(store);
    // Reopening an up-to-date store keeps the data and the version.
    let store = Store::open(&path).unwrap();
    store
        .put_release(&release("web", "v1", "2026-01-01T00:00:00.000Z"))
        .unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert!(store.release("web", "v1").unwrap().is_some());
    assert_eq!(store.path(), path);
}

#[test]
fn concurrent_first_open_migrates_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = Arc::new(dir.path().join("state.db"));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let path = Arc::clone(&path);
            std::thread::spawn(move || Store::open(&path).map(|_| ()))
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let v: i64 = raw(&path)
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, schema::SCHEMA_VERSION);
}

#[test]
fn open_refuses_a_newer_schema() {
    let (_dir, path, store) = fresh();
    drop(store);
    raw(&path).pragma_update(None, "user_version", 99).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::TooNew { found: 99, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[test]
fn open_error_names_path_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("state.db");
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("--state-dir"), "{msg}");
}

#[test]
fn timestamps_have_fixed_width() {
    let ts = timestamp_now();
    assert_eq!(ts.len(), "2026-11-03T09:15:02.120Z".len(), "{ts}");
    assert!(ts.ends_with('Z'));
    ts.parse::<jiff::Timestamp>().unwrap();
}

#[test]
fn release_state_strings_round_trip() {
    for s in ReleaseState::ALL {
        assert_eq!(ReleaseState::parse(s.as_str()), Some(s));
        assert_eq!(s.as_str().parse::<ReleaseState>(), Ok(s));
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
    }
    assert!("bogus".parse::<ReleaseState>().is_err());
}

#[test]
fn releases_put_get_replace_list_and_state() {
    let (_dir, _path, store) = fresh();
    assert_eq!(store.release("web", "v1").unwrap(), None);
    assert!(store.releases("web").unwrap().is_empty());
    assert!(store.projects().unwrap().is_empty());

    let v1 = release("web", "v1", "2026-01-01T00:00:00.000Z");
    let v3 = release("web", "v3", "2026-01-03T00:00:00.000Z");
    // Same instant written differently: still sorted by time, not text.
    let v2 = release("web", "v2", "2026-01-02T01:00:00+01:00");
    store.put_release(&v1).unwrap();
    store.put_release(&v3).unwrap();
    store.put_release(&v2).unwrap();
    store
        .put_release(&release("api", "a1", "2026-01-05T00:00:00.000Z"))
        .unwrap();

    assert_eq!(store.release("web", "v1").unwrap(), Some(v1.clone()));
    let names: Vec<_> = store
        .releases("web")
        .unwrap()
        .into_iter()
        .map(|r| r.release)
        .collect();
    assert_eq!(names, ["v3", "v2", "v1"]);
    assert_eq!(store.projects().unwrap(), ["api", "web"]);

    // Replace: every field changes.
    let mut v1b = v1.clone();
    v1b.state = ReleaseState::Good;
    v1b.spec_json = "{}".into();
    v1b.digests.insert("db".into(), "reg/db@sha256:def".into());
    v1b.image_ids.clear();
    v1b.created_at = "2026-01-04T00:00:00.000Z".into();
    store.put_release(&v1b).unwrap();
    assert_eq!(store.release("web", "v1").unwrap(), Some(v1b));
    assert_eq!(store.releases("web").unwrap().len(), 3);
    assert_eq!(store.releases("web").unwrap()[0].release, "v1");

    store
        .set_release_state("web", "v2", ReleaseState::Failed)
        .unwrap();
    assert_eq!(
        store.release("web", "v2").unwrap().unwrap().state,
        ReleaseState::Failed
    );
    let err = store
        .set_release_state("web", "nope", ReleaseState::Pruned)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("nope"));
}

#[test]
fn releases_with_equal_timestamps_list_last_inserted_first() {
    let (_dir, _path, store) = fresh();
    let ts = "2026-01-01T00:00:00.000Z";
    for r in ["a", "b", "c"] {
        store.put_release(&release("web", r, ts)).unwrap();
    }
    let names: Vec<_> = store
        .releases("web")
        .unwrap()
        .into_iter()
        .map(|r| r.release)
        .collect();
    assert_eq!(names, ["c", "b", "a"]);
}

#[test]
fn corrupt_release_state_is_reported_not_panicked() {
    let (_dir, path, store) = fresh();
    store
        .put_release(&release("web", "v1", "2026-01-01T00:00:00.000Z"))
        .unwrap();
    raw(&path)
        .execute("UPDATE releases SET state = 'weird'", [])
        .unwrap();
    let err = store.release("web", "v1").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

#[test]
fn serving_tracks_since_only_when_current_changes() {
    let (_dir, _path, store) = fresh();
    assert_eq!(store.serving("web").unwrap(), None);

    store.set_serving("web", Some("v1"), None).unwrap();
    let s1 = store.serving("web").unwrap().unwrap();
    assert_eq!(s1.current.as_deref(), Some("v1"));
    assert_eq!(s1.previous, None);
    let since1 = s1.since.clone().unwrap();

    std::thread::sleep(std::time::Duration::from_millis(5));
    // Same current (e.g. reconciliation re-recording it): since unchanged.
    store.set_serving("web", Some("v1"), Some("v0")).unwrap();
    let s = store.serving("web").unwrap().unwrap();
    assert_eq!(s.since.as_deref(), Some(since1.as_str()));
    assert_eq!(s.previous.as_deref(), Some("v0"));

    store.set_serving("web", Some("v2"), Some("v1")).unwrap();
    let s2 = store.serving("web").unwrap().unwrap();
    assert_eq!(s2.current.as_deref(), Some("v2"));
    assert_eq!(s2.previous.as_deref(), Some("v1"));
    assert!(s2.since.clone().unwrap() > since1, "{s2:?}");

    store.set_serving("web", None, Some("v2")).unwrap();
    assert_eq!(
        store.serving("web").unwrap().unwrap(),
        Serving {
            current: None,
            previous: Some("v2".into()),
            since: None
        }
    );
    assert_eq!(store.serving("api").unwrap(), None);
}

#[test]
fn operations_begin_step_finish_and_open_list() {
    let (_dir, _path, store) = fresh();
    let a = store
        .begin_operation(&new_op(OperationKind::Deploy, "web", "v2"))
        .unwrap();
    let b = store
        .begin_operation(&new_op(OperationKind::Rollback, "api", "a0"))
        .unwrap();
    let c = store
        .begin_operation(&new_op(OperationKind::Reconcile, "web", "v2"))
        .unwrap();
    assert!(a < b && b < c);

    let open = store.open_operations(None).unwrap();
    assert_eq!(open.iter().map(|o| o.id).collect::<Vec<_>>(), [a, b, c]);
    let first = &open[0];
    assert_eq!(first.kind, OperationKind::Deploy);
    assert_eq!(first.project, "web");
    assert_eq!(first.release, "v2");
    assert_eq!(first.previous.as_deref(), Some("v0"));
    assert_eq!(first.who, "alice");
    assert_eq!(first.reason.as_deref(), Some("ticket 42"));
    assert_eq!(first.step, None);
    assert_eq!(first.state_json, None);
    first.started_at.parse::<jiff::Timestamp>().unwrap();

    store.save_step(a, "pull", r#"{"i":1}"#).unwrap();
    store.save_step(a, "start_new", r#"{"i":2}"#).unwrap();
    let op = store.operation(a).unwrap().unwrap();
    assert_eq!(op.step.as_deref(), Some("start_new"));
    assert_eq!(op.state_json.as_deref(), Some(r#"{"i":2}"#));

    let web: Vec<_> = store
        .open_operations(Some("web"))
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(web, [a, c]);

    store
        .finish_operation(a, Outcome::Succeeded, "v2 is serving")
        .unwrap();
    let open: Vec<_> = store
        .open_operations(None)
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(open, [b, c]);
    assert!(
        store.operation(a).unwrap().is_some(),
        "finished ops remain readable"
    );

    // A finished operation is immutable.
    let err = store
        .finish_operation(a, Outcome::Interrupted, "again")
        .unwrap_err();
    assert!(
        matches!(err, StoreError::OperationFinished { id } if id == a),
        "{err:?}"
    );
    let err = store.save_step(a, "late", "{}").unwrap_err();
    assert!(
        matches!(err, StoreError::OperationFinished { id } if id == a),
        "{err:?}"
    );
    // Unknown ids.
    let err = store.save_step(9999, "x", "{}").unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let err = store
        .finish_operation(9999, Outcome::Succeeded, "")
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert_eq!(store.operation(9999).unwrap(), None);
}

#[test]
fn operations_survive_reopen() {
    let (_dir, path, store) = fresh();
    let id = store
        .begin_operation(&new_op(OperationKind::Deploy, "web", "v2"))
        .unwrap();
    store
        .save_step(id, "switch_proxy", r#"{"old":"blue"}"#)
        .unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    let open = store.open_operations(Some("web")).unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].step.as_deref(), Some("switch_proxy"));
}

#[test]
fn history_is_newest_first_with_outcomes() {
    let (_dir, _path, store) = fresh();
    assert!(store.history("web", 10).unwrap().is_empty());
    let a = store
        .begin_operation(&new_op(OperationKind::Deploy, "web", "v1"))
        .unwrap();
    store.finish_operation(a, Outcome::Succeeded, "ok").unwrap();
    let b = store
        .begin_operation(&new_op(OperationKind::Deploy, "web", "v2"))
        .unwrap();
    store
        .finish_operation(b, Outcome::HealthGateFailed, "v2 unhealthy; v1 serves")
        .unwrap();
    store
        .begin_operation(&new_op(OperationKind::Deploy, "api", "a1"))
        .unwrap();
    let _open = store
        .begin_operation(&new_op(OperationKind::Rollback, "web", "v1"))
        .unwrap();

    let h = store.history("web", 10).unwrap();
    let releases: Vec<_> = h
        .iter()
        .map(|e| (e.operation, e.release.as_str()))
        .collect();
    assert_eq!(
        releases,
        [
            (OperationKind::Rollback, "v1"),
            (OperationKind::Deploy, "v2"),
            (OperationKind::Deploy, "v1")
        ]
    );
    assert_eq!(h[0].outcome, None);
    assert_eq!(h[0].finished_at, None);
    assert_eq!(h[0].duration_ms, None);
    assert_eq!(h[1].outcome, Some(Outcome::HealthGateFailed));
    assert_eq!(h[1].message.as_deref(), Some("v2 unhealthy; v1 serves"));
    assert!(h[1].finished_at.is_some());
    assert!(h[1].duration_ms.is_some());
    assert_eq!(h[2].outcome, Some(Outcome::Succeeded));
    assert_eq!(h[2].who, "alice");
    assert_eq!(h[2].previous.as_deref(), Some("v0"));

    let h = store.history("web", 2).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].release, "v1");
    assert_eq!(h[1].release, "v2");
    assert!(store.history("web", 0).unwrap().is_empty());
    assert_eq!(store.history("web", usize::MAX).unwrap().len(), 3);
}

#[test]
fn images_first_record_wins_and_forget() {
    let (_dir, _path, store) = fresh();
    assert_eq!(store.image("sha256:a").unwrap(), None);

    // Present before the agent pulled: never becomes prunable.
    store.record_image("sha256:a", "reg/a:1", false).unwrap();
    store.record_image("sha256:a", "reg/a:2", true).unwrap();
    let a = store.image("sha256:a").unwrap().unwrap();
    assert!(!a.pulled_by_agent);
    assert_eq!(a.reference, "reg/a:1");
    a.first_seen.parse::<jiff::Timestamp>().unwrap();

    // Pulled by the agent: a later sighting does not change that either.
    store.record_image("sha256:b", "reg/b:1", true).unwrap();
    store.record_image("sha256:b", "reg/b:1", false).unwrap();
    assert!(store.image("sha256:b").unwrap().unwrap().pulled_by_agent);

    let ids: Vec<_> = store
        .images()
        .unwrap()
        .into_iter()
        .map(|i| i.image_id)
        .collect();
    assert_eq!(ids, ["sha256:a", "sha256:b"]);

    store.forget_image("sha256:a").unwrap();
    assert_eq!(store.image("sha256:a").unwrap(), None);
    store.forget_image("sha256:a").unwrap(); // idempotent
    // Forgotten, then seen again: a new first record.
    store.record_image("sha256:a", "reg/a:3", true).unwrap();
    assert!(store.image("sha256:a").unwrap().unwrap().pulled_by_agent);
}

// ---- audit ----------------------------------------------------------------

#[test]
fn canonical_json_sorts_keys_and_escapes() {
    let v = json!({"b": 1, "a": [true, null, 1.5, -3], "c": {"z": "x\"y\\\n\u{1}é", "A": {}}});
    assert_eq!(
        canonical_json(&v),
        r#"{"a":[true,null,1.5,-3],"b":1,"c":{"A":{},"z":"x\"y\\\n\u0001é"}}"#
    );
    // It is valid JSON that means the same thing.
    let back: serde_json::Value = serde_json::from_str(&canonical_json(&v)).unwrap();
    assert_eq!(back, v);
}

#[test]
fn hashed_payload_is_the_canonical_json_of_the_fields() {
    let (_dir, _path, store) = fresh();
    let mut e = entry(7);
    e.outcome = Some("succeeded".into());
    e.project = None;
    let r = store.append_audit(&e).unwrap();
    let expected = canonical_json(&json!({
        "seq": r.seq, "ts": r.ts, "who": r.who, "action": r.action,
        "project": r.project, "release": r.release, "outcome": r.outcome,
        "duration_ms": r.duration_ms, "reason": r.reason, "detail": r.detail,
    }));
    assert_eq!(hashed_payload_for_test(&r), expected);
    // And the hash is sha256(prev_hash + "\n" + payload), as documented.
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(format!("{}\n{expected}", r.prev_hash)));
    assert_eq!(r.hash, h);
}

#[test]
fn append_chains_records_and_writes_head() {
    let (_dir, _path, store) = fresh();
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact {
            records: 0,
            head: GENESIS_HASH.into()
        }
    );
    assert_eq!(
        std::fs::read_to_string(store.audit_head_path()).unwrap(),
        format!("0 {GENESIS_HASH}\n")
    );

    let recs = append_n(&store, 3);
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(recs[0].prev_hash, GENESIS_HASH);
    assert_eq!(recs[1].prev_hash, recs[0].hash);
    assert_eq!(recs[2].prev_hash, recs[1].hash);
    for r in &recs {
        assert_eq!(r.hash.len(), 64);
        assert_eq!(r.compute_hash(), r.hash);
        r.ts.parse::<jiff::Timestamp>().unwrap();
    }
    let head = std::fs::read_to_string(store.audit_head_path()).unwrap();
    assert_eq!(head, format!("3 {}\n", recs[2].hash));
    assert_eq!(
        store.audit_head_path().file_name().unwrap(),
        "state.db.audit-head"
    );
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact {
            records: 3,
            head: recs[2].hash.clone()
        }
    );
    // What was returned is what was stored.
    assert_eq!(store.audit(None, 10).unwrap(), recs);
}

#[test]
fn audit_filters_and_limits_oldest_first() {
    let (_dir, _path, store) = fresh();
    append_n(&store, 6); // even n: web, odd n: api
    let all = store.audit(None, 100).unwrap();
    assert_eq!(all.len(), 6);
    let last3: Vec<_> = store
        .audit(None, 3)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(last3, [4, 5, 6]);
    let web: Vec<_> = store
        .audit(Some("web"), 2)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(web, [4, 6]);
    assert!(store.audit(Some("nope"), 10).unwrap().is_empty());
    assert!(store.audit(None, 0).unwrap().is_empty());
}

#[test]
fn audit_record_json_round_trip_and_offline_verify() {
    let (_dir, _path, store) = fresh();
    let mut e = AuditEntry::new("agent", "reconcile.repaired");
    e.detail = json!({"float": 0.1, "big": u64::MAX, "s": "ünï"});
    store.append_audit(&e).unwrap();
    append_n(&store, 3);
    let exported: Vec<String> = store
        .audit(None, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let parsed: Vec<AuditRecord> = exported
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let v = verify_records(&parsed);
    assert!(
        matches!(v, AuditVerification::Intact { records: 4, .. }),
        "{v:?}"
    );
    assert_eq!(v, store.verify_audit().unwrap());

    let mut edited = parsed.clone();
    edited[1].who = "mallory".into();
    assert_eq!(broken(verify_records(&edited)).0, 2);
    let mut cut = parsed.clone();
    cut.remove(2);
    assert_eq!(broken(verify_records(&cut)).0, 3);
}

#[test]
fn huge_duration_is_clamped_consistently() {
    let (_dir, _path, store) = fresh();
    let mut e = AuditEntry::new("a", "x");
    e.duration_ms = Some(u64::MAX);
    let r = store.append_audit(&e).unwrap();
    assert_eq!(r.duration_ms, Some(i64::MAX as u64));
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact { records: 1, .. }
    ));
}

#[test]
fn triggers_refuse_update_and_delete() {
    let (_dir, path, store) = fresh();
    append_n(&store, 2);
    let conn = raw(&path);
    let err = conn
        .execute("UPDATE audit SET who = 'mallory' WHERE seq = 1", [])
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = conn
        .execute("DELETE FROM audit WHERE seq = 1", [])
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact { records: 2, .. }
    ));
}

#[test]
fn tamper_edited_field_is_detected() {
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_update").unwrap();
    conn.execute("UPDATE audit SET who = 'mallory' WHERE seq = 3", [])
        .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert_eq!(reason, "record 3 was modified: hash mismatch");
}

#[test]
fn tamper_reformatted_detail_is_detected() {
    let (_dir, path, store) = fresh();
    append_n(&store, 3);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_update").unwrap();
    // Same JSON meaning, different text: still a modification.
    let detail: String = conn
        .query_row("SELECT detail FROM audit WHERE seq = 2", [], |r| r.get(0))
        .unwrap();
    conn.execute(
        "UPDATE audit SET detail = ?1 WHERE seq = 2",
        [format!(" {detail}")],
    )
    .unwrap();
    assert_eq!(broken(store.verify_audit().unwrap()).0, 2);
}

#[test]
fn tamper_recomputed_hash_breaks_the_next_link() {
    let (_dir, path, store) = fresh();
    let recs = append_n(&store, 4);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_update").unwrap();
    // Edit record 2 and give it a self-consistent hash: record 3 no longer links.
    let mut r2 = recs[1].clone();
    r2.who = "mallory".into();
    r2.hash = r2.compute_hash();
    conn.execute(
        "UPDATE audit SET who = ?1, hash = ?2 WHERE seq = 2",
        [&r2.who, &r2.hash],
    )
    .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3, "{reason}");
    assert!(reason.contains("prev_hash mismatch"), "{reason}");
}

#[test]
fn tamper_deleted_middle_record_is_detected() {
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_delete").unwrap();
    conn.execute("DELETE FROM audit WHERE seq = 3", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.contains("record 3 was deleted"), "{reason}");

    conn.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.contains("records 3 to 4 were deleted"), "{reason}");
}

#[test]
fn tamper_deleted_first_record_is_detected() {
    let (_dir, path, store) = fresh();
    append_n(&store, 3);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_delete").unwrap();
    conn.execute("DELETE FROM audit WHERE seq = 1", []).unwrap();
    assert_eq!(broken(store.verify_audit().unwrap()).0, 1);
}

#[test]
fn tamper_deleted_last_record_is_detected_via_head() {
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_delete").unwrap();
    conn.execute("DELETE FROM audit WHERE seq = 5", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 5);
    assert!(reason.contains("records after 4 were deleted"), "{reason}");

    // Appending afterwards must not paper over it: the finding is recorded
    // first (record 6) and numbering skips the deleted seq, so verification
    // still reports the hole.
    let r = store.append_audit(&entry(9)).unwrap();
    assert_eq!(r.seq, 7);
    let marker = &store.audit(None, 2).unwrap()[0];
    assert_eq!((marker.seq, marker.action.as_str()), (6, TAMPER_ACTION));
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 5);
    assert!(reason.contains("record 5 was deleted"), "{reason}");
}

#[test]
fn tamper_deleted_everything_is_detected_via_head() {
    let (_dir, path, store) = fresh();
    append_n(&store, 2);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_delete").unwrap();
    conn.execute("DELETE FROM audit", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 1);
    assert!(reason.contains("truncated"), "{reason}");
    assert!(reason.contains("records 1 to 2 were deleted"), "{reason}");
}

#[test]
fn missing_or_malformed_head_file_is_reported() {
    let (_dir, _path, store) = fresh();
    append_n(&store, 2);
    std::fs::remove_file(store.audit_head_path()).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.contains("missing"), "{reason}");

    std::fs::write(store.audit_head_path(), "garbage\n").unwrap();
    let (_, reason) = broken(store.verify_audit().unwrap());
    assert!(reason.contains("malformed"), "{reason}");

    // An explicit, audited acknowledgement (after checking) makes it intact
    // again: the finding is recorded, then accepted.
    let ack = store
        .acknowledge_audit("root", 3, "head file clobbered by a bad restore script")
        .unwrap();
    assert_eq!(ack.tamper_record.as_ref().map(|r| r.seq), Some(3));
    assert_eq!(ack.record.seq, 4);
    let report = store.verify_audit_report().unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 4);
    assert_eq!(report.acknowledged.len(), 1);
    assert_eq!(report.acknowledged[0].problem.seq, 3);
    assert_eq!(report.acknowledged[0].acknowledged_by, "root");
}

#[test]
fn reopen_does_not_recreate_a_removed_head() {
    let (_dir, path, store) = fresh();
    append_n(&store, 2);
    std::fs::remove_file(store.audit_head_path()).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert!(!store.audit_head_path().exists());
    assert_eq!(broken(store.verify_audit().unwrap()).0, 3);
}

#[test]
fn missing_head_on_an_empty_log_is_intact_and_recreated_on_open() {
    let (_dir, path, store) = fresh();
    std::fs::remove_file(store.audit_head_path()).unwrap();
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact { records: 0, .. }
    ));
    drop(store);
    let store = Store::open(&path).unwrap();
    assert!(store.audit_head_path().exists());
}

#[test]
fn head_lagging_behind_is_accepted_but_a_wrong_hash_is_not() {
    let (_dir, _path, store) = fresh();
    let recs = append_n(&store, 4);
    // A crash between commit and head update leaves the head one behind.
    std::fs::write(store.audit_head_path(), format!("3 {}\n", recs[2].hash)).unwrap();
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact { records: 4, .. }
    ));
    std::fs::write(store.audit_head_path(), format!("3 {}\n", recs[1].hash)).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.contains("head file"), "{reason}");
}

#[test]
fn two_stores_appending_concurrently_form_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let a = Arc::new(Store::open(&path).unwrap());
    let b = Arc::new(Store::open(&path).unwrap());
    const EACH: u32 = 40;
    let spawn = |store: Arc<Store>, who: &'static str| {
        std::thread::spawn(move || {
            for i in 0..EACH {
                let mut e = entry(i);
                e.who = who.into();
                store.append_audit(&e).unwrap();
            }
        })
    };
    let ha = spawn(Arc::clone(&a), "daemon");
    let hb = spawn(Arc::clone(&b), "cli");
    // A verifier running alongside must never see a false "deleted".
    for _ in 0..20 {
        let v = a.verify_audit().unwrap();
        assert!(matches!(v, AuditVerification::Intact { .. }), "{v:?}");
    }
    ha.join().unwrap();
    hb.join().unwrap();

    let expected = u64::from(EACH) * 2;
    for store in [&a, &b] {
        match store.verify_audit().unwrap() {
            AuditVerification::Intact { records, .. } => assert_eq!(records, expected),
            other => panic!("{other:?}"),
        }
    }
    let all = a.audit(None, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, expected);
    assert_eq!(
        all.iter().filter(|r| r.who == "daemon").count() as u32,
        EACH
    );
    assert!(all.iter().all(|r| r.action != TAMPER_ACTION));
    let head = std::fs::read_to_string(a.audit_head_path()).unwrap();
    let last = all.last().unwrap();
    assert_eq!(head, format!("{} {}\n", last.seq, last.hash));
}

#[test]
fn store_shared_across_threads() {
    let (_dir, _path, store) = fresh();
    let store = Arc::new(store);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..10 {
                    let id = store
                        .begin_operation(&new_op(
                            OperationKind::Deploy,
                            "web",
                            &format!("t{t}-{i}"),
                        ))
                        .unwrap();
                    store.save_step(id, "pull", "{}").unwrap();
                    store
                        .finish_operation(id, Outcome::Succeeded, "ok")
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(store.history("web", 100).unwrap().len(), 40);
    assert!(store.open_operations(None).unwrap().is_empty());
}

// ---- audit: tampering must stay detectable ---------------------------------

/// Removes the delete trigger and deletes the records after `keep`, as
/// someone with write access to the state directory could.
fn delete_newest(path: &std::path::Path, keep: i64) {
    let conn = raw(path);
    conn.execute_batch("DROP TRIGGER IF EXISTS audit_no_delete")
        .unwrap();
    conn.execute("DELETE FROM audit WHERE seq > ?1", [keep])
        .unwrap();
}

#[test]
fn append_does_not_recreate_a_removed_head_file() {
    let (_dir, _path, store) = fresh();
    append_n(&store, 3);
    std::fs::remove_file(store.audit_head_path()).unwrap();
    assert_eq!(broken(store.verify_audit().unwrap()).0, 4);
    // The agent's next audited event must not make the log look intact.
    store.append_audit(&entry(4)).unwrap();
    let (_, reason) = broken(store.verify_audit().unwrap());
    assert!(reason.contains("head file"), "{reason}");
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn append_after_deleting_the_newest_records_and_the_head_keeps_reporting_it() {
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    delete_newest(&path, 3);
    std::fs::remove_file(store.audit_head_path()).unwrap();
    broken(store.verify_audit().unwrap());
    store.append_audit(&entry(6)).unwrap();
    broken(store.verify_audit().unwrap());
    // Nor after a restart and more events.
    drop(store);
    let store = Store::open(&path).unwrap();
    store.append_audit(&entry(7)).unwrap();
    broken(store.verify_audit().unwrap());
}

#[test]
fn append_does_not_overwrite_a_malformed_or_mismatched_head_file() {
    let (_dir, _path, store) = fresh();
    let recs = append_n(&store, 3);
    std::fs::write(store.audit_head_path(), "garbage\n").unwrap();
    store.append_audit(&entry(4)).unwrap();
    let (_, reason) = broken(store.verify_audit().unwrap());
    assert!(reason.contains("malformed"), "{reason}");

    let (_dir, _path, store) = fresh();
    append_n(&store, 3);
    // Record 3's hash is not the one the head file names.
    std::fs::write(store.audit_head_path(), format!("3 {}\n", recs[0].hash)).unwrap();
    store.append_audit(&entry(4)).unwrap();
    let (_, reason) = broken(store.verify_audit().unwrap());
    assert!(reason.contains("head file"), "{reason}");
}

#[test]
fn truncated_log_without_head_file_is_not_intact() {
    let (_dir, path, store) = fresh();
    let id = store
        .begin_operation(&new_op(OperationKind::Deploy, "web", "v1"))
        .unwrap();
    append_n(&store, 3);
    store
        .finish_operation(id, Outcome::Succeeded, "ok")
        .unwrap();
    delete_newest(&path, 0);
    std::fs::remove_file(store.audit_head_path()).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 1, "{reason}");
    assert!(reason.contains("truncated"), "{reason}");
    // Reopening must not recreate an "empty log" head, and appending must
    // not start a fresh, intact-looking chain.
    drop(store);
    let store = Store::open(&path).unwrap();
    assert!(!store.audit_head_path().exists());
    let (_, reason) = broken(store.verify_audit().unwrap());
    assert!(reason.contains("truncated"), "{reason}");
    store.append_audit(&entry(9)).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 1, "{reason}");
    assert!(reason.contains("records 1 to 3 were deleted"), "{reason}");
}

/// Sets the database's audit head as someone covering their tracks would.
fn forge_db_head(path: &std::path::Path, head: &AuditHead) {
    let conn = raw(path);
    conn.execute_batch("DROP TRIGGER IF EXISTS audit_head_forward_only")
        .unwrap();
    conn.execute(
        "UPDATE audit_head SET seq = ?1, hash = ?2",
        rusqlite::params![head.seq, head.hash],
    )
    .unwrap();
}

/// Makes both heads name the table's newest record: what someone who knows
/// about them does after deleting records.
fn forge_heads(store: &Store, path: &std::path::Path) {
    let head = store.audit_head().unwrap();
    forge_db_head(path, &head);
    std::fs::write(store.audit_head_path(), format!("{head}\n")).unwrap();
}

/// Replaces the log by `recs`, re-chained from the genesis and with both
/// heads moved: a consistent rewrite that only an anchor can reveal.
fn rewrite_consistently(store: &Store, path: &std::path::Path, mut recs: Vec<AuditRecord>) {
    let mut prev = GENESIS_HASH.to_owned();
    for r in &mut recs {
        r.prev_hash = prev.clone();
        r.hash = r.compute_hash();
        prev = r.hash.clone();
    }
    let conn = raw(path);
    conn.execute_batch("DROP TRIGGER IF EXISTS audit_no_update")
        .unwrap();
    for r in &recs {
        conn.execute(
            "UPDATE audit SET who = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
            rusqlite::params![r.seq, r.who, r.prev_hash, r.hash],
        )
        .unwrap();
    }
    forge_heads(store, path);
}

fn actions(store: &Store) -> Vec<(i64, String)> {
    store
        .audit(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.action))
        .collect()
}

fn finished_op(store: &Store) {
    let id = store
        .begin_operation(&new_op(OperationKind::Deploy, "web", "v1"))
        .unwrap();
    store
        .finish_operation(id, Outcome::Succeeded, "ok")
        .unwrap();
}

#[test]
fn append_records_what_it_found_before_its_own_record() {
    let (_dir, _path, store) = fresh();
    append_n(&store, 3);
    std::fs::remove_file(store.audit_head_path()).unwrap();
    let r = store.append_audit(&entry(4)).unwrap();
    assert_eq!(r.seq, 5, "record 4 says what the append found");
    let recs = store.audit(None, 10).unwrap();
    let marker = &recs[3];
    assert_eq!(
        (marker.seq, marker.who.as_str(), marker.action.as_str()),
        (4, "agent", TAMPER_ACTION)
    );
    let found = marker.reason.as_deref().unwrap();
    assert!(
        found.contains("head file") && found.contains("missing"),
        "{found}"
    );
    assert_eq!(marker.detail["found"][0]["kind"], "head_file");
    assert_eq!(marker.detail["log_ended_at"], format!("3 {}", recs[2].hash));
    // The heads moved on (to the appended record), so only the record of
    // the finding is reported now, and appends do not repeat it.
    let report = store.verify_audit_report().unwrap();
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    assert_eq!(report.breaks[0].seq, 4);
    assert_eq!(report.breaks[0].kind, BreakKind::TamperDetected);
    store.append_audit(&entry(6)).unwrap();
    assert_eq!(store.verify_audit_report().unwrap().breaks, report.breaks);
}

#[test]
fn heads_covered_up_by_hand_still_leave_the_record_of_the_finding() {
    // Someone deletes the newest records and sets the database's head to
    // match, but the head file is gone: the agent's next append records that.
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    delete_newest(&path, 3);
    forge_db_head(&path, &store.audit_head().unwrap());
    std::fs::remove_file(store.audit_head_path()).unwrap();
    store.append_audit(&entry(6)).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 4);
    assert!(reason.contains("tampered with"), "{reason}");
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn a_lagging_head_file_is_not_tampering() {
    // A crash between commit and the head file update leaves it behind.
    let (_dir, _path, store) = fresh();
    let recs = append_n(&store, 4);
    std::fs::write(store.audit_head_path(), format!("3 {}\n", recs[2].hash)).unwrap();
    store.append_audit(&entry(5)).unwrap();
    assert!(actions(&store).iter().all(|(_, a)| a != TAMPER_ACTION));
    assert!(store.verify_audit_report().unwrap().is_intact());
    // Nor is the genesis head after a crash right after the first record.
    let (_dir, _path, store) = fresh();
    append_n(&store, 1);
    std::fs::write(store.audit_head_path(), format!("0 {GENESIS_HASH}\n")).unwrap();
    assert!(store.verify_audit_report().unwrap().is_intact());
    append_n(&store, 1);
    assert_eq!(actions(&store).len(), 2);
}

#[test]
fn appending_an_audit_action_is_refused() {
    let (_dir, _path, store) = fresh();
    for action in [ACK_ACTION, TAMPER_ACTION, "audit.anything"] {
        let err = store
            .append_audit(&AuditEntry::new("mallory", action))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::ReservedAuditAction { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("reserved"), "{err}");
    }
    assert!(store.audit(None, 10).unwrap().is_empty());
}

#[test]
fn empty_log_next_to_finished_operations_is_truncated() {
    // Both heads reset to the empty log: the operations still tell.
    let (_dir, path, store) = fresh();
    finished_op(&store);
    append_n(&store, 3);
    delete_newest(&path, 0);
    forge_heads(&store, &path);
    let report = store.verify_audit_report().unwrap();
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    let b = &report.breaks[0];
    assert_eq!((b.seq, b.kind), (1, BreakKind::Truncated));
    assert!(b.reason.contains("1 finished operation"), "{}", b.reason);
    // The next append records it instead of starting an intact-looking log.
    store.append_audit(&entry(1)).unwrap();
    assert_eq!(actions(&store)[0], (1, TAMPER_ACTION.to_owned()));
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 1);
    assert!(reason.contains("truncated"), "{reason}");
}

#[test]
fn an_operation_that_has_not_written_its_first_record_yet_is_not_truncation() {
    // begin_operation commits just before the operation's first record.
    let (_dir, _path, store) = fresh();
    store
        .begin_operation(&new_op(OperationKind::Deploy, "web", "v1"))
        .unwrap();
    assert!(store.verify_audit_report().unwrap().is_intact());
    store.append_audit(&entry(1)).unwrap();
    assert_eq!(actions(&store).len(), 1);
}

#[test]
fn the_database_head_catches_what_the_file_does_not() {
    // Deleted row.
    let (_dir, path, store) = fresh();
    append_n(&store, 2);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_head_no_delete; DELETE FROM audit_head")
        .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(
        reason.contains("audit head (table audit_head) was deleted"),
        "{reason}"
    );
    // Appending records that and recreates the row.
    store.append_audit(&entry(3)).unwrap();
    let report = store.verify_audit_report().unwrap();
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    assert_eq!(report.breaks[0].kind, BreakKind::TamperDetected);

    // A record added behind the store's back, with the head file moved.
    let (_dir, path, store) = fresh();
    let recs = append_n(&store, 2);
    let mut forged = recs[1].clone();
    forged.seq = 3;
    forged.prev_hash = recs[1].hash.clone();
    forged.hash = forged.compute_hash();
    raw(&path)
        .execute(
            "INSERT INTO audit (seq, ts, who, action, project, release, outcome, duration_ms, reason, detail, prev_hash, hash) \
             SELECT 3, ts, who, action, project, release, outcome, duration_ms, reason, detail, ?1, ?2 FROM audit WHERE seq = 2",
            [&forged.prev_hash, &forged.hash],
        )
        .unwrap();
    std::fs::write(store.audit_head_path(), format!("3 {}\n", forged.hash)).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.contains("not appended by deploy-agent"), "{reason}");
}

// ---- audit: acknowledgement ----------------------------------------------

#[test]
fn acknowledgement_is_audited_and_makes_verify_pass_listing_what_it_accepted() {
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    delete_newest(&path, 5);
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = 3", [])
        .unwrap();
    let (seq, _) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);

    let ack = store
        .acknowledge_audit(
            "alice",
            3,
            "record 3 deleted by a botched cleanup, see OPS-7",
        )
        .unwrap();
    assert_eq!(ack.tamper_record, None);
    assert_eq!(ack.acknowledged.len(), 1);
    assert_eq!(ack.acknowledged[0].kind, BreakKind::Deleted);
    let r = &ack.record;
    assert_eq!(
        (r.seq, r.who.as_str(), r.action.as_str()),
        (6, "alice", ACK_ACTION)
    );
    assert_eq!(
        r.reason.as_deref(),
        Some("record 3 deleted by a botched cleanup, see OPS-7")
    );
    assert_eq!(r.detail["acknowledged"][0]["seq"], 3);
    assert_eq!(r.detail["acknowledged"][0]["kind"], "deleted");

    let report = store.verify_audit_report().unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 5);
    assert_eq!(report.head, store.audit_head().unwrap());
    let a = &report.acknowledged[0];
    assert_eq!((a.problem.seq, a.acknowledged_in), (3, 6));
    assert_eq!(a.acknowledged_by, "alice");
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact { records: 5, .. }
    ));
    // Exported, it verifies the same way.
    let exported = store.audit(None, usize::MAX).unwrap();
    assert_eq!(verify_records(&exported), store.verify_audit().unwrap());
}

#[test]
fn acknowledgement_covers_only_what_it_names_as_it_was() {
    let (_dir, path, store) = fresh();
    let recs = append_n(&store, 6);
    delete_newest(&path, 6);
    let conn = raw(&path);
    conn.execute("DELETE FROM audit WHERE seq = 3", []).unwrap();
    store.acknowledge_audit("alice", 3, "accepted").unwrap();
    assert!(store.verify_audit_report().unwrap().is_intact());

    // The record after the hole pins the acknowledgement: changing it, or
    // widening the hole, is reported.
    conn.execute_batch("DROP TRIGGER audit_no_update").unwrap();
    conn.execute("UPDATE audit SET who = 'mallory' WHERE seq = 4", [])
        .unwrap();
    let report = store.verify_audit_report().unwrap();
    let kinds: Vec<_> = report.breaks.iter().map(|b| (b.seq, b.kind)).collect();
    assert_eq!(
        kinds,
        [(3, BreakKind::Deleted), (4, BreakKind::Modified)],
        "{report:?}"
    );
    conn.execute("UPDATE audit SET who = ?1 WHERE seq = 4", [&recs[3].who])
        .unwrap();
    assert!(store.verify_audit_report().unwrap().is_intact());
    conn.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.contains("records 3 to 4 were deleted"), "{reason}");

    // Deleting the acknowledgement itself brings everything back.
    let (_dir, path, store) = fresh();
    append_n(&store, 4);
    delete_newest(&path, 4);
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = 2", [])
        .unwrap();
    let ack = store.acknowledge_audit("alice", 2, "accepted").unwrap();
    append_n(&store, 1);
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = ?1", [ack.record.seq])
        .unwrap();
    let report = store.verify_audit_report().unwrap();
    let seqs: Vec<_> = report.breaks.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, [2, ack.record.seq], "{report:?}");
    assert!(report.acknowledged.is_empty());
}

#[test]
fn acknowledge_refuses_when_there_is_nothing_to_acknowledge() {
    let (_dir, path, store) = fresh();
    append_n(&store, 4);
    let err = store.acknowledge_audit("alice", 4, "why not").unwrap_err();
    assert!(
        matches!(err, StoreError::AuditAcknowledge { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("intact"), "{err}");

    delete_newest(&path, 4);
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = 3", [])
        .unwrap();
    // Not at or before the record given.
    let err = store.acknowledge_audit("alice", 2, "why not").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no problem at or before record 2"), "{msg}");
    assert!(msg.contains("record 3 was deleted"), "{msg}");
    // No reason, no one.
    let err = store.acknowledge_audit("alice", 3, "  ").unwrap_err();
    assert!(err.to_string().contains("reason is required"), "{err}");
    let err = store.acknowledge_audit("", 3, "because").unwrap_err();
    assert!(
        matches!(err, StoreError::AuditAcknowledge { .. }),
        "{err:?}"
    );
    // Nothing was recorded by the refusals.
    assert_eq!(store.audit(None, 10).unwrap().len(), 3);
}

#[test]
fn a_restored_backup_is_accepted_by_acknowledging_it() {
    // A database restored from a backup: consistent in itself, but older
    // than the head file.
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    delete_newest(&path, 3);
    forge_db_head(&path, &store.audit_head().unwrap());
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 4);
    assert!(reason.contains("restored from a backup"), "{reason}");

    let ack = store
        .acknowledge_audit(
            "root",
            4,
            "restored last night's backup after the disk failed",
        )
        .unwrap();
    // The finding is recorded past the head file's record 5, leaving a hole
    // (4 to 5) that the acknowledgement names too.
    let tamper = ack.tamper_record.clone().unwrap();
    assert_eq!(tamper.seq, 6);
    let named: Vec<_> = ack.acknowledged.iter().map(|b| (b.seq, b.kind)).collect();
    assert_eq!(
        named,
        [(4, BreakKind::Deleted), (6, BreakKind::TamperDetected)]
    );
    let report = store.verify_audit_report().unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.acknowledged.len(), 2);
    assert_eq!(
        std::fs::read_to_string(store.audit_head_path()).unwrap(),
        format!("{}\n", store.audit_head().unwrap())
    );
    // Life goes on.
    store.append_audit(&entry(8)).unwrap();
    assert!(store.verify_audit_report().unwrap().is_intact());
}

// ---- audit: anchoring off the host ----------------------------------------

#[test]
fn audit_head_is_printable_and_parses_back() {
    let (_dir, _path, store) = fresh();
    let genesis = store.audit_head().unwrap();
    assert_eq!(genesis, AuditHead::genesis());
    assert_eq!(genesis.to_string(), format!("0 {GENESIS_HASH}"));
    let recs = append_n(&store, 3);
    let head = store.audit_head().unwrap();
    assert_eq!(head.seq, 3);
    assert_eq!(head.hash, recs[2].hash);
    let printed = head.to_string();
    assert_eq!(printed, format!("3 {}", recs[2].hash));
    // What the head file holds, and what parsing gives back.
    assert_eq!(
        std::fs::read_to_string(store.audit_head_path()).unwrap(),
        format!("{printed}\n")
    );
    assert_eq!(printed.parse::<AuditHead>().unwrap(), head);
    assert_eq!(format!("  {printed}\n").parse::<AuditHead>().unwrap(), head);
    assert_eq!(
        serde_json::to_value(&head).unwrap(),
        json!({"seq": 3, "hash": recs[2].hash})
    );
    for bad in [
        "",
        "3",
        "three abc",
        &format!("3 {} extra", head.hash),
        &format!("-1 {}", head.hash),
        &format!("0 {}", head.hash),
        &format!("3 {}", head.hash.to_uppercase()),
        "3 abc",
    ] {
        let err = bad.parse::<AuditHead>().unwrap_err();
        assert!(err.to_string().contains("is not an audit head"), "{err}");
    }
}

#[test]
fn anchored_verify_accepts_a_log_that_grew_from_the_anchor() {
    let (_dir, _path, store) = fresh();
    let genesis = store.audit_head().unwrap();
    append_n(&store, 3);
    let anchor = store.audit_head().unwrap();
    append_n(&store, 2);
    for a in [&genesis, &anchor, &store.audit_head().unwrap()] {
        let report = store.verify_audit_against(a).unwrap();
        assert!(report.is_intact(), "{a}: {report:?}");
        assert_eq!(report.records, 5);
    }
    let err = store
        .verify_audit_against(&AuditHead {
            seq: 3,
            hash: "nope".into(),
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidAuditHead(_)), "{err:?}");
    assert!(err.to_string().contains("audit head"), "{err}");
}

#[test]
fn anchored_verify_detects_deleted_records_the_heads_no_longer_show() {
    let (_dir, path, store) = fresh();
    append_n(&store, 5);
    let anchor = store.audit_head().unwrap();
    append_n(&store, 2);
    // Records 4 to 7 go, and both heads are set to record 3.
    delete_newest(&path, 3);
    forge_heads(&store, &path);
    assert!(store.verify_audit_report().unwrap().is_intact());
    let report = store.verify_audit_against(&anchor).unwrap();
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    let b = &report.breaks[0];
    assert_eq!((b.seq, b.kind), (4, BreakKind::Anchor));
    assert!(
        b.reason.contains("records after 3 were deleted"),
        "{}",
        b.reason
    );
    assert!(b.reason.contains(&anchor.to_string()), "{}", b.reason);
    // The same check runs on an exported log.
    let exported = store.audit(None, usize::MAX).unwrap();
    assert_eq!(
        audit::verify_records_report(&exported, Some(&anchor)).breaks,
        report.breaks
    );
}

#[test]
fn anchored_verify_detects_history_rewritten_before_the_anchor() {
    let (_dir, path, store) = fresh();
    let recs = append_n(&store, 5);
    // The controller kept record 2's head.
    let anchor = AuditHead {
        seq: 2,
        hash: recs[1].hash.clone(),
    };
    append_n(&store, 1);
    let mut recs = store.audit(None, usize::MAX).unwrap();
    recs[1].who = "mallory".into();
    rewrite_consistently(&store, &path, recs);
    // Consistent on the host: only the anchor can tell.
    assert!(store.verify_audit_report().unwrap().is_intact());
    let report = store.verify_audit_against(&anchor).unwrap();
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    let b = &report.breaks[0];
    assert_eq!((b.seq, b.kind), (2, BreakKind::Anchor));
    assert!(
        b.reason.contains("rewritten up to record 2"),
        "{}",
        b.reason
    );
}

#[test]
fn anchored_verify_detects_truncation() {
    let (_dir, path, store) = fresh();
    append_n(&store, 3);
    let anchor = store.audit_head().unwrap();
    // Everything goes, the heads are reset, and there are no operations to
    // give it away.
    delete_newest(&path, 0);
    forge_heads(&store, &path);
    assert!(store.verify_audit_report().unwrap().is_intact());
    let report = store.verify_audit_against(&anchor).unwrap();
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    let b = &report.breaks[0];
    assert_eq!((b.seq, b.kind), (1, BreakKind::Anchor));
    assert!(b.reason.contains("truncated"), "{}", b.reason);
}

#[test]
fn anchored_verify_reports_problems_acknowledged_after_the_anchor() {
    let (_dir, path, store) = fresh();
    append_n(&store, 4);
    let anchor = store.audit_head().unwrap();
    delete_newest(&path, 4);
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = 2", [])
        .unwrap();
    store
        .acknowledge_audit("mallory", 2, "nothing to see here")
        .unwrap();
    assert!(store.verify_audit_report().unwrap().is_intact());
    // The anchored records are not what was anchored any more.
    let report = store.verify_audit_against(&anchor).unwrap();
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    assert_eq!(
        (report.breaks[0].seq, report.breaks[0].kind),
        (2, BreakKind::Anchor)
    );
    assert!(report.breaks[0].reason.contains("acknowledged in record 5"));
    assert!(report.acknowledged.is_empty());
    // An anchor taken after the acknowledgement accepts it.
    let later = store.audit_head().unwrap();
    let report = store.verify_audit_against(&later).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.acknowledged.len(), 1);
}

#[test]
fn v3_store_with_audit_records_verifies_after_the_upgrade() {
    let (_dir, path, store) = fresh();
    append_n(&store, 3);
    drop(store);
    // What a v3 store looks like: no audit_head table, no lease tokens.
    raw(&path)
        .execute_batch(
            "DROP TABLE audit_head; ALTER TABLE leases DROP COLUMN token_sha256; \
             PRAGMA user_version = 3;",
        )
        .unwrap();
    let store = Store::open(&path).unwrap();
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditVerification::Intact { records: 3, .. }
    ));
    store.append_audit(&entry(4)).unwrap();
    assert_eq!(actions(&store).len(), 4);
    assert!(store.verify_audit_report().unwrap().is_intact());
}

#[test]
fn an_acknowledged_relink_does_not_hide_a_later_edit_of_the_record_before_it() {
    let (_dir, path, store) = fresh();
    let recs = append_n(&store, 4);
    let conn = raw(&path);
    conn.execute_batch("DROP TRIGGER audit_no_update").unwrap();
    // Record 2 edited and given a self-consistent hash: record 3 no longer
    // follows it.
    let edit = |who: &str| {
        let mut r2 = recs[1].clone();
        r2.who = who.into();
        r2.hash = r2.compute_hash();
        conn.execute(
            "UPDATE audit SET who = ?1, hash = ?2 WHERE seq = 2",
            [&r2.who, &r2.hash],
        )
        .unwrap();
    };
    edit("mallory");
    let (seq, _) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    store.acknowledge_audit("alice", 3, "accepted").unwrap();
    assert!(store.verify_audit_report().unwrap().is_intact());
    // Edited again, the same way: not covered by the acknowledgement.
    edit("eve");
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.contains("prev_hash mismatch"), "{reason}");
}
