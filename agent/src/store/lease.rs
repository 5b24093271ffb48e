//! The environment lease: one deployment per environment at a time.
//!
//! `deploy-controller` takes a lease on every host of an environment before
//! it rolls anything, renews it while it runs, and releases it at the end.
//! A lease has an owner (deployment id + the identity that took it) and an
//! expiry: a controller that dies stops renewing, and once the expiry has
//! passed anyone may take the lease over (the agent audits that). One row
//! per environment; all checks run in an IMMEDIATE transaction so two
//! controllers racing for the same host cannot both win.
//!
//! The row also keeps the SHA-256 of the lease's secret token (never the
//! token: the file is readable by the `deploy-agent` group). Every grant
//! replaces it; handing the lease to another identity needs the token
//! ([`Store::hand_over_lease`]), because the owner's identity and
//! deployment id are readable by anyone who may read the lease.
//!
//! Unlike the [`HostLock`](crate::lock::HostLock) (a kernel flock held for
//! the length of one operation on one host), a lease spans a whole fleet
//! rollout and outlives any single request, hence a row with an expiry.

use std::time::Duration;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Store, StoreError};
use crate::wire::Lease;

/// Why a lease request was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "environment {} is locked by deployment {} ({}{}) until {}",
        .0.environment, .0.deployment_id, .0.identity,
        .0.purpose.as_ref().map(|p| format!(", {p}")).unwrap_or_default(), .0.expires_at
    )]
    Held(Box<Lease>),
    #[error("deployment {deployment_id} does not hold the lease of environment {environment}{}",
        .current.as_ref().map(|c| format!(" (deployment {} of {} does, until {})", c.deployment_id, c.identity, c.expires_at))
            .unwrap_or_else(|| " (nobody does)".into()))]
    NotHolder {
        environment: String,
        deployment_id: String,
        current: Option<Box<Lease>>,
    },
    /// A hand-over from the lease's holder without the proof that the
    /// caller is that holder (the lease's token).
    #[error(
        "the environment lease of deployment {} is held by {} until {}, and the hand-over from {from} {}",
        .lease.deployment_id, .lease.identity, .lease.expires_at,
        match .proof { Proof::Missing => "came without its token", Proof::Wrong => "came with a token that is not the lease's", Proof::NoneKept => "cannot be proven: the lease was taken before this agent kept lease tokens" }
    )]
    NoProof {
        lease: Box<Lease>,
        from: String,
        proof: Proof,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was wrong with the proof of a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The request had no token.
    Missing,
    /// The request's token is not the lease's.
    Wrong,
    /// The lease has no token (taken before the store kept them).
    NoneKept,
}

impl Proof {
    /// For the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            Proof::Missing => "no hand_over_token",
            Proof::Wrong => "hand_over_token is not the lease's",
            Proof::NoneKept => "the lease has no token",
        }
    }
}

/// A request for the lease: who asks, for which deployment, for how long,
/// and the SHA-256 (hex) of the token its answer gives the caller (stored
/// with the lease, replacing the one before: the newest answer's token is
/// the one that counts).
#[derive(Debug, Clone, Copy)]
pub struct LeaseAsk<'a> {
    pub environment: &'a str,
    pub deployment_id: &'a str,
    pub identity: &'a str,
    pub purpose: Option<&'a str>,
    pub ttl: Duration,
    pub now: jiff::Timestamp,
    pub token_sha256: &'a str,
}

/// A lease taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub lease: Lease,
    /// The expired lease of another deployment that was replaced.
    pub took_over: Option<Lease>,
    /// The owner already held it: this only extended it.
    pub extended: bool,
}

/// `now` as the store writes it (fixed width, so text order = time order).
fn ts(t: jiff::Timestamp) -> String {
    format!("{t:.3}")
}

fn plus(now: jiff::Timestamp, ttl: Duration) -> jiff::Timestamp {
    let ttl = jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX);
    now.checked_add(ttl).unwrap_or(jiff::Timestamp::MAX)
}

/// Whether `lease` has expired at `now`. An unreadable expiry counts as
/// expired: a damaged row must not lock an environment forever.
pub fn expired(lease: &Lease, now: jiff::Timestamp) -> bool {
    lease
        .expires_at
        .parse::<jiff::Timestamp>()
        .map(|e| e <= now)
        .unwrap_or(true)
}

fn same_owner(lease: &Lease, deployment_id: &str, identity: &str) -> bool {
    lease.deployment_id == deployment_id && lease.identity == identity
}

/// Whether two token digests are equal, in a time that does not depend on
/// where they differ.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

const COLUMNS: &str = "environment, deployment_id, identity, purpose, acquired_at, expires_at";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        environment: r.get(0)?,
        deployment_id: r.get(1)?,
        identity: r.get(2)?,
        purpose: r.get(3)?,
        acquired_at: r.get(4)?,
        expires_at: r.get(5)?,
    })
}

/// The lease row of `environment`, on a connection or in a transaction.
fn lease_row(conn: &rusqlite::Connection, environment: &str) -> rusqlite::Result<Option<Lease>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM leases WHERE environment = ?1"),
        [environment],
        from_row,
    )
    .optional()
}

/// The lease row of `environment` with the digest of its token.
fn lease_row_with_token(
    conn: &rusqlite::Connection,
    environment: &str,
) -> rusqlite::Result<Option<(Lease, Option<String>)>> {
    conn.query_row(
        &format!("SELECT {COLUMNS}, token_sha256 FROM leases WHERE environment = ?1"),
        [environment],
        |r| Ok((from_row(r)?, r.get(6)?)),
    )
    .optional()
}

impl Store {
    /// The lease row of `environment`, expired or not.
    pub fn lease(&self, environment: &str) -> Result<Option<Lease>, StoreError> {
        const OP: &str = "reading the environment lease";
        lease_row(&self.conn(), environment).map_err(self.sql(OP))
    }

    /// The lease of `environment` if it is in force at `now`.
    pub fn active_lease(
        &self,
        environment: &str,
        now: jiff::Timestamp,
    ) -> Result<Option<Lease>, StoreError> {
        Ok(self.lease(environment)?.filter(|l| !expired(l, now)))
    }

    /// Takes the lease for `ask.ttl` from `ask.now`. The same owner asking
    /// again extends it; another owner's lease in force is
    /// [`LeaseError::Held`]; an expired one is replaced (and returned in
    /// `took_over`). Either way the lease keeps `ask.token_sha256` from now on.
    pub fn acquire_lease(&self, ask: &LeaseAsk<'_>) -> Result<Acquired, LeaseError> {
        const OP: &str = "taking the environment lease";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let existing = lease_row(&tx, ask.environment).map_err(self.sql(OP))?;
        let (acquired_at, took_over, extended) = match existing {
            Some(l) if same_owner(&l, ask.deployment_id, ask.identity) => {
                (l.acquired_at, None, true)
            }
            Some(l) if !expired(&l, ask.now) => return Err(LeaseError::Held(Box::new(l))),
            Some(l) => (ts(ask.now), Some(l), false),
            None => (ts(ask.now), None, false),
        };
        let lease = Lease {
            environment: ask.environment.to_string(),
            deployment_id: ask.deployment_id.to_string(),
            identity: ask.identity.to_string(),
            purpose: ask.purpose.map(str::to_string),
            acquired_at,
            expires_at: ts(plus(ask.now, ask.ttl)),
        };
        tx.execute(
            &format!(
                "INSERT INTO leases ({COLUMNS}, token_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (environment) DO UPDATE SET
                    deployment_id = excluded.deployment_id, identity = excluded.identity,
                    purpose = excluded.purpose, acquired_at = excluded.acquired_at,
                    expires_at = excluded.expires_at, token_sha256 = excluded.token_sha256"
            ),
            params![
                lease.environment,
                lease.deployment_id,
                lease.identity,
                lease.purpose,
                lease.acquired_at,
                lease.expires_at,
                ask.token_sha256
            ],
        )
        .map_err(self.sql(OP))?;
        tx.commit().map_err(self.sql(OP))?;
        Ok(Acquired {
            lease,
            took_over,
            extended,
        })
    }

    /// Extends the holder's lease to `now + ttl`. Also after its expiry, as
    /// long as nobody took it over: a renewal that came late is not a loss.
    pub fn renew_lease(
        &self,
        environment: &str,
        deployment_id: &str,
        identity: &str,
        ttl: Duration,
        now: jiff::Timestamp,
    ) -> Result<Lease, LeaseError> {
        const OP: &str = "renewing the environment lease";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let existing = lease_row(&tx, environment).map_err(self.sql(OP))?;
        let mut lease = match existing {
            Some(l) if same_owner(&l, deployment_id, identity) => l,
            current => {
                return Err(LeaseError::NotHolder {
                    environment: environment.to_string(),
                    deployment_id: deployment_id.to_string(),
                    current: current.map(Box::new),
                });
            }
        };
        lease.expires_at = ts(plus(now, ttl));
        tx.execute(
            "UPDATE leases SET expires_at = ?2 WHERE environment = ?1",
            params![environment, lease.expires_at],
        )
        .map_err(self.sql(OP))?;
        tx.commit().map_err(self.sql(OP))?;
        Ok(lease)
    }

    /// Gives the lease up. Releasing a lease nobody holds is fine (`None`);
    /// releasing another owner's is [`LeaseError::NotHolder`].
    pub fn release_lease(
        &self,
        environment: &str,
        deployment_id: &str,
        identity: &str,
    ) -> Result<Option<Lease>, LeaseError> {
        const OP: &str = "releasing the environment lease";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(OP))?;
        let existing = lease_row(&tx, environment).map_err(self.sql(OP))?;
        match existing {
            None => Ok(None),
            Some(l) if same_owner(&l, deployment_id, identity) => {
                tx.execute("DELETE FROM leases WHERE environment = ?1", [environment])
                    .map_err(self.sql(OP))?;
                tx.commit().map_err(self.sql(OP))?;
                Ok(Some(l))
            }
            Some(l) => Err(LeaseError::NotHolder {
                environment: environment.to_string(),
                deployment_id: deployment_id.to_string(),
                current: Some(Box::new(l)),
            }),
        }
    }

    // --- SSH fallback -------------------------------------------

    /// Hands deployment `ask.deployment_id`'s lease from identity `from` to
    /// `ask.identity`, for `ask.ttl` from `ask.now`: the controller that
    /// took the lease over mutual TLS (`mtls:<CN>`) lost the agent's HTTPS
    /// API and carries on over SSH (`ssh:…`).
    ///
    /// `proof_sha256` is the SHA-256 (hex) of the token the caller showed:
    /// it must be the lease's, which only the caller that took it learnt.
    /// Anyone can name the holder and read the deployment id; only the
    /// holder has the token. So:
    /// - `ask.identity` already holding it: it is extended (no proof needed,
    ///   it is the caller's own);
    /// - held by `from` within that deployment (expired or not, as long as
    ///   nobody took it over): handed over with the right token, else
    ///   [`LeaseError::NoProof`] and nothing changes;
    /// - otherwise this is [`Store::acquire_lease`] (so another
    ///   deployment's lease in force is [`LeaseError::Held`]).
    ///
    /// `Ok((acquired, true))` when it was handed over.
    pub fn hand_over_lease(
        &self,
        ask: &LeaseAsk<'_>,
        from: &str,
        proof_sha256: Option<&str>,
    ) -> Result<(Acquired, bool), LeaseError> {
        const OP: &str = "handing the environment lease over";
        {
            let mut conn = self.conn();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.sql(OP))?;
            let existing = lease_row_with_token(&tx, ask.environment).map_err(self.sql(OP))?;
            let held_by_from = existing.filter(|(l, _)| {
                !same_owner(l, ask.deployment_id, ask.identity)
                    && same_owner(l, ask.deployment_id, from)
            });
            if let Some((mut lease, kept)) = held_by_from {
                let proof = match (kept.as_deref(), proof_sha256) {
                    (None, _) => Some(Proof::NoneKept),
                    (Some(_), None) => Some(Proof::Missing),
                    (Some(kept), Some(shown)) if !same_digest(kept, shown) => Some(Proof::Wrong),
                    (Some(_), Some(_)) => None,
                };
                if let Some(proof) = proof {
                    return Err(LeaseError::NoProof {
                        lease: Box::new(lease),
                        from: from.to_string(),
                        proof,
                    });
                }
                lease.identity = ask.identity.to_string();
                lease.expires_at = ts(plus(ask.now, ask.ttl));
                if let Some(p) = ask.purpose {
                    lease.purpose = Some(p.to_string());
                }
                tx.execute(
                    "UPDATE leases SET identity = ?2, expires_at = ?3, purpose = ?4, token_sha256 = ?5
                     WHERE environment = ?1",
                    params![
                        ask.environment,
                        lease.identity,
                        lease.expires_at,
                        lease.purpose,
                        ask.token_sha256
                    ],
                )
                .map_err(self.sql(OP))?;
                tx.commit().map_err(self.sql(OP))?;
                return Ok((
                    Acquired {
                        lease,
                        took_over: None,
                        extended: false,
                    },
                    true,
                ));
            }
        }
        self.acquire_lease(ask).map(|a| (a, false))
    }

    // --- end SSH fallback ---------------------------------------------------
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, s)
    }

    fn t(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    const TTL: Duration = Duration::from_secs(10);

    /// The digest of the token `n` (what the engine stores).
    fn digest(n: u8) -> String {
        format!("{n:064x}")
    }

    const TOKEN: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

    fn ask<'a>(
        environment: &'a str,
        deployment_id: &'a str,
        identity: &'a str,
        purpose: Option<&'a str>,
        ttl: Duration,
        now: jiff::Timestamp,
    ) -> LeaseAsk<'a> {
        LeaseAsk {
            environment,
            deployment_id,
            identity,
            purpose,
            ttl,
            now,
            token_sha256: TOKEN,
        }
    }

    #[test]
    fn first_taker_wins_and_the_second_learns_who_holds_it() {
        let (_d, s) = store();
        let a = s
            .acquire_lease(&ask(
                "prod",
                "d1",
                "mtls:ci",
                Some("deploy of v2"),
                TTL,
                t(0),
            ))
            .unwrap();
        assert_eq!(a.took_over, None);
        assert!(!a.extended);
        assert_eq!(a.lease.deployment_id, "d1");
        let err = s
            .acquire_lease(&ask("prod", "d2", "mtls:other", None, TTL, t(5)))
            .unwrap_err();
        let LeaseError::Held(h) = &err else {
            panic!("{err}")
        };
        assert_eq!(h.deployment_id, "d1");
        let msg = err.to_string();
        assert!(msg.contains("d1") && msg.contains("mtls:ci") && msg.contains("deploy of v2"));
        // Other environments are independent.
        s.acquire_lease(&ask("staging", "d2", "mtls:other", None, TTL, t(5)))
            .unwrap();
    }

    #[test]
    fn the_owner_reacquires_and_renews() {
        let (_d, s) = store();
        let a = s
            .acquire_lease(&ask("prod", "d1", "mtls:ci", None, TTL, t(0)))
            .unwrap();
        let again = s
            .acquire_lease(&ask("prod", "d1", "mtls:ci", None, TTL, t(3)))
            .unwrap();
        assert!(again.extended);
        assert_eq!(again.lease.acquired_at, a.lease.acquired_at);
        assert!(again.lease.expires_at > a.lease.expires_at);
        // Late renewal (after expiry) is fine while nobody took it over.
        let r = s.renew_lease("prod", "d1", "mtls:ci", TTL, t(30)).unwrap();
        assert!(!expired(&r, t(35)));
        assert!(expired(&r, t(40)));
    }

    #[test]
    fn an_expired_lease_is_taken_over_and_its_owner_cannot_renew_it() {
        let (_d, s) = store();
        s.acquire_lease(&ask("prod", "d1", "mtls:ci", None, TTL, t(0)))
            .unwrap();
        assert!(s.active_lease("prod", t(9)).unwrap().is_some());
        assert!(s.active_lease("prod", t(10)).unwrap().is_none());
        let b = s
            .acquire_lease(&ask("prod", "d2", "mtls:ci", None, TTL, t(11)))
            .unwrap();
        assert_eq!(b.took_over.unwrap().deployment_id, "d1");
        let err = s
            .renew_lease("prod", "d1", "mtls:ci", TTL, t(12))
            .unwrap_err();
        assert!(matches!(err, LeaseError::NotHolder { .. }), "{err}");
        assert!(err.to_string().contains("d2"), "{err}");
    }

    #[test]
    fn a_lease_is_handed_over_from_mtls_to_ssh_only_within_its_deployment() {
        let (_d, s) = store();
        s.acquire_lease(&ask("prod", "d1", "mtls:ci", None, TTL, t(0)))
            .unwrap();
        let root_token = digest(2);
        let to_root = |at| LeaseAsk {
            token_sha256: &root_token,
            ..ask("prod", "d1", "ssh:root", None, TTL, t(at))
        };
        // Another deployment cannot use it to take the lease.
        let err = s
            .hand_over_lease(
                &ask("prod", "d2", "ssh:root", None, TTL, t(1)),
                "mtls:ci",
                Some(TOKEN),
            )
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held(_)), "{err}");
        // Nor can a claim of another holder.
        let err = s
            .hand_over_lease(&to_root(1), "mtls:other", Some(TOKEN))
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held(_)), "{err}");
        let (a, handed) = s
            .hand_over_lease(&to_root(2), "mtls:ci", Some(TOKEN))
            .unwrap();
        assert!(handed);
        assert_eq!(a.lease.identity, "ssh:root");
        assert_eq!(
            s.active_lease("prod", t(3)).unwrap().unwrap().identity,
            "ssh:root"
        );
        // Asking again (an answer that was lost): the new holder extends
        // it, whatever token it shows.
        let (a, handed) = s
            .hand_over_lease(&to_root(4), "mtls:ci", Some(TOKEN))
            .unwrap();
        assert!(!handed && a.extended);
        s.renew_lease("prod", "d1", "ssh:root", TTL, t(5)).unwrap();
        assert!(s.release_lease("prod", "d1", "mtls:ci").is_err());
        assert!(s.release_lease("prod", "d1", "ssh:root").unwrap().is_some());
    }

    /// Naming the holder and the deployment is not enough: both are
    /// readable by anyone. Without the lease's token nothing changes.
    #[test]
    fn a_hand_over_needs_the_leases_token() {
        let (_d, s) = store();
        s.acquire_lease(&ask("prod", "d1", "mtls:ci", None, TTL, t(0)))
            .unwrap();
        let thief = LeaseAsk {
            token_sha256: &digest(9),
            ..ask("prod", "d1", "ssh:mallory", None, TTL, t(1))
        };
        for (shown, expected) in [(None, Proof::Missing), (Some(digest(7)), Proof::Wrong)] {
            let err = s
                .hand_over_lease(&thief, "mtls:ci", shown.as_deref())
                .unwrap_err();
            let LeaseError::NoProof { lease, from, proof } = &err else {
                panic!("{err}")
            };
            assert_eq!(*proof, expected);
            assert_eq!(
                (lease.identity.as_str(), from.as_str()),
                ("mtls:ci", "mtls:ci")
            );
            assert!(err.to_string().contains("held by mtls:ci"), "{err}");
        }
        // Still the holder's, with its token.
        assert_eq!(s.lease("prod").unwrap().unwrap().identity, "mtls:ci");
        s.renew_lease("prod", "d1", "mtls:ci", TTL, t(2)).unwrap();

        // The holder asking again gets a new token: the old one proves
        // nothing any more.
        let again = LeaseAsk {
            token_sha256: &digest(3),
            ..ask("prod", "d1", "mtls:ci", None, TTL, t(3))
        };
        assert!(s.acquire_lease(&again).unwrap().extended);
        let err = s
            .hand_over_lease(&thief, "mtls:ci", Some(TOKEN))
            .unwrap_err();
        assert!(
            matches!(
                err,
                LeaseError::NoProof {
                    proof: Proof::Wrong,
                    ..
                }
            ),
            "{err}"
        );
        let (_, handed) = s
            .hand_over_lease(&thief, "mtls:ci", Some(&digest(3)))
            .unwrap();
        assert!(handed);
        // Handed over, the lease has the new holder's token: the one that
        // was shown cannot hand it on again.
        let next = LeaseAsk {
            token_sha256: &digest(4),
            ..ask("prod", "d1", "ssh:eve", None, TTL, t(4))
        };
        let err = s
            .hand_over_lease(&next, "ssh:mallory", Some(&digest(3)))
            .unwrap_err();
        assert!(
            matches!(
                err,
                LeaseError::NoProof {
                    proof: Proof::Wrong,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A lease taken before tokens were kept cannot be handed over.
    #[test]
    fn a_lease_without_a_token_is_not_handed_over() {
        let (dir, s) = store();
        s.acquire_lease(&ask("prod", "d1", "mtls:ci", None, TTL, t(0)))
            .unwrap();
        rusqlite::Connection::open(dir.path().join("state.db"))
            .unwrap()
            .execute("UPDATE leases SET token_sha256 = NULL", [])
            .unwrap();
        let err = s
            .hand_over_lease(
                &ask("prod", "d1", "ssh:root", None, TTL, t(1)),
                "mtls:ci",
                Some(TOKEN),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                LeaseError::NoProof {
                    proof: Proof::NoneKept,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("before this agent kept lease tokens")
        );
        assert!(same_digest(TOKEN, TOKEN) && !same_digest(TOKEN, &digest(1)));
        assert!(!same_digest(TOKEN, ""));
    }

    #[test]
    fn release_only_by_the_owner() {
        let (_d, s) = store();
        assert_eq!(s.release_lease("prod", "d1", "mtls:ci").unwrap(), None);
        s.acquire_lease(&ask("prod", "d1", "mtls:ci", None, TTL, t(0)))
            .unwrap();
        assert!(matches!(
            s.release_lease("prod", "d2", "mtls:ci"),
            Err(LeaseError::NotHolder { .. })
        ));
        // Same deployment id, other identity: not the owner either.
        assert!(matches!(
            s.release_lease("prod", "d1", "mtls:intruder"),
            Err(LeaseError::NotHolder { .. })
        ));
        assert!(s.release_lease("prod", "d1", "mtls:ci").unwrap().is_some());
        assert_eq!(s.lease("prod").unwrap(), None);
        s.acquire_lease(&ask("prod", "d2", "mtls:x", None, TTL, t(1)))
            .unwrap();
    }
}
