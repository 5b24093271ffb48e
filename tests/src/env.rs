//! What the e2e tests need from the host, checked once per process. Every
//! check panics with what is missing and how to get it: tests never skip.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::http::get_new_connection;

/// The registry without authentication (scripts/test-env.sh).
pub const REGISTRY: &str = "127.0.0.1:5000";
/// The registry with basic auth (scripts/test-env.sh).
pub const AUTH_REGISTRY: &str = "127.0.0.1:5001";
pub const AUTH_USER: &str = "deployer";
pub const AUTH_PASSWORD: &str = "s3cret";

/// Where a panic message sends the reader.
pub const SETUP_HINT: &str = "run `scripts/test-env.sh` (it starts the test registries on \
     127.0.0.1:5000 and 127.0.0.1:5001 and builds the test images; `scripts/test.sh` runs it \
     before the tests)";

/// The demo images every test may use (tests/images/build.sh).
const DEMO_TAGS: [&str; 5] = ["v1", "v2", "v3", "crash", "noport"];

pub fn registry_addr() -> &'static str {
    REGISTRY
}

pub fn auth_registry_addr() -> &'static str {
    AUTH_REGISTRY
}

/// `127.0.0.1:5000/demo:{tag}`.
pub fn demo_image(tag: &str) -> String {
    format!("{REGISTRY}/demo:{tag}")
}

/// Panics unless the Docker daemon answers.
pub fn require_docker() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        match Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output()
        {
            Err(e) => Err(format!(
                "the `docker` CLI cannot be run ({e}): install it (apt-get install docker.io)"
            )),
            Ok(o) if !o.status.success() => Err(format!(
                "the Docker daemon does not answer: `docker info` failed: {}. Start it \
                 (e.g. `dockerd >/var/log/dockerd.log 2>&1 &`), then {SETUP_HINT}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(_) => Ok(()),
        }
    });
    if let Err(e) = r {
        panic!("e2e test environment not ready: {e}");
    }
}

/// Panics unless the registry on 127.0.0.1:5000 answers and holds the demo images.
pub fn require_test_registry() {
    require_docker();
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        let v2 = registry_get(5000, "/v2/", None)?;
        if v2.status != 200 {
            return Err(format!(
                "GET http://{REGISTRY}/v2/ answered {} (expected 200): something else listens there",
                v2.status
            ));
        }
        let tags = registry_get(5000, "/v2/demo/tags/list", None)?;
        let missing: Vec<&str> = DEMO_TAGS
            .iter()
            .copied()
            .filter(|t| !tags.body.contains(&format!("\"{t}\"")))
            .collect();
        if tags.status != 200 || !missing.is_empty() {
            return Err(format!(
                "the test images are not in the registry {REGISTRY} (missing demo:{missing:?}; \
                 GET /v2/demo/tags/list -> {} {})",
                tags.status, tags.body
            ));
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("e2e test environment not ready: {e}. To fix: {SETUP_HINT}");
    }
}

/// Panics unless the registry with basic auth on 127.0.0.1:5001 answers
/// (401 without credentials, 200 with them).
pub fn require_auth_registry() {
    require_test_registry();
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        let anon = registry_get(5001, "/v2/", None)?;
        if anon.status != 401 {
            return Err(format!(
                "GET http://{AUTH_REGISTRY}/v2/ without credentials answered {} (expected 401)",
                anon.status
            ));
        }
        // base64("deployer:s3cret")
        let auth = registry_get(
            5001,
            "/v2/demo/tags/list",
            Some("Basic ZGVwbG95ZXI6czNjcmV0"),
        )?;
        if auth.status != 200 || !auth.body.contains("\"v1\"") {
            return Err(format!(
                "{AUTH_REGISTRY} does not serve demo:v1 to {AUTH_USER}: GET /v2/demo/tags/list -> {} {}",
                auth.status, auth.body
            ));
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("e2e test environment not ready: {e}. To fix: {SETUP_HINT}");
    }
}

fn registry_get(
    port: u16,
    path: &str,
    auth: Option<&str>,
) -> Result<crate::http::HttpResponse, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(5), get_new_connection(port, path, auth))
            .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(format!(
                "the test registry on 127.0.0.1:{port} does not answer ({e})"
            )),
            Err(_) => Err(format!(
                "the test registry on 127.0.0.1:{port} does not answer within 5 s"
            )),
        }
    })
}

/// The `docker-registry` binary, for [`crate::PrivateRegistry`].
pub(crate) fn registry_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("REGISTRY_BIN") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("docker-registry");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "e2e test environment not ready: the `docker-registry` binary is not on PATH \
         (apt-get install docker-registry, or set REGISTRY_BIN)"
    );
}
