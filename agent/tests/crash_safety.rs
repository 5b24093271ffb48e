//! kill -9 at each persisted step of a deploy: the CLI does the deploy itself
//! (no daemon running) with `DEPLOY_AGENT_CRASH_AT=<step>`, kills itself
//! right after persisting that step; then the daemon starts, reconciles, and
//! exactly one healthy release serves (v1 or v2), with no request failing
//! through the proxy meanwhile, the status agreeing, the audit log intact,
//! and the project usable again.

use std::time::Duration;

use deploy_testkit::{Compose, Harness, LoadLoop, http_get, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");
const PROJECT: &str = "web";

fn crash_at(step: &str) {
    let mut h = Harness::builder(BIN).no_daemon().start();
    let port = h.free_port();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok(PROJECT, &file, "v1");
    h.wait_serving(port, "v1", Duration::from_secs(10));
    let load = LoadLoop::start(port);
    load.wait_for_responses(150, Duration::from_secs(10));

    let out = h.deploy_with(
        PROJECT,
        &file,
        "v2",
        &[],
        &[("DEPLOY_AGENT_CRASH_AT", step)],
    );
    assert_eq!(
        out.signal,
        Some(9),
        "with DEPLOY_AGENT_CRASH_AT={step} the CLI must kill itself with SIGKILL:\n{out}"
    );

    h.start_daemon();
    let release = wait_until(
        &format!("one healthy release serving after a crash at {step}"),
        Duration::from_secs(60),
        || {
            let st = h
                .project_status(PROJECT)
                .ok_or_else(|| "project not in status".to_string())?;
            if !st["operation"].is_null() {
                return Err(format!("operation still in progress: {}", st["operation"]));
            }
            let current = st["current"]
                .as_str()
                .ok_or_else(|| format!("no current release: {st}"))?
                .to_string();
            if current != "v1" && current != "v2" {
                return Err(format!("current release is {current:?}"));
            }
            let r = http_get(port, "/", Duration::from_secs(3))?;
            if r.status == 200 && r.body == current {
                Ok(current)
            } else {
                Err(format!(
                    "status says {current}, proxy answers {} {:?}",
                    r.status, r.body
                ))
            }
        },
    );
    // It stays that way.
    for _ in 0..10 {
        h.assert_serving(port, &release);
        std::thread::sleep(Duration::from_millis(100));
    }
    h.assert_current(PROJECT, &release);
    let report = load.stop();
    eprintln!("crash at {step}: {release} serves. {}", report.summary());
    report.assert_zero_failures();
    let served = report.bodies_in_order();
    assert!(
        served.iter().all(|b| b == "v1" || b == "v2"),
        "{}",
        report.summary()
    );
    assert_eq!(served.last(), Some(&release), "{}", report.summary());

    let verify = h.audit_verify();
    verify.expect_code(0);

    // Nothing is left locked or half-done: the next operation works.
    if release == "v1" {
        h.deploy_ok(PROJECT, &file, "v2");
        h.wait_serving(port, "v2", Duration::from_secs(10));
    } else {
        let back = h.rollback(PROJECT, None);
        back.expect_code(0);
        h.wait_serving(port, "v1", Duration::from_secs(10));
    }
}

#[test]
fn crash_at_start_new() {
    crash_at("start_new");
}

#[test]
fn crash_at_await_healthy() {
    crash_at("await_healthy");
}

#[test]
fn crash_at_route() {
    crash_at("route");
}

#[test]
fn crash_at_drain() {
    crash_at("drain");
}

#[test]
fn crash_at_commit() {
    crash_at("commit");
}

#[test]
fn crash_at_stop_old() {
    crash_at("stop_old");
}

#[test]
fn crash_at_prune() {
    crash_at("prune");
}
