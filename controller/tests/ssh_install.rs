//! `deploy-controller install` over SSH: the deploy-agent binary,
//! the systemd units, the host's agent.toml and the certificates it names
//! land on the host (here under `install.root`, a staging directory, since
//! the test machine's own /usr and /etc are not ours to change); a second
//! run copies nothing (checksums match); a changed agent.toml is the only
//! file sent again; a bad agent.toml is refused before anything is
//! contacted. Without systemd nothing is started, and the output says so.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use deploy_testkit::sshd::Sshd;
use serde_json::Value;

fn inventory(dir: &Path, pki: &Pki, sshd: &Sshd, root: &Path) -> std::path::PathBuf {
    let client = pki.client("ci-production");
    let mut t = tls_table("tls", &pki.ca(), &client);
    t.push_str(&format!(
        "\n[environments.production]\nproject = \"web\"\ncompose = \"compose.yml\"\n\
         ssh = {{ user = \"{user}\", key_env = \"DEPLOY_TEST_INSTALL_KEY\", known_hosts = \"{kh}\", address = \"127.0.0.1\", port = {port} }}\n\
         install = {{ agent_toml = \"hosts/{{host}}.toml\", tls_cert = \"{pki}/agent-{{host}}.pem\", tls_key = \"{pki}/agent-{{host}}-key.pem\", tls_ca = \"{pki}/ca.pem\", binary = \"{bin}\", root = \"{root}\" }}\n\
         [[environments.production.hosts]]\nname = \"web-1\"\nagent = \"127.0.0.1:7443\"\n",
        user = Sshd::user(),
        kh = sshd.known_hosts.display(),
        port = sshd.port,
        pki = pki.path().display(),
        bin = agent_bin().display(),
        root = root.display(),
    ));
    let path = dir.join("deploy.toml");
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(1)).expect("write the compose file");
    path
}

fn agent_toml(grants: &str) -> String {
    format!(
        "instance = \"default\"\napi_listen = \"0.0.0.0:7443\"\n\
         tls_cert = \"/etc/deploy-agent/tls/web-1.pem\"\ntls_key = \"/etc/deploy-agent/tls/web-1-key.pem\"\n\
         tls_ca = \"/etc/deploy-agent/tls/ca.pem\"\nenvironment = \"production\"\n[grants]\n{grants}\n"
    )
}

fn host(summary: &Value) -> &Value {
    &summary["hosts"][0]
}

#[test]
fn install_copies_what_changed_and_nothing_else() {
    let pki = Pki::new();
    pki.agent("agent-web-1");
    let sshd = Sshd::start();
    let key = std::fs::read_to_string(&sshd.client_key.private).expect("read the key");
    let env = [("DEPLOY_TEST_INSTALL_KEY", key.as_str())];
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("host-root");
    std::fs::create_dir_all(dir.path().join("hosts")).expect("mkdir hosts");
    std::fs::write(
        dir.path().join("hosts/web-1.toml"),
        agent_toml("\"ci-production\" = \"deployer\""),
    )
    .expect("write agent.toml");
    let inv = inventory(dir.path(), &pki, &sshd, &root);

    // First install: everything is copied; nothing is started.
    let r = run_env(&inv, &["install", "--env", "production", "--json"], &env);
    r.expect_code(0);
    let s = r.summary();
    eprintln!(
        "first install in {:.1}s: {}",
        r.duration.as_secs_f64(),
        host(&s)
    );
    assert_eq!(host(&s)["copied"].as_array().map(Vec::len), Some(9), "{r}");
    assert_eq!(
        host(&s)["unchanged"].as_array().map(Vec::len),
        Some(0),
        "{r}"
    );
    assert!(
        host(&s)["service"]
            .as_str()
            .is_some_and(|m| m.starts_with("not started")),
        "{r}"
    );
    let installed = root.join("usr/bin/deploy-agent");
    assert_eq!(
        std::fs::read(&installed).expect("the installed binary"),
        std::fs::read(agent_bin()).expect("the binary"),
    );
    assert_eq!(
        std::fs::metadata(&installed)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    let out = std::process::Command::new(&installed)
        .arg("--version")
        .output()
        .expect("run the installed binary");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("deploy-agent "));
    let toml = root.join("etc/deploy-agent/agent.toml");
    assert_eq!(
        std::fs::metadata(&toml).expect("stat").permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(
        std::fs::read(root.join("etc/deploy-agent/tls/web-1-key.pem")).expect("key"),
        std::fs::read(pki.path().join("agent-web-1-key.pem")).expect("key"),
    );
    assert!(root.join("etc/deploy-agent/tls/ca.pem").is_file());
    assert!(
        root.join("etc/systemd/system/deploy-agent.service")
            .is_file()
    );
    assert!(
        root.join("etc/systemd/system/deploy-proxy.service")
            .is_file()
    );

    // Again: nothing to copy.
    let r = run_env(
        &inv,
        &[
            "install",
            "--env",
            "production",
            "--host",
            "web-1",
            "--json",
        ],
        &env,
    );
    r.expect_code(0);
    let s = r.summary();
    eprintln!("second install in {:.1}s", r.duration.as_secs_f64());
    assert_eq!(host(&s)["copied"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(
        host(&s)["unchanged"].as_array().map(Vec::len),
        Some(9),
        "{r}"
    );

    // A changed agent.toml is the only file sent again.
    std::fs::write(
        dir.path().join("hosts/web-1.toml"),
        agent_toml("\"ci-production\" = \"deployer\"\n\"dashboard\" = \"reader\""),
    )
    .expect("write agent.toml");
    let r = run_env(&inv, &["install", "--env", "production", "--json"], &env);
    r.expect_code(0);
    assert_eq!(
        host(&r.summary())["copied"],
        serde_json::json!([toml.display().to_string()]),
        "{r}"
    );
    assert!(
        std::fs::read_to_string(&toml)
            .expect("read")
            .contains("dashboard")
    );

    // A bad agent.toml is refused before anything is contacted.
    let logins = sshd.accepted_logins();
    std::fs::write(dir.path().join("hosts/web-1.toml"), "retain = \"ten\"\n").expect("write");
    let r = run_env(&inv, &["install", "--env", "production"], &env);
    r.expect_code(2);
    assert!(
        r.stderr.contains("retain") && r.stderr.contains("web-1.toml"),
        "{r}"
    );
    assert_eq!(sshd.accepted_logins(), logins);
    assert!(
        std::fs::read_to_string(&toml)
            .expect("read")
            .contains("dashboard")
    );

    // An unknown host name is refused too.
    let r = run_env(
        &inv,
        &["install", "--env", "production", "--host", "web-9"],
        &env,
    );
    r.expect_code(2);
    assert!(r.stderr.contains("web-9"), "{r}");
}
