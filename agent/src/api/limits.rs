//! The bounds of the HTTPS API's connections (used by [`super::tls`]):
//! how many are open at once in all and per certificate identity, how many
//! are being refused, and how often a refusal is logged or audited.
//!
//! Pure bookkeeping with no I/O, unit-tested: a [`Slot`] is taken when a
//! connection is admitted and given back when it is dropped, however the
//! connection ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// How many connections without a grant, or over their identity's cap,
/// may wait for their one refusal answer at once (all identities together).
pub const MAX_REFUSING: usize = 16;

/// The caps: `api_max_connections` and `api_max_connections_per_identity`
/// of agent.toml, and [`MAX_REFUSING`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub total: usize,
    pub per_identity: usize,
    pub refusing: usize,
}

/// What is open now.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    refusing: usize,
    per_identity: HashMap<String, usize>,
}

/// The connection counts, shared by the accept loop and every connection.
#[derive(Debug)]
pub struct Connections {
    caps: Caps,
    open: Mutex<Open>,
}

/// A connection's place under one cap, given back on drop.
#[derive(Debug)]
pub struct Slot {
    connections: Arc<Connections>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Total,
    Identity(String),
    Refusing,
}

/// Why a connection is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `api_max_connections` are open.
    Total,
    /// This identity has `api_max_connections_per_identity` open.
    Identity,
    /// [`MAX_REFUSING`] connections are being refused already.
    Refusing,
}

impl Connections {
    pub fn new(caps: Caps) -> Arc<Connections> {
        Arc::new(Connections {
            caps,
            open: Mutex::new(Open::default()),
        })
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        // A panic while counting leaves consistent counts (each change is
        // one statement), so a poisoned lock is still good.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now (all of them, handshakes included).
    pub fn total(&self) -> usize {
        self.open().total
    }

    /// Connections `identity` has open now.
    pub fn of(&self, identity: &str) -> usize {
        self.open().per_identity.get(identity).copied().unwrap_or(0)
    }

    /// A place for one more connection, as it is accepted.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Full> {
        let mut open = self.open();
        if open.total >= self.caps.total {
            return Err(Full::Total);
        }
        open.total += 1;
        Ok(self.slot(Kind::Total))
    }

    /// A place for one more connection of `identity`, after its handshake.
    pub fn admit_identity(self: &Arc<Self>, identity: &str) -> Result<Slot, Full> {
        let mut open = self.open();
        let n = open.per_identity.entry(identity.to_string()).or_insert(0);
        if *n >= self.caps.per_identity {
            return Err(Full::Identity);
        }
        *n += 1;
        Ok(self.slot(Kind::Identity(identity.to_string())))
    }

    /// A place for a connection that gets one refusal answer.
    pub fn admit_refusal(self: &Arc<Self>) -> Result<Slot, Full> {
        let mut open = self.open();
        if open.refusing >= self.caps.refusing {
            return Err(Full::Refusing);
        }
        open.refusing += 1;
        Ok(self.slot(Kind::Refusing))
    }

    fn slot(self: &Arc<Self>, kind: Kind) -> Slot {
        Slot {
            connections: self.clone(),
            kind,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.open();
        match &self.kind {
            Kind::Total => open.total = open.total.saturating_sub(1),
            Kind::Refusing => open.refusing = open.refusing.saturating_sub(1),
            Kind::Identity(identity) => {
                if let Some(n) = open.per_identity.get_mut(identity) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        open.per_identity.remove(identity);
                    }
                }
            }
        }
    }
}

/// At most one report per key per period; the others are counted and the
/// next report says how many there were.
#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    /// Key → (when it was last reported, occurrences not reported since).
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Keys remembered at most; beyond that, the expired ones are forgotten, and
/// if none has expired the occurrence is not reported.
const THROTTLE_KEYS: usize = 4096;

impl Throttle {
    pub fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)`: report this occurrence now, with `n` occurrences since the
    /// last report that were not; `None`: count it and stay quiet.
    pub fn report(&self, key: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last, quiet)) = seen.get_mut(key) {
            if now.saturating_duration_since(*last) < self.period {
                *quiet += 1;
                return None;
            }
            let n = *quiet;
            *last = now;
            *quiet = 0;
            return Some(n);
        }
        if seen.len() >= THROTTLE_KEYS {
            let period = self.period;
            seen.retain(|_, (last, _)| now.saturating_duration_since(*last) < period);
            if seen.len() >= THROTTLE_KEYS {
                return None;
            }
        }
        seen.insert(key.to_string(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            total: 4,
            per_identity: 2,
            refusing: 1,
        }
    }

    #[test]
    fn the_total_cap_counts_every_connection_until_it_is_dropped() {
        let c = Connections::new(caps());
        let slots: Vec<Slot> = (0..4).map(|_| c.admit().unwrap()).collect();
        assert_eq!(c.total(), 4);
        assert_eq!(c.admit().unwrap_err(), Full::Total);
        drop(slots);
        assert_eq!(c.total(), 0);
        let _again = c.admit().unwrap();
        assert_eq!(c.total(), 1);
    }

    #[test]
    fn each_identity_has_its_own_cap() {
        let c = Connections::new(caps());
        let a1 = c.admit_identity("a").unwrap();
        let _a2 = c.admit_identity("a").unwrap();
        assert_eq!(c.admit_identity("a").unwrap_err(), Full::Identity);
        // Another identity is not affected.
        let b1 = c.admit_identity("b").unwrap();
        assert_eq!((c.of("a"), c.of("b"), c.of("c")), (2, 1, 0));
        drop(a1);
        let _a3 = c.admit_identity("a").unwrap();
        drop(b1);
        assert_eq!(c.of("b"), 0);
        // The identity caps are separate from the total (both are taken).
        assert_eq!(c.total(), 0);
    }

    #[test]
    fn refusals_have_a_small_pool_of_their_own() {
        let c = Connections::new(caps());
        let r = c.admit_refusal().unwrap();
        assert_eq!(c.admit_refusal().unwrap_err(), Full::Refusing);
        let _a = c.admit_identity("a").unwrap();
        drop(r);
        let _r = c.admit_refusal().unwrap();
    }

    #[test]
    fn slots_are_given_back_from_any_thread() {
        let c = Connections::new(Caps {
            total: 1000,
            per_identity: 1000,
            refusing: 1,
        });
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let _t = c.admit().unwrap();
                        let _i = c.admit_identity("x").unwrap();
                    }
                });
            }
        });
        assert_eq!((c.total(), c.of("x")), (0, 0));
    }

    #[test]
    fn a_throttle_reports_once_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(t.report("mtls:a", t0), Some(0));
        assert_eq!(t.report("mtls:a", t0 + Duration::from_secs(1)), None);
        assert_eq!(t.report("mtls:a", t0 + Duration::from_secs(59)), None);
        // Another key is reported on its own.
        assert_eq!(t.report("mtls:b", t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(t.report("mtls:a", t0 + Duration::from_secs(60)), Some(2));
        assert_eq!(t.report("mtls:a", t0 + Duration::from_secs(61)), None);
        assert_eq!(t.report("mtls:a", t0 + Duration::from_secs(200)), Some(1));
    }

    #[test]
    fn a_throttle_forgets_expired_keys_and_stays_bounded() {
        let t = Throttle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..THROTTLE_KEYS {
            assert_eq!(t.report(&format!("k{i}"), t0), Some(0));
        }
        // Full of keys seen within the period: a new one stays quiet.
        assert_eq!(t.report("new", t0 + Duration::from_secs(1)), None);
        // A period later the old ones are forgotten.
        assert_eq!(t.report("new", t0 + Duration::from_secs(61)), Some(0));
        assert_eq!(t.seen.lock().unwrap().len(), 1);
    }
}
