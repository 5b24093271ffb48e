//! After the switch: the observation window and its automatic rollback
//! (probes, error rate, container exit), canary steps, hooks and smoke
//! checks. Real Docker Engine, real registry (`scripts/test-env.sh`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploy_testkit::{CliOutput, Harness, LoadConfig, LoadLoop, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");
const PROJECT: &str = "web";

/// A compose file: service `web` from `demo:${TAG}` on `port`, with the
/// given top-level `x-deploy` block (YAML, indented two spaces).
fn compose(h: &Harness, name: &str, port: u16, x_deploy: &str) -> PathBuf {
    let text = format!(
        "x-deploy:\n{x_deploy}\nservices:\n  web:\n    image: 127.0.0.1:5000/demo:${{TAG}}\n    ports: [\"127.0.0.1:{port}:80\"]\n    x-deploy:\n      health: {{http: /health, interval: 300ms, deadline: 15s}}\n      drain_timeout: 5s\n"
    );
    h.write_file(name, &text)
}

fn deploy(h: &Harness, file: &Path, release: &str, tag: &str, extra: &[&str]) -> CliOutput {
    let var = format!("TAG={tag}");
    let mut args = vec!["--var", var.as_str()];
    args.extend_from_slice(extra);
    h.deploy_with(PROJECT, file, release, &args, &[])
}

/// `web` serving release `good` (image demo:v1) with `x_deploy`.
fn serving_v1(x_deploy: &str) -> (Harness, u16, PathBuf) {
    let h = Harness::new(BIN);
    let port = h.free_port();
    let file = compose(&h, "compose.yml", port, x_deploy);
    deploy(&h, &file, "good", "v1", &[]).expect_code(0);
    h.wait_serving(port, "v1", Duration::from_secs(10));
    (h, port, file)
}

fn assert_rolled_back(h: &Harness, out: &CliOutput, port: u16, gate_words: &[&str]) {
    out.expect_code(1);
    let r = out.result();
    assert_eq!(r["outcome"], "health_gate_failed", "{out}");
    assert_eq!(r["serving"], "good", "{out}");
    let msg = r["message"].as_str().unwrap_or_default();
    for w in gate_words {
        assert!(msg.contains(w), "the result must say {w:?}:\n{out}");
    }
    let switch_back = r["switch_back_ms"].as_u64();
    assert!(
        switch_back.is_some_and(|ms| ms < 1000),
        "traffic must be back on the warm previous release well under a second, got {switch_back:?}:\n{out}"
    );
    eprintln!("switch back took {} ms", switch_back.unwrap_or_default());
    h.assert_serving(port, "v1");
    h.assert_current(PROJECT, "good");
}

#[test]
fn a_release_that_turns_unhealthy_in_the_window_is_rolled_back_by_itself() {
    let (h, port, file) = serving_v1("  observe: {window: 25s, unhealthy_after: 3}");
    let load = LoadLoop::start(port);
    load.wait_for_responses(100, Duration::from_secs(10));
    // demo:sick is healthy at first; its /health answers 404 from 10 s on.
    let out = deploy(&h, &file, "sick", "sick", &[]);
    let report = load.stop();
    eprintln!("{}", report.summary());
    assert_rolled_back(&h, &out, port, &["observe", "consecutive probe failures"]);
    // Every request was answered by a healthy release: the broken app's own
    // /health was the only thing that failed (the load asks for `/`). The
    // switch and the switch back happened once each (requests in flight at
    // either may be answered by both sides of it, in any order).
    report.assert_clean(&["v1", "sick", "v1"]);
    let history = h.history(PROJECT);
    assert_eq!(history[0]["outcome"], "health_gate_failed", "{history:?}");
}

#[test]
fn an_error_rate_over_the_threshold_rolls_back_and_an_idle_service_is_not_judged() {
    let x = "  observe: {window: 12s, max_error_rate: 5%, error_rate_for: 4s, min_requests: 30}";
    let (h, port, file) = serving_v1(x);

    // Idle: two requests, both 500 at worst, far under min_requests.
    let idle = deploy(&h, &file, "idle-flaky", "flaky", &[]);
    idle.expect_code(0);
    h.assert_current(PROJECT, "idle-flaky");
    let back = h.rollback(PROJECT, Some("good"));
    back.expect_code(0);

    // Busy: ~20% of /cgi-bin/flaky answers 500.
    let mut cfg = LoadConfig::new(port);
    cfg.path = "/cgi-bin/flaky".into();
    cfg.rate = 40.0;
    cfg.keepalive_workers = 2;
    cfg.new_connection_workers = 2;
    let load = LoadLoop::with_config(cfg);
    let out = deploy(&h, &file, "flaky", "flaky", &[]);
    let _ = load.stop();
    assert_rolled_back(&h, &out, port, &["error rate", "5xx"]);
}

#[test]
fn a_container_that_exits_in_the_window_is_rolled_back() {
    let (h, port, file) = serving_v1("  observe: {window: 15s}");
    let load = LoadLoop::start(port);
    load.wait_for_responses(100, Duration::from_secs(10));
    let out = deploy(&h, &file, "crash", "crash", &[]);
    let report = load.stop();
    assert_rolled_back(&h, &out, port, &["exited with code 1"]);
    report.assert_zero_failures();
}

#[test]
fn canary_steps_complete_on_a_good_release_and_stop_at_the_first_on_a_bad_one() {
    let x = "  observe: {window: 1s, error_rate_for: 3s, min_requests: 20}\n  canary: [10, 50, 100]\n  canary_hold: 4s";
    let (h, port, file) = serving_v1(x);
    let load = LoadLoop::start(port);
    load.wait_for_responses(100, Duration::from_secs(10));
    let out = deploy(&h, &file, "two", "v2", &[]);
    let report = load.stop();
    out.expect_code(0);
    let canaries: Vec<String> = out
        .json_lines()
        .iter()
        .filter(|l| l["step"] == "canary")
        .filter_map(|l| l["message"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        canaries.len(),
        2,
        "two canary steps (10%, 50%): {canaries:?}\n{out}"
    );
    assert!(
        canaries[0].contains("10%") && canaries[1].contains("50%"),
        "{canaries:?}"
    );
    report.assert_zero_failures();
    // During the 10% step both releases answered.
    let bodies = report.bodies_in_order();
    assert_eq!(bodies.first().map(String::as_str), Some("v1"));
    assert_eq!(bodies.last().map(String::as_str), Some("v2"));
    h.assert_current(PROJECT, "two");

    // A bad canary: 20% of requests fail on demo:flaky's /cgi-bin/flaky.
    let mut cfg = LoadConfig::new(port);
    cfg.path = "/cgi-bin/flaky".into();
    // 10% of 200 requests/s reach the canary: enough to judge in 3 s.
    cfg.rate = 200.0;
    let load = LoadLoop::with_config(cfg);
    load.wait_for_responses(30, Duration::from_secs(10));
    let out = deploy(&h, &file, "bad", "flaky", &[]);
    let _ = load.stop();
    out.expect_code(1);
    let steps: Vec<String> = out
        .json_lines()
        .iter()
        .filter(|l| l["step"] == "canary")
        .filter_map(|l| l["message"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        steps.len(),
        1,
        "stops at the first canary step: {steps:?}\n{out}"
    );
    assert!(
        !out.progress_steps().iter().any(|s| s == "route"),
        "never fully switched:\n{out}"
    );
    h.assert_serving(port, "v2");
    h.assert_current(PROJECT, "two");
}

#[test]
fn a_migration_past_its_timeout_is_killed_and_nothing_switches() {
    let x = "  observe: {window: 0s}\n  hooks:\n    migrate: {service: web, command: \"sleep 30\", timeout: 2s}";
    let (h, port, file) = serving_v1(x);
    let out = deploy(&h, &file, "two", "v2", &["--run-migrations"]);
    out.expect_code(1);
    let msg = out.result()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("migrate") && msg.contains("timeout"), "{out}");
    assert!(
        !out.progress_steps().iter().any(|s| s == "start_new"),
        "nothing started:\n{out}"
    );
    h.assert_serving(port, "v1");
    h.assert_current(PROJECT, "good");
    // The hook's container is gone, and its record is in the audit log.
    assert!(
        !h.containers().iter().any(|c| c.name.contains("-hook-")),
        "{:?}",
        h.containers()
    );
    let audit = h.audit_export(Some(PROJECT));
    assert!(
        audit
            .iter()
            .any(|r| r["action"] == "hook.migrate" && r["outcome"] == "failed")
    );

    // Without --run-migrations the hook does not run at all.
    let out = deploy(&h, &file, "two", "v2", &[]);
    out.expect_code(0);
    assert!(
        out.result()["hooks"]
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "{out}"
    );
}

#[test]
fn a_failing_smoke_check_before_the_switch_means_no_switch() {
    let x = "  observe: {window: 0s}\n  hooks:\n    smoke:\n      checks: [{path: /, body_contains: \"v9\"}]";
    let (h, port, _plain) = serving_v1("  observe: {window: 0s}");
    let smoke_file = compose(&h, "smoke.yml", port, x);
    let load = LoadLoop::start(port);
    load.wait_for_responses(100, Duration::from_secs(10));
    let out = deploy(&h, &smoke_file, "two", "v2", &[]);
    let report = load.stop();
    out.expect_code(1);
    assert!(out.text().contains("smoke (before switch)"), "{out}");
    assert!(!out.progress_steps().iter().any(|s| s == "route"), "{out}");
    report.assert_zero_failures();
    assert_eq!(report.bodies_in_order(), ["v1"]);
    h.assert_current(PROJECT, "good");
}

#[test]
fn no_wait_returns_at_the_switch_and_the_daemon_rolls_back_by_itself() {
    let (h, port, file) = serving_v1("  observe: {window: 15s}");
    let out = deploy(&h, &file, "crash", "crash", &["--no-wait"]);
    out.expect_code(0);
    assert!(
        out.text().contains("watching the observation window"),
        "{out}"
    );
    // demo:crash exits after ~5 s: the daemon rolls back without anyone waiting.
    wait_until(
        "the daemon's automatic rollback",
        Duration::from_secs(40),
        || {
            let history = h.history(PROJECT);
            match history.first() {
                Some(e) if e["release"] == "crash" && e["outcome"] == "health_gate_failed" => {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    );
    h.assert_serving(port, "v1");
    h.assert_current(PROJECT, "good");
}

/// A release that fails its health gate before the switch never received a
/// request: the output says so (no "switching back", no switch-back time),
/// and the gate it names is the one check that failed, not every service's. A switch names the
/// replicas that take the traffic, never an empty list. For people (not a
/// terminal), progress lines carry millisecond timestamps.
#[test]
fn a_release_that_fails_before_the_switch_never_had_traffic_and_says_so() {
    let h = Harness::new(BIN);
    let port = h.free_port();
    let file = h.write_file(
        "compose.yml",
        &format!(
            "services:\n  web:\n    image: 127.0.0.1:5000/demo:${{TAG}}\n    ports: [\"127.0.0.1:{port}:80\"]\n    x-deploy:\n      health: {{http: /health, interval: 300ms, deadline: 4s}}\n      drain_timeout: 2s\n  worker:\n    image: 127.0.0.1:5000/demo:noport\n    x-deploy:\n      health: {{exec: \"true\", interval: 300ms}}\n"
        ),
    );
    deploy(&h, &file, "one", "v1", &[]).expect_code(0);
    let out = deploy(&h, &file, "two", "v2", &[]);
    out.expect_code(0);
    let said = |out: &CliOutput, step: &str| -> Vec<String> {
        out.json_lines()
            .iter()
            .filter(|l| l["type"] == "progress" && l["step"] == step)
            .filter_map(|l| l["message"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(
        said(&out, "route"),
        [
            "switching all of web's traffic to two replicas [0]; one's replicas stay warm (retries only) until the commit"
        ],
        "{out}"
    );
    // A success names every gate that passed.
    assert_eq!(
        out.result()["gate"],
        "web: http GET /health on port 80; worker: exec true",
        "{out}"
    );
    h.wait_serving(port, "v2", Duration::from_secs(10));

    // demo:v3 answers 500 to everything: its gate fails, traffic never moves.
    let out = deploy(&h, &file, "three", "v3", &[]);
    out.expect_code(1);
    let r = out.result();
    assert_eq!(r["outcome"], "health_gate_failed", "{out}");
    assert_eq!(r["serving"], "two", "{out}");
    assert_eq!(r["gate"], "web: http GET /health on port 80", "{out}");
    assert!(r["switch_back_ms"].is_null(), "no switch back: {out}");
    assert!(
        r["message"].as_str().is_some_and(
            |m| m.ends_with("release two is still serving (three never received traffic)")
        ),
        "{out}"
    );
    assert_eq!(
        said(&out, "route_old"),
        ["three never received web's traffic: two served every request throughout"],
        "{out}"
    );
    assert!(!out.stdout.contains("switching"), "{out}");
    h.assert_serving(port, "v2");

    // The same for people: nothing claims a switch back, and every progress
    // line starts with a UTC time at millisecond precision.
    let path = file.to_str().expect("utf-8 path");
    let out = h.cli(&[
        "deploy",
        "--project",
        PROJECT,
        "--file",
        path,
        "--release",
        "four",
        "--var",
        "TAG=v3",
    ]);
    out.expect_code(1);
    let text = out.text();
    assert!(!text.contains("switching"), "{out}");
    assert!(!text.contains("traffic was back"), "{out}");
    assert!(text.contains("four never received traffic"), "{out}");
    let progress: Vec<&str> = out.stdout.lines().filter(|l| !l.is_empty()).collect();
    assert!(progress.len() > 3, "{out}");
    for line in progress {
        let ts = line.split(' ').next().unwrap_or_default();
        assert!(
            ts.len() == "2026-11-03T09:15:02.120Z".len()
                && ts.as_bytes().get(19) == Some(&b'.')
                && ts.ends_with('Z'),
            "not a millisecond timestamp: {line:?}\n{out}"
        );
    }
    h.assert_current(PROJECT, "two");
}
