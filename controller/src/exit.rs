//! `deploy-controller`'s exit codes. Stable: CI relies on them. Where they
//! overlap with `deploy-agent`'s ([`deploy_protocol::exit`]) they mean
//! the same thing.

use deploy_protocol::{Outcome, exit as agent};

/// Every host runs the requested release (or the command succeeded).
pub const SUCCESS: i32 = agent::SUCCESS;
/// A host failed its gates; the rollout stopped and every host that had
/// been updated was rolled back: the environment is on the releases it had.
pub const HEALTH_GATE_FAILED: i32 = agent::HEALTH_GATE_FAILED;
/// Bad inventory, compose file, flag, or a release unknown to a host.
/// Nothing changed.
pub const CONFIG: i32 = agent::CONFIG;
/// Pre-pull failed on a host (registry authentication, missing image,
/// registry unreachable, or the tag moved between hosts). Nothing changed.
pub const REGISTRY: i32 = agent::REGISTRY;
/// Another deployment holds the environment lock (the message names its
/// deployment id and identity), even after `--lock-wait`.
pub const LOCKED: i32 = agent::LOCKED;
/// An agent could not be reached (refused, timeout, TLS handshake refused)
/// or its host is not ready (Docker, proxy, state store).
pub const ENVIRONMENT: i32 = agent::ENVIRONMENT;
/// An agent refused this certificate's identity (403), a promotion gate
/// refused the release (the source environment never ran it), or a safety
/// gate of the environment's policy denied the deploy (window, blackout,
/// rate limit, promotion rule; the message says when it would pass).
/// Nothing changed.
pub const DENIED: i32 = agent::DENIED;
/// Hosts were left on different releases, or in an unknown state: a
/// rollback failed, a host had nothing to roll back to, or `max_failed`
/// let the rollout finish around failed hosts. The output names every such
/// host and what it runs. Act on it: `deploy-controller status --env E`.
pub const MIXED: i32 = 7;

/// The exit code of an agent outcome.
pub fn of_outcome(o: Outcome) -> i32 {
    o.exit_code()
}
