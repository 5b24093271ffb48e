//! Shared by the SSH transport's tests (controller/tests/ssh_*.rs):
//! inventories whose hosts have SSH details pointing at a throw-away sshd
//! on 127.0.0.1 (`deploy_testkit::sshd::Sshd`), where the remote command
//! runs this workspace's `deploy-agent` binary with the host's state dir
//! and config (explicit `env` assignments in the inventory's `ssh` table).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use deploy_testkit::sshd::Sshd;
use serde_json::Value;

use crate::common::{Agent, Pki, agent_bin, compose, tls_table};

pub const ENV: &str = "production";

/// How a host's SSH key is given.
#[derive(Clone, Copy)]
pub enum Key<'a> {
    File,
    /// `key_env = NAME` (the test sets the variable to the key's text).
    Env(&'a str),
}

/// The `ssh = { … }` inline table of a host of `agent`, logging in to
/// `sshd` with its client key, checking the host key against `known_hosts`.
pub fn ssh_inline(sshd: &Sshd, agent: &Agent, known_hosts: &Path, key: Key<'_>) -> String {
    let h = &agent.harness;
    let key = match key {
        Key::File => format!("key = \"{}\"", sshd.client_key.private.display()),
        Key::Env(var) => format!("key_env = \"{var}\""),
    };
    format!(
        "ssh = {{ address = \"127.0.0.1\", port = {}, user = \"{}\", {key}, known_hosts = \"{}\", \
         command = \"{}\", env = {{ DEPLOY_AGENT_STATE_DIR = \"{}\", DEPLOY_AGENT_CONFIG = \"{}\", DOCKER_CONFIG = \"{}\" }} }}",
        sshd.port,
        Sshd::user(),
        known_hosts.display(),
        agent_bin().display(),
        h.state_dir().display(),
        h.config_path().display(),
        h.docker_config_dir().display(),
    )
}

/// One host of an inventory.
pub struct HostEntry<'a> {
    pub agent: &'a Agent,
    /// The `agent` address (default: the agent's HTTPS API).
    pub addr: Option<String>,
    /// The `ssh = { … }` line, if any.
    pub ssh: Option<String>,
}

impl<'a> HostEntry<'a> {
    pub fn new(agent: &'a Agent, ssh: Option<String>) -> HostEntry<'a> {
        HostEntry {
            agent,
            addr: None,
            ssh,
        }
    }
}

/// Writes `deploy.toml` (client certificate `client`, environment `ENV`,
/// `extra` environment lines) and `compose.yml` into `dir`.
pub fn inventory(
    dir: &Path,
    name: &str,
    pki: &Pki,
    client: &str,
    hosts: &[HostEntry<'_>],
    extra: &str,
) -> PathBuf {
    let mut t = tls_table("tls", &pki.ca(), &pki.client(client));
    t.push_str(&format!(
        "\n[environments.{ENV}]\nproject = \"web\"\ncompose = \"compose.yml\"\n\
         strategy = {{ canary = 1, batch = 2 }}\nlock_ttl = \"30s\"\nconnect_timeout = \"1s\"\n{extra}\n"
    ));
    for h in hosts {
        let a = h.agent;
        t.push_str(&format!(
            "\n[[environments.{ENV}.hosts]]\nname = \"{}\"\nagent = \"{}\"\nvars = {{ PORT = \"{}\" }}\n",
            a.name,
            h.addr
                .clone()
                .unwrap_or_else(|| format!("127.0.0.1:{}", a.api)),
            a.app_port
        ));
        if let Some(ssh) = &h.ssh {
            t.push_str(ssh);
            t.push('\n');
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(1)).expect("write the compose file");
    path
}

/// The summary's host lines, by host name: (after, via).
pub fn summary_hosts(summary: &Value) -> Vec<(String, String, String)> {
    summary["hosts"]
        .as_array()
        .expect("summary hosts")
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap_or_default().to_string(),
                h["after"].as_str().unwrap_or_default().to_string(),
                h["via"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The `--json` warnings of a run.
pub fn warnings(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|v| v["type"] == "warning")
        .filter_map(|v| v["message"].as_str().map(str::to_string))
        .collect()
}

/// `ssh:USER (claimed: key=SHA256:… from=127.0.0.1 controller=CN)`: what
/// the agent records for this sshd's client key (the user is the kernel's;
/// the rest is what `serve-stdio`'s environment and request said).
pub fn ssh_who(sshd: &Sshd, controller: &str) -> String {
    format!(
        "ssh:{} (claimed: key={} from=127.0.0.1 controller={controller})",
        Sshd::user(),
        sshd.client_key.fingerprint
    )
}
