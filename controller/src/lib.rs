//! deploy-controller: deploys a release to a fleet of `deploy-agent` hosts
//! over mutual TLS: pre-pull everywhere, the environment lock, canary host(s)
//! then batches, fleet-wide rollback when a host fails its gates.
//!
//! Pure core (no I/O, unit-tested): [`fleet`] (the rollout state machine and
//! the wave plan), [`policy`] (the safety gates: windows, blackouts, rate
//! limit, promotion age), [`dora`] (DORA figures from the hosts' history)
//! and [`inventory`] (the deploy.toml model and its
//! checks).
//! Thin adapters: [`client`] (the agent API over HTTPS), [`lease`] (the
//! environment lock on every host), [`promote`] (digests from the source
//! environment), [`deploy`] (the deploy and rollback commands), [`commands`]
//! (status, history, audit), [`report`] (terminal, plain, JSON and
//! GitHub step summary output) and [`pki`] (the private CA).
pub mod client;
pub mod commands;
pub mod deploy;
pub mod dora;
pub mod exit;
pub mod fleet;
pub mod install; // `deploy-controller install` over SSH
pub mod inventory;
pub mod lease;
pub mod pki;
pub mod policy;
pub mod promote;
pub mod report;
pub mod ssh; // the SSH transport
