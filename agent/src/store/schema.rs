//! Schema creation and migration, versioned with `PRAGMA user_version`.
//!
//! The daemon and the CLI may open the same file at the same moment (the
//! first `deploy-agent deploy` on a fresh host races the daemon's start), so
//! migration runs inside an IMMEDIATE transaction and re-reads the version
//! once it holds the write lock: whichever process gets there second sees the
//! work already done.

use rusqlite::{Connection, TransactionBehavior};

/// One entry per schema version; entry `i` takes the schema from version `i`
/// to `i + 1`. Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE releases (
        project        TEXT NOT NULL,
        release        TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        state          TEXT NOT NULL,
        spec_json      TEXT NOT NULL,
        digests_json   TEXT NOT NULL,
        image_ids_json TEXT NOT NULL,
        PRIMARY KEY (project, release)
    ) STRICT;

    CREATE TABLE serving (
        project  TEXT PRIMARY KEY NOT NULL,
        current  TEXT,
        previous TEXT,
        since    TEXT
    ) STRICT;

    CREATE TABLE operations (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        project     TEXT NOT NULL,
        release     TEXT NOT NULL,
        previous    TEXT,
        who         TEXT NOT NULL,
        reason      TEXT,
        started_at  TEXT NOT NULL,
        step        TEXT,
        state_json  TEXT,
        finished_at TEXT,
        outcome     TEXT,
        message     TEXT,
        duration_ms INTEGER
    ) STRICT;
    CREATE INDEX operations_by_project ON operations (project, id);
    CREATE INDEX operations_open ON operations (id) WHERE finished_at IS NULL;

    CREATE TABLE images (
        image_id        TEXT PRIMARY KEY NOT NULL,
        reference       TEXT NOT NULL,
        pulled_by_agent INTEGER NOT NULL,
        first_seen      TEXT NOT NULL
    ) STRICT;

    -- seq is assigned by append_audit (last + 1), not by AUTOINCREMENT, so
    -- that a gap always means a deletion.
    CREATE TABLE audit (
        seq         INTEGER PRIMARY KEY NOT NULL,
        ts          TEXT NOT NULL,
        who         TEXT NOT NULL,
        action      TEXT NOT NULL,
        project     TEXT,
        release     TEXT,
        outcome     TEXT,
        duration_ms INTEGER,
        reason      TEXT,
        detail      TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        hash        TEXT NOT NULL
    ) STRICT;
    CREATE INDEX audit_by_project ON audit (project, seq);

    -- Defence in depth only: anyone with write access to the file can drop
    -- these, which is why the records are hash-chained as well.
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN
        SELECT RAISE(ABORT, 'the audit log is append-only: records cannot be modified');
    END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN
        SELECT RAISE(ABORT, 'the audit log is append-only: records cannot be deleted');
    END;
    "#,
    // v2: the environment lease that deploy-controller takes on
    // every host of an environment (see `store::lease`). One row per
    // environment; an expired row may be taken over.
    r#"
    CREATE TABLE leases (
        environment   TEXT PRIMARY KEY NOT NULL,
        deployment_id TEXT NOT NULL,
        identity      TEXT NOT NULL,
        purpose       TEXT,
        acquired_at   TEXT NOT NULL,
        expires_at    TEXT NOT NULL
    ) STRICT;
    "#,
    // v3: when the deployed commit was made (RFC 3339), when the caller
    // says so; `deploy-controller dora` computes lead time from it.
    r#"
    ALTER TABLE operations ADD COLUMN commit_time TEXT;
    "#,
    // v4: the audit log's newest seq and hash inside the database, moved in
    // the same transaction as every append (see `store::audit`), so that
    // deleting the newest records, or all of them, leaves it pointing past
    // the end even when the head file is removed too. A store migrated from
    // v3 starts from its newest record (or the empty log's genesis head).
    r#"
    CREATE TABLE audit_head (
        id   INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
        seq  INTEGER NOT NULL,
        hash TEXT NOT NULL
    ) STRICT;
    INSERT INTO audit_head (id, seq, hash)
    SELECT 1,
           COALESCE((SELECT seq FROM audit ORDER BY seq DESC LIMIT 1), 0),
           COALESCE((SELECT hash FROM audit ORDER BY seq DESC LIMIT 1),
                    '0000000000000000000000000000000000000000000000000000000000000000');

    -- Defence in depth only, like the audit table's triggers.
    CREATE TRIGGER audit_head_forward_only BEFORE UPDATE ON audit_head
    WHEN NEW.seq <= OLD.seq
    BEGIN
        SELECT RAISE(ABORT, 'the audit head only moves forward');
    END;
    CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
    BEGIN
        SELECT RAISE(ABORT, 'the audit head cannot be deleted');
    END;
    "#,
    // v5: the SHA-256 (hex) of the lease's secret token, which only the
    // caller that took the lease learnt and which a hand-over of the lease
    // must show (see `store::lease`). A lease taken before has none: it
    // cannot be handed over until its holder asks for it again.
    r#"
    ALTER TABLE leases ADD COLUMN token_sha256 TEXT;
    "#,
];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Why a migration did not happen.
pub(crate) enum MigrateError {
    /// The file was written by a newer build; touching it could lose data.
    TooNew { found: i64 },
    Sqlite {
        version: i64,
        source: rusqlite::Error,
    },
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Brings the schema up to [`SCHEMA_VERSION`].
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    let sqlite = |version| move |source| MigrateError::Sqlite { version, source };
    // Fast path without the write lock: an up-to-date store (the normal case)
    // must not make every CLI invocation queue behind the daemon's writes.
    let found = user_version(conn).map_err(sqlite(0))?;
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    if found > SCHEMA_VERSION {
        return Err(MigrateError::TooNew { found });
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite(found + 1))?;
    let found = user_version(&tx).map_err(sqlite(found + 1))?;
    if found > SCHEMA_VERSION {
        return Err(MigrateError::TooNew { found });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let version = i as i64 + 1;
        tx.execute_batch(sql).map_err(sqlite(version))?;
        // user_version lives in the database header, so setting it inside the
        // transaction commits atomically with the schema change.
        tx.pragma_update(None, "user_version", version)
            .map_err(sqlite(version))?;
    }
    tx.commit().map_err(sqlite(SCHEMA_VERSION))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written by the previous version (v2) gains the commit time
    /// column, and its operations are kept.
    #[test]
    fn v2_stores_migrate_to_v3_keeping_their_operations() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute(
            "INSERT INTO operations (kind, project, release, who, started_at) \
             VALUES ('deploy', 'web', 'v1', 'alice', '2026-11-01T00:00:00Z')",
            [],
        )
        .unwrap();
        assert!(migrate(&mut conn).is_ok());
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        let (release, commit): (String, Option<String>) = conn
            .query_row("SELECT release, commit_time FROM operations", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((release.as_str(), commit), ("v1", None));
    }

    fn at_version(version: usize) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64)
            .unwrap();
        conn
    }

    fn audit_head_row(conn: &Connection) -> (i64, String) {
        conn.query_row("SELECT seq, hash FROM audit_head", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap()
    }

    /// A v3 store's audit head starts at its newest record, so the records
    /// it already has are covered from the upgrade on.
    #[test]
    fn v3_stores_migrate_to_v4_with_the_newest_audit_record_as_head() {
        let mut conn = at_version(3);
        for (seq, hash) in [(1, "a".repeat(64)), (2, "b".repeat(64))] {
            conn.execute(
                "INSERT INTO audit (seq, ts, who, action, detail, prev_hash, hash) \
                 VALUES (?1, '2026-11-01T00:00:00.000Z', 'alice', 'deploy.started', 'null', '', ?2)",
                rusqlite::params![seq, hash],
            )
            .unwrap();
        }
        assert!(migrate(&mut conn).is_ok());
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        assert_eq!(audit_head_row(&conn), (2, "b".repeat(64)));
        // Only moves forward, and cannot be deleted (by accident).
        let err = conn
            .execute("UPDATE audit_head SET seq = 1", [])
            .unwrap_err();
        assert!(err.to_string().contains("only moves forward"), "{err}");
        let err = conn.execute("DELETE FROM audit_head", []).unwrap_err();
        assert!(err.to_string().contains("cannot be deleted"), "{err}");
        conn.execute("UPDATE audit_head SET seq = 3, hash = 'c'", [])
            .unwrap();
    }

    /// A v4 store keeps its lease, with no token: nobody can hand it over
    /// until its holder takes it again.
    #[test]
    fn v4_stores_migrate_to_v5_keeping_their_lease_without_a_token() {
        let mut conn = at_version(4);
        conn.execute(
            "INSERT INTO leases (environment, deployment_id, identity, purpose, acquired_at, expires_at) \
             VALUES ('production', 'd1', 'mtls:ci', 'deploy of v2', '2026-11-01T00:00:00.000Z', '2026-11-01T00:01:00.000Z')",
            [],
        )
        .unwrap();
        assert!(migrate(&mut conn).is_ok());
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        let (id, token): (String, Option<String>) = conn
            .query_row("SELECT identity, token_sha256 FROM leases", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((id.as_str(), token), ("mtls:ci", None));
    }

    #[test]
    fn v3_stores_with_an_empty_audit_log_migrate_to_the_genesis_head() {
        let mut conn = at_version(3);
        assert!(migrate(&mut conn).is_ok());
        assert_eq!(
            audit_head_row(&conn),
            (0, crate::store::GENESIS_HASH.to_owned())
        );
    }
}
