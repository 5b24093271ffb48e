//! Test support for the end-to-end tests of `deploy-agent` (agent/tests/*.rs).
//!
//! Everything here runs against the real Docker Engine and the local test
//! registries that `scripts/test-env.sh` starts (127.0.0.1:5000, and
//! 127.0.0.1:5001 with basic auth) with the images `tests/images/build.sh`
//! builds. A helper that needs one of them and does not find it PANICS with a
//! message that names what is missing and how to start it: the tests never
//! skip.
//!
//! - [`Harness`]: one per test. A unique agent instance (so that every test's
//!   containers and networks are its own), a temporary state directory, an
//!   `agent.toml`, the `deploy-agent proxy` and `deploy-agent run` processes,
//!   CLI invocations, compose files, and cleanup on drop.
//! - [`LoadLoop`]: continuous HTTP load (keep-alive and one connection per
//!   request) against `127.0.0.1:PORT`, recording every response.
//! - [`PrivateRegistry`]: a throw-away registry on a free port, for tests that
//!   stop their registry.
//! - [`Compose`]: compose files for the demo images.
//! - [`sshd::Sshd`]: a throw-away OpenSSH server on 127.0.0.1.
//! - [`wait_sigterm_trap`]: to `docker stop` a test image's container right
//!   after starting it (before its trap, the kernel drops the SIGTERM).
//!
//! All traffic goes to 127.0.0.1 only.

pub mod cli;
mod compose;
mod env;
mod harness;
mod http;
mod load;
mod registry;
pub mod sshd; // a throw-away sshd for the SSH transport's tests

pub use compose::{Compose, Health, Service};
pub use env::{
    AUTH_PASSWORD, AUTH_USER, SETUP_HINT, auth_registry_addr, demo_image, registry_addr,
    require_auth_registry, require_docker, require_test_registry,
};
pub use harness::{
    CliOutput, Container, Harness, HarnessBuilder, INSTANCE_LABEL, InitProcess, RunningCli,
    TamperedRecord, docker, free_port, image_id, wait_all, wait_sigterm_trap, wait_until,
};
pub use http::{HttpResponse, http_get};
pub use load::{LoadConfig, LoadLoop, LoadReport, MIN_REQUESTS, Mode, Record, Reordered, Sequence};
pub use registry::PrivateRegistry;
