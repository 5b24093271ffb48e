//! Zero failed requests under continuous load (300 requests/s offered
//! through the agent's proxy, keep-alive and new connections, both crossing
//! every switch) during a deploy, a failed deploy, rollbacks, and a kill -9 +
//! restart of the control daemon; the served release changes exactly when
//! expected.
//!
//! Real Docker Engine, real registry: run `scripts/test-env.sh` first
//! (`scripts/test.sh` does).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use deploy_testkit::{CliOutput, Compose, Harness, LoadConfig, LoadLoop, demo_image, image_id};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");
const PROJECT: &str = "web";

/// A harness (proxy + daemon) with project `web` serving `releases` in turn.
fn serving(releases: &[&str]) -> (Harness, u16, PathBuf) {
    let h = Harness::new(BIN);
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    for r in releases {
        h.deploy_ok(PROJECT, &file, r);
    }
    h.wait_serving(
        port,
        releases.last().expect("a release"),
        Duration::from_secs(10),
    );
    (h, port, file)
}

fn started_load(port: u16) -> LoadLoop {
    let load = LoadLoop::start(port);
    load.wait_for_responses(150, Duration::from_secs(10));
    load
}

/// The switch happened while `out` ran.
fn assert_switch_during(switch: Instant, out: &CliOutput) {
    assert!(
        switch >= out.started && switch <= out.finished,
        "the served release changed outside the command that changed it \
         ({:?} after its start; it ran {:?}):\n{out}",
        switch.checked_duration_since(out.started),
        out.duration()
    );
}

fn assert_result(out: &CliOutput, operation: &str, release: &str, previous: &str, serving: &str) {
    let r = out.result();
    assert_eq!(r["operation"], operation, "{out}");
    assert_eq!(r["project"], PROJECT, "{out}");
    assert_eq!(r["release"], release, "{out}");
    assert_eq!(r["previous"], previous, "{out}");
    assert_eq!(r["serving"], serving, "{out}");
    assert_eq!(r["exit_code"].as_i64(), out.code.map(i64::from), "{out}");
}

#[test]
fn deploy_v1_to_v2_under_load_drops_nothing_and_completes_slow_requests() {
    let (h, port, file) = serving(&["v1"]);
    let load = started_load(port);
    // A 2-second request every 250 ms: several are in flight at the switch.
    let slow = LoadLoop::with_config(LoadConfig::slow_requests(
        port,
        "/cgi-bin/slow",
        Duration::from_millis(250),
    ));
    slow.wait_for_responses(1, Duration::from_secs(10));

    let out = h.deploy(PROJECT, &file, "v2");
    std::thread::sleep(Duration::from_secs(1));
    let slow = slow.stop();
    let report = load.stop();
    eprintln!(
        "deploy v1 -> v2 took {:?}\n{}",
        out.duration(),
        report.summary()
    );

    out.expect_code(0);
    assert_result(&out, "deploy", "v2", "v1", "v2");
    let r = out.result();
    assert_eq!(r["outcome"], "succeeded", "{out}");
    let digest = r["digests"]["web"].as_str().unwrap_or_default();
    assert!(
        digest.starts_with("127.0.0.1:5000/demo@sha256:"),
        "the result must pin service web to a digest, got {digest:?}:\n{out}"
    );
    assert!(
        r["gate"].as_str().unwrap_or_default().contains("/health"),
        "the result must name the health gate used (http /health):\n{out}"
    );
    assert!(
        out.progress_steps().iter().any(|s| s == "await_healthy"),
        "no `await_healthy` progress line:\n{out}"
    );

    let switches = report.assert_clean(&["v1", "v2"]);
    assert_switch_during(switches[0], &out);

    slow.assert_zero_failures();
    assert!(
        slow.records
            .iter()
            .all(|r| r.body == "v1" || r.body == "v2"),
        "{}",
        slow.summary()
    );
    let straddling: Vec<_> = slow
        .in_flight_at(switches[0])
        .into_iter()
        .filter(|r| r.body == "v1")
        .collect();
    assert!(
        !straddling.is_empty(),
        "no 2-second request on v1 was in flight at the switch ({}): {}",
        report.at(switches[0]),
        slow.summary()
    );

    let st = h.assert_current(PROJECT, "v2");
    assert_eq!(st["previous"], "v1", "{st:#}");
    assert!(
        st["digests"]["web"]
            .as_str()
            .unwrap_or_default()
            .contains("@sha256:"),
        "status must show the digest of web: {st:#}"
    );
    h.assert_serving(port, "v2");
    let history = h.history(PROJECT);
    assert_eq!(
        history[0]["release"], "v2",
        "history is newest first: {history:?}"
    );
    assert_eq!(history[0]["outcome"], "succeeded", "{history:?}");
}

#[test]
fn failed_deploy_of_broken_v3_keeps_v2_serving_under_load() {
    let (h, port, _) = serving(&["v1", "v2"]);
    // The same project, with a shorter deadline: v3 never becomes healthy.
    let file = h.write_compose(
        "compose-v3.yml",
        &Compose::web(port).edit("web", |s| s.health(|h| h.deadline = "5s".into())),
    );
    let load = started_load(port);
    let out = h.deploy(PROJECT, &file, "v3");
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "failed deploy of v3 took {:?}\n{}",
        out.duration(),
        report.summary()
    );

    out.expect_code(1);
    assert_result(&out, "deploy", "v3", "v2", "v2");
    let r = out.result();
    assert_eq!(r["outcome"], "health_gate_failed", "{out}");
    assert!(
        r["gate"].as_str().unwrap_or_default().contains("/health"),
        "the result must name the gate that failed:\n{out}"
    );
    report.assert_clean(&["v2"]);
    h.assert_current(PROJECT, "v2");
    h.assert_serving(port, "v2");

    // The container that failed its gate is removed.
    let v3 = image_id(&demo_image("v3"));
    let left: Vec<_> = h
        .containers_with_image_ids()
        .into_iter()
        .filter(|(_, id)| *id == v3)
        .map(|(c, _)| c)
        .collect();
    assert!(left.is_empty(), "containers of v3 left behind: {left:?}");
}

#[test]
fn rollback_and_rollback_to_under_load_switch_cleanly() {
    let (h, port, _file) = serving(&["v1", "v2"]);
    let load = started_load(port);
    let back = h.rollback(PROJECT, None);
    std::thread::sleep(Duration::from_millis(700));
    let forth = h.rollback(PROJECT, Some("v2"));
    std::thread::sleep(Duration::from_millis(700));
    let report = load.stop();
    eprintln!(
        "rollback took {:?}, rollback --to v2 took {:?}\n{}",
        back.duration(),
        forth.duration(),
        report.summary()
    );

    back.expect_code(0);
    assert_result(&back, "rollback", "v1", "v2", "v1");
    assert_eq!(back.result()["outcome"], "succeeded", "{back}");
    forth.expect_code(0);
    assert_result(&forth, "rollback", "v2", "v1", "v2");

    let switches = report.assert_clean(&["v2", "v1", "v2"]);
    assert_switch_during(switches[0], &back);
    assert_switch_during(switches[1], &forth);
    h.assert_current(PROJECT, "v2");
    h.assert_serving(port, "v2");
    let history = h.history(PROJECT);
    assert_eq!(history[0]["operation"], "rollback", "{history:?}");
    assert_eq!(history[0]["release"], "v2", "{history:?}");
}

#[test]
fn daemon_kill9_and_restart_under_load_drops_nothing() {
    let (mut h, port, file) = serving(&["v1"]);
    let load = started_load(port);
    h.kill9_daemon();
    std::thread::sleep(Duration::from_secs(1));
    h.start_daemon();
    // Give the start-up reconciliation time to run (and do nothing).
    std::thread::sleep(Duration::from_secs(3));
    h.assert_daemon_running();
    h.assert_current(PROJECT, "v1");
    // The restarted daemon can deploy.
    let out = h.deploy(PROJECT, &file, "v2");
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!("{}", report.summary());
    out.expect_code(0);
    let switches = report.assert_clean(&["v1", "v2"]);
    assert_switch_during(switches[0], &out);
    h.assert_current(PROJECT, "v2");
}

#[test]
fn proxy_upgrade_by_sighup_under_load_drops_nothing() {
    let (mut h, port, file) = serving(&["v1"]);
    let load = started_load(port);
    // 2-second requests in flight while the listeners change hands.
    let slow = LoadLoop::with_config(LoadConfig::slow_requests(
        port,
        "/cgi-bin/slow",
        Duration::from_millis(250),
    ));
    slow.wait_for_responses(1, Duration::from_secs(10));

    let old = h.proxy_pid().expect("the proxy runs");
    let upgraded_at = Instant::now();
    let new = h.upgrade_proxy(Duration::from_secs(20));
    assert_ne!(old, new);
    // It leaves once its clients have: keep-alive ones at their next
    // response, slow ones when their answer is sent.
    let exit = h.wait_proxy_exit(Duration::from_secs(45));
    assert!(exit.success(), "the old proxy exited with {exit}");
    eprintln!(
        "the old proxy left {:?} after SIGHUP",
        upgraded_at.elapsed()
    );
    let st = h.status();
    assert!(st.is_object(), "{st}");

    // The daemon switches routes through the successor.
    let out = h.deploy(PROJECT, &file, "v2");
    std::thread::sleep(Duration::from_millis(500));
    let slow = slow.stop();
    let report = load.stop();
    eprintln!("{}\n{}", report.summary(), slow.summary());
    out.expect_code(0);
    let switches = report.assert_clean(&["v1", "v2"]);
    assert_switch_during(switches[0], &out);
    slow.assert_zero_failures();
    assert!(
        !slow.in_flight_at(upgraded_at).is_empty(),
        "no slow request was in flight at the handover: {}",
        slow.summary()
    );
    h.assert_current(PROJECT, "v2");
    assert_eq!(h.serving_proxy_pid(), Ok(new));
}

#[test]
fn take_over_with_no_proxy_running_exits_with_a_clear_error() {
    let h = Harness::builder(BIN).no_proxy().no_daemon().start();
    let out = h.cli(&["proxy", "--take-over"]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("nothing to take over") && out.stderr.contains("without --take-over"),
        "{out}"
    );
    assert!(!h.state_dir().join("proxy.sock").exists(), "{out}");
}
