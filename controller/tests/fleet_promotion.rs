//! Image promotion: production deploys the digests staging recorded for a
//! release, even after the tag moved in the registry; a release staging
//! never ran is refused.
//!
//! The test pushes to its own repository (`127.0.0.1:5000/promo<pid>x<n>`)
//! so that moving its tag cannot affect any other test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use deploy_testkit::{docker, http_get};

fn inventory(
    dir: &Path,
    pki: &Pki,
    staging: &[Agent],
    production: &[Agent],
    repo: &str,
) -> PathBuf {
    let mut t = String::new();
    t.push_str(&format!(
        "[environments.staging]\nproject = \"web\"\ncompose = \"compose.yml\"\nvars = {{ REPO = \"{repo}\" }}\n"
    ));
    t.push_str(&tls_table(
        "environments.staging.tls",
        &pki.ca(),
        &pki.client("ci-staging"),
    ));
    for a in staging {
        t.push_str(&format!(
            "\n[[environments.staging.hosts]]\n{}",
            a.host_toml("")
        ));
    }
    t.push_str(&format!(
        "\n[environments.production]\nproject = \"web\"\ncompose = \"compose.yml\"\npromote_from = \"staging\"\n\
         vars = {{ REPO = \"{repo}\" }}\nstrategy = {{ canary = 1, batch = \"100%\" }}\n"
    ));
    t.push_str(&tls_table(
        "environments.production.tls",
        &pki.ca(),
        &pki.client("ci-production"),
    ));
    for a in production {
        t.push_str(&format!(
            "\n[[environments.production.hosts]]\n{}",
            a.host_toml("")
        ));
    }
    let path = dir.join("deploy.toml");
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(1)).expect("write the compose file");
    path
}

/// Pushes `demo:{from}` as `{repo}:{tag}`; returns the pushed digest.
fn push_as(from: &str, repo: &str, tag: &str) -> String {
    let target = format!("127.0.0.1:5000/{repo}:{tag}");
    docker(&["pull", "-q", &format!("127.0.0.1:5000/demo:{from}")]);
    docker(&["tag", &format!("127.0.0.1:5000/demo:{from}"), &target]);
    let out = docker(&["push", &target]);
    let digest = out
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in `docker push` output: {out}"))
        .to_string();
    docker(&["rmi", &target]);
    digest
}

#[test]
fn production_gets_the_digests_staging_ran_even_after_the_tag_moved() {
    let pki = Pki::new();
    let staging = start_agents(
        &pki,
        "staging",
        &["s1"],
        "\"ci-staging\" = \"deployer\", \"ci-production\" = \"reader\"",
    );
    let production = start_agents(
        &pki,
        "production",
        &["p1", "p2"],
        "\"ci-production\" = \"deployer\"",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = unique("promo");
    let inv = inventory(dir.path(), &pki, &staging, &production, &repo);

    let d1 = push_as("v1", &repo, "rel");
    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            "staging",
            "--release",
            "rel",
            "--var",
            "TAG=rel",
            "--json",
        ],
    );
    r.expect_code(0);
    let staged = r.summary()["digests"]["web"]
        .as_str()
        .expect("digest")
        .to_string();
    assert_eq!(staged, format!("127.0.0.1:5000/{repo}@{d1}"));

    // The tag moves: `rel` now names demo:v2's bytes.
    let d2 = push_as("v2", &repo, "rel");
    assert_ne!(d1, d2);

    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            "production",
            "--release",
            "rel",
            "--var",
            "TAG=rel",
            "--json",
        ],
    );
    r.expect_code(0);
    eprintln!("promoted to production in {:.1}s", r.duration.as_secs_f64());
    assert!(r.stdout.contains("promotion: staging ran"), "{r}");
    assert_eq!(r.summary()["digests"]["web"], staged.as_str(), "{r}");
    let s = status(&inv, "production");
    for h in s["hosts"].as_array().expect("hosts") {
        assert_eq!(h["release"], "rel", "{s:#}");
        assert_eq!(h["digests"]["web"], staged.as_str(), "{s:#}");
    }
    for a in &production {
        let resp = http_get(a.app_port, "/", Duration::from_secs(3)).expect("GET /");
        assert_eq!(
            resp.body, "v1",
            "production runs staging's bytes, not the moved tag"
        );
    }

    // Without promotion the tag resolves to the new bytes (the test's own
    // control): proves the tag really moved.
    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            "staging",
            "--release",
            "rel2",
            "--var",
            "TAG=rel",
            "--json",
        ],
    );
    r.expect_code(0);
    assert_eq!(
        r.summary()["digests"]["web"],
        format!("127.0.0.1:5000/{repo}@{d2}").as_str()
    );

    // A release staging never ran is refused; nothing changes.
    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            "production",
            "--release",
            "never",
            "--var",
            "TAG=rel",
        ],
    );
    r.expect_code(6);
    assert!(
        r.stderr.contains("never ran successfully in staging"),
        "{r}"
    );
    assert_eq!(releases(&inv, "production"), vec![Some("rel".into()); 2]);
}
