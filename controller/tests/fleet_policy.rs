//! The safety gates of an environment's policy against real agents: a
//! deploy outside the deployment window is denied (exit 6) with the gate
//! and the time it would pass, and changes nothing; `--override` deploys
//! anyway and every host audits the reason; the rate limit reads the
//! hosts' own history.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// An inventory of environment `production` (hosts `agents`) whose
/// `[environments.production.policy]` table has `policy` as its body.
fn inventory(dir: &Path, pki: &Pki, agents: &[Agent], policy: &str) -> PathBuf {
    let mut t = String::from(
        "[environments.production]\nproject = \"web\"\ncompose = \"compose.yml\"\n\
         strategy = { canary = 1, batch = \"100%\" }\n",
    );
    t.push_str(&tls_table(
        "environments.production.tls",
        &pki.ca(),
        &pki.client("ci-production"),
    ));
    t.push_str(&format!("\n[environments.production.policy]\n{policy}\n"));
    for a in agents {
        t.push_str(&format!(
            "\n[[environments.production.hosts]]\n{}",
            a.host_toml("")
        ));
    }
    let path = dir.join(format!("deploy-{}.toml", unique("p")));
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(1)).expect("write the compose file");
    path
}

fn deploy(inv: &Path, release: &str, extra: &[&str]) -> Run {
    let tag = format!("TAG={release}");
    let mut args = vec![
        "deploy",
        "--env",
        "production",
        "--release",
        release,
        "--var",
        &tag,
        "--json",
    ];
    args.extend_from_slice(extra);
    run(inv, &args)
}

#[test]
fn outside_the_window_is_denied_and_override_deploys_with_an_audited_reason() {
    let pki = Pki::new();
    let agents = start_agents(
        &pki,
        "production",
        &["p1", "p2"],
        "\"ci-production\" = \"deployer\"",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // A window on tomorrow only (UTC): closed now, opens at midnight.
    let tomorrow = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .tomorrow()
        .expect("tomorrow");
    let day = tomorrow.strftime("%a").to_string();
    let inv = inventory(
        dir.path(),
        &pki,
        &agents,
        &format!("timezone = \"UTC\"\nwindows = [\"{day} 00:00-24:00\"]"),
    );

    let r = deploy(&inv, "v1", &[]);
    r.expect_code(6);
    let s = r.summary();
    assert_eq!(s["outcome"], "refused", "{r}");
    assert_eq!(s["gate"], "window", "{r}");
    let message = s["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("window gate: outside the deployment window")
            && message.contains(&format!("it would pass at {tomorrow}T00:00:00Z"))
            && message.contains("--override"),
        "{r}"
    );
    assert_eq!(
        releases(&inv, "production"),
        vec![None, None],
        "nothing changed"
    );
    for a in &agents {
        assert!(
            a.harness.history("web").is_empty(),
            "{}: a deploy ran",
            a.name
        );
    }

    // An override without a reason is a usage error.
    deploy(&inv, "v1", &["--override", " "]).expect_code(2);

    let r = deploy(&inv, "v1", &["--override", "hotfix for INC-7"]);
    r.expect_code(0);
    assert!(
        r.stderr.contains("OVERRIDE") || r.stdout.contains("OVERRIDE"),
        "the override must be loud: {r}"
    );
    assert_eq!(
        releases(&inv, "production"),
        vec![Some("v1".into()), Some("v1".into())]
    );
    for a in &agents {
        let audited = a.harness.audit_export(Some("web"));
        assert!(
            audited.iter().any(|rec| {
                let reason = rec["reason"].as_str().unwrap_or_default();
                reason.contains("OVERRIDE of the window gate(s)")
                    && reason.contains("hotfix for INC-7")
            }),
            "{}: no audited override in {audited:#?}",
            a.name
        );
    }
}

#[test]
fn the_rate_limit_counts_the_hosts_own_history() {
    let pki = Pki::new();
    let agents = start_agents(
        &pki,
        "production",
        &["p1"],
        "\"ci-production\" = \"deployer\"",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = inventory(dir.path(), &pki, &agents, "rate_limit = \"1/1h\"");

    let committed = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let committed = format!("{committed:.0}");
    deploy(&inv, "v1", &["--commit-time", &committed]).expect_code(0);
    deploy(&inv, "v2", &["--commit-time", "an hour ago"]).expect_code(2);
    let r = deploy(&inv, "v2", &[]);
    r.expect_code(6);
    let s = r.summary();
    assert_eq!(s["gate"], "rate_limit", "{r}");
    let message = s["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("rate limit 1/1h: 1 deploy(s) in the last 1h (v1 at ")
            && message.contains("it would pass at "),
        "{r}"
    );
    assert_eq!(releases(&inv, "production"), vec![Some("v1".into())]);
    deploy(&inv, "v2", &["--override", "urgent fix"]).expect_code(0);
    assert_eq!(releases(&inv, "production"), vec![Some("v2".into())]);
    // Rollbacks are never gated, though a deploy would be denied now.
    run(&inv, &["rollback", "--env", "production", "--json"]).expect_code(0);
    assert_eq!(releases(&inv, "production"), vec![Some("v1".into())]);

    // The DORA figures of that: two changes, v2 undone by a rollback; the
    // denied attempt changed nothing and is not a change.
    let r = run(&inv, &["dora", "--env", "production", "--json"]);
    r.expect_code(0);
    let f: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("dora --json");
    assert_eq!(f["changes"], 2, "{r}");
    assert_eq!(f["failed_changes"], 1, "{r}");
    assert_eq!(f["deployments"], 1, "{r}");
    assert_eq!(f["rollbacks"], 1, "{r}");
    assert_eq!(f["failures"][0]["release"], "v2", "{r}");
    assert_eq!(f["failures"][0]["why"], "rolled back on p1", "{r}");
    assert!(f["time_to_restore_median_ms"].as_u64().is_some(), "{r}");
    // v1 went out about an hour after its commit.
    assert_eq!(f["lead_time_changes"], 1, "{r}");
    let lead = f["lead_time_median_ms"].as_u64().unwrap_or_default();
    assert!(
        (3_600_000..3_700_000).contains(&lead),
        "lead time {lead} ms: {r}"
    );
    let r = run(&inv, &["dora", "--env", "production"]);
    r.expect_code(0);
    assert!(r.stdout.contains("1 of 2 change(s) failed: 50.0%"), "{r}");
    // What it counted: the window, the two deploys; every figure has a value.
    assert!(r.stdout.contains("  window                "), "{r}");
    assert!(
        r.stdout
            .contains("counted               2 deploy(s) (one per host), making 2 change(s)"),
        "{r}"
    );
    assert!(!r.stdout.contains("n/a"), "{r}");
    run(&inv, &["dora", "--env", "production", "--since", "soon"]).expect_code(2);
}

#[test]
fn a_deploy_waits_for_two_distinct_approvers_and_a_deployer_cannot_approve() {
    let pki = Pki::new();
    let agents = start_agents(
        &pki,
        "production",
        &["p1", "p2"],
        "\"ci-production\" = \"deployer\", \"alice\" = \"approver\", \"bob\" = \"approver\"",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = inventory(
        dir.path(),
        &pki,
        &agents,
        "approvals = { min = 2, timeout = \"1h\" }",
    );
    let approve_as = |who: Option<&str>| {
        let mut args = vec![
            "approve".to_string(),
            "--env".into(),
            "production".into(),
            "--release".into(),
            "v1".into(),
            "--reason".into(),
            "QA passed".into(),
        ];
        if let Some(name) = who {
            let issued = pki.client(name);
            args.extend([
                "--cert".to_string(),
                issued.cert.display().to_string(),
                "--key".to_string(),
                issued.key.display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&inv, &args)
    };

    let r = deploy(&inv, "v1", &[]);
    r.expect_code(6);
    assert_eq!(r.summary()["gate"], "approvals", "{r}");
    assert!(
        r.summary()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("0 of 2 approval(s) of release v1 within the last 1h; 2 more needed"),
        "{r}"
    );

    // The deploying identity cannot approve its own deploy.
    let r = approve_as(None);
    r.expect_code(6);
    assert!(r.stderr.contains("approver"), "{r}");

    approve_as(Some("alice")).expect_code(0);
    approve_as(Some("alice")).expect_code(0);
    let r = deploy(&inv, "v1", &[]);
    r.expect_code(6);
    assert!(
        r.summary()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("1 of 2 approval(s) of release v1 within the last 1h (mtls:alice at "),
        "the same approver twice counts once: {r}"
    );
    assert_eq!(releases(&inv, "production"), vec![None, None]);

    let r = approve_as(Some("bob"));
    r.expect_code(0);
    assert!(r.stdout.contains("mtls:bob approved v1 of web"), "{r}");
    deploy(&inv, "v1", &[]).expect_code(0);
    assert_eq!(
        releases(&inv, "production"),
        vec![Some("v1".into()), Some("v1".into())]
    );
    let audited = agents[0].harness.audit_export(Some("web"));
    assert!(
        audited.iter().any(|r| r["action"] == "release.approved"
            && r["who"] == "mtls:bob"
            && r["reason"] == "QA passed"),
        "{audited:#?}"
    );
    // Over SSH there is no certificate identity to approve with.
    run(
        &inv,
        &[
            "--transport",
            "ssh",
            "approve",
            "--env",
            "production",
            "--release",
            "v1",
        ],
    )
    .expect_code(2);
}
