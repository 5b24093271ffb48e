//! Shared by the controller's end-to-end tests: a private CA, agents with
//! the HTTPS API on 127.0.0.1 (each its own state dir, API port, published
//! port and instance label, via the testkit's `Harness`), inventories, and
//! controller runs.
//!
//! Real everything: the `deploy-agent` binary, Docker, the local registry
//! on 127.0.0.1:5000, TLS. A missing piece fails the test with what to do.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deploy_controller::pki::{self, Issued, Kind};
use deploy_testkit::{Harness, free_port, wait_until};
use serde_json::Value;

pub const CONTROLLER: &str = env!("CARGO_BIN_EXE_deploy-controller");

/// `deploy-agent`, built next to `deploy-controller` by
/// `cargo build --workspace --all-targets` (scripts/test.sh does it).
pub fn agent_bin() -> PathBuf {
    let p = Path::new(CONTROLLER).with_file_name("deploy-agent");
    assert!(
        p.is_file(),
        "the deploy-agent binary {} does not exist: run `cargo build --workspace --all-targets` \
         (scripts/test.sh does) before the controller's tests",
        p.display()
    );
    p
}

/// A private CA in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("deploy-pki-")
            .tempdir()
            .expect("temporary directory for the CA");
        pki::init(dir.path(), 30).expect("pki init");
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.path().join("ca.pem")
    }

    fn get(&self, name: &str, kind: Kind, sans: &[String]) -> Issued {
        let files = pki::paths(self.path(), name);
        if files.cert.is_file() {
            return files;
        }
        pki::issue(self.path(), name, kind, sans, 30).expect("pki issue")
    }

    /// A client certificate with CN `name`.
    pub fn client(&self, name: &str) -> Issued {
        self.get(name, Kind::Client, &[])
    }

    /// An agent certificate for 127.0.0.1.
    pub fn agent(&self, name: &str) -> Issued {
        self.get(name, Kind::Agent, &["127.0.0.1".into(), "localhost".into()])
    }

    /// A client certificate whose validity ended yesterday.
    pub fn expired_client(&self, name: &str) -> Issued {
        let now = time::OffsetDateTime::now_utc();
        pki::issue_between(
            self.path(),
            name,
            Kind::Client,
            &[],
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .expect("issue an expired certificate")
    }
}

/// One agent: its harness (proxy + daemon), API port and the port its
/// project publishes.
pub struct Agent {
    pub name: String,
    pub harness: Harness,
    pub api: u16,
    pub app_port: u16,
}

impl Agent {
    /// `name = "…"` line of the inventory's hosts.
    pub fn host_toml(&self, extra_vars: &str) -> String {
        format!(
            "name = \"{}\"\nagent = \"127.0.0.1:{}\"\nvars = {{ PORT = \"{}\"{extra_vars} }}\n",
            self.name, self.api, self.app_port
        )
    }
}

/// Starts agents for environment `env`. `grants` is the body of
/// agent.toml's inline `grants` table, e.g. `"ci-production" = "deployer"`.
///
/// One after the other, on the calling thread: the testkit's agent
/// processes die with the thread that started them (PR_SET_PDEATHSIG).
pub fn start_agents(pki: &Pki, env: &str, names: &[&str], grants: &str) -> Vec<Agent> {
    start_agents_with(pki, env, names, grants, &[])
}

/// [`start_agents`] with more lines for agent.toml.
pub fn start_agents_with(
    pki: &Pki,
    env: &str,
    names: &[&str],
    grants: &str,
    config: &[&str],
) -> Vec<Agent> {
    let bin = agent_bin();
    let ca = pki.ca();
    names
        .iter()
        .map(|name| {
            let cert = pki.agent(&format!("agent-{env}-{name}"));
            let api = free_port();
            let app_port = free_port();
            let mut builder = Harness::builder(bin.clone());
            for line in config {
                builder = builder.config_line(line);
            }
            let harness = builder
                .config_line(&format!("api_listen = \"127.0.0.1:{api}\""))
                .config_line(&format!("tls_cert = \"{}\"", cert.cert.display()))
                .config_line(&format!("tls_key = \"{}\"", cert.key.display()))
                .config_line(&format!("tls_ca = \"{}\"", ca.display()))
                .config_line(&format!("environment = \"{env}\""))
                .config_line("observe_window = \"0s\"")
                .config_line(&format!("grants = {{ {grants} }}"))
                .start();
            wait_until(
                &format!("the HTTPS API of agent {name} on 127.0.0.1:{api}"),
                Duration::from_secs(20),
                || {
                    TcpStream::connect(("127.0.0.1", api))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                },
            );
            Agent {
                name: name.to_string(),
                harness,
                api,
                app_port,
            }
        })
        .collect()
}

/// The compose file of the fleet tests: one HTTP service `web` from
/// `127.0.0.1:5000/${REPO:-demo}:${TAG}`, published on `127.0.0.1:${PORT}`,
/// with a fast health gate on `${HEALTH:-/health}` (a host whose inventory
/// sets `HEALTH` to a path that answers 404 fails its gate).
/// `healthy_after` makes the gate slower when a test needs deploys to overlap.
pub fn compose(healthy_after: u32) -> String {
    format!(
        r#"services:
  web:
    image: "127.0.0.1:5000/${{REPO:-demo}}:${{TAG}}"
    ports:
      - "127.0.0.1:${{PORT}}:80"
    x-deploy:
      health:
        http: "${{HEALTH:-/health}}"
        port: 80
        interval: 200ms
        timeout: 1s
        healthy_after: {healthy_after}
        unhealthy_after: 2
        start_period: 0s
        deadline: 6s
      drain_timeout: 5s
      proxy: http
"#
    )
}

/// The client files of an inventory's `tls` table.
pub fn tls_table(table: &str, ca: &Path, client: &Issued) -> String {
    format!(
        "[{table}]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        ca.display(),
        client.cert.display(),
        client.key.display()
    )
}

/// A result of `deploy-controller`.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "deploy-controller {:?} exited {} after {:.1}s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args,
            self.code,
            self.duration.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

impl Run {
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "unexpected exit code:\n{self}");
        self
    }

    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| l.trim_start().starts_with('{'))
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}\n{self}"))
            })
            .collect()
    }

    /// The `summary` line of `--json` output.
    pub fn summary(&self) -> Value {
        self.json_lines()
            .into_iter()
            .rev()
            .find(|v| v["type"] == "summary")
            .unwrap_or_else(|| panic!("no summary line:\n{self}"))
    }

    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A controller command with the inventory.
pub fn command(inventory: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(CONTROLLER);
    c.arg("--inventory")
        .arg(inventory)
        .args(args)
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("DEPLOY_INVENTORY")
        .stdin(Stdio::null());
    c
}

/// Runs the controller to completion (at most 3 minutes).
pub fn run(inventory: &Path, args: &[&str]) -> Run {
    spawn(inventory, args, &[]).wait()
}

/// Runs the controller with extra environment variables.
pub fn run_env(inventory: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    spawn(inventory, args, env).wait()
}

/// A controller running in the background; its stdout is read as it comes.
pub struct Running {
    pub child: Child,
    args: Vec<String>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

pub fn spawn(inventory: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut c = command(inventory, args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {CONTROLLER}: {e}"));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let readers = vec![
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    match l {
                        Ok(l) => lines.lock().expect("lock").push(l),
                        Err(_) => break,
                    }
                }
            })
        },
        {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let mut err = err;
                let _ = err.read_to_string(&mut s);
                stderr.lock().expect("lock").push_str(&s);
            })
        },
    ];
    Running {
        child,
        args: args.iter().map(|s| s.to_string()).collect(),
        lines,
        stderr,
        readers,
        started,
    }
}

impl Running {
    /// Waits for a stdout line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        wait_until(
            &format!("deploy-controller to print {needle:?}"),
            timeout,
            || {
                let lines = self.lines.lock().expect("lock");
                if lines.iter().any(|l| l.contains(needle)) {
                    Ok(())
                } else {
                    Err(format!("output so far:\n{}", lines.join("\n")))
                }
            },
        );
    }

    /// SIGKILL.
    pub fn kill9(mut self) -> Run {
        let _ = self.child.kill();
        self.wait()
    }

    pub fn wait(mut self) -> Run {
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            match self.child.try_wait().expect("try_wait") {
                Some(s) => break s,
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "deploy-controller {:?} did not finish within 180 s; output:\n{}",
                        self.args,
                        self.lines.lock().expect("lock").join("\n")
                    );
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        use std::os::unix::process::ExitStatusExt;
        Run {
            args: self.args.clone(),
            code: status.code().unwrap_or(128 + status.signal().unwrap_or(0)),
            stdout: self.lines.lock().expect("lock").join("\n"),
            stderr: self.stderr.lock().expect("lock").clone(),
            duration: self.started.elapsed(),
        }
    }
}

/// `status --env E --json`, parsed.
pub fn status(inventory: &Path, env: &str) -> Value {
    let r = run(inventory, &["status", "--env", env, "--json"]);
    r.expect_code(0);
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("status is not JSON: {e}\n{r}"))
}

/// The release each host serves, from `status --json`, in host order.
pub fn releases(inventory: &Path, env: &str) -> Vec<Option<String>> {
    status(inventory, env)["hosts"]
        .as_array()
        .expect("hosts array")
        .iter()
        .map(|h| h["release"].as_str().map(str::to_string))
        .collect()
}

/// A unique name for a registry repository of one test.
pub fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{}x{:x}", std::process::id(), n % 0xffff_ffff)
}
