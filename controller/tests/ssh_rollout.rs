//! The SSH fallback on a three-host environment: host `b`'s
//! control daemon is stopped (its proxy keeps serving). A deploy reaches
//! `b` over SSH — `deploy-agent serve-stdio` does the work itself under the
//! host lock — and `a`, `c` over mutual TLS; all end on the new release with
//! zero failed requests on every host under load. `status` shows `b` as
//! reached over SSH with its agent down, and a fleet rollback with `b`'s
//! daemon still down puts every host back, again without a failed request.
//! The host's audit log says the request came over SSH, from which key,
//! address and controller.

mod common;
mod ssh_common;

use std::time::Duration;

use common::*;
use deploy_testkit::sshd::Sshd;
use deploy_testkit::{LoadConfig, LoadLoop, http_get};
use ssh_common::*;

fn body(port: u16) -> String {
    http_get(port, "/", Duration::from_secs(3))
        .map(|r| format!("{} {}", r.status, r.body))
        .unwrap_or_else(|e| e)
}

fn loads(agents: &[Agent]) -> Vec<LoadLoop> {
    let loads: Vec<LoadLoop> = agents
        .iter()
        .map(|a| {
            let mut c = LoadConfig::new(a.app_port);
            c.rate = 100.0;
            c.keepalive_workers = 3;
            c.new_connection_workers = 3;
            LoadLoop::with_config(c)
        })
        .collect();
    for l in &loads {
        l.wait_for_responses(50, Duration::from_secs(10));
    }
    loads
}

#[test]
fn one_agent_down_deploy_status_and_rollback_over_ssh_under_load() {
    let pki = Pki::new();
    let mut agents = start_agents(
        &pki,
        ENV,
        &["a", "b", "c"],
        "\"ci-production\" = \"deployer\"",
    );
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts: Vec<HostEntry> = agents
        .iter()
        .map(|a| HostEntry::new(a, Some(ssh_inline(&sshd, a, &sshd.known_hosts, Key::File))))
        .collect();
    let inv = inventory(dir.path(), "deploy.toml", &pki, "ci-production", &hosts, "");
    drop(hosts);

    // v1 everywhere, every agent up: mutual TLS only, no SSH login at all.
    let r = run(
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
    );
    r.expect_code(0);
    assert!(
        summary_hosts(&r.summary())
            .iter()
            .all(|(_, _, via)| via == "agent"),
        "{r}"
    );
    assert_eq!(sshd.accepted_logins(), 0, "no SSH while the agents answer");

    // b's control daemon stops; its proxy keeps serving v1.
    agents[1].harness.stop_daemon();
    assert_eq!(body(agents[1].app_port), "200 v1");

    // v2 under load: b over SSH, a and c over mTLS, not one failed request.
    let running = loads(&agents);
    let r = run(
        &inv,
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
    );
    std::thread::sleep(Duration::from_millis(500));
    let reports: Vec<_> = running.into_iter().map(LoadLoop::stop).collect();
    r.expect_code(0);
    eprintln!(
        "v2 deployed with b over SSH in {:.1}s",
        r.duration.as_secs_f64()
    );
    for (a, rep) in agents.iter().zip(&reports) {
        eprintln!("host {}: {}", a.name, rep.summary());
        rep.assert_zero_failures();
        if let Err(e) = rep.check_sequence(&["v1", "v2"]) {
            panic!("host {}: {e}", a.name);
        }
    }
    let summary = r.summary();
    assert_eq!(
        summary_hosts(&summary),
        vec![
            ("a".into(), "v2".into(), "agent".into()),
            ("b".into(), "v2".into(), "ssh".into()),
            ("c".into(), "v2".into(), "agent".into()),
        ],
        "{r}"
    );
    let lines = r.json_lines();
    let warned = warnings(&lines);
    assert!(
        warned
            .iter()
            .any(|w| w.starts_with("host b: its agent cannot be reached")
                && w.contains("falling back to SSH")),
        "the fallback is said loudly: {warned:#?}"
    );
    assert!(
        warned
            .iter()
            .any(|w| w.contains("host b: no deploy-agent daemon answers there")),
        "{warned:#?}"
    );
    assert!(
        !warned
            .iter()
            .any(|w| w.starts_with("host a:") || w.starts_with("host c:")),
        "{warned:#?}"
    );
    // b's progress streamed back over SSH, live, like the others'.
    assert!(
        lines
            .iter()
            .any(|v| v["type"] == "host" && v["host"] == "b" && v["event"]["type"] == "progress"),
        "{r}"
    );
    for a in &agents {
        assert_eq!(body(a.app_port), "200 v2", "host {}", a.name);
    }

    // b's audit log: the deploy came over SSH, from which key, address and
    // controller; a's came over mutual TLS.
    let who = ssh_who(&sshd, "ci-production");
    let audit_b = agents[1].harness.audit_export(None);
    assert!(
        audit_b.iter().any(|a| a["action"] == "deploy.started"
            && a["release"] == "v2"
            && a["who"] == who.as_str()),
        "expected deploy.started by {who:?}: {audit_b:#?}"
    );
    assert!(
        audit_b
            .iter()
            .any(|a| a["action"] == "lock.acquired" && a["who"] == who.as_str()),
        "the environment lock was taken over SSH: {audit_b:#?}"
    );
    let ssh_deploy = audit_b
        .iter()
        .find(|a| a["action"] == "ssh.request" && a["detail"]["op"] == "deploy")
        .unwrap_or_else(|| panic!("no ssh.request for the deploy: {audit_b:#?}"));
    let d = &ssh_deploy["detail"];
    assert_eq!(d["transport"], "ssh");
    // The Unix user is the kernel's; the SSH details are what sshd's
    // environment said, recorded as claims.
    assert_eq!(d["user"], Sshd::user().as_str());
    let claimed = &d["claimed"];
    assert_eq!(
        claimed["key_fingerprint"],
        sshd.client_key.fingerprint.as_str()
    );
    assert_eq!(claimed["key_type"], "ssh-ed25519");
    assert_eq!(claimed["client_ip"], "127.0.0.1");
    assert!(claimed["client_port"].as_u64().is_some(), "{d}");
    assert_eq!(claimed["controller"], "ci-production");
    assert_eq!(d["served_by"], "in_process");
    let audit_a = agents[0].harness.audit_export(None);
    assert!(
        audit_a.iter().any(|a| a["action"] == "deploy.started"
            && a["release"] == "v2"
            && a["who"] == "mtls:ci-production"),
        "{audit_a:#?}"
    );
    assert!(!audit_a.iter().any(|a| a["action"] == "ssh.request"));
    agents[1].harness.audit_verify().expect_code(0);

    // status: b is there, reached over SSH, its agent down; exit 0.
    let s = status(&inv, ENV);
    assert_eq!(s["release"], "v2");
    let rows = s["hosts"].as_array().expect("hosts");
    assert_eq!(rows[1]["host"], "b");
    assert_eq!(rows[1]["release"], "v2");
    assert_eq!(rows[1]["health"], "healthy", "{s:#}");
    assert_eq!(rows[1]["via"]["transport"], "ssh", "{s:#}");
    assert_eq!(rows[1]["via"]["served_by"], "in_process", "{s:#}");
    assert!(rows[1]["error"].is_null(), "{s:#}");
    for i in [0, 2] {
        assert_eq!(rows[i]["via"]["transport"], "agent", "{s:#}");
    }
    let r = run(&inv, &["status", "--env", ENV]);
    r.expect_code(0);
    assert!(r.stdout.contains("healthy (over SSH: agent down)"), "{r}");
    // A read changes nothing there: no warning about serve-stdio doing the
    // work under the host lock (the fallback itself is still said).
    assert!(r.stderr.contains("falling back to SSH"), "{r}");
    assert!(!r.text().contains("does the work itself"), "{r}");
    assert!(!r.text().contains("host lock"), "{r}");
    // history reads b over SSH too, and names the SSH caller.
    let r = run(&inv, &["history", "--env", ENV, "--json"]);
    r.expect_code(0);
    assert!(
        r.json_lines()
            .iter()
            .any(|h| h["host"] == "b" && h["release"] == "v2" && h["who"] == who.as_str()),
        "{r}"
    );

    // A fleet rollback with b's daemon still down, under load.
    let running = loads(&agents);
    let r = run(&inv, &["rollback", "--env", ENV, "--json"]);
    std::thread::sleep(Duration::from_millis(500));
    let reports: Vec<_> = running.into_iter().map(LoadLoop::stop).collect();
    r.expect_code(0);
    eprintln!(
        "rollback with b over SSH in {:.1}s",
        r.duration.as_secs_f64()
    );
    for (a, rep) in agents.iter().zip(&reports) {
        eprintln!("host {}: {}", a.name, rep.summary());
        rep.assert_zero_failures();
        if let Err(e) = rep.check_sequence(&["v2", "v1"]) {
            panic!("host {}: {e}", a.name);
        }
    }
    assert_eq!(
        summary_hosts(&r.summary()),
        vec![
            ("a".into(), "v1".into(), "agent".into()),
            ("b".into(), "v1".into(), "ssh".into()),
            ("c".into(), "v1".into(), "agent".into()),
        ],
        "{r}"
    );
    let audit_b = agents[1].harness.audit_export(None);
    assert!(
        audit_b
            .iter()
            .any(|a| a["action"] == "rollback.started" && a["who"] == who.as_str()),
        "{audit_b:#?}"
    );
    // Nothing left locked: the lease was released over SSH as well.
    assert!(
        audit_b
            .iter()
            .filter(|a| a["action"] == "lock.released" && a["who"] == who.as_str())
            .count()
            >= 2,
        "{audit_b:#?}"
    );

    // The daemon comes back: the next status is over mTLS again.
    agents[1].harness.start_daemon();
    let s = status(&inv, ENV);
    assert_eq!(s["hosts"][1]["via"]["transport"], "agent", "{s:#}");
    assert_eq!(s["hosts"][1]["release"], "v1", "{s:#}");
}

/// The agent of a batch host goes down after the controller took the
/// environment lock over mutual TLS: its deploy goes over SSH, and the
/// lock is handed from the certificate's identity to the SSH identity
/// first (audited `lock.handed_over`), so the agent's lease check lets
/// this deployment, and only it, carry on.
#[test]
fn an_agent_lost_mid_rollout_hands_its_lock_over_to_ssh() {
    let pki = Pki::new();
    let mut agents = start_agents(&pki, ENV, &["a", "b"], "\"ci-production\" = \"deployer\"");
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts: Vec<HostEntry> = agents
        .iter()
        .map(|a| HostEntry::new(a, Some(ssh_inline(&sshd, a, &sshd.known_hosts, Key::File))))
        .collect();
    let inv = inventory(dir.path(), "deploy.toml", &pki, "ci-production", &hosts, "");
    drop(hosts);
    run(
        &inv,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
    )
    .expect_code(0);
    // A slower gate, so that the canary is still deploying when b goes down.
    std::fs::write(dir.path().join("compose.yml"), compose(8)).expect("write the compose file");

    let running = spawn(
        &inv,
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
        &[],
    );
    running.wait_for("canary: a", Duration::from_secs(60));
    agents[1].harness.stop_daemon();
    let r = running.wait();
    r.expect_code(0);
    assert_eq!(
        summary_hosts(&r.summary()),
        vec![
            ("a".into(), "v2".into(), "agent".into()),
            ("b".into(), "v2".into(), "ssh".into()),
        ],
        "{r}"
    );
    let warned = warnings(&r.json_lines());
    assert!(
        warned
            .iter()
            .any(|w| w.contains("host b: the environment lock of deployment")
                && w.contains("moved to this controller's SSH identity")),
        "{warned:#?}"
    );
    let who = ssh_who(&sshd, "ci-production");
    let audit = agents[1].harness.audit_export(None);
    let handed = audit
        .iter()
        .find(|e| e["action"] == "lock.handed_over")
        .unwrap_or_else(|| panic!("{audit:#?}"));
    assert_eq!(handed["who"], who.as_str());
    assert_eq!(handed["detail"]["from"], "mtls:ci-production");
    assert!(
        audit.iter().any(|e| e["action"] == "deploy.started"
            && e["release"] == "v2"
            && e["who"] == who.as_str()),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "lock.released" && e["who"] == who.as_str()),
        "{audit:#?}"
    );
    assert_eq!(
        agents[1].harness.current_release("web").as_deref(),
        Some("v2")
    );
}
