//! Operations around a deploy: rollback with the registry stopped, the host
//! lock, the proxy not running, drift repair, the audit log, services
//! without ports.

use std::time::Duration;

use deploy_testkit::{
    Compose, Harness, LoadLoop, PrivateRegistry, Service, demo_image, docker, http_get, wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");
const PROJECT: &str = "web";

#[test]
fn rollback_works_with_the_registry_stopped() {
    let mut reg = PrivateRegistry::start_with(&["demo:v1", "demo:v2"]);
    let h = Harness::new(BIN);
    let port = h.free_port();
    let file = h.write_compose(
        "compose.yml",
        &Compose::web(port).edit("web", |s| {
            s.image(&format!("{}/demo:${{RELEASE}}", reg.addr()))
        }),
    );
    h.deploy_ok(PROJECT, &file, "v1");
    h.deploy_ok(PROJECT, &file, "v2");
    h.wait_serving(port, "v2", Duration::from_secs(10));
    reg.stop();

    let load = LoadLoop::start(port);
    load.wait_for_responses(150, Duration::from_secs(10));
    let back = h.rollback(PROJECT, None);
    std::thread::sleep(Duration::from_millis(700));
    let forth = h.rollback(PROJECT, Some("v2"));
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "registry stopped: rollback {:?}, rollback --to v2 {:?}. {}",
        back.duration(),
        forth.duration(),
        report.summary()
    );
    back.expect_code(0);
    assert_eq!(back.result()["serving"], "v1", "{back}");
    forth.expect_code(0);
    assert_eq!(forth.result()["serving"], "v2", "{forth}");
    report.assert_clean(&["v2", "v1", "v2"]);
    h.assert_current(PROJECT, "v2");
}

/// A compose file whose gate takes a while (8 successes 250 ms apart), so
/// that a second deploy surely overlaps; the image tag comes from `--var TAG`.
fn slow_gate_compose(port: u16) -> Compose {
    Compose::web(port).edit("web", |s| {
        s.image(&format!(
            "{}/demo:${{TAG}}",
            deploy_testkit::registry_addr()
        ))
        .health(|h| {
            h.interval = "250ms".into();
            h.healthy_after = 8;
        })
    })
}

#[test]
fn second_deploy_fails_with_exit_4_naming_the_holder() {
    let h = Harness::new(BIN);
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &slow_gate_compose(port));
    h.deploy_with(PROJECT, &file, "r1", &["--var", "TAG=v1"], &[])
        .expect_code(0);
    let path = file.to_str().expect("utf-8");

    let mut first = h.spawn_cli(
        &[
            "deploy",
            "--project",
            PROJECT,
            "--file",
            path,
            "--release",
            "r2",
            "--var",
            "TAG=v2",
            "--json",
        ],
        &[],
    );
    first.wait_for_step("await_healthy", Duration::from_secs(30));
    let second = h.deploy_with(PROJECT, &file, "r3", &["--var", "TAG=v1"], &[]);
    let first_pid = first.pid();
    let first = first.wait();

    eprintln!("{second}");
    second.expect_code(4);
    assert_eq!(second.result()["outcome"], "locked", "{second}");
    let text = second.text();
    assert!(
        text.contains("deploy"),
        "the message must name the holder's operation:\n{second}"
    );
    let pids = [Some(first_pid), h.daemon_pid()];
    assert!(
        pids.iter().flatten().any(|p| text.contains(&p.to_string())),
        "the message must name the holder's pid (CLI {first_pid} or daemon {:?}):\n{second}",
        h.daemon_pid()
    );
    first.expect_code(0);
    h.assert_current(PROJECT, "r2");
    h.assert_serving(port, "v2");
}

#[test]
fn second_deploy_waits_for_the_lock_with_lock_wait() {
    // No daemon: both CLIs do the work themselves under the host lock.
    let h = Harness::builder(BIN).no_daemon().start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &slow_gate_compose(port));
    h.deploy_with(PROJECT, &file, "r1", &["--var", "TAG=v1"], &[])
        .expect_code(0);
    let path = file.to_str().expect("utf-8");
    let mut first = h.spawn_cli(
        &[
            "deploy",
            "--project",
            PROJECT,
            "--file",
            path,
            "--release",
            "r2",
            "--var",
            "TAG=v2",
            "--json",
        ],
        &[],
    );
    first.wait_for_step("await_healthy", Duration::from_secs(30));
    let second = h.spawn_cli(
        &[
            "deploy",
            "--project",
            PROJECT,
            "--file",
            path,
            "--release",
            "r3",
            "--var",
            "TAG=v1",
            "--lock-wait",
            "60s",
            "--json",
        ],
        &[],
    );
    let mut outs = deploy_testkit::wait_all(vec![first, second]).into_iter();
    let (first, second) = (outs.next().expect("first"), outs.next().expect("second"));
    first.expect_code(0);
    second.expect_code(0);
    assert!(
        second.finished >= first.finished,
        "the second deploy finished before the first one:\n{first}\n{second}"
    );
    assert_eq!(second.result()["previous"], "r2", "{second}");
    h.assert_current(PROJECT, "r3");
    h.assert_serving(port, "v1");
}

#[test]
fn deploy_without_the_proxy_exits_5_saying_how_to_start_it() {
    let mut h = Harness::builder(BIN).no_proxy().start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    // Through the daemon, then by the CLI itself.
    for via in ["daemon", "cli"] {
        let out = h.deploy(PROJECT, &file, "v1");
        eprintln!("{out}");
        out.expect_code(5);
        assert_eq!(out.result()["outcome"], "environment_error", "{out}");
        assert!(
            out.text().contains("deploy-agent proxy"),
            "({via}) the message must say how to start the proxy:\n{out}"
        );
        if via == "daemon" {
            h.stop_daemon();
        }
    }
    let containers = h.containers();
    assert!(
        containers.is_empty(),
        "a deploy that cannot publish must not start anything: {containers:?}"
    );
    assert!(
        h.current_release(PROJECT).is_none(),
        "nothing may be recorded as serving"
    );
}

#[test]
fn a_container_removed_by_hand_is_brought_back() {
    let h = Harness::new(BIN);
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    h.wait_serving(port, "v1", Duration::from_secs(10));
    let running = h.running_containers();
    assert_eq!(running.len(), 1, "one replica expected: {running:?}");
    docker(&["rm", "-f", &running[0].id]);

    let new_id = wait_until(
        "reconciliation to bring v1 back",
        Duration::from_secs(60),
        || {
            let now = h.running_containers();
            let c = now
                .iter()
                .find(|c| c.id != running[0].id)
                .ok_or_else(|| format!("no new container yet: {now:?}"))?;
            let r = http_get(port, "/", Duration::from_secs(2))?;
            if r.status == 200 && r.body == "v1" {
                Ok(c.id.clone())
            } else {
                Err(format!("proxy answers {} {:?}", r.status, r.body))
            }
        },
    );
    assert_ne!(new_id, running[0].id);
    h.wait_serving(port, "v1", Duration::from_secs(10));
    h.assert_current(PROJECT, "v1");
}

#[test]
fn audit_log_verifies_and_exports_after_a_normal_sequence() {
    let h = Harness::new(BIN);
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    h.deploy_ok(PROJECT, &file, "v2");
    let v3 = h.write_compose(
        "compose-v3.yml",
        &Compose::web(port).edit("web", |s| s.health(|h| h.deadline = "5s".into())),
    );
    h.deploy(PROJECT, &v3, "v3").expect_code(1);
    h.rollback(PROJECT, None).expect_code(0);
    h.assert_current(PROJECT, "v1");

    let verify = h.audit_verify();
    verify.expect_code(0);
    assert!(
        verify.text().contains("audit log intact"),
        "`audit verify` must say the log is intact:\n{verify}"
    );
    let records = h.audit_export(Some(PROJECT));
    assert!(
        records.len() >= 4,
        "at least one record per operation expected, got {}: {records:?}",
        records.len()
    );
    let all = serde_json::to_string(&records).expect("json");
    for needle in ["v1", "v2", "v3", "rollback"] {
        assert!(
            all.contains(needle),
            "no audit record mentions {needle}: {all}"
        );
    }

    let history = h.history(PROJECT);
    assert_eq!(history[0]["operation"], "rollback", "{history:?}");
    assert_eq!(history[0]["release"], "v1", "{history:?}");
    let failed = history
        .iter()
        .find(|e| e["release"] == "v3")
        .unwrap_or_else(|| panic!("the failed deploy of v3 is not in the history: {history:?}"));
    assert_eq!(failed["outcome"], "health_gate_failed", "{failed}");
    assert!(
        history
            .iter()
            .all(|e| !e["who"].as_str().unwrap_or_default().is_empty()),
        "every history entry must say who: {history:?}"
    );
}

fn tampered_audit_log_fails_verification(delete: bool) {
    let h = Harness::builder(BIN).no_daemon().start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    h.deploy_ok(PROJECT, &file, "v2");
    h.rollback(PROJECT, None).expect_code(0);
    h.audit_verify().expect_code(0);

    let tampered = h.tamper_audit_log(delete);
    let verify = h.audit_verify();
    eprintln!("{}\n{verify}", tampered.description);
    assert!(
        verify.code.is_some() && verify.code != Some(0),
        "`audit verify` must fail after: {}\n{verify}",
        tampered.description
    );
    if !delete {
        let id = tampered.rowid.to_string();
        let named = verify
            .text()
            .split(|c: char| !c.is_ascii_digit())
            .any(|w| w == id);
        assert!(
            named,
            "`audit verify` must name the edited record ({}):\n{verify}",
            tampered.description
        );
    }
}

#[test]
fn audit_verify_detects_an_edited_record() {
    tampered_audit_log_fails_verification(false);
}

#[test]
fn audit_verify_detects_a_deleted_record() {
    tampered_audit_log_fails_verification(true);
}

#[test]
fn audit_head_anchors_and_acknowledge_accepts_an_investigated_break() {
    let h = Harness::builder(BIN).no_daemon().start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    let head = h.cli(&["audit", "head"]);
    head.expect_code(0);
    let anchor = head.stdout.trim().to_string();
    let seq: i64 = anchor
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("`audit head` must print SEQ HASH:\n{head}"));
    assert!(seq > 0, "{head}");
    h.deploy_ok(PROJECT, &file, "v2");
    // The log grew from the anchor: it still holds it.
    let v = h.cli(&["audit", "verify", "--anchor", &anchor]);
    v.expect_code(0);
    assert!(v.text().contains("audit log intact"), "{v}");
    h.cli(&["audit", "verify", "--anchor", "not a head"])
        .expect_code(2);

    let tampered = h.tamper_audit_log(true);
    let broken = h.audit_verify();
    broken.expect_code(1);
    let hint = broken
        .stderr
        .lines()
        .find_map(|l| l.split("acknowledge --through ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "verify must say how to acknowledge ({}):\n{broken}",
                tampered.description
            )
        });
    let ack = h.cli(&[
        "audit",
        "acknowledge",
        "--through",
        &hint,
        "--reason",
        "restored from the nightly backup",
    ]);
    ack.expect_code(0);
    assert!(ack.stdout.contains("acknowledged"), "{ack}");
    let after = h.audit_verify();
    after.expect_code(0);
    assert!(
        after.text().contains("acknowledged: record")
            && after.text().contains("restored from the nightly backup"),
        "verify must list what was accepted, by whom and why:\n{after}"
    );
    // Nothing left to acknowledge is an error that changes nothing.
    h.cli(&[
        "audit",
        "acknowledge",
        "--through",
        &hint,
        "--reason",
        "again",
    ])
    .expect_code(2);
}

#[test]
fn service_without_ports_deploys_beside_a_web_service() {
    let h = Harness::new(BIN);
    let port = h.free_port();
    let compose = Compose::web(port).service(Service::worker("worker", &demo_image("noport")));
    let file = h.write_compose("compose.yml", &compose);
    let out = h.deploy(PROJECT, &file, "v1");
    out.expect_code(0);
    h.wait_serving(port, "v1", Duration::from_secs(10));
    let st = h.assert_current(PROJECT, "v1");
    let services = st["services"].as_array().cloned().unwrap_or_default();
    for name in ["web", "worker"] {
        let s = services
            .iter()
            .find(|s| s["service"] == name)
            .unwrap_or_else(|| panic!("status lacks service {name}: {st:#}"));
        let replicas = s["replicas"].as_array().cloned().unwrap_or_default();
        assert!(
            !replicas.is_empty() && replicas.iter().all(|r| r["state"] == "running"),
            "service {name} must run: {s:#}"
        );
    }
    assert_eq!(
        h.running_containers().len(),
        2,
        "one container per service: {:?}",
        h.containers()
    );
}

#[test]
fn status_reports_the_proxy_and_fails_while_it_is_down() {
    let mut h = Harness::builder(BIN).no_daemon().start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    let up = h.cli(&["status"]);
    up.expect_code(0);
    assert!(
        up.stdout.contains("proxy: running")
            && up.stdout.contains(&format!(":{port} {PROJECT}/web -> v1")),
        "status must name the proxy's listeners and the release each serves:\n{up}"
    );
    h.stop_proxy();
    let down = h.cli(&["status", "--json"]);
    down.expect_code(5);
    let report: serde_json::Value = serde_json::from_str(down.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json: {e}\n{down}"));
    assert_eq!(report["proxy"]["running"], false, "{report:#}");
    let drift = report["projects"][0]["drift"].to_string();
    assert!(drift.contains("the proxy is not running"), "{report:#}");
    h.start_proxy();
    h.cli(&["status"]).expect_code(0);
}

#[test]
fn state_dir_and_config_come_from_the_environment_too() {
    let h = Harness::builder(BIN).no_daemon().start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    let out = h.cli_via_env(&["status", "--json"]);
    out.expect_code(0);
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json: {e}\n{out}"));
    let current = status["projects"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["project"] == PROJECT))
        .map(|p| p["current"].clone());
    assert_eq!(
        current,
        Some(serde_json::Value::from("v1")),
        "DEPLOY_AGENT_STATE_DIR must select the same state: {status:#}"
    );
    // The instance from DEPLOY_AGENT_CONFIG: the running container is ours.
    let running = h.running_containers();
    assert_eq!(running.len(), 1, "{running:?}");
    assert!(
        running[0]
            .name
            .starts_with(&format!("{}-{PROJECT}-", h.instance)),
        "container names start with <instance>-<project>-: {running:?}"
    );
}
