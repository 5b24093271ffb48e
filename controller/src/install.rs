//! `deploy-controller install --env E [--host H]…`: puts deploy-agent on
//! hosts over SSH and starts its services.
//!
//! For each host (in parallel), over the host's SSH details:
//! 1. the files: the `deploy-agent` binary with the systemd units and the
//!    sysusers/tmpfiles entries the .deb would install, or the .deb itself;
//!    the host's agent.toml (checked locally first, as the agent would) and
//!    the certificates it names (`tls_cert`, `tls_key`, `tls_ca`), from
//!    `[environments.E.install]`;
//! 2. **idempotent**: a file whose SHA-256 on the host already matches is
//!    not sent; a changed one is written beside its target and renamed over
//!    it, then its checksum is checked;
//! 3. the service: on a host running systemd, the user and directories are
//!    created, both units enabled and started, and the control daemon
//!    restarted if anything changed (`try-restart`), the proxy reloaded
//!    (its successor takes the listening sockets over: no connection is
//!    refused, never a proxy restart). A host without systemd (a container, the tests) gets
//!    the files and is reported as "service not started" (exit 5), unless
//!    `--no-start` said not to start it. An `install.root` other than `/`
//!    (a staging directory) never starts anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deploy_protocol::config::AgentConfig;
use futures_util::future::join_all;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::client::TransportOptions;
use crate::exit;
use crate::inventory::{Environment, Host, InstallSettings, Inventory, SshSettings};
use crate::report::Reporter;
use crate::ssh::{Session, shell_quote};

const AGENT_UNIT: &str = include_str!("../../systemd/deploy-agent.service");
const PROXY_UNIT: &str = include_str!("../../systemd/deploy-proxy.service");
const SYSUSERS: &str = include_str!("../../systemd/deploy-agent.sysusers");
const TMPFILES: &str = include_str!("../../systemd/deploy-agent.tmpfiles");

pub struct InstallOptions {
    pub env: String,
    /// Only these hosts (default: all of the environment's).
    pub hosts: Vec<String>,
    pub binary: Option<PathBuf>,
    pub deb: Option<PathBuf>,
    pub no_start: bool,
    pub transport: TransportOptions,
}

/// What goes where.
#[derive(Debug, Clone)]
struct FileSpec {
    /// What it is, for messages (`binary`, `agent.toml`, …).
    what: String,
    content: Arc<Vec<u8>>,
    /// The path on the host (with `install.root` applied).
    remote: String,
    mode: u32,
    /// `chgrp deploy-agent` it (agent.toml and keys: the daemon's group reads them).
    group_readable: bool,
    /// The content's SHA-256, hex.
    sha256: String,
}

impl FileSpec {
    fn sha256(&self) -> &str {
        &self.sha256
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One host's result.
#[derive(Debug, Clone, Serialize)]
pub struct HostInstall {
    pub host: String,
    pub copied: Vec<String>,
    pub unchanged: Vec<String>,
    /// `started`, `restarted`, `running`, `not started: …`.
    pub service: String,
    pub exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn join_root(root: &str, path: &str) -> String {
    let rel = path.trim_start_matches('/');
    if root == "/" {
        format!("/{rel}")
    } else {
        format!("{}/{rel}", root.trim_end_matches('/'))
    }
}

fn for_host(template: &str, host: &str) -> PathBuf {
    PathBuf::from(template.replace("{host}", host))
}

/// Local files, each read and hashed once however many hosts get it.
#[derive(Default)]
struct Local {
    files: BTreeMap<PathBuf, (Arc<Vec<u8>>, String)>,
}

impl Local {
    fn read(&mut self, what: &str, path: &Path) -> Result<(Arc<Vec<u8>>, String), String> {
        if let Some(f) = self.files.get(path) {
            return Ok(f.clone());
        }
        let content = std::fs::read(path)
            .map(Arc::new)
            .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
        let sha = hex(&Sha256::digest(content.as_slice()));
        self.files
            .insert(path.to_path_buf(), (content.clone(), sha.clone()));
        Ok((content, sha))
    }
}

/// The newest `target/debian/deploy-agent_*.deb` under the working directory.
fn built_deb() -> Option<PathBuf> {
    let dir = Path::new("target/debian");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("deploy-agent_") && n.ends_with(".deb"))
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    debs.sort();
    debs.pop().map(|(_, p)| p)
}

/// Where the agent comes from.
#[derive(Debug, Clone)]
enum Package {
    Binary(PathBuf),
    Deb(PathBuf),
}

fn package(opts: &InstallOptions, inst: &InstallSettings) -> Result<Package, String> {
    match (&opts.binary, &opts.deb) {
        (Some(_), Some(_)) => {
            return Err("give --binary or --deb, not both".into());
        }
        (Some(b), None) => return Ok(Package::Binary(b.clone())),
        (None, Some(d)) => return Ok(Package::Deb(d.clone())),
        (None, None) => {}
    }
    if let Some(b) = &inst.binary {
        return Ok(Package::Binary(PathBuf::from(b)));
    }
    if let Some(d) = &inst.deb {
        return Ok(Package::Deb(PathBuf::from(d)));
    }
    if let Some(d) = built_deb() {
        return Ok(Package::Deb(d));
    }
    let next_to_us = std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("deploy-agent"))
        .filter(|p| p.is_file());
    next_to_us.map(Package::Binary).ok_or_else(|| {
        "no deploy-agent to install: pass --binary PATH or --deb PATH (packaging/build-deb.sh builds one), \
         or set `binary`/`deb` in [environments.E.install]"
            .to_string()
    })
}

/// Every file of one host, in the order they are installed.
fn files_for(
    host: &Host,
    inst: &InstallSettings,
    pkg: &Package,
    local: &mut Local,
) -> Result<Vec<FileSpec>, String> {
    let root = inst.root.as_str();
    let mut files = Vec::new();
    let file = |what: &str,
                (content, sha256): (Arc<Vec<u8>>, String),
                remote: &str,
                mode,
                group_readable| FileSpec {
        what: what.to_string(),
        sha256,
        content,
        remote: join_root(root, remote),
        mode,
        group_readable,
    };
    let text = |t: &str| {
        let content = Arc::new(t.as_bytes().to_vec());
        let sha = hex(&Sha256::digest(content.as_slice()));
        (content, sha)
    };
    match pkg {
        Package::Binary(b) => {
            files.push(file(
                "deploy-agent binary",
                local.read("deploy-agent binary", b)?,
                "/usr/bin/deploy-agent",
                0o755,
                false,
            ));
            for (what, body, path) in [
                (
                    "unit deploy-agent.service",
                    AGENT_UNIT,
                    "/etc/systemd/system/deploy-agent.service",
                ),
                (
                    "unit deploy-proxy.service",
                    PROXY_UNIT,
                    "/etc/systemd/system/deploy-proxy.service",
                ),
                (
                    "sysusers entry",
                    SYSUSERS,
                    "/usr/lib/sysusers.d/deploy-agent.conf",
                ),
                (
                    "tmpfiles entry",
                    TMPFILES,
                    "/usr/lib/tmpfiles.d/deploy-agent.conf",
                ),
            ] {
                files.push(file(what, text(body), path, 0o644, false));
            }
        }
        Package::Deb(d) => {
            let name = d
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("{} is not a .deb file name", d.display()))?;
            files.push(file(
                ".deb",
                local.read(".deb", d)?,
                &format!("/var/cache/deploy-agent/{name}"),
                0o644,
                false,
            ));
        }
    }
    let Some(toml_template) = &inst.agent_toml else {
        return Ok(files);
    };
    let toml_path = for_host(toml_template, &host.name);
    let toml = local.read("agent.toml", &toml_path)?;
    let toml_text = String::from_utf8_lossy(&toml.0).to_string();
    let cfg = AgentConfig::parse(&toml_path, &toml_text)
        .map_err(|e| format!("host {}: {e}; nothing was installed there", host.name))?;
    files.push(file(
        "agent.toml",
        toml,
        "/etc/deploy-agent/agent.toml",
        0o640,
        true,
    ));
    for (key, named, source, mode) in [
        ("tls_cert", &cfg.tls_cert, &inst.tls_cert, 0o644),
        ("tls_key", &cfg.tls_key, &inst.tls_key, 0o640),
        ("tls_ca", &cfg.tls_ca, &inst.tls_ca, 0o644),
    ] {
        match (named, source) {
            (Some(remote), Some(source)) => {
                let remote = remote.display().to_string();
                let local_path = for_host(source, &host.name);
                files.push(file(
                    key,
                    local.read(key, &local_path)?,
                    &remote,
                    mode,
                    key == "tls_key",
                ));
            }
            (Some(remote), None) => {
                return Err(format!(
                    "host {}: {} names {key} = {:?}, but [environments.E.install] has no `{key}` to copy there",
                    host.name,
                    toml_path.display(),
                    remote.display()
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "host {}: [environments.E.install] has `{key}`, but {} does not name where it goes (its `{key}` key)",
                    host.name,
                    toml_path.display()
                ));
            }
            (None, None) => {}
        }
    }
    Ok(files)
}

/// A shell script run on the host (with `sudo -n` when asked).
fn script(inst: &InstallSettings, body: &str) -> String {
    let sh = format!("sh -c {}", shell_quote(body));
    if inst.sudo {
        format!("sudo -n {sh}")
    } else {
        sh
    }
}

struct Remote<'a> {
    host: &'a str,
    session: &'a Session,
    inst: &'a InstallSettings,
}

impl Remote<'_> {
    /// Runs `body`; its stdout, or an error with its stderr.
    async fn run(&self, what: &str, body: &str, stdin: &[u8]) -> Result<String, String> {
        let mut out = String::new();
        let r = self
            .session
            .exec(&script(self.inst, body), stdin, |l| {
                out.push_str(&String::from_utf8_lossy(l));
                out.push('\n');
            })
            .await
            .map_err(|e| format!("host {}: {what}: {e}", self.host))?;
        if r.exit_status == Some(0) {
            Ok(out)
        } else {
            Err(format!(
                "host {}: {what} failed ({}){}",
                self.host,
                r.describe(),
                if r.stderr.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.stderr)
                }
            ))
        }
    }

    /// SHA-256 of each path that exists on the host.
    async fn checksums(&self, paths: &[&str]) -> Result<BTreeMap<String, String>, String> {
        let args: Vec<String> = paths.iter().map(|p| shell_quote(p)).collect();
        let body = format!(
            "for f in {}; do if [ -f \"$f\" ]; then sha256sum -- \"$f\"; fi; done",
            args.join(" ")
        );
        let out = self.run("reading checksums", &body, &[]).await?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (sum, path) = l.split_once("  ")?;
                Some((path.to_string(), sum.to_string()))
            })
            .collect())
    }

    async fn upload(&self, f: &FileSpec) -> Result<(), String> {
        let path = shell_quote(&f.remote);
        let tmp = shell_quote(&format!("{}.deploy-tmp", f.remote));
        let dir = shell_quote(
            Path::new(&f.remote)
                .parent()
                .map(|p| p.display().to_string())
                .as_deref()
                .unwrap_or("/"),
        );
        let group = if f.group_readable {
            format!("getent group deploy-agent >/dev/null 2>&1 && chgrp deploy-agent {tmp}; ")
        } else {
            String::new()
        };
        let body = format!(
            "set -e; umask 077; mkdir -p {dir}; cat > {tmp}; chmod {:o} {tmp}; {group}mv -f {tmp} {path}; sha256sum -- {path}",
            f.mode
        );
        let out = self
            .run(
                &format!("writing {} to {}", f.what, f.remote),
                &body,
                &f.content,
            )
            .await?;
        let got = out.split_whitespace().next().unwrap_or_default();
        if got != f.sha256() {
            return Err(format!(
                "host {}: {} arrived damaged (checksum {got}, expected {}); run install again",
                self.host,
                f.remote,
                f.sha256()
            ));
        }
        Ok(())
    }
}

async fn install_host(
    env: &Environment,
    host: &Host,
    ssh: &SshSettings,
    files: Vec<FileSpec>,
    pkg: &Package,
    opts: &InstallOptions,
    out: &Reporter,
) -> HostInstall {
    let inst = env.install.clone().unwrap_or_else(|| InstallSettings {
        root: "/".into(),
        ..InstallSettings::default()
    });
    let mut result = HostInstall {
        host: host.name.clone(),
        copied: vec![],
        unchanged: vec![],
        service: "not started".into(),
        exit_code: exit::SUCCESS,
        error: None,
    };
    let fail = |mut r: HostInstall, code: i32, message: String| {
        r.exit_code = code;
        r.error = Some(message);
        r
    };
    let session = match Session::connect(
        &host.name,
        ssh,
        opts.transport.accept_new_host_keys,
        env.connect_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            return fail(
                result,
                exit::ENVIRONMENT,
                format!(
                    "host {}: over SSH: {e}; nothing was installed there",
                    host.name
                ),
            );
        }
    };
    if let Some(k) = &session.accepted_host_key {
        out.warn(&format!(
            "host {}: ACCEPTED A NEW SSH HOST KEY {k} for {} and added it to {} (--accept-new-host-keys)",
            host.name,
            session.target(),
            ssh.known_hosts.display()
        ));
    }
    let remote = Remote {
        host: &host.name,
        session: &session,
        inst: &inst,
    };
    let paths: Vec<&str> = files.iter().map(|f| f.remote.as_str()).collect();
    let sums = match remote.checksums(&paths).await {
        Ok(s) => s,
        Err(e) => return fail(result, exit::ENVIRONMENT, e),
    };
    let mut deb_changed = false;
    for f in &files {
        if sums.get(&f.remote).map(String::as_str) == Some(f.sha256()) {
            result.unchanged.push(f.remote.clone());
            continue;
        }
        out.host(&host.name, &format!("copying {} to {}", f.what, f.remote));
        if let Err(e) = remote.upload(f).await {
            return fail(result, exit::ENVIRONMENT, e);
        }
        if f.what == ".deb" {
            deb_changed = true;
        }
        result.copied.push(f.remote.clone());
    }
    if let (Package::Deb(_), Some(deb)) = (pkg, files.first())
        && inst.root == "/"
    {
        // Also when the package was removed by hand since the last install.
        let installed = remote
            .run(
                "checking the package",
                "dpkg-query -W -f='${Status}' deploy-agent 2>/dev/null | grep -q 'install ok installed' && echo yes || echo no",
                &[],
            )
            .await
            .map(|o| o.trim() == "yes")
            .unwrap_or(false);
        if deb_changed || !installed {
            out.host(&host.name, "installing the .deb (dpkg -i)");
            let body = format!(
                "DEBIAN_FRONTEND=noninteractive dpkg --force-confold -i {}",
                shell_quote(&deb.remote)
            );
            if let Err(e) = remote.run("dpkg -i", &body, &[]).await {
                return fail(result, exit::ENVIRONMENT, e);
            }
            result.copied.push("(package installed)".into());
        }
    }
    let changed = !result.copied.is_empty();
    match start_service(&remote, &inst, pkg, opts.no_start, changed).await {
        Ok(service) => result.service = service,
        Err((service, message)) => {
            if let Some(service) = service {
                result.service = service;
            }
            return fail(result, exit::ENVIRONMENT, message);
        }
    }
    session.close().await;
    result
}

/// Starts (or restarts, when something changed) the services on a host
/// with systemd. `Ok`: what the service is now; `Err`: what it is, when
/// known, and why it could not be started.
async fn start_service(
    remote: &Remote<'_>,
    inst: &InstallSettings,
    pkg: &Package,
    no_start: bool,
    changed: bool,
) -> Result<String, (Option<String>, String)> {
    if inst.root != "/" {
        return Ok(format!(
            "not started: installed under install.root {} (a staging directory)",
            inst.root
        ));
    }
    if no_start {
        return Ok("not started (--no-start)".into());
    }
    let systemd = remote
        .run(
            "checking for systemd",
            "[ -d /run/systemd/system ] && echo yes || echo no",
            &[],
        )
        .await
        .map(|o| o.trim() == "yes")
        .map_err(|e| (None, e))?;
    if !systemd {
        return Err((
            Some("not started: the host does not run systemd".into()),
            format!(
                "host {}: the files are installed, but the service could not be started: the host does not run systemd \
                 (no /run/systemd/system); start `deploy-agent proxy` and `deploy-agent run` another way, or pass --no-start",
                remote.host
            ),
        ));
    }
    let was_active = remote
        .run(
            "checking the service",
            "systemctl is-active --quiet deploy-agent.service && echo yes || echo no",
            &[],
        )
        .await
        .map(|o| o.trim() == "yes")
        .unwrap_or(false);
    let mut body = String::from("set -e; systemctl daemon-reload; ");
    if matches!(pkg, Package::Binary(_)) {
        body.push_str(
            "systemd-sysusers /usr/lib/sysusers.d/deploy-agent.conf; \
             systemd-tmpfiles --create /usr/lib/tmpfiles.d/deploy-agent.conf; ",
        );
    }
    body.push_str(
        "deploy-agent check-config --config /etc/deploy-agent/agent.toml; \
         systemctl enable --now deploy-proxy.service deploy-agent.service; ",
    );
    if changed && was_active {
        // The control daemon picks up the change; the proxy hands its
        // sockets over to the new binary and keeps serving meanwhile.
        body.push_str(
            "systemctl try-restart deploy-agent.service; \
             systemctl reload deploy-proxy.service; ",
        );
    }
    body.push_str("systemctl is-active deploy-agent.service");
    remote
        .run("starting the service", &body, &[])
        .await
        .map_err(|e| (None, e))?;
    Ok(match (was_active, changed) {
        (false, _) => "started".into(),
        (true, true) => {
            "restarted (deploy-agent.service; deploy-proxy reloaded: its sockets handed over)"
                .into()
        }
        (true, false) => "running (nothing changed)".into(),
    })
}

/// `deploy-controller install`. Returns the exit code.
pub async fn install(inv: &Inventory, opts: &InstallOptions, out: Arc<Reporter>) -> i32 {
    let env = match inv.environment(&opts.env) {
        Ok(e) => e,
        Err(e) => {
            out.error(&e.to_string());
            return exit::CONFIG;
        }
    };
    for h in &opts.hosts {
        if !env.hosts.iter().any(|x| &x.name == h) {
            out.error(&format!(
                "--host {h}: not a host of environment {} (it has: {})",
                env.name,
                env.hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            return exit::CONFIG;
        }
    }
    let hosts: Vec<&Host> = env
        .hosts
        .iter()
        .filter(|h| opts.hosts.is_empty() || opts.hosts.contains(&h.name))
        .collect();
    let inst = env.install.clone().unwrap_or_else(|| InstallSettings {
        root: "/".into(),
        ..InstallSettings::default()
    });
    let pkg = match package(opts, &inst) {
        Ok(p) => p,
        Err(e) => {
            out.error(&e);
            return exit::CONFIG;
        }
    };
    // Everything is checked before any host is contacted.
    let mut plans = Vec::new();
    let mut local = Local::default();
    for h in &hosts {
        let Some(ssh) = &h.ssh else {
            out.error(&format!(
                "host {}: no SSH details in the inventory (an `ssh` table with user, key or key_env, known_hosts); install works over SSH only",
                h.name
            ));
            return exit::CONFIG;
        };
        match files_for(h, &inst, &pkg, &mut local) {
            Ok(f) => plans.push((*h, ssh, f)),
            Err(e) => {
                out.error(&e);
                return exit::CONFIG;
            }
        }
    }
    let names: Vec<String> = plans.iter().map(|(h, _, _)| h.name.clone()).collect();
    out.hosts(&names);
    out.phase(&format!(
        "install {} on {} host(s) of {}: {}",
        match &pkg {
            Package::Binary(b) => format!("the binary {}", b.display()),
            Package::Deb(d) => format!("the package {}", d.display()),
        },
        plans.len(),
        env.name,
        plans
            .iter()
            .map(|(h, _, _)| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let results = join_all(
        plans
            .into_iter()
            .map(|(h, ssh, files)| install_host(env, h, ssh, files, &pkg, opts, &out)),
    )
    .await;
    let mut code = exit::SUCCESS;
    let errors: Vec<&str> = results.iter().filter_map(|r| r.error.as_deref()).collect();
    if !errors.is_empty() {
        out.error(&errors.join("; "));
    }
    for r in &results {
        let msg = match &r.error {
            Some(e) => e.clone(),
            None => format!(
                "{} file(s) copied, {} unchanged; service {}",
                r.copied.len(),
                r.unchanged.len(),
                r.service
            ),
        };
        out.host_done(&r.host, r.exit_code == exit::SUCCESS, &msg);
        if r.exit_code != exit::SUCCESS && code == exit::SUCCESS {
            code = r.exit_code;
        }
    }
    #[derive(Serialize)]
    struct Summary<'a> {
        command: &'static str,
        environment: &'a str,
        exit_code: i32,
        hosts: &'a [HostInstall],
    }
    let text = results
        .iter()
        .map(|r| {
            format!(
                "  {:<16} copied {:<3} unchanged {:<3} service {}{}",
                r.host,
                r.copied.len(),
                r.unchanged.len(),
                r.service,
                r.error
                    .as_ref()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    out.summary(
        &Summary {
            command: "install",
            environment: &env.name,
            exit_code: code,
            hosts: &results,
        },
        &format!("install on {} (exit {code}):\n{text}", env.name),
    );
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_honour_the_root() {
        assert_eq!(
            join_root("/", "/usr/bin/deploy-agent"),
            "/usr/bin/deploy-agent"
        );
        assert_eq!(
            join_root("/tmp/r/", "/usr/bin/deploy-agent"),
            "/tmp/r/usr/bin/deploy-agent"
        );
        assert_eq!(
            for_host("pki/{host}.pem", "web-1"),
            PathBuf::from("pki/web-1.pem")
        );
    }

    #[test]
    fn the_units_are_the_repository_s() {
        assert!(AGENT_UNIT.contains("ExecStart=/usr/bin/deploy-agent run"));
        assert!(PROXY_UNIT.contains("deploy-agent proxy"));
        assert!(SYSUSERS.contains("deploy-agent"));
    }
}
