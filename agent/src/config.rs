//! agent.toml: its format and checks live in the protocol crate
//! (`deploy_protocol::config`, which the controller's `install` uses too);
//! this module adds what needs this host.

pub use deploy_protocol::config::*;

/// The host name this agent reports.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
