//! deploy-agent: the one-host rollout engine.
//!
//! See ARCHITECTURE.md at the repository root for the map. In short:
//! [`rollout`] and [`health`] are the pure core; [`engine`] drives them
//! against [`docker`], [`proxy`] and [`store`]; [`daemon`] and the CLI are
//! two doors into the same engine.
pub mod api;
pub mod compose;
pub mod config;
pub mod daemon;
pub mod docker;
pub mod engine;
pub mod health;
pub mod local;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod proxy;
pub mod rollout;
pub mod service;
pub mod spec;
pub mod stdio;
pub mod store;
/// The wire types, defined once in the protocol crate.
pub use deploy_protocol as wire;
