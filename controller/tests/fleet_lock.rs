//! The environment lock: two controllers at once (one wins, the other fails
//! naming the holder, or waits with --lock-wait), and a controller killed
//! mid-deploy (its lease expires, a new deploy takes it over and finds the
//! hosts consistent).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use deploy_testkit::http_get;

const ENV: &str = "production";

/// Two hosts; deploys are slowed down by a gate of 10 successes 200 ms
/// apart (~2 s per host) so that they overlap.
fn setup(dir: &Path, pki: &Pki, agents: &[Agent], lock_ttl: &str) -> PathBuf {
    let client = pki.client("ci-production");
    let mut t = tls_table("tls", &pki.ca(), &client);
    t.push_str(&format!(
        "\n[environments.{ENV}]\nproject = \"web\"\ncompose = \"compose.yml\"\n\
         strategy = {{ canary = 1, batch = 1 }}\nlock_ttl = \"{lock_ttl}\"\n"
    ));
    for a in agents {
        t.push_str(&format!(
            "\n[[environments.{ENV}.hosts]]\n{}",
            a.host_toml("")
        ));
    }
    let path = dir.join("deploy.toml");
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(10)).expect("write the compose file");
    path
}

#[test]
fn two_controllers_at_once_one_wins_the_other_names_the_holder() {
    let pki = Pki::new();
    let agents = start_agents(&pki, ENV, &["a", "b"], "\"ci-production\" = \"deployer\"");
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = setup(dir.path(), &pki, &agents, "30s");

    let first = spawn(
        &inv,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
        &[],
    );
    first.wait_for(
        "environment lock of production taken",
        Duration::from_secs(30),
    );
    // A second controller while the first holds the lock: refused at once.
    let second = run(
        &inv,
        &["deploy", "--env", ENV, "--release", "v2", "--var", "TAG=v2"],
    );
    // A third one waits for the lock, then deploys.
    let third = spawn(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v2",
            "--var",
            "TAG=v2",
            "--lock-wait",
            "60s",
        ],
        &[],
    );
    let first = first.wait();
    let third = third.wait();
    eprintln!(
        "first {:.1}s, second refused in {:.1}s, third (waited) {:.1}s",
        first.duration.as_secs_f64(),
        second.duration.as_secs_f64(),
        third.duration.as_secs_f64()
    );
    first.expect_code(0);
    second.expect_code(4);
    assert!(
        second.duration < Duration::from_secs(10),
        "the refusal must be immediate: {second}"
    );
    assert!(
        second
            .stderr
            .contains("locked by deployment production-v1-")
            && second.stderr.contains("mtls:ci-production")
            && second.stderr.contains("deploy of v1"),
        "the refusal names the holder: {second}"
    );
    assert!(
        second.stderr.contains("--lock-wait"),
        "and says what to do: {second}"
    );
    third.expect_code(0);
    assert!(
        third.stdout.contains("waiting for the environment lock"),
        "{third}"
    );
    assert_eq!(releases(&inv, ENV), vec![Some("v2".into()); 2]);

    // The refusal and the lock's life are in the agents' audit logs.
    let audit = agents[0].harness.audit_export(None);
    let actions: Vec<&str> = audit.iter().filter_map(|r| r["action"].as_str()).collect();
    for a in ["lock.acquired", "lock.refused", "lock.released"] {
        assert!(actions.contains(&a), "no {a} in {actions:?}");
    }
    // While a controller holds the lease, a local deploy without its
    // deployment id is refused too (one deployment per environment).
    let held = spawn(
        &inv,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
        &[],
    );
    held.wait_for(
        "environment lock of production taken",
        Duration::from_secs(30),
    );
    let compose_file = dir.path().join("local.yml");
    std::fs::write(&compose_file, compose(1)).expect("write");
    let port = agents[1].app_port.to_string();
    let local = agents[1].harness.cli(&[
        "deploy",
        "--project",
        "web",
        "--file",
        compose_file.to_str().expect("utf-8"),
        "--release",
        "v9",
        "--var",
        "TAG=v1",
        "--var",
        &format!("PORT={port}"),
        "--json",
    ]);
    local.expect_code(4);
    assert!(
        local.text().contains("locked by deployment production-v1-"),
        "{local}"
    );
    held.wait().expect_code(0);
}

#[test]
fn a_killed_controller_leaves_a_lease_that_expires() {
    let pki = Pki::new();
    let agents = start_agents(&pki, ENV, &["a", "b"], "\"ci-production\" = \"deployer\"");
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = setup(dir.path(), &pki, &agents, "3s");
    run(
        &inv,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
    )
    .expect_code(0);

    // Killed while the canary deploys v2.
    let doomed = spawn(
        &inv,
        &["deploy", "--env", ENV, "--release", "v2", "--var", "TAG=v2"],
        &[],
    );
    doomed.wait_for("canary: a", Duration::from_secs(30));
    let killed = doomed.kill9();
    assert_ne!(killed.code, 0);

    // Its lease is still in force: a new deploy is refused at once...
    let refused = run(
        &inv,
        &["deploy", "--env", ENV, "--release", "v2", "--var", "TAG=v2"],
    );
    refused.expect_code(4);
    // ...and proceeds once it expired (the agents finished the killed
    // controller's host operation on their own meanwhile).
    let next = run(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v2",
            "--var",
            "TAG=v2",
            "--lock-wait",
            "30s",
        ],
    );
    eprintln!(
        "the new deploy took over the expired lock after {:.1}s",
        next.duration.as_secs_f64()
    );
    next.expect_code(0);
    assert!(
        next.stderr.contains("took over the expired lock") || next.stdout.contains("took over"),
        "{next}"
    );
    let s = status(&inv, ENV);
    for h in s["hosts"].as_array().expect("hosts") {
        assert_eq!(h["release"], "v2", "{s:#}");
        assert_eq!(h["health"], "healthy", "{s:#}");
        assert!(h["operation"].is_null(), "{s:#}");
    }
    for a in &agents {
        let r = http_get(a.app_port, "/", Duration::from_secs(3)).expect("GET /");
        assert_eq!(r.body, "v2");
    }
    let audit = agents[0].harness.audit_export(None);
    assert!(
        audit.iter().any(|r| r["action"] == "lock.taken_over"),
        "the takeover is audited"
    );
}
