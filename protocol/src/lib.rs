//! deploy-protocol: everything that crosses a process boundary between
//! `deploy-agent` (CLI, control daemon, `serve-stdio`) and
//! `deploy-controller`, defined once.
//!
//! - [`wire`] (re-exported at the root): requests, events, results, status,
//!   history, the lease, exit codes. Changing a field is an API change.
//! - [`ops`]: the operation table: every operation of the agent's API once,
//!   with its method, path, required role, whether it streams, its request
//!   and response types. The agent's router, its role check, `serve-stdio`'s
//!   mapping and the controller's client are all derived from it.
//! - [`caller`]: who makes a request (Unix user, mTLS certificate, SSH
//!   login, the agent itself), as a type.
//! - [`jsonl`]: the JSON-lines codec every stream uses.
//! - [`audit`]: the audit record and its hash chain (checkable away from
//!   the host).
//! - [`config`]: agent.toml, which the controller's `install` checks too.
//! - [`identity`]: the identity a client certificate carries.
//! - [`timestamp`]: the one timestamp format.
//!
//! No tokio, Docker or SQLite here: the controller links this crate, not
//! the agent.

pub mod audit;
pub mod caller;
pub mod config;
pub mod identity;
pub mod jsonl;
pub mod ops;
pub mod suggest;
pub mod timestamp;
mod wire;

pub use audit::AuditRecord;
pub use caller::Caller;
pub use ops::{Op, Query};
pub use wire::*;
