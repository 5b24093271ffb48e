//! Bad input changes nothing: an unknown compose key or a malformed file is
//! exit 2, an image that does not exist or a registry that refuses the
//! credentials is exit 3, each with a clear message, while the running
//! release keeps serving every request and `status` still names it.
//! Credentials from agent.toml and from $DOCKER_CONFIG/config.json work.
//! Hostile compose files (deep `${...}` nesting, YAML alias bombs, an
//! `env_file` that is a secret file) are refused the same way, and the
//! daemon that loads them stays up.

use std::path::Path;
use std::time::Duration;

use deploy_testkit::{
    AUTH_PASSWORD, AUTH_USER, CliOutput, Compose, Harness, LoadLoop, auth_registry_addr,
};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");
const PROJECT: &str = "web";

/// Deploys v1 from 127.0.0.1:5000 and returns the port it is served on.
fn serve_v1(h: &Harness) -> u16 {
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    h.wait_serving(port, "v1", Duration::from_secs(10));
    port
}

/// Runs a deploy of `file` as release `release` (extra CLI args) under load
/// and checks that v1 kept serving, untouched.
fn deploy_under_load(
    h: &Harness,
    port: u16,
    file: &Path,
    release: &str,
    extra: &[&str],
) -> CliOutput {
    let load = LoadLoop::start(port);
    load.wait_for_responses(100, Duration::from_secs(10));
    let out = h.deploy_with(PROJECT, file, release, extra, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!("{out}\n{}", report.summary());
    report.assert_clean(&["v1"]);
    h.assert_current(PROJECT, "v1");
    h.assert_serving(port, "v1");
    out
}

fn assert_outcome(out: &CliOutput, outcome: &str) {
    let r = out.result();
    assert_eq!(r["outcome"], outcome, "{out}");
    assert_eq!(
        r["serving"], "v1",
        "the result must say v1 still serves:\n{out}"
    );
}

fn assert_mentions(out: &CliOutput, needle: &str) {
    assert!(
        out.text().contains(needle),
        "the error message must mention {needle:?}:\n{out}"
    );
}

fn assert_auth_message(out: &CliOutput) {
    let text = out.text().to_lowercase();
    assert!(
        ["auth", "unauthorized", "credential", "denied"]
            .iter()
            .any(|w| text.contains(w)),
        "the message must say that authentication failed:\n{out}"
    );
    assert_mentions(out, auth_registry_addr());
}

#[test]
fn unknown_compose_key_is_exit_2_naming_key_and_file() {
    let h = Harness::new(BIN);
    let port = serve_v1(&h);
    let bad = h.write_compose(
        "compose-unknown-key.yml",
        &Compose::web(port).edit("web", |s| s.extra("restart_policy: always")),
    );
    let out = deploy_under_load(&h, port, &bad, "v2", &[]);
    out.expect_code(2);
    assert_outcome(&out, "config_error");
    assert_mentions(&out, "restart_policy");
    assert_mentions(&out, "compose-unknown-key.yml");
}

#[test]
fn a_commit_time_that_is_not_a_time_is_exit_2() {
    let h = Harness::new(BIN);
    let port = serve_v1(&h);
    let file = h.write_compose("compose.yml", &Compose::web(port));
    let out = deploy_under_load(&h, port, &file, "v2", &["--commit-time", "yesterday"]);
    out.expect_code(2);
    assert_outcome(&out, "config_error");
    assert_mentions(&out, "commit_time");
    assert_mentions(&out, "yesterday");
    assert_mentions(&out, "is not an RFC 3339 time");
    // A good one is kept in history.
    h.deploy_with(
        PROJECT,
        &file,
        "v2",
        &["--commit-time", "2026-11-30T22:15:00+01:00"],
        &[],
    )
    .expect_code(0);
    let history = h.history(PROJECT);
    assert_eq!(
        history[0]["commit_time"], "2026-11-30T21:15:00Z",
        "{history:#?}"
    );
}

#[test]
fn unknown_x_deploy_key_is_exit_2_naming_the_key() {
    let h = Harness::new(BIN);
    let port = serve_v1(&h);
    let bad = h.write_file(
        "compose-typo.yml",
        &format!(
            "services:\n  web:\n    image: \"127.0.0.1:5000/demo:${{RELEASE}}\"\n    ports:\n      \
             - \"127.0.0.1:{port}:80\"\n    x-deploy:\n      helth:\n        http: /health\n"
        ),
    );
    let out = deploy_under_load(&h, port, &bad, "v2", &[]);
    out.expect_code(2);
    assert_outcome(&out, "config_error");
    assert_mentions(&out, "helth");
}

#[test]
fn malformed_yaml_is_exit_2() {
    let h = Harness::new(BIN);
    let port = serve_v1(&h);
    let bad = h.write_file(
        "compose-malformed.yml",
        "services:\n  web:\n    image: [\"unclosed\n    ports: - :\n",
    );
    let out = deploy_under_load(&h, port, &bad, "v2", &[]);
    out.expect_code(2);
    assert_outcome(&out, "config_error");
    assert_mentions(&out, "compose-malformed.yml");
}

#[test]
fn hostile_compose_files_are_exit_2_and_the_daemon_stays_up() {
    let mut h = Harness::new(BIN);
    let port = serve_v1(&h);

    // `${A:-${A:-...}}` 5000 levels deep: this overflowed the daemon's stack.
    let nested = h.write_file(
        "compose-nested.yml",
        &format!(
            "services:\n  web:\n    image: \"{}x{}\"\n    ports:\n      - \"127.0.0.1:{port}:80\"\n",
            "${A:-".repeat(5000),
            "}".repeat(5000)
        ),
    );
    let out = deploy_under_load(&h, port, &nested, "v2", &[]);
    out.expect_code(2);
    assert_outcome(&out, "config_error");
    assert_mentions(&out, "compose-nested.yml");
    assert_mentions(&out, "services.web.image");
    assert_mentions(&out, "nested 5000 levels deep");
    h.assert_daemon_running();

    // 6.6 KB that YAML aliases expand to 72.9 million strings.
    let strings: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let mut bomb = format!("x-a: &a [{}]\n", strings.join(","));
    for (name, from) in [("b", "a"), ("c", "b"), ("d", "c")] {
        bomb.push_str(&format!(
            "x-{name}: &{name} [{}]\n",
            vec![format!("*{from}"); 9].join(",")
        ));
    }
    bomb.push_str(&format!("x-e: [{}]\n", vec!["*d"; 100].join(",")));
    bomb.push_str(&Compose::web(port).render());
    let bomb = h.write_file("compose-aliases.yml", &bomb);
    let out = h.deploy(PROJECT, &bomb, "v2");
    out.expect_code(2);
    assert_outcome(&out, "config_error");
    assert_mentions(&out, "compose-aliases.yml");
    assert_mentions(&out, "through YAML aliases");
    h.assert_daemon_running();

    // An env_file that is not one is refused without quoting it, in the
    // answer and in the audit log.
    h.write_file("shadow", "root:$y$j9T$SECRETHASH:20228:0:99999:7:::\n");
    let secret = h.write_compose(
        "compose-secret.yml",
        &Compose::web(port).edit("web", |s| s.extra("env_file: shadow")),
    );
    let out = h.deploy(PROJECT, &secret, "v2");
    out.expect_code(2);
    assert_outcome(&out, "config_error");
    assert_mentions(&out, "line 1");
    assert!(!out.text().contains("SECRETHASH"), "{out}");
    let audit = serde_json::to_string(&h.audit_export(Some(PROJECT))).unwrap_or_default();
    assert!(
        !audit.contains("SECRETHASH"),
        "the audit log quotes the env file"
    );

    h.assert_daemon_running();
    h.assert_current(PROJECT, "v1");
    h.assert_serving(port, "v1");
}

#[test]
fn image_that_does_not_exist_is_exit_3() {
    let h = Harness::new(BIN);
    let port = serve_v1(&h);
    let file = h.write_compose("compose.yml", &Compose::web(port));
    let out = deploy_under_load(&h, port, &file, "nope", &[]);
    out.expect_code(3);
    assert_outcome(&out, "registry_error");
    assert_mentions(&out, "demo:nope");
    let text = out.text().to_lowercase();
    assert!(
        ["not found", "unknown", "does not exist", "no such"]
            .iter()
            .any(|w| text.contains(w)),
        "the message must say that the image does not exist:\n{out}"
    );
}

/// `127.0.0.1:5001/{repo}:${TAG}` published on `port`.
fn auth_compose(port: u16, repo: &str) -> Compose {
    Compose::web(port).edit("web", |s| {
        s.image(&format!("{}/{repo}:${{TAG}}", auth_registry_addr()))
    })
}

#[test]
fn registry_without_credentials_is_exit_3_with_an_auth_message() {
    let h = Harness::builder(BIN).uses_auth_registry().start();
    let port = serve_v1(&h);
    let file = h.write_compose("compose-private.yml", &auth_compose(port, "private"));
    let out = deploy_under_load(&h, port, &file, "p1", &["--var", "TAG=v1"]);
    out.expect_code(3);
    assert_outcome(&out, "registry_error");
    assert_auth_message(&out);
}

#[test]
fn registry_with_a_wrong_password_is_exit_3_with_an_auth_message() {
    let h = Harness::builder(BIN)
        .registry_credentials(auth_registry_addr(), AUTH_USER, "wrong-password")
        .start();
    let port = serve_v1(&h);
    let file = h.write_compose("compose-private.yml", &auth_compose(port, "private"));
    let out = deploy_under_load(&h, port, &file, "p1", &["--var", "TAG=v1"]);
    out.expect_code(3);
    assert_outcome(&out, "registry_error");
    assert_auth_message(&out);
}

#[test]
fn credentials_from_agent_toml_pull_from_the_auth_registry() {
    let h = Harness::builder(BIN)
        .registry_credentials(auth_registry_addr(), AUTH_USER, AUTH_PASSWORD)
        .start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &auth_compose(port, "demo"));
    let out = h.deploy_with(PROJECT, &file, "a1", &["--var", "TAG=v1"], &[]);
    out.expect_code(0);
    let digest = out.result()["digests"]["web"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        digest.starts_with("127.0.0.1:5001/demo@sha256:"),
        "digest {digest:?}:\n{out}"
    );
    h.wait_serving(port, "v1", Duration::from_secs(10));
    h.assert_current(PROJECT, "a1");
}

#[test]
fn credentials_from_docker_config_json_pull_from_the_auth_registry() {
    let h = Harness::builder(BIN).uses_auth_registry().start();
    h.write_docker_config_auth(auth_registry_addr(), AUTH_USER, AUTH_PASSWORD);
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &auth_compose(port, "demo"));
    let out = h.deploy_with(PROJECT, &file, "a1", &["--var", "TAG=v1"], &[]);
    out.expect_code(0);
    h.wait_serving(port, "v1", Duration::from_secs(10));
    h.assert_current(PROJECT, "a1");
}
