//! When the SSH fallback applies, and when it must not.
//!
//! - Falls back: host `x`'s agent presents an EXPIRED certificate (the TLS
//!   handshake fails) and host `y`'s agent address is a port that accepts
//!   connections and never answers (the connect timeout). Both daemons run:
//!   over SSH, `serve-stdio` hands the request to the daemon, which records
//!   the SSH caller. The key comes from an environment variable (CI
//!   secrets). `--transport agent` never falls back.
//! - Never falls back: an agent that refuses OUR expired certificate (a TLS
//!   alert), answers 403 (this certificate has no grant there) or 409
//!   (another deployment holds the environment lock): the answer is the
//!   result, and not one SSH login happens.

mod common;
mod ssh_common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use deploy_controller::pki::{self as pkilib, Kind};
use deploy_testkit::sshd::Sshd;
use deploy_testkit::{Harness, free_port, wait_until};
use ssh_common::*;

/// An agent whose HTTPS API presents a certificate that expired yesterday.
fn start_expired_agent(pki: &Pki, name: &str) -> Agent {
    let now = time::OffsetDateTime::now_utc();
    let cert = pkilib::issue_between(
        pki.path(),
        &format!("agent-{ENV}-{name}-expired"),
        Kind::Agent,
        &["127.0.0.1".into(), "localhost".into()],
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .expect("issue an expired agent certificate");
    let api = free_port();
    let harness = Harness::builder(agent_bin())
        .config_line(&format!("api_listen = \"127.0.0.1:{api}\""))
        .config_line(&format!("tls_cert = \"{}\"", cert.cert.display()))
        .config_line(&format!("tls_key = \"{}\"", cert.key.display()))
        .config_line(&format!("tls_ca = \"{}\"", pki.ca().display()))
        .config_line(&format!("environment = \"{ENV}\""))
        .config_line("grants = { \"ci-production\" = \"deployer\" }")
        .start();
    wait_until(
        &format!("the HTTPS API of agent {name} on 127.0.0.1:{api}"),
        Duration::from_secs(20),
        || {
            TcpStream::connect(("127.0.0.1", api))
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    );
    Agent {
        name: name.to_string(),
        harness,
        api,
        app_port: free_port(),
    }
}

/// A port that accepts TCP connections and never says a word (what a
/// firewalled or wedged agent looks like from the controller).
struct SilentPort {
    port: u16,
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl SilentPort {
    fn start() -> SilentPort {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a silent port");
        let port = listener.local_addr().expect("local addr").port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                keep.lock().expect("lock").push(s);
            }
        });
        SilentPort { port, _held: held }
    }
}

const KEY_VAR: &str = "DEPLOY_TEST_SSH_KEY";

#[test]
fn an_expired_certificate_or_a_silent_port_falls_back_to_ssh() {
    let pki = Pki::new();
    let expired = start_expired_agent(&pki, "x");
    let mut others = start_agents(&pki, ENV, &["y"], "\"ci-production\" = \"deployer\"");
    let y = others.remove(0);
    let silent = SilentPort::start();
    let sshd = Sshd::start();
    let key = std::fs::read_to_string(&sshd.client_key.private).expect("read the client key");
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = vec![
        HostEntry::new(
            &expired,
            Some(ssh_inline(
                &sshd,
                &expired,
                &sshd.known_hosts,
                Key::Env(KEY_VAR),
            )),
        ),
        HostEntry {
            agent: &y,
            addr: Some(format!("127.0.0.1:{}", silent.port)),
            ssh: Some(ssh_inline(&sshd, &y, &sshd.known_hosts, Key::Env(KEY_VAR))),
        },
    ];
    let inv = inventory(dir.path(), "deploy.toml", &pki, "ci-production", &hosts, "");

    let r = run_env(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v1",
            "--var",
            "TAG=v1",
            "--json",
        ],
        &[(KEY_VAR, key.as_str())],
    );
    r.expect_code(0);
    eprintln!(
        "deployed with both hosts over SSH in {:.1}s",
        r.duration.as_secs_f64()
    );
    assert_eq!(
        summary_hosts(&r.summary()),
        vec![
            ("x".into(), "v1".into(), "ssh".into()),
            ("y".into(), "v1".into(), "ssh".into()),
        ],
        "{r}"
    );
    let warned = warnings(&r.json_lines());
    let x_why = warned
        .iter()
        .find(|w| w.starts_with("host x: its agent cannot be reached"))
        .unwrap_or_else(|| panic!("{warned:#?}"));
    assert!(x_why.to_lowercase().contains("expired"), "{x_why}");
    let y_why = warned
        .iter()
        .find(|w| w.starts_with("host y: its agent cannot be reached"))
        .unwrap_or_else(|| panic!("{warned:#?}"));
    assert!(
        y_why.contains("timed out") || y_why.contains("timeout"),
        "{y_why}"
    );
    // The daemons run: serve-stdio handed the work to them, and they
    // recorded the SSH caller.
    assert!(
        !warned
            .iter()
            .any(|w| w.contains("no deploy-agent daemon answers")),
        "{warned:#?}"
    );
    let who = ssh_who(&sshd, "ci-production");
    for a in [&expired, &y] {
        let audit = a.harness.audit_export(None);
        assert!(
            audit
                .iter()
                .any(|e| e["action"] == "deploy.started" && e["who"] == who.as_str()),
            "host {}: {audit:#?}",
            a.name
        );
        let req = audit
            .iter()
            .find(|e| e["action"] == "ssh.request" && e["detail"]["op"] == "deploy")
            .unwrap_or_else(|| panic!("host {}: {audit:#?}", a.name));
        assert_eq!(req["detail"]["served_by"], "daemon");
        assert_eq!(
            req["detail"]["claimed"]["key_fingerprint"],
            sshd.client_key.fingerprint.as_str()
        );
        assert_eq!(a.harness.current_release("web").as_deref(), Some("v1"));
    }

    // Our own certificate expired: the agent refuses it in the TLS
    // handshake, and that alert is its answer: reported (exit 6), never
    // hidden by going over SSH.
    pki.expired_client("ci-production-old");
    let old_cert = inventory(
        dir.path(),
        "old-cert.toml",
        &pki,
        "ci-production-old",
        &[HostEntry::new(
            &y,
            Some(ssh_inline(&sshd, &y, &sshd.known_hosts, Key::Env(KEY_VAR))),
        )],
        "",
    );
    let logins = sshd.accepted_logins();
    let r = run_env(
        &old_cert,
        &["status", "--env", ENV, "--json"],
        &[(KEY_VAR, key.as_str())],
    );
    r.expect_code(6);
    let s: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("status JSON");
    assert_eq!(s["hosts"][0]["via"]["transport"], "agent", "{r}");
    assert_eq!(s["hosts"][0]["health"], "refused", "{r}");
    let error = s["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused this controller's client certificate")
            && error.contains("certificate_expired"),
        "{r}"
    );
    assert!(!r.text().contains("falling back"), "{r}");
    assert_eq!(
        sshd.accepted_logins(),
        logins,
        "no SSH for our own certificate"
    );
    eprintln!("our expired certificate: {error}");
    let r = run_env(
        &old_cert,
        &["deploy", "--env", ENV, "--release", "v2", "--var", "TAG=v2"],
        &[(KEY_VAR, key.as_str())],
    );
    r.expect_code(6);
    assert!(
        r.stderr
            .contains("refused this controller's client certificate"),
        "{r}"
    );
    assert_eq!(
        sshd.accepted_logins(),
        logins,
        "no SSH for our own certificate"
    );
    assert_eq!(y.harness.current_release("web").as_deref(), Some("v1"));

    // No client certificate at all: the inventory is SSH only (the team
    // that used to `ssh host deploy.sh`). Status and a deploy go over SSH;
    // --transport agent is a configuration error naming what is missing.
    let text = std::fs::read_to_string(&old_cert).expect("read the inventory");
    let ssh_only = dir.path().join("ssh-only.toml");
    let without_tls = text
        .split_once("\n[environments.")
        .map(|(_, rest)| format!("[environments.{rest}"))
        .expect("the inventory has an environment");
    assert!(!without_tls.contains("[tls]"), "{without_tls}");
    std::fs::write(&ssh_only, without_tls).expect("write the inventory");
    let r = run_env(
        &ssh_only,
        &["status", "--env", ENV, "--json"],
        &[(KEY_VAR, key.as_str())],
    );
    r.expect_code(0);
    let s: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("status JSON");
    assert_eq!(s["hosts"][0]["via"]["transport"], "ssh", "{r}");
    assert!(
        s["hosts"][0]["via"]["reason"]
            .as_str()
            .is_some_and(|m| m.contains("no client certificate")),
        "{r}"
    );
    assert_eq!(s["hosts"][0]["release"], "v1", "{r}");
    let r = run_env(
        &ssh_only,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v2",
            "--var",
            "TAG=v2",
            "--json",
        ],
        &[(KEY_VAR, key.as_str())],
    );
    r.expect_code(0);
    assert_eq!(
        summary_hosts(&r.summary()),
        vec![("y".into(), "v2".into(), "ssh".into())],
        "{r}"
    );
    let r = run_env(
        &ssh_only,
        &["rollback", "--env", ENV, "--json"],
        &[(KEY_VAR, key.as_str())],
    );
    r.expect_code(0);
    assert_eq!(y.harness.current_release("web").as_deref(), Some("v1"));
    let logins = sshd.accepted_logins();
    let r = run(&ssh_only, &["--transport", "agent", "status", "--env", ENV]);
    r.expect_code(2);
    assert!(
        r.stderr.contains("no client certificate") && r.stderr.contains("[tls]"),
        "{r}"
    );
    assert_eq!(sshd.accepted_logins(), logins, "nothing was contacted");

    // --transport agent: the same unreachable agents are an error (exit 5),
    // and SSH is not even tried.
    let logins = sshd.accepted_logins();
    let r = run_env(
        &inv,
        &[
            "--transport",
            "agent",
            "deploy",
            "--env",
            ENV,
            "--release",
            "v2",
            "--var",
            "TAG=v2",
        ],
        &[(KEY_VAR, key.as_str())],
    );
    r.expect_code(5);
    assert!(r.stderr.contains("cannot reach its agent"), "{r}");
    assert!(!r.text().contains("falling back"), "{r}");
    assert_eq!(
        sshd.accepted_logins(),
        logins,
        "no SSH with --transport agent"
    );
    assert_eq!(
        expired.harness.current_release("web").as_deref(),
        Some("v1")
    );

    // --transport ssh without the key's variable: a configuration error
    // naming it.
    let r = run(&inv, &["--transport", "ssh", "status", "--env", ENV]);
    assert_eq!(r.code, 2, "{r}");
    assert!(
        r.text().contains(KEY_VAR) && r.text().contains("not set"),
        "{r}"
    );
}

/// Takes the environment lease on `agent` for another deployment, through
/// its local socket (serve-stdio hands it to the daemon).
fn hold_lease(agent: &Agent, deployment: &str) {
    let mut c = agent.harness.command(&["serve-stdio"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn serve-stdio");
    let req = format!(
        "{{\"op\":\"lock\",\"request\":{{\"deployment_id\":\"{deployment}\",\"ttl_ms\":600000,\"purpose\":\"a long migration\"}},\"caller\":{{\"controller\":\"ci-other\"}}}}\n"
    );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(req.as_bytes())
        .expect("write the request");
    let out = child.wait_with_output().expect("serve-stdio");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"served_by\":\"daemon\""), "{stdout}");
}

#[test]
fn an_agent_that_answers_is_never_routed_around() {
    let pki = Pki::new();
    // `denying` grants this certificate nothing; `locked` is held by
    // another deployment.
    let mut agents = start_agents(
        &pki,
        ENV,
        &["denying"],
        "\"ci-someone-else\" = \"deployer\"",
    );
    agents.extend(start_agents(
        &pki,
        ENV,
        &["locked"],
        "\"ci-production\" = \"deployer\"",
    ));
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    fn entry<'a>(sshd: &Sshd, a: &'a Agent) -> HostEntry<'a> {
        HostEntry::new(a, Some(ssh_inline(sshd, a, &sshd.known_hosts, Key::File)))
    }
    let denying = inventory(
        dir.path(),
        "denying.toml",
        &pki,
        "ci-production",
        &[entry(&sshd, &agents[0])],
        "",
    );
    let locked = inventory(
        dir.path(),
        "locked.toml",
        &pki,
        "ci-production",
        &[entry(&sshd, &agents[1])],
        "",
    );

    // 403: reported as it is (exit 6), no SSH.
    let r = run(
        &denying,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
    );
    r.expect_code(6);
    assert!(
        r.stderr.contains("mtls:ci-production") && r.stderr.contains("needs role deployer"),
        "{r}"
    );
    assert!(!r.text().contains("SSH"), "{r}");
    let r = run(&denying, &["status", "--env", ENV, "--json"]);
    r.expect_code(6);
    assert!(r.stdout.contains("\"health\":\"refused\""), "{r}");
    assert!(r.stdout.contains("\"transport\":\"agent\""), "{r}");

    // 409 locked: reported as it is (exit 4, naming the holder), no SSH.
    hold_lease(&agents[1], "migration-42");
    let r = run(
        &locked,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
    );
    r.expect_code(4);
    assert!(
        r.stderr.contains("migration-42") && r.stderr.contains("a long migration"),
        "{r}"
    );
    assert!(!r.text().contains("SSH"), "{r}");

    assert_eq!(
        sshd.accepted_logins(),
        0,
        "an answer is never routed around:\n{}",
        sshd.log()
    );
    for a in &agents {
        assert_eq!(a.harness.current_release("web"), None, "host {}", a.name);
        assert!(a.harness.history("web").is_empty(), "host {}", a.name);
    }
}
