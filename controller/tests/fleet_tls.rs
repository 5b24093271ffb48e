//! Mutual TLS and authorization on a production agent: a staging
//! certificate is refused with 403 (and audited), a reader may read but not
//! deploy, and no certificate, a certificate from another CA, an expired
//! certificate or an agent (server) certificate are refused at the TLS
//! handshake.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use deploy_controller::pki::{self as pkilib, Issued};

const ENV: &str = "production";

fn inventory(dir: &Path, name: &str, ca: &Path, client: &Issued, agent: &Agent) -> PathBuf {
    let mut t = tls_table("tls", ca, client);
    t.push_str(&format!(
        "\n[environments.{ENV}]\nproject = \"web\"\ncompose = \"compose.yml\"\n\n[[environments.{ENV}.hosts]]\n{}",
        agent.host_toml("")
    ));
    let path = dir.join(name);
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(1)).expect("write the compose file");
    path
}

/// A raw HTTPS GET with an optional client identity: Ok(status) or the
/// transport error (with its sources).
fn raw_get(ca: &Path, identity: Option<&Issued>, port: u16) -> Result<u16, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).expect("read CA")).expect("CA");
        let mut b = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(10));
        if let Some(id) = identity {
            let pem = [
                std::fs::read(&id.cert).expect("cert"),
                b"\n".to_vec(),
                std::fs::read(&id.key).expect("key"),
            ]
            .concat();
            b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
        }
        let c = b.build().expect("client");
        match c
            .get(format!("https://127.0.0.1:{port}/v1/status"))
            .send()
            .await
        {
            Ok(r) => Ok(r.status().as_u16()),
            Err(e) => Err(deploy_controller::client::error_chain(&e)),
        }
    })
}

fn assert_handshake_refused(what: &str, r: Result<u16, String>) {
    match r {
        Ok(status) => {
            panic!("{what}: the agent answered HTTP {status}; it must refuse the TLS handshake")
        }
        Err(e) => {
            assert!(!e.contains("HTTP status"), "{what}: {e}");
            eprintln!("{what}: refused at the handshake: {e}");
        }
    }
}

#[test]
fn certificates_roles_and_handshakes() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = Pki::new();
    let agents = start_agents(
        &pki,
        ENV,
        &["p1"],
        "\"ci-production\" = \"deployer\", \"ci-staging-readonly\" = \"reader\"",
    );
    let agent = &agents[0];
    let dir = tempfile::tempdir().expect("tempdir");

    // The production certificate works.
    let prod = inventory(
        dir.path(),
        "prod.toml",
        &pki.ca(),
        &pki.client("ci-production"),
        agent,
    );
    run(
        &prod,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
    )
    .expect_code(0);

    // A staging certificate (same CA, no grant in production): 403, audited,
    // nothing changed.
    let staging = inventory(
        dir.path(),
        "staging.toml",
        &pki.ca(),
        &pki.client("ci-staging"),
        agent,
    );
    let r = run(
        &staging,
        &["deploy", "--env", ENV, "--release", "v2", "--var", "TAG=v2"],
    );
    r.expect_code(6);
    // Said once: the error line, not again in the summary under it.
    assert_eq!(
        r.text()
            .matches("pre-pull failed, nothing was changed")
            .count(),
        1,
        "{r}"
    );
    assert!(
        r.stdout
            .contains("deploy v2 of web to production: refused (exit 6)"),
        "{r}"
    );
    for needle in [
        "mtls:ci-staging",
        "environment production",
        "needs role deployer",
    ] {
        assert!(
            r.stderr.contains(needle),
            "the refusal must say {needle:?}: {r}"
        );
    }
    let r = run(&staging, &["status", "--env", ENV]);
    assert_ne!(r.code, 0, "{r}");
    assert!(r.text().contains("needs role reader"), "{r}");
    let audit = agent.harness.audit_export(None);
    let denied: Vec<_> = audit
        .iter()
        .filter(|a| a["action"] == "api.denied")
        .collect();
    assert!(
        denied.iter().any(|a| a["who"] == "mtls:ci-staging"
            && a["detail"]["environment"] == "production"
            && a["detail"]["path"] == "/v1/pull"),
        "the refusal is audited: {denied:#?}"
    );
    assert_eq!(releases(&prod, ENV), vec![Some("v1".into())]);

    // A reader reads, and may not deploy.
    let reader = inventory(
        dir.path(),
        "reader.toml",
        &pki.ca(),
        &pki.client("ci-staging-readonly"),
        agent,
    );
    let s = status(&reader, ENV);
    assert_eq!(s["release"], "v1");
    run(&reader, &["history", "--env", ENV]).expect_code(0);
    let r = run(&reader, &["rollback", "--env", ENV]);
    r.expect_code(6);
    assert!(
        r.stderr.contains("is a reader in environment production"),
        "{r}"
    );

    // Refused at the handshake: no certificate, another CA, expired, and a
    // server certificate used as a client one.
    assert_handshake_refused("no certificate", raw_get(&pki.ca(), None, agent.api));
    let other = Pki::new();
    assert_handshake_refused(
        "a certificate from another CA",
        raw_get(&pki.ca(), Some(&other.client("ci-production")), agent.api),
    );
    assert_handshake_refused(
        "an expired certificate",
        raw_get(
            &pki.ca(),
            Some(&pki.expired_client("ci-production-old")),
            agent.api,
        ),
    );
    assert_handshake_refused(
        "an agent (server) certificate",
        raw_get(
            &pki.ca(),
            Some(&pki.agent("ci-production-server")),
            agent.api,
        ),
    );
    // The controller says the agent refused OUR certificate, and why (the
    // TLS alert): a refusal of who we are, exit 6; not "cannot reach".
    let refused = |name: &str, client: &Issued, why: &[&str]| {
        let inv = inventory(dir.path(), name, &pki.ca(), client, agent);
        let r = run(&inv, &["status", "--env", ENV]);
        r.expect_code(6);
        assert!(
            r.stderr
                .contains("host p1: its agent at https://127.0.0.1:")
                && r.stderr
                    .contains("refused this controller's client certificate"),
            "{r}"
        );
        assert!(
            why.iter().any(|w| r.stderr.contains(w)),
            "{name}: the reason must say one of {why:?}: {r}"
        );
        assert!(!r.text().contains("cannot reach its agent"), "{r}");
        assert!(!r.text().contains("listens there"), "{r}");
        eprintln!("{name}: {}", r.stderr.trim());
        r
    };
    let r = refused(
        "expired.toml",
        &pkilib::paths(pki.path(), "ci-production-old"),
        &["it has expired (or is not valid yet) (TLS alert certificate_expired)"],
    );
    assert!(
        r.stderr.contains("ci-production-old.pem, which expired "),
        "{r}"
    );
    assert!(r.stderr.contains("pki issue --dir CA_DIR"), "{r}");
    // (Another CA with the same name as ours: its signature does not verify.)
    refused(
        "other-ca.toml",
        &other.client("ci-production"),
        &["(TLS alert unknown_ca)", "(TLS alert decrypt_error)"],
    );
    refused(
        "server-cert.toml",
        &pki.agent("ci-production-server"),
        &["bad usage", "(TLS alert unsupported_certificate)"],
    );
    // The production certificate still works, and the agent logged why it
    // refused the others.
    assert_eq!(
        raw_get(&pki.ca(), Some(&pki.client("ci-production")), agent.api),
        Ok(200)
    );
    let log =
        std::fs::read_to_string(agent.harness.dir().join("logs/daemon-1.log")).expect("daemon log");
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS handshake refused"))
        .collect();
    eprintln!("agent log:\n{}", refusals.join("\n"));
    assert!(
        refusals.len() >= 5,
        "every bad certificate is refused in the handshake: {refusals:#?}"
    );
    // (Another CA with the same name as ours: its signature does not verify.)
    for reasons in [
        &["no certificates"][..],
        &["UnknownIssuer", "BadSignature"],
        &["certificate expired"],
        &["extended key usage for client authentication"],
    ] {
        assert!(
            refusals
                .iter()
                .any(|l| reasons.iter().any(|r| l.contains(r))),
            "no refusal for {reasons:?}: {refusals:#?}"
        );
    }
}
