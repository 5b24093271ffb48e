//! One agent instance per test: state directory, config, processes, CLI,
//! compose files, Docker cleanup.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::compose::Compose;
use crate::env::{require_auth_registry, require_test_registry};
use crate::http::http_get;

/// The label the agent puts on everything it creates.
pub const INSTANCE_LABEL: &str = "io.deploy-agent.instance";

/// How long a CLI command may run before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a daemon may take to open its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u32(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A free TCP port on 127.0.0.1, picked at random in 20000..32000: below
/// Linux's ephemeral range, so that no client connection of the load loop
/// holds it by chance.
pub fn free_port() -> u16 {
    for _ in 0..500 {
        let port = 20000 + (random_u64() % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in 20000..32000");
}

/// Polls `f` until it returns `Ok`, every 100 ms; panics after `timeout`
/// with `what` and the last error.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                if start.elapsed() >= timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {e}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Options for a [`Harness`].
pub struct HarnessBuilder {
    bin: PathBuf,
    proxy: bool,
    daemon: bool,
    credentials: Vec<(String, String, String)>,
    extra_toml: Vec<String>,
    auth_registry: bool,
}

impl HarnessBuilder {
    /// Do not start `deploy-agent proxy`.
    pub fn no_proxy(mut self) -> Self {
        self.proxy = false;
        self
    }

    /// Do not start `deploy-agent run`: the CLI then does the work itself.
    pub fn no_daemon(mut self) -> Self {
        self.daemon = false;
        self
    }

    /// `[registries."{host}"] username/password` in agent.toml. Also checks
    /// that the registry with authentication is up.
    pub fn registry_credentials(mut self, host: &str, username: &str, password: &str) -> Self {
        self.credentials
            .push((host.into(), username.into(), password.into()));
        self.auth_registry = true;
        self
    }

    /// The test uses 127.0.0.1:5001: check that it is up.
    pub fn uses_auth_registry(mut self) -> Self {
        self.auth_registry = true;
        self
    }

    /// A raw line for agent.toml (top level, before the registry tables).
    pub fn config_line(mut self, line: &str) -> Self {
        self.extra_toml.push(line.into());
        self
    }

    pub fn start(self) -> Harness {
        require_test_registry();
        if self.auth_registry {
            require_auth_registry();
        }
        assert!(
            self.bin.is_file(),
            "the deploy-agent binary {} does not exist (cargo build --workspace --all-targets)",
            self.bin.display()
        );
        let instance = format!(
            "t{}n{}",
            std::process::id(),
            radix36(random_u64() % 36u64.pow(5))
        );
        let dir = tempfile::Builder::new()
            .prefix("deploy-e2e-")
            .tempdir()
            .expect("create the test's temporary directory");
        let root = dir.path().to_path_buf();
        let state_dir = root.join("state");
        let docker_config = root.join("docker-config");
        let logs = root.join("logs");
        for d in [&state_dir, &docker_config, &logs] {
            fs::create_dir_all(d).expect("create test directories");
        }
        let mut toml = format!("instance = \"{instance}\"\n");
        // The product's default observation window is minutes long; tests
        // that watch after the switch set their own.
        if !self
            .extra_toml
            .iter()
            .any(|l| l.trim_start().starts_with("observe_window"))
        {
            toml.push_str("observe_window = \"0s\"\n");
        }
        for line in &self.extra_toml {
            toml.push_str(line);
            toml.push('\n');
        }
        for (host, user, password) in &self.credentials {
            toml.push_str(&format!(
                "\n[registries.\"{host}\"]\nusername = \"{user}\"\npassword = \"{password}\"\n"
            ));
        }
        let config_path = root.join("agent.toml");
        fs::write(&config_path, toml).expect("write agent.toml");
        let mut h = Harness {
            instance,
            bin: self.bin,
            dir: Some(dir),
            root,
            state_dir,
            config_path,
            docker_config,
            logs,
            proxy: None,
            successors: Vec::new(),
            daemon: None,
            daemon_starts: 0,
        };
        if self.proxy {
            h.start_proxy();
        }
        if self.daemon {
            h.start_daemon();
        }
        h
    }
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

/// One agent instance for one test. Dropping it kills its processes and
/// removes every container, network and volume labelled with its instance.
pub struct Harness {
    /// `instance` in agent.toml: `t<pid>n<random>`.
    pub instance: String,
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    state_dir: PathBuf,
    config_path: PathBuf,
    docker_config: PathBuf,
    logs: PathBuf,
    proxy: Option<Child>,
    /// Successor proxies started by the proxy itself (SIGHUP): not our
    /// children, killed on drop all the same.
    successors: Vec<u32>,
    daemon: Option<Child>,
    daemon_starts: u32,
}

impl Harness {
    /// Proxy and daemon running. `bin` is `env!("CARGO_BIN_EXE_deploy-agent")`.
    pub fn new(bin: impl Into<PathBuf>) -> Harness {
        Harness::builder(bin).start()
    }

    pub fn builder(bin: impl Into<PathBuf>) -> HarnessBuilder {
        HarnessBuilder {
            bin: bin.into(),
            proxy: true,
            daemon: true,
            credentials: vec![],
            extra_toml: vec![],
            auth_registry: false,
        }
    }

    /// The agent's state directory (`--state-dir`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `DOCKER_CONFIG` of every agent process: empty unless a test writes a
    /// `config.json` there (see [`Harness::write_docker_config_auth`]).
    pub fn docker_config_dir(&self) -> &Path {
        &self.docker_config
    }

    /// The temporary directory holding everything of this harness.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// A free port on 127.0.0.1 (see [`free_port`]).
    pub fn free_port(&self) -> u16 {
        free_port()
    }

    /// A command running `deploy-agent --state-dir … --config … ARGS` with
    /// this harness's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env_remove("DEPLOY_AGENT_CRASH_AT")
            .env_remove("DEPLOY_AGENT_STATE_DIR")
            .env_remove("DEPLOY_AGENT_CONFIG")
            .stdin(Stdio::null());
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs in the child.
        unsafe {
            c.pre_exec(|| {
                // The agent processes die with the test thread that started them,
                // even when the test process is killed.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        c
    }

    fn spawn_daemon(&self, what: &str, log_name: &str, socket: &str) -> Child {
        let log_path = self.logs.join(log_name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open daemon log");
        let mut c = self.command(&[what]);
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        c.stdout(log.try_clone().expect("log fd")).stderr(log);
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {what}: {e}", self.bin.display()));
        let sock = self.state_dir.join(socket);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "`deploy-agent {what}` exited ({}) before {} accepted connections.\n{}",
                    describe_status(status),
                    sock.display(),
                    tail(&log_path, 60)
                );
            }
            if UnixStream::connect(&sock).is_ok() {
                return child;
            }
            if start.elapsed() > SOCKET_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`deploy-agent {what}` did not accept connections on {} within {SOCKET_TIMEOUT:?}.\n{}",
                    sock.display(),
                    tail(&log_path, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Starts `deploy-agent proxy` and waits for `proxy.sock`.
    pub fn start_proxy(&mut self) {
        assert!(self.proxy.is_none(), "the proxy is already running");
        self.proxy = Some(self.spawn_daemon("proxy", "proxy.log", "proxy.sock"));
    }

    /// Stops the proxy (SIGTERM, then SIGKILL after 5 s).
    pub fn stop_proxy(&mut self) {
        let child = self.proxy.take().expect("the proxy is not running");
        terminate(child, Duration::from_secs(5));
    }

    /// The pid of the proxy this harness started.
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(Child::id)
    }

    /// The pid of the proxy that answers on `proxy.sock` now.
    pub fn serving_proxy_pid(&self) -> Result<u32, String> {
        let path = self.state_dir.join("proxy.sock");
        let mut stream =
            UnixStream::connect(&path).map_err(|e| format!("connect {}: {e}", path.display()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"{\"op\":\"status\"}\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        let answer: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
        answer["status"]["pid"]
            .as_u64()
            .map(|pid| pid as u32)
            .ok_or_else(|| format!("no pid in {line:?}"))
    }

    /// SIGHUP to the proxy: it starts a successor that takes its listeners
    /// over. Returns the successor's pid once it answers on `proxy.sock`
    /// (the old proxy may still be finishing its connections).
    pub fn upgrade_proxy(&mut self, timeout: Duration) -> u32 {
        let old = self.proxy_pid().expect("the proxy is not running");
        kill(Pid::from_raw(old as i32), Signal::SIGHUP).expect("SIGHUP the proxy");
        let new = wait_until(
            "a successor proxy answers on proxy.sock",
            timeout,
            || match self.serving_proxy_pid()? {
                pid if pid == old => Err(format!("still {old}")),
                pid => Ok(pid),
            },
        );
        self.successors.push(new);
        new
    }

    /// Waits for the proxy this harness started to exit (after a handover).
    pub fn wait_proxy_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.proxy.as_mut().expect("the proxy was not started");
        let status = wait_until("the old proxy exits", timeout, || {
            child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_string())
        });
        self.proxy = None;
        status
    }

    /// Starts `deploy-agent run` and waits for `agent.sock`.
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "the daemon is already running");
        self.daemon_starts += 1;
        let log = format!("daemon-{}.log", self.daemon_starts);
        self.daemon = Some(self.spawn_daemon("run", &log, "agent.sock"));
    }

    /// SIGKILL to the control daemon.
    pub fn kill9_daemon(&mut self) {
        let mut child = self.daemon.take().expect("the daemon is not running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "the daemon had already exited ({}) before kill -9",
                describe_status(status)
            );
        }
        child.kill().expect("kill -9 the daemon");
        let _ = child.wait();
    }

    /// kill -9 the daemon if it runs, then start it again.
    pub fn restart_daemon(&mut self) {
        if self.daemon.is_some() {
            self.kill9_daemon();
        }
        self.start_daemon();
    }

    /// Stops the daemon gracefully (SIGTERM, then SIGKILL after 10 s).
    pub fn stop_daemon(&mut self) {
        let child = self.daemon.take().expect("the daemon is not running");
        terminate(child, Duration::from_secs(10));
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// Panics (with its log) if the daemon has exited.
    pub fn assert_daemon_running(&mut self) {
        let logs = self.logs.clone();
        let starts = self.daemon_starts;
        let child = self.daemon.as_mut().expect("the daemon was not started");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "the daemon exited ({}).\n{}",
                describe_status(status),
                tail(&logs.join(format!("daemon-{starts}.log")), 60)
            );
        }
    }

    /// Starts a CLI command in the background; stdout and stderr are collected.
    pub fn spawn_cli(&self, args: &[&str], env: &[(&str, &str)]) -> RunningCli {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", self.bin.display()));
        let stdout_lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let readers = vec![
            {
                let lines = stdout_lines.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines() {
                        match line {
                            Ok(l) => lines.lock().expect("lock").push(l),
                            Err(_) => break,
                        }
                    }
                })
            },
            {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut err = err;
                    let _ = err.read_to_end(&mut buf);
                    stderr
                        .lock()
                        .expect("lock")
                        .push_str(&String::from_utf8_lossy(&buf));
                })
            },
        ];
        RunningCli {
            child,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            stdout_lines,
            stderr,
            readers,
            started,
            exited: None,
        }
    }

    /// Runs a CLI command that finds its state directory and config through
    /// `DEPLOY_AGENT_STATE_DIR` and `DEPLOY_AGENT_CONFIG` instead of flags.
    pub fn cli_via_env(&self, args: &[&str]) -> CliOutput {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("DEPLOY_AGENT_STATE_DIR", &self.state_dir)
            .env("DEPLOY_AGENT_CONFIG", &self.config_path)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env_remove("DEPLOY_AGENT_CRASH_AT");
        let started = Instant::now();
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", self.bin.display()));
        CliOutput {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![
                format!("DEPLOY_AGENT_STATE_DIR={}", self.state_dir.display()),
                format!("DEPLOY_AGENT_CONFIG={}", self.config_path.display()),
            ],
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            started,
            finished: Instant::now(),
        }
    }

    /// Runs a CLI command to completion.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.spawn_cli(args, &[]).wait()
    }

    /// Runs a CLI command with extra environment variables.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
        self.spawn_cli(args, env).wait()
    }

    /// `deploy --project P --file F --release R --json`.
    pub fn deploy(&self, project: &str, file: &Path, release: &str) -> CliOutput {
        self.deploy_with(project, file, release, &[], &[])
    }

    /// `deploy … --json EXTRA…` with extra environment variables.
    pub fn deploy_with(
        &self,
        project: &str,
        file: &Path,
        release: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> CliOutput {
        let file = file.to_str().expect("utf-8 path");
        let mut args = vec![
            "deploy",
            "--project",
            project,
            "--file",
            file,
            "--release",
            release,
            "--json",
        ];
        args.extend_from_slice(extra);
        self.cli_env(&args, env)
    }

    /// `deploy …` that must succeed (exit 0) and serve `release`.
    pub fn deploy_ok(&self, project: &str, file: &Path, release: &str) -> CliOutput {
        let out = self.deploy(project, file, release);
        out.expect_code(0);
        let result = out.result();
        assert_eq!(
            result["serving"].as_str(),
            Some(release),
            "deploy of {release} succeeded but the result does not say it serves it:\n{out}"
        );
        out
    }

    /// `rollback --project P [--to R] --json`.
    pub fn rollback(&self, project: &str, to: Option<&str>) -> CliOutput {
        let mut args = vec!["rollback", "--project", project, "--json"];
        if let Some(to) = to {
            args.extend_from_slice(&["--to", to]);
        }
        self.cli(&args)
    }

    /// `status --json`, parsed; panics unless it exits 0 with one JSON object.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        out.expect_code(0);
        parse_single_json(&out.stdout).unwrap_or_else(|e| {
            panic!("`status --json` did not print one JSON object ({e}):\n{out}")
        })
    }

    /// The entry of `project` in `status --json`, if any.
    pub fn project_status(&self, project: &str) -> Option<Value> {
        let status = self.status();
        let projects = status["projects"]
            .as_array()
            .unwrap_or_else(|| panic!("`status --json` has no \"projects\" array: {status}"));
        projects
            .iter()
            .find(|p| p["project"].as_str() == Some(project))
            .cloned()
    }

    /// `current` of `project` in `status --json`.
    pub fn current_release(&self, project: &str) -> Option<String> {
        self.project_status(project)
            .and_then(|p| p["current"].as_str().map(str::to_string))
    }

    /// `history --project P --json`, one object per line, newest first.
    pub fn history(&self, project: &str) -> Vec<Value> {
        let out = self.cli(&["history", "--project", project, "--json"]);
        out.expect_code(0);
        out.json_lines()
    }

    /// `audit verify`.
    pub fn audit_verify(&self) -> CliOutput {
        self.cli(&["audit", "verify"])
    }

    /// `audit export [--project P]`, parsed (JSON lines).
    pub fn audit_export(&self, project: Option<&str>) -> Vec<Value> {
        let mut args = vec!["audit", "export"];
        if let Some(p) = project {
            args.extend_from_slice(&["--project", p]);
        }
        let out = self.cli(&args);
        out.expect_code(0);
        out.json_lines()
    }

    /// Writes a file into the harness directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.root.join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Writes a compose file into the harness directory.
    pub fn write_compose(&self, name: &str, compose: &Compose) -> PathBuf {
        self.write_file(name, &compose.render())
    }

    /// Writes `$DOCKER_CONFIG/config.json` of the agent processes with
    /// credentials for `host`.
    pub fn write_docker_config_auth(&self, host: &str, username: &str, password: &str) {
        let auth = base64(format!("{username}:{password}").as_bytes());
        let json = serde_json::json!({ "auths": { host: { "auth": auth } } });
        fs::write(self.docker_config.join("config.json"), json.to_string())
            .expect("write config.json");
    }

    /// Waits until `GET http://127.0.0.1:{port}/` answers 200 with body
    /// `release` three times in a row.
    pub fn wait_serving(&self, port: u16, release: &str, timeout: Duration) {
        let mut streak = 0;
        wait_until(
            &format!("127.0.0.1:{port} to serve {release:?}"),
            timeout,
            || match http_get(port, "/", Duration::from_secs(3)) {
                Ok(r) if r.status == 200 && r.body == release => {
                    streak += 1;
                    if streak >= 3 {
                        Ok(())
                    } else {
                        Err("not yet three in a row".into())
                    }
                }
                Ok(r) => {
                    streak = 0;
                    Err(format!("HTTP {} {:?}", r.status, r.body))
                }
                Err(e) => {
                    streak = 0;
                    Err(e)
                }
            },
        );
    }

    /// Panics unless `GET /` on `port` answers 200 with body `release` now.
    pub fn assert_serving(&self, port: u16, release: &str) {
        match http_get(port, "/", Duration::from_secs(5)) {
            Ok(r) if r.status == 200 && r.body == release => {}
            Ok(r) => panic!(
                "127.0.0.1:{port} answered HTTP {} {:?}, expected 200 {release:?}",
                r.status, r.body
            ),
            Err(e) => panic!("127.0.0.1:{port} should serve {release:?}: {e}"),
        }
    }

    /// Containers of this instance (any state), via the docker CLI.
    pub fn containers(&self) -> Vec<Container> {
        let out = docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label={INSTANCE_LABEL}={}", self.instance),
            "--format",
            "{{.ID}}\t{{.Names}}\t{{.Image}}\t{{.State}}\t{{.Labels}}",
        ]);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut f = l.splitn(5, '\t');
                let mut next = || f.next().unwrap_or("").to_string();
                Container {
                    id: next(),
                    name: next(),
                    image: next(),
                    state: next(),
                    labels: next(),
                }
            })
            .collect()
    }

    /// Running containers of this instance.
    pub fn running_containers(&self) -> Vec<Container> {
        self.containers()
            .into_iter()
            .filter(|c| c.state == "running")
            .collect()
    }

    /// Panics unless `status --json` names `release` as the current release
    /// of `project` with no operation in progress.
    pub fn assert_current(&self, project: &str, release: &str) -> Value {
        let p = self
            .project_status(project)
            .unwrap_or_else(|| panic!("`status --json` does not list project {project:?}"));
        assert_eq!(
            p["current"].as_str(),
            Some(release),
            "status names the wrong current release of {project}: {p:#}"
        );
        assert!(
            p["operation"].is_null(),
            "status shows an operation in progress for {project}: {p:#}"
        );
        p
    }

    /// Containers of this instance with the ID of the image each runs.
    pub fn containers_with_image_ids(&self) -> Vec<(Container, String)> {
        self.containers()
            .into_iter()
            .map(|c| {
                let id = docker(&["inspect", "-f", "{{.Image}}", &c.id])
                    .trim()
                    .to_string();
                (c, id)
            })
            .collect()
    }

    /// Edits or deletes one record in the middle of the audit log, directly
    /// in the SQLite file under the state directory (python3's sqlite3;
    /// triggers on the audit table are dropped first). Returns what was done,
    /// e.g. `edit …/agent.db table audit rowid 3 column outcome`.
    pub fn tamper_audit_log(&self, delete: bool) -> TamperedRecord {
        let out = Command::new("python3")
            .arg("-c")
            .arg(TAMPER_PY)
            .arg(&self.state_dir)
            .arg(if delete { "delete" } else { "edit" })
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "python3 is needed to edit the audit database ({e}): apt-get install python3"
                )
            });
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "tampering with the audit log failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rowid = stdout
            .split_whitespace()
            .skip_while(|w| *w != "rowid")
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("unexpected output of the tamper script: {stdout}"));
        TamperedRecord {
            description: stdout,
            rowid,
        }
    }

    /// Prints the last lines of the daemons' logs to stderr.
    pub fn dump_logs(&self) {
        let mut names: Vec<PathBuf> = fs::read_dir(&self.logs)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.sort();
        for p in names {
            eprintln!("{}", tail(&p, 80));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for child in [self.daemon.take(), self.proxy.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.successors.drain(..) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "---- harness {} (state dir {}) ----",
                self.instance,
                self.state_dir.display()
            );
            self.dump_logs();
        }
        remove_instance_resources(&self.instance);
        if panicking
            && std::env::var_os("DEPLOY_TEST_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("kept {}", kept.display());
        }
    }
}

/// What [`Harness::tamper_audit_log`] changed.
#[derive(Debug, Clone)]
pub struct TamperedRecord {
    pub description: String,
    pub rowid: i64,
}

const TAMPER_PY: &str = r#"
import os, sqlite3, sys
state, action = sys.argv[1], sys.argv[2]
def is_sqlite(p):
    try:
        with open(p, 'rb') as f:
            return f.read(16) == b'SQLite format 3\x00'
    except OSError:
        return False
dbs = sorted(os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs if is_sqlite(os.path.join(d, f)))
if not dbs:
    print('no SQLite database under', state); sys.exit(2)
for db in dbs:
    con = sqlite3.connect(db)
    tables = [r[0] for r in con.execute("select name from sqlite_master where type='table' and name like '%audit%' order by name")]
    if not tables:
        continue
    t = tables[0]
    for (trg,) in con.execute("select name from sqlite_master where type='trigger' and tbl_name=?", (t,)).fetchall():
        con.execute('drop trigger "%s"' % trg)
    cols = con.execute('pragma table_info("%s")' % t).fetchall()
    rows = [r[0] for r in con.execute('select rowid from "%s" order by rowid' % t)]
    if len(rows) < 3:
        print('only %d audit records in %s' % (len(rows), db)); sys.exit(3)
    rowid = rows[len(rows) // 2]
    if action == 'delete':
        con.execute('delete from "%s" where rowid=?' % t, (rowid,))
        con.commit()
        print('delete %s table %s rowid %d' % (db, t, rowid)); sys.exit(0)
    names = [c[1] for c in cols]
    prefer = ['outcome', 'release', 'who', 'message', 'what', 'details', 'detail', 'payload', 'data', 'record', 'reason', 'operation', 'project']
    col = next((n for n in prefer if n in names), None)
    if col is None:
        col = next((c[1] for c in cols if not c[5] and 'hash' not in c[1].lower()), None)
    old = con.execute('select "%s" from "%s" where rowid=?' % (col, t), (rowid,)).fetchone()[0]
    if isinstance(old, str):
        new = old + ' (edited)'
    elif isinstance(old, (int, float)):
        new = old + 1
    else:
        new = 'edited'
    con.execute('update "%s" set "%s"=? where rowid=?' % (t, col), (new, rowid))
    con.commit()
    print('edit %s table %s rowid %d column %s' % (db, t, rowid, col)); sys.exit(0)
print('no audit table in', dbs); sys.exit(4)
"#;

/// A container of a harness's instance.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    pub state: String,
    pub labels: String,
}

/// Runs the docker CLI; panics (with stderr) when it fails.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run docker {args:?}: {e}"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image ID (`sha256:…`) of a local image reference.
pub fn image_id(reference: &str) -> String {
    docker(&["image", "inspect", "-f", "{{.Id}}", reference])
        .trim()
        .to_string()
}

/// PID 1 of a container, as this host's `/proc/PID/status` shows it.
#[derive(Debug, Clone)]
pub struct InitProcess {
    /// Its PID on this host.
    pub pid: u32,
    /// `Name:`, the command name (`start` for a test image's /bin/start,
    /// `runc:[2:INIT]` while the runtime has not yet exec'd it).
    pub name: String,
    /// `SigCgt:`, the signals it has a handler for (bit N-1 for signal N).
    pub caught: u64,
}

impl InitProcess {
    /// Reads PID 1 of the running container `id`. Needs the Docker Engine on
    /// this host; `/proc/PID/status` can be read without root.
    pub fn of(id: &str) -> Result<InitProcess, String> {
        let state = docker(&["inspect", "-f", "{{.State.Status}} {{.State.Pid}}", id]);
        let pid: u32 = match state.split_whitespace().collect::<Vec<_>>()[..] {
            ["running", p] => p.parse().map_err(|e| format!("pid {p:?}: {e}"))?,
            _ => return Err(format!("container {id} is not running: {}", state.trim())),
        };
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path)
            .map_err(|e| format!("read {path} (is the Docker Engine on this host?): {e}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("no {name} in {path}"))
        };
        let caught = field("SigCgt:")?;
        Ok(InitProcess {
            pid,
            name: field("Name:")?,
            caught: u64::from_str_radix(&caught, 16)
                .map_err(|e| format!("SigCgt {caught:?} in {path}: {e}"))?,
        })
    }

    /// Whether it has a handler for signal number `sig`.
    pub fn catches(&self, sig: Signal) -> bool {
        self.caught & (1u64 << (sig as i32 - 1)) != 0
    }
}

/// Waits until PID 1 of container `id`, a test image's entrypoint
/// (`/bin/start`), has installed its SIGTERM trap, and returns it.
///
/// Before that, `docker stop` cannot work: the kernel drops SIGTERM sent to
/// the init process of a PID namespace unless that process has a handler
/// for it. The signal is not kept for later, so `docker stop` waits its whole
/// grace period and then kills the container (exit code 137). No image can
/// close this window, since exec resets every handler, so a test that stops
/// a container right after `docker run` must wait for this first. A test
/// that waited for HTTP has already waited long enough, because every image
/// traps SIGTERM before it starts its server.
///
/// `Name: start` is checked too, so that a handler of the runtime's
/// `runc init`, which runs before the exec, does not count.
pub fn wait_sigterm_trap(id: &str, timeout: Duration) -> InitProcess {
    wait_until(
        &format!("PID 1 of container {id} (/bin/start) to trap SIGTERM"),
        timeout,
        || {
            let init = InitProcess::of(id)?;
            if init.name == "start" && init.catches(Signal::SIGTERM) {
                Ok(init)
            } else {
                Err(format!("{init:?}"))
            }
        },
    )
}

fn docker_quiet(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Removes every container, network and volume of `instance` (by label, and
/// containers by name prefix in case one lacks the label).
fn remove_instance_resources(instance: &str) {
    let label = format!("label={INSTANCE_LABEL}={instance}");
    let name = format!("name=^/?{instance}-");
    let mut ids: Vec<String> = Vec::new();
    for filter in [&label, &name] {
        ids.extend(
            docker_quiet(&["ps", "-aq", "--filter", filter])
                .split_whitespace()
                .map(String::from),
        );
    }
    ids.sort();
    ids.dedup();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids.iter().map(String::as_str));
        docker_quiet(&args);
    }
    let nets: Vec<String> = docker_quiet(&["network", "ls", "-q", "--filter", &label])
        .split_whitespace()
        .map(String::from)
        .collect();
    if !nets.is_empty() {
        let mut args = vec!["network", "rm"];
        args.extend(nets.iter().map(String::as_str));
        docker_quiet(&args);
    }
    let vols: Vec<String> = docker_quiet(&["volume", "ls", "-q", "--filter", &label])
        .split_whitespace()
        .map(String::from)
        .collect();
    if !vols.is_empty() {
        let mut args = vec!["volume", "rm", "-f"];
        args.extend(vols.iter().map(String::as_str));
        docker_quiet(&args);
    }
}

fn terminate(mut child: Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn describe_status(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last `n` lines of a log file, with a header.
fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            let from = lines.len().saturating_sub(n);
            format!(
                "--- last {} lines of {} ---\n{}",
                lines.len() - from,
                path.display(),
                lines[from..].join("\n")
            )
        }
        Err(e) => format!("--- {}: {e} ---", path.display()),
    }
}

fn parse_single_json(s: &str) -> Result<Value, String> {
    serde_json::from_str(s.trim()).map_err(|e| e.to_string())
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A CLI command running in the background.
pub struct RunningCli {
    child: Child,
    args: Vec<String>,
    env: Vec<String>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    exited: Option<(std::process::ExitStatus, Instant)>,
}

/// Waits for several background commands at once, so that each one's
/// `finished` is when it exited (within 10 ms), whatever the order.
pub fn wait_all(clis: Vec<RunningCli>) -> Vec<CliOutput> {
    let mut clis = clis;
    let end = Instant::now() + CLI_TIMEOUT;
    while clis.iter_mut().any(|c| !c.poll()) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    clis.into_iter()
        .map(|c| c.wait_timeout(Duration::ZERO))
        .collect()
}

impl RunningCli {
    /// True once the process has exited (and records when).
    fn poll(&mut self) -> bool {
        if self.exited.is_none()
            && let Some(s) = self.child.try_wait().expect("try_wait")
        {
            self.exited = Some((s, Instant::now()));
        }
        self.exited.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.lock().expect("lock").clone()
    }

    /// Waits for a stdout line matching `pred` and returns it; panics when
    /// the process exits first or after `timeout`.
    pub fn wait_for_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stdout_lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            let exited = self.child.try_wait().expect("try_wait").is_some();
            if exited || Instant::now() >= end {
                // Let the readers finish before reporting.
                std::thread::sleep(Duration::from_millis(100));
                if let Some(l) = self.stdout_lines().into_iter().find(|l| pred(l)) {
                    return l;
                }
                panic!(
                    "`deploy-agent {}` {} without printing the line the test waits for.\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.args.join(" "),
                    if exited { "exited" } else { "timed out" },
                    self.stdout_lines().join("\n"),
                    self.stderr.lock().expect("lock")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the `--json` progress line of `step`.
    pub fn wait_for_step(&mut self, step: &str, timeout: Duration) -> Value {
        let line = self.wait_for_line(timeout, |l| {
            serde_json::from_str::<Value>(l)
                .map(|v| v["type"] == "progress" && v["step"] == step)
                .unwrap_or(false)
        });
        serde_json::from_str(&line).expect("json")
    }

    /// Waits for the process (at most 180 s) and returns its output.
    pub fn wait(self) -> CliOutput {
        self.wait_timeout(CLI_TIMEOUT)
    }

    pub fn wait_timeout(mut self, timeout: Duration) -> CliOutput {
        let end = Instant::now() + timeout;
        let (status, finished) = loop {
            if self.poll() {
                let (s, t) = self.exited.expect("exited");
                break (Some(s), t);
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break (None, Instant::now());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = CliOutput {
            args: self.args.clone(),
            env: self.env.clone(),
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout: self.stdout_lines().join("\n"),
            stderr: self.stderr.lock().expect("lock").clone(),
            started: self.started,
            finished,
        };
        if status.is_none() {
            panic!("timed out after {timeout:?} (killed):\n{out}");
        }
        out
    }
}

/// A finished CLI command.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub started: Instant,
    pub finished: Instant,
}

impl CliOutput {
    /// Panics (printing everything) unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &CliOutput {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit code {code}, got {}:\n{self}",
            self.status_text()
        );
        self
    }

    fn status_text(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "no status".into(),
        }
    }

    /// Every non-empty stdout line parsed as JSON; panics on a line that is not.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l:?}\n{self}"))
            })
            .collect()
    }

    /// The final `{"type":"result",…}` line; panics if missing or not last.
    pub fn result(&self) -> Value {
        let lines = self.json_lines();
        let last = lines
            .last()
            .unwrap_or_else(|| panic!("no JSON output at all:\n{self}"));
        assert_eq!(
            last["type"], "result",
            "the last JSON line is not the result:\n{self}"
        );
        assert_eq!(
            lines.iter().filter(|l| l["type"] == "result").count(),
            1,
            "more than one result line:\n{self}"
        );
        last.clone()
    }

    /// The `step` of every progress line, in order.
    pub fn progress_steps(&self) -> Vec<String> {
        self.json_lines()
            .iter()
            .filter(|l| l["type"] == "progress")
            .filter_map(|l| l["step"].as_str().map(str::to_string))
            .collect()
    }

    /// stdout and stderr together, for message checks.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    pub fn duration(&self) -> Duration {
        self.finished.duration_since(self.started)
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "`{}deploy-agent {}` -> {} after {:.1}s",
            if self.env.is_empty() {
                String::new()
            } else {
                format!("{} ", self.env.join(" "))
            },
            self.args.join(" "),
            self.status_text(),
            self.duration().as_secs_f64()
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_registry_header() {
        assert_eq!(base64(b"deployer:s3cret"), "ZGVwbG95ZXI6czNjcmV0");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    #[test]
    fn instance_names_match_the_stale_cleanup_pattern() {
        let n = radix36(36u64.pow(5) - 1);
        assert_eq!(n, "zzzzz");
        assert_eq!(radix36(0), "0");
    }

    #[test]
    fn free_ports_are_below_the_ephemeral_range() {
        let p = free_port();
        assert!((20000..32000).contains(&p), "{p}");
    }
}
