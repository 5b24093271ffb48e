//! deploy-agent: the one-host rollout engine.
//!
//! See ARCHITECTURE.md at the repository root for the map.
pub mod compose;
pub mod proxy;
pub mod spec;
pub mod store;
pub mod wire;
