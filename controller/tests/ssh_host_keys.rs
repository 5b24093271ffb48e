//! Host keys over SSH are verified against the inventory's known_hosts
//!: an unknown key and a changed key are refused with an error
//! that names the host and the file, and nothing is deployed there (not
//! even a pre-pull: the controller never logs in). `--accept-new-host-keys`
//! accepts an unknown key (never a changed one), says so loudly, records
//! it in known_hosts and in the host's audit log. The client key here is
//! RSA (SHA-2 signatures).

mod common;
mod ssh_common;

use common::*;
use deploy_testkit::sshd::{KeyType, Sshd};
use ssh_common::*;

#[test]
fn unknown_and_changed_host_keys_are_refused() {
    let pki = Pki::new();
    let mut agents = start_agents(&pki, ENV, &["u", "k"], "\"ci-production\" = \"deployer\"");
    // Both agents are down: only SSH could reach these hosts.
    for a in &mut agents {
        a.harness.stop_daemon();
    }
    let sshd = Sshd::start_with(KeyType::Rsa);
    let unknown = sshd.empty_known_hosts();
    let changed = sshd.wrong_known_hosts();
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = vec![
        HostEntry::new(
            &agents[0],
            Some(ssh_inline(&sshd, &agents[0], &unknown, Key::File)),
        ),
        HostEntry::new(
            &agents[1],
            Some(ssh_inline(&sshd, &agents[1], &changed, Key::File)),
        ),
    ];
    let inv = inventory(dir.path(), "deploy.toml", &pki, "ci-production", &hosts, "");
    let only_u = inventory(
        dir.path(),
        "only-u.toml",
        &pki,
        "ci-production",
        &hosts[..1],
        "",
    );
    drop(hosts);

    let r = run(
        &inv,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
    );
    r.expect_code(5);
    let text = r.text();
    assert!(
        text.contains("host u:")
            && text.contains("is not in the known_hosts file")
            && text.contains(&unknown.display().to_string())
            && text.contains(&sshd.host_key.fingerprint),
        "an unknown key names the host, the file and the key: {r}"
    );
    assert!(
        text.contains("host k:")
            && text.contains("CHANGED")
            && text.contains(&format!("line 1 of {}", changed.display())),
        "a changed key names the host, the file and the line: {r}"
    );
    assert!(text.contains("nothing was changed"), "{r}");
    assert_eq!(
        sshd.accepted_logins(),
        0,
        "refused before logging in:\n{}",
        sshd.log()
    );
    assert_eq!(std::fs::read_to_string(&unknown).expect("read"), "");
    for a in &agents {
        assert!(a.harness.history("web").is_empty(), "host {}", a.name);
    }
    // status says the same per host instead of failing the table.
    let r = run(&inv, &["status", "--env", ENV, "--json"]);
    r.expect_code(5);
    let s: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("status JSON");
    assert_eq!(s["hosts"][0]["health"], "unreachable", "{s:#}");
    assert!(
        s["hosts"][1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("CHANGED")),
        "{s:#}"
    );

    // --accept-new-host-keys: u's key is accepted (loudly, and written to
    // its known_hosts); k's changed key is still refused.
    let r = run(
        &inv,
        &[
            "--accept-new-host-keys",
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
    r.expect_code(5);
    let warned = warnings(&r.json_lines());
    assert!(
        warned
            .iter()
            .any(|w| w.starts_with("host u: ACCEPTED A NEW SSH HOST KEY")
                && w.contains(&sshd.host_key.fingerprint)),
        "{warned:#?}"
    );
    assert!(r.text().contains("CHANGED"), "{r}");
    assert_eq!(
        std::fs::read_to_string(&unknown).expect("read"),
        sshd.known_hosts_line()
    );
    assert_eq!(
        std::fs::read_to_string(&changed)
            .expect("read")
            .lines()
            .count(),
        1
    );
    // The host recorded who accepted its key, in its audit log.
    let audit = agents[0].harness.audit_export(None);
    assert!(
        audit.iter().any(|e| e["action"] == "ssh.request"
            && e["detail"]["claimed"]["accepted_host_key"]
                .as_str()
                .is_some_and(|k| k.contains(&sshd.host_key.fingerprint))),
        "{audit:#?}"
    );
    assert!(agents[1].harness.history("web").is_empty());

    // Now known, u deploys over SSH without the flag (an RSA client key).
    let r = run(
        &only_u,
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
    assert_eq!(
        summary_hosts(&r.summary()),
        vec![("u".into(), "v1".into(), "ssh".into())],
        "{r}"
    );
    let who = ssh_who(&sshd, "ci-production");
    assert!(who.contains("SHA256:"), "{who}");
    let audit = agents[0].harness.audit_export(None);
    let req = audit
        .iter()
        .find(|e| e["action"] == "ssh.request" && e["detail"]["op"] == "deploy")
        .unwrap_or_else(|| panic!("{audit:#?}"));
    assert_eq!(req["detail"]["claimed"]["key_type"], "ssh-rsa");
    assert_eq!(req["who"], who.as_str());
    assert!(
        agents[1].harness.history("web").is_empty(),
        "k never deployed"
    );
}
