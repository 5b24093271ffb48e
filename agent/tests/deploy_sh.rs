//! `scripts/deploy.sh <environment> <commit_sha>|rollback`, the interface
//! teams call from CI over SSH, driven against a real agent (proxy, daemon,
//! Docker, the test registries): each of its exit codes 0, 1, 2 and 3.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use deploy_testkit::{Compose, Harness, auth_registry_addr, registry_addr};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");

fn deploy_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/deploy.sh")
}

/// What one deploy.sh run did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn expect(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "deploy.sh exited {:?}, expected {code}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A deploy.sh environment directory for `h`'s agent.
struct Envs<'a> {
    h: &'a Harness,
    dir: PathBuf,
}

impl<'a> Envs<'a> {
    fn new(h: &'a Harness) -> Envs<'a> {
        let dir = h.dir().join("environments");
        std::fs::create_dir_all(&dir).expect("create the environments directory");
        Envs { h, dir }
    }

    /// `NAME.env` naming `project`, `compose` and `vars`.
    fn write(&self, name: &str, project: &str, compose: &Path, vars: &str) {
        std::fs::write(
            self.dir.join(format!("{name}.env")),
            format!(
                "PROJECT={project}\nCOMPOSE_FILE={}\nDEPLOY_VARS=\"{vars}\"\n",
                compose.display()
            ),
        )
        .expect("write the environment file");
    }

    /// `deploy.sh ARGS` with the agent found through the environment, as a
    /// CI job over SSH would run it on a host.
    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new("bash")
            .arg(deploy_sh())
            .args(args)
            .env("DEPLOY_AGENT", BIN)
            .env("DEPLOY_ENV_DIR", &self.dir)
            .env("DEPLOY_AGENT_STATE_DIR", self.h.state_dir())
            .env("DEPLOY_AGENT_CONFIG", self.h.config_path())
            .env("DOCKER_CONFIG", self.h.docker_config_dir())
            .env_remove("DEPLOY_AGENT_CRASH_AT")
            .env_remove("GITHUB_RUN_ID")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/deploy.sh");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The demo web service with its image tag from `${TAG}` (DEPLOY_VARS),
/// since deploy.sh's release is a commit sha, not an image tag.
fn compose(port: u16, registry: &str) -> Compose {
    Compose::web(port).edit("web", |s| s.image(&format!("{registry}/demo:${{TAG}}")))
}

/// 0: deployed; 1: the health gate failed and the previous release serves;
/// 0 again for `rollback`.
#[test]
fn deploy_sh_exits_0_on_success_1_on_a_failed_health_gate_and_rolls_back() {
    let port = free_port();
    let h = Harness::new(BIN);
    let envs = Envs::new(&h);
    let file = h.write_compose("compose.yml", &compose(port, registry_addr()));

    envs.write("staging", "web", &file, "TAG=v1");
    envs.run(&["staging", "1111111"]).expect(0);
    h.wait_serving(port, "v1", Duration::from_secs(10));
    assert_eq!(h.current_release("web").as_deref(), Some("1111111"));
    let record = &h.history("web")[0];
    assert_eq!(
        record["who"].as_str().map(|w| w.starts_with("unix:")),
        Some(true),
        "{record}"
    );

    // demo:v3 answers 500 on /health.
    envs.write("staging", "web", &file, "TAG=v3");
    let failed = envs.run(&["staging", "3333333"]);
    failed.expect(1);
    assert!(
        failed.stderr.contains("1111111"),
        "the failure does not say which release still serves:\n{}",
        failed.stderr
    );
    h.assert_serving(port, "v1");
    assert_eq!(h.current_release("web").as_deref(), Some("1111111"));

    envs.write("staging", "web", &file, "TAG=v2");
    envs.run(&["staging", "2222222aaaa"]).expect(0);
    h.wait_serving(port, "v2", Duration::from_secs(10));

    envs.run(&["staging", "rollback"]).expect(0);
    h.wait_serving(port, "v1", Duration::from_secs(10));
    assert_eq!(h.current_release("web").as_deref(), Some("1111111"));
}

/// 2: every configuration error, before anything changes.
#[test]
fn deploy_sh_exits_2_on_configuration_errors() {
    let port = free_port();
    let h = Harness::new(BIN);
    let envs = Envs::new(&h);
    let file = h.write_compose("compose.yml", &compose(port, registry_addr()));
    envs.write("staging", "web", &file, "TAG=v1");

    let cases: [(&[&str], &str); 6] = [
        (
            &["production", "1111111"],
            "no configuration for environment 'production'",
        ),
        (&["staging", "not-a-sha"], "is not a commit sha"),
        (&["staging", "12345"], "is not a commit sha"),
        (&["Bad/Env", "1111111"], "is invalid"),
        (&["staging"], "usage: deploy.sh"),
        (&[], "usage: deploy.sh"),
    ];
    for (args, message) in cases {
        let r = envs.run(args);
        r.expect(2);
        assert!(r.stderr.contains(message), "{args:?}: {}", r.stderr);
    }

    // An environment file without PROJECT.
    std::fs::write(envs.dir.join("broken.env"), "COMPOSE_FILE=/srv/x.yml\n").expect("write");
    let r = envs.run(&["broken", "1111111"]);
    r.expect(2);
    assert!(
        r.stderr.contains("must set PROJECT and COMPOSE_FILE"),
        "{}",
        r.stderr
    );

    // A compose file deploy-agent refuses (an unsupported key): its own 2.
    let bad = h.write_file(
        "bad.yml",
        &compose(port, registry_addr())
            .edit("web", |s| s.extra("privileged: true"))
            .render(),
    );
    envs.write("bad", "web", &bad, "TAG=v1");
    let r = envs.run(&["bad", "1111111"]);
    r.expect(2);
    assert!(r.stderr.contains("privileged"), "{}", r.stderr);

    // An undefined ${TAG}: a configuration error too.
    envs.write("novars", "web", &file, "");
    let r = envs.run(&["novars", "1111111"]);
    r.expect(2);
    assert!(r.stderr.contains("TAG"), "{}", r.stderr);

    // Nothing was deployed by any of it.
    assert_eq!(h.current_release("web"), None);
    assert!(h.running_containers().is_empty());
}

/// 3: the registry refuses our credentials, or the image does not exist;
/// what serves is untouched.
#[test]
fn deploy_sh_exits_3_on_registry_authentication_failure_and_missing_image() {
    let port = free_port();
    let h = Harness::builder(BIN).uses_auth_registry().start();
    let envs = Envs::new(&h);
    let good = h.write_compose("good.yml", &compose(port, registry_addr()));
    envs.write("staging", "web", &good, "TAG=v1");
    envs.run(&["staging", "1111111"]).expect(0);

    // 127.0.0.1:5001 wants a password and this agent has none.
    let auth = h.write_compose("auth.yml", &compose(port, auth_registry_addr()));
    envs.write("staging", "web", &auth, "TAG=v2");
    let r = envs.run(&["staging", "2222222"]);
    r.expect(3);
    assert!(
        r.stderr.to_lowercase().contains("auth"),
        "the message does not say authentication failed:\n{}",
        r.stderr
    );

    // A tag the registry does not have.
    envs.write("staging", "web", &good, "TAG=no-such-tag");
    let r = envs.run(&["staging", "3333333"]);
    r.expect(3);
    assert!(r.stderr.contains("no-such-tag"), "{}", r.stderr);

    h.assert_serving(port, "v1");
    assert_eq!(h.current_release("web").as_deref(), Some("1111111"));
}

fn free_port() -> u16 {
    deploy_testkit::free_port()
}
