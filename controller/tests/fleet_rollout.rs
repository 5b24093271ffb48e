//! A three-host environment on 127.0.0.1 (three agents, each with its own
//! state dir, HTTPS API, published port and instance label), driven by
//! `deploy-controller` over mutual TLS with canary 1 + batch 2:
//! v1, then v2 under load on every host (zero failed requests), v3 failing
//! on the canary (the batch never starts), v4 failing on one batch host
//! (every updated host goes back to v2), and a pre-pull failure (nothing
//! changes).
//!
//! How v4 fails on one host only: the compose file's health path is
//! `${HEALTH:-/health}`, and for the v4 deploy the inventory gives host `c`
//! `HEALTH = "/missing"` (a per-host variable), which answers 404 there.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use deploy_testkit::{LoadConfig, LoadLoop, http_get};

const ENV: &str = "production";

fn inventory(dir: &Path, pki: &Pki, agents: &[Agent], host_c_extra: &str) -> PathBuf {
    let client = pki.client("ci-production");
    let mut t = tls_table("tls", &pki.ca(), &client);
    t.push_str(&format!(
        "\n[environments.{ENV}]\nproject = \"web\"\ncompose = \"compose.yml\"\n\
         strategy = {{ canary = 1, batch = 2 }}\nlock_ttl = \"30s\"\n"
    ));
    for a in agents {
        let extra = if a.name == "c" { host_c_extra } else { "" };
        t.push_str(&format!(
            "\n[[environments.{ENV}.hosts]]\n{}",
            a.host_toml(extra)
        ));
    }
    let path = dir.join("deploy.toml");
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(1)).expect("write the compose file");
    path
}

fn body(port: u16) -> String {
    http_get(port, "/", Duration::from_secs(3))
        .map(|r| format!("{} {}", r.status, r.body))
        .unwrap_or_else(|e| e)
}

fn history_releases(inv: &Path, host: &str) -> Vec<String> {
    let r = run(inv, &["history", "--env", ENV, "--json"]);
    r.expect_code(0);
    r.json_lines()
        .into_iter()
        .filter(|v| v["host"] == host)
        .map(|v| {
            format!(
                "{} {}",
                v["operation"].as_str().unwrap_or("?"),
                v["release"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[test]
fn canary_then_batch_under_load_and_fleet_rollbacks() {
    let pki = Pki::new();
    let agents = start_agents(
        &pki,
        ENV,
        &["a", "b", "c"],
        "\"ci-production\" = \"deployer\"",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = inventory(dir.path(), &pki, &agents, "");

    // v1 everywhere.
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
    eprintln!("v1 deployed to 3 hosts in {:.1}s", r.duration.as_secs_f64());
    for a in &agents {
        assert_eq!(body(a.app_port), "200 v1", "host {}", a.name);
    }

    // v2 under load on every host: not one failed request.
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
    let reports: Vec<_> = loads.into_iter().map(LoadLoop::stop).collect();
    r.expect_code(0);
    eprintln!(
        "v2 deployed (canary 1 + batch 2) in {:.1}s",
        r.duration.as_secs_f64()
    );
    for (a, rep) in agents.iter().zip(&reports) {
        eprintln!("host {}: {}", a.name, rep.summary());
        rep.assert_zero_failures();
        if let Err(e) = rep.check_sequence(&["v1", "v2"]) {
            panic!("host {}: {e}", a.name);
        }
    }
    // The canary went first, alone; then the batch.
    let phases: Vec<String> = r
        .json_lines()
        .into_iter()
        .filter(|v| v["type"] == "phase")
        .filter_map(|v| v["message"].as_str().map(str::to_string))
        .collect();
    let canary = phases
        .iter()
        .position(|p| p == "canary: a")
        .unwrap_or_else(|| panic!("{r}"));
    let batch = phases
        .iter()
        .position(|p| p == "batch 1: b, c")
        .unwrap_or_else(|| panic!("{r}"));
    assert!(canary < batch, "{phases:?}");
    let s = status(&inv, ENV);
    assert_eq!(s["release"], "v2", "{s:#}");
    for h in s["hosts"].as_array().expect("hosts") {
        assert_eq!(h["release"], "v2", "{s:#}");
        assert_eq!(h["health"], "healthy", "{s:#}");
        assert!(h["drift"].as_array().is_some_and(|d| d.is_empty()), "{s:#}");
        assert!(
            h["digests"]["web"]
                .as_str()
                .is_some_and(|d| d.contains("@sha256:")),
            "{s:#}"
        );
    }
    let text = run(&inv, &["status", "--env", ENV]);
    text.expect_code(0);
    assert!(text.stdout.contains("release v2"), "{text}");

    // v3 is unhealthy: the canary fails, the batch never starts.
    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v3",
            "--var",
            "TAG=v3",
            "--json",
        ],
    );
    r.expect_code(1);
    eprintln!(
        "v3 refused by the canary in {:.1}s",
        r.duration.as_secs_f64()
    );
    let sum = r.summary();
    assert_eq!(sum["outcome"], "rolled_back", "{r}");
    assert_eq!(sum["failed_host"], "a", "{r}");
    assert!(
        sum["gate"]
            .as_str()
            .is_some_and(|g| g.contains("http GET /health")),
        "the summary names the gate: {r}"
    );
    assert!(
        sum["message"]
            .as_str()
            .is_some_and(|m| m.contains("host a (canary)")),
        "{r}"
    );
    assert!(
        !r.stdout.contains("batch 1"),
        "the batch must not start: {r}"
    );
    assert_eq!(releases(&inv, ENV), vec![Some("v2".into()); 3]);
    for a in &agents {
        assert_eq!(body(a.app_port), "200 v2", "host {}", a.name);
    }
    for h in ["b", "c"] {
        let ops = history_releases(&inv, h);
        assert!(
            !ops.iter().any(|o| o.contains("v3")),
            "host {h} was touched: {ops:?}"
        );
    }

    // v4 passes the canary and fails on host c of the batch: a and b go
    // back to v2.
    let inv = inventory(dir.path(), &pki, &agents, ", HEALTH = \"/missing\"");
    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v4",
            "--var",
            "TAG=v2",
            "--json",
        ],
    );
    r.expect_code(1);
    eprintln!(
        "v4 failed on host c and was rolled back everywhere in {:.1}s",
        r.duration.as_secs_f64()
    );
    let sum = r.summary();
    assert_eq!(sum["outcome"], "rolled_back", "{r}");
    assert_eq!(sum["failed_host"], "c", "{r}");
    assert!(r.stdout.contains("rolling back: a -> v2, b -> v2"), "{r}");
    assert_eq!(releases(&inv, ENV), vec![Some("v2".into()); 3], "{r}");
    for h in ["a", "b"] {
        let ops = history_releases(&inv, h);
        assert_eq!(
            ops.first().map(String::as_str),
            Some("rollback v2"),
            "host {h}: {ops:?}"
        );
        assert!(ops.contains(&"deploy v4".to_string()), "host {h}: {ops:?}");
    }
    for a in &agents {
        assert_eq!(body(a.app_port), "200 v2", "host {}", a.name);
    }

    // A tag that does not exist: pre-pull fails, nothing changes.
    let inv = inventory(dir.path(), &pki, &agents, "");
    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v5",
            "--var",
            "TAG=missing",
        ],
    );
    r.expect_code(3);
    assert!(
        r.stderr.contains("nothing was changed") && r.stderr.contains("not found"),
        "{r}"
    );
    assert_eq!(releases(&inv, ENV), vec![Some("v2".into()); 3]);
    for h in ["a", "b", "c"] {
        assert!(!history_releases(&inv, h).iter().any(|o| o.contains("v5")));
    }

    // A fleet rollback of everything to v1, then the summary file.
    let summary_file = dir.path().join("step-summary.md");
    let r = run_env(
        &inv,
        &["rollback", "--env", ENV, "--to", "v1"],
        &[("GITHUB_STEP_SUMMARY", summary_file.to_str().expect("utf-8"))],
    );
    r.expect_code(0);
    assert_eq!(releases(&inv, ENV), vec![Some("v1".into()); 3]);
    let md = std::fs::read_to_string(&summary_file).expect("the step summary was written");
    assert!(
        md.contains("| host | before | after | result |") && md.contains("| c | v2 | v1 |"),
        "{md}"
    );
}
