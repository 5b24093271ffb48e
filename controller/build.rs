//! Embeds the git commit the binary was built from (`--version`); the
//! same script as the agent's, so both binaries say it the same way.
include!("../agent/build.rs");
