//! Running as a service: the sd-notify protocol against a real unix datagram
//! socket (`NOTIFY_SOCKET`), the watchdog going silent when the main loop
//! hangs, a graceful SIGTERM, the units (`systemd-analyze verify`, their
//! descriptor and memory limits), a bad
//! config's message, the Prometheus metrics, and the .deb
//! (`packaging/test-deb.sh`).
//!
//! Like every e2e test here, they need Docker and the test registry
//! (scripts/test-env.sh) and fail, never skip, when something is missing.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy_testkit::{Compose, Harness, free_port, http_get, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");

/// The watchdog interval the tests give the daemon (WATCHDOG_USEC): it then
/// pings every second.
const WATCHDOG: Duration = Duration::from_secs(2);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

/// One datagram the daemon sent, when it arrived.
#[derive(Debug, Clone)]
struct Message {
    at: Instant,
    text: String,
}

impl Message {
    /// Whether one of its lines is `line` (e.g. `READY=1`) or, for a prefix
    /// ending in `=`, starts with it (e.g. `STATUS=`).
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| {
            if line.ends_with('=') {
                l.starts_with(line)
            } else {
                l == line
            }
        })
    }

    fn status(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("STATUS="))
    }
}

/// The service manager's end: a bound unix datagram socket.
struct Notifications {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<Message>,
}

impl Notifications {
    fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("bind the notify socket {}: {e}", path.display()));
        Notifications {
            sock,
            path,
            seen: vec![],
        }
    }

    /// Receives one datagram, waiting at most `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<Message> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("set_read_timeout");
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let m = Message {
                    at: Instant::now(),
                    text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                };
                self.seen.push(m.clone());
                Some(m)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv on {}: {e}", self.path.display()),
        }
    }

    /// Receives until a datagram matches `pred`; panics after `timeout`.
    fn until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Message) -> bool) -> Message {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no {what} within {timeout:?}; the daemon sent:\n{}",
                    self.transcript()
                );
            }
            if let Some(m) = self.recv(left)
                && pred(&m)
            {
                return m;
            }
        }
    }

    /// Everything that arrives during `d`.
    fn during(&mut self, d: Duration) -> Vec<Message> {
        let end = Instant::now() + d;
        let mut got = vec![];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            if let Some(m) = self.recv(left) {
                got.push(m);
            }
        }
    }

    fn transcript(&self) -> String {
        let Some(first) = self.seen.first() else {
            return "  (nothing)".into();
        };
        self.seen
            .iter()
            .map(|m| {
                format!(
                    "  +{:>6.2}s {:?}",
                    m.at.duration_since(first.at).as_secs_f64(),
                    m.text
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A `deploy-agent run` of our own (not the harness's), so that the test
/// controls its environment and sees its exit status.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(h: &Harness, notify: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = h.dir().join(format!("daemon-{}.log", free_port()));
        let out = File::create(&log).expect("create the daemon log");
        let mut c = h.command(&["run"]);
        c.env("NOTIFY_SOCKET", notify)
            .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
            .env("RUST_LOG", "info")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("DEPLOY_AGENT_TEST_STALL_LOOP")
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().unwrap_or_else(|e| panic!("spawn {BIN} run: {e}"));
        Daemon {
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> Pid {
        let child = self.child.as_ref().expect("the daemon was reaped");
        Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the daemon to exit; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take().expect("the daemon was reaped");
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn assert_no_watchdog(msgs: &[Message], n: &Notifications, what: &str) {
    if let Some(m) = msgs.iter().find(|m| m.has("WATCHDOG=1")) {
        panic!(
            "WATCHDOG=1 arrived {what} ({m:?}); the daemon sent:\n{}",
            n.transcript()
        );
    }
}

#[test]
fn sd_notify_sends_ready_status_then_watchdog_pings_and_stopping_on_sigterm() {
    let h = Harness::builder(BIN)
        .no_proxy()
        .no_daemon()
        .config_line("reconcile_interval_secs = 1")
        .start();
    let mut n = Notifications::bind(h.dir());
    let mut d = Daemon::spawn(&h, &n.path.clone(), &[]);

    let ready = n.until("READY=1", Duration::from_secs(60), |m| m.has("READY=1"));
    let before: Vec<Message> = n.seen[..n.seen.len() - 1].to_vec();
    assert!(
        before
            .iter()
            .any(|m| m.status().is_some_and(|s| s.starts_with("starting"))),
        "no STATUS=starting… before READY=1:\n{}",
        n.transcript()
    );
    assert_no_watchdog(&before, &n, "before READY=1");
    let status = ready
        .status()
        .unwrap_or_else(|| panic!("READY=1 came without a STATUS= line:\n{}", n.transcript()));
    assert!(status.starts_with("idle"), "{status}");
    // The API answers by then.
    UnixStream::connect(h.state_dir().join("agent.sock"))
        .expect("agent.sock accepts after READY=1");

    // Pings every half interval, from the loop, while it is healthy.
    let window = Duration::from_millis(4_500);
    let msgs = n.during(window);
    let pings: Vec<Instant> = msgs
        .iter()
        .filter(|m| m.has("WATCHDOG=1"))
        .map(|m| m.at)
        .collect();
    assert!(
        pings.len() >= 3,
        "{} WATCHDOG=1 in {window:?} after READY=1 (watchdog {WATCHDOG:?}):\n{}",
        pings.len(),
        n.transcript()
    );
    let mut last = ready.at;
    for p in &pings {
        assert!(
            p.duration_since(last) < WATCHDOG,
            "a gap of {:?} between pings, over the watchdog interval:\n{}",
            p.duration_since(last),
            n.transcript()
        );
        last = *p;
    }
    assert!(
        msgs.iter().any(|m| m
            .status()
            .is_some_and(|s| s.starts_with("idle; last reconciliation at"))),
        "no STATUS= after a reconciliation pass:\n{}",
        n.transcript()
    );

    kill(d.pid(), Signal::SIGTERM).expect("SIGTERM the daemon");
    let stopping = n.until("STOPPING=1", Duration::from_secs(10), |m| {
        m.has("STOPPING=1")
    });
    assert!(
        stopping.status().is_some_and(|s| s.starts_with("stopping")),
        "{stopping:?}"
    );
    let code = d.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "exit after SIGTERM; log:\n{}", d.log());
    assert!(
        !h.state_dir().join("agent.sock").exists(),
        "agent.sock left behind after a graceful stop"
    );
}

/// The first periodic pass waits forever (the await hook): the loop keeps
/// pinging only until the pass exceeds reconcile_timeout_secs, says so in
/// STATUS=, then goes silent.
#[test]
fn no_watchdog_once_a_reconciliation_pass_hangs_past_its_timeout() {
    let h = Harness::builder(BIN)
        .no_proxy()
        .no_daemon()
        .config_line("reconcile_interval_secs = 1")
        .config_line("reconcile_timeout_secs = 1")
        .start();
    let mut n = Notifications::bind(h.dir());
    let _d = Daemon::spawn(
        &h,
        &n.path.clone(),
        &[("DEPLOY_AGENT_TEST_STALL_LOOP", "await")],
    );
    n.until("READY=1", Duration::from_secs(60), |m| m.has("READY=1"));
    n.until("WATCHDOG=1 after READY=1", Duration::from_secs(5), |m| {
        m.has("WATCHDOG=1")
    });
    let stuck = n.until(
        "STATUS= saying the pass is hung",
        Duration::from_secs(15),
        |m| {
            m.status()
                .is_some_and(|s| s.contains("over reconcile_timeout_secs=1"))
        },
    );
    assert!(
        stuck
            .status()
            .is_some_and(|s| s.contains("no longer pings the watchdog")),
        "{stuck:?}"
    );
    let after = n.during(WATCHDOG * 3);
    assert_no_watchdog(&after, &n, "after the loop reported itself hung");
}

/// The first periodic pass blocks its thread (the block hook): the task that
/// pings is the blocked one, so the pings stop at once.
#[test]
fn no_watchdog_once_the_main_loop_blocks() {
    let h = Harness::builder(BIN)
        .no_proxy()
        .no_daemon()
        .config_line("reconcile_interval_secs = 1")
        .start();
    let mut n = Notifications::bind(h.dir());
    let _d = Daemon::spawn(
        &h,
        &n.path.clone(),
        &[("DEPLOY_AGENT_TEST_STALL_LOOP", "block")],
    );
    n.until("READY=1", Duration::from_secs(60), |m| m.has("READY=1"));
    n.until("STATUS=reconciling", Duration::from_secs(10), |m| {
        m.status() == Some("reconciling")
    });
    let after = n.during(WATCHDOG * 3);
    assert_no_watchdog(&after, &n, "after the main loop blocked");
}

/// SIGTERM while a deploy is in its health gate: the API stops accepting,
/// the operation finishes (the CLI gets its result), then the daemon exits 0.
#[test]
fn sigterm_lets_the_operation_in_progress_finish() {
    let port = free_port();
    let h = Harness::builder(BIN).no_daemon().start();
    let mut n = Notifications::bind(h.dir());
    let mut d = Daemon::spawn(&h, &n.path.clone(), &[]);
    n.until("READY=1", Duration::from_secs(60), |m| m.has("READY=1"));

    // Eight consecutive successes 300 ms apart: a few seconds in the gate.
    let compose = Compose::web(port).edit("web", |s| s.health(|h| h.healthy_after = 8));
    let file = h.write_compose("compose.yml", &compose);
    let file = file.to_str().expect("utf-8 path");
    let mut cli = h.spawn_cli(
        &[
            "deploy",
            "--project",
            "web",
            "--file",
            file,
            "--release",
            "v1",
            "--json",
        ],
        &[],
    );
    cli.wait_for_step("await_healthy", Duration::from_secs(120));
    n.until("STATUS= naming the deploy", Duration::from_secs(5), |m| {
        m.status()
            .is_some_and(|s| s.contains("deploy of web release v1"))
    });
    kill(d.pid(), Signal::SIGTERM).expect("SIGTERM the daemon");
    let stopping = n.until("STOPPING=1", Duration::from_secs(10), |m| {
        m.has("STOPPING=1")
    });
    assert!(
        stopping
            .status()
            .is_some_and(|s| s.starts_with("stopping: 1 operation")),
        "{stopping:?}"
    );
    // New requests are refused while the operation finishes.
    std::thread::sleep(Duration::from_millis(200));
    let refused = UnixStream::connect(h.state_dir().join("agent.sock"))
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok(buf)
        })
        .map(|answer| !answer.contains("200 OK"))
        .unwrap_or(true);
    assert!(refused, "the daemon accepted a request after SIGTERM");

    let out = cli.wait_timeout(Duration::from_secs(90));
    out.expect_code(0);
    assert_eq!(out.result()["serving"], "v1", "{out}");
    let code = d.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "exit after SIGTERM; log:\n{}", d.log());
    assert!(
        d.log().contains("stopped: no operation in progress"),
        "{}",
        d.log()
    );
    h.wait_serving(port, "v1", Duration::from_secs(10));
}

#[test]
fn systemd_analyze_verify_accepts_both_units() {
    let tool = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        tool.as_ref().is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing (apt-get install systemd; .ci/run installs it): {tool:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut units = vec![];
    for unit in ["deploy-agent.service", "deploy-proxy.service"] {
        let text = std::fs::read_to_string(repo_root().join("systemd").join(unit))
            .unwrap_or_else(|e| panic!("read systemd/{unit}: {e}"));
        assert!(text.contains("ExecStart=/usr/bin/deploy-agent "), "{unit}");
        // verify checks that ExecStart= exists: point it at the built binary.
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace("/usr/bin/deploy-agent", BIN)).expect("write unit");
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {}\n{text}",
        out.status
    );
}

/// The daemon's unit gives it room for the HTTPS API's connections and
/// more (the largest `api_max_connections` is a quarter of it), and bounds
/// its memory.
#[test]
fn the_daemon_unit_bounds_descriptors_and_memory() {
    let text = std::fs::read_to_string(repo_root().join("systemd/deploy-agent.service"))
        .expect("read systemd/deploy-agent.service");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("deploy-agent.service sets no {key}="))
            .trim()
            .to_string()
    };
    let nofile: usize = value("LimitNOFILE")
        .parse()
        .expect("LimitNOFILE is a number");
    assert!(
        nofile >= 4 * deploy_agent::wire::config::MAX_API_CONNECTIONS,
        "LimitNOFILE={nofile}"
    );
    assert!(value("MemoryMax").ends_with('M'), "MemoryMax in MiB");
}

#[test]
fn a_bad_config_is_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("agent.toml");
    std::fs::write(
        &bad,
        "instance = \"t\"\n\n[registries.\"r.example\"]\nusername = \"u\"\npasword = \"p\"\n",
    )
    .expect("write agent.toml");
    let expect = format!(
        "error: invalid agent config {}, line 5, key `registries.r.example.pasword`: unknown field `pasword`",
        bad.display()
    );
    let state = dir.path().join("state");
    for args in [vec!["check-config"], vec!["run"]] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&bad)
            .arg("--state-dir")
            .arg(&state)
            .args(&args)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .output()
            .expect("run deploy-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with(&expect), "{args:?}: {stderr}");
    }
    assert!(
        !state.join("agent.sock").exists(),
        "`run` with a bad config opened its socket"
    );

    std::fs::write(&bad, "retain = 3\nmetrics_listen = \"localhost:9480\"\n").expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("run deploy-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(", line 2, key `metrics_listen`: "),
        "{stderr}"
    );
}

/// `GET path` over a unix socket; (status line, body).
fn unix_get(sock: &Path, path: &str) -> (String, String) {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    raw_get(s, path)
}

/// `GET path` on 127.0.0.1:port (testkit's http_get cuts bodies short).
fn tcp_get(port: u16, path: &str) -> Result<(String, String), String> {
    let s = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    Ok(raw_get(s, path))
}

/// One HTTP/1.1 request with `Connection: close`; (status line, body).
fn raw_get(mut s: impl Read + Write, path: &str) -> (String, String) {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample `series` (name and labels exactly as printed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn scrape(h: &Harness) -> String {
    let (status, body) = unix_get(&h.state_dir().join("agent.sock"), "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    body
}

#[test]
fn metrics_count_deploys_durations_probes_and_proxy_responses() {
    let port = free_port();
    let metrics_port = free_port();
    let mut h = Harness::builder(BIN)
        .config_line(&format!("metrics_listen = \"127.0.0.1:{metrics_port}\""))
        .start();
    let file = h.write_compose("compose.yml", &Compose::web(port));
    h.deploy_ok("web", &file, "v1");
    h.wait_serving(port, "v1", Duration::from_secs(10));
    for _ in 0..5 {
        let r = http_get(port, "/", Duration::from_secs(5)).expect("GET through the proxy");
        assert_eq!(r.status, 200);
    }
    // v3 fails its health gate; "nope" is not in the registry (refused).
    h.deploy("web", &file, "v3").expect_code(1);
    h.deploy("web", &file, "nope").expect_code(3);

    let m = scrape(&h);
    let ops = |outcome: &str| {
        sample(
            &m,
            &format!(
                "deploy_agent_operations_total{{project=\"web\",kind=\"deploy\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(ops("succeeded"), Some(1.0), "{m}");
    assert_eq!(ops("health_gate_failed"), Some(1.0), "{m}");
    assert_eq!(ops("registry_error"), Some(1.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "deploy_agent_operation_duration_seconds_count{kind=\"deploy\",outcome=\"succeeded\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "deploy_agent_operation_duration_seconds_bucket{kind=\"deploy\",outcome=\"succeeded\",le=\"+Inf\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "deploy_agent_serving_release{project=\"web\",release=\"v1\"}"
        ),
        Some(1.0),
        "{m}"
    );
    let probes = |result: &str| {
        sample(
            &m,
            &format!("deploy_agent_probes_total{{probe=\"http\",result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(probes("success") >= 1.0, "{m}");
    assert!(
        probes("failure") >= 1.0,
        "v3's failing probes are not counted:\n{m}"
    );
    let ok_responses = sample(
        &m,
        &format!(
            "deploy_agent_proxy_responses_total{{project=\"web\",service=\"web\",listen=\"127.0.0.1:{port}\",release=\"v1\",class=\"2xx\"}}"
        ),
    )
    .unwrap_or(0.0);
    assert!(ok_responses >= 5.0, "{ok_responses} 2xx counted:\n{m}");
    assert_eq!(sample(&m, "deploy_agent_proxy_up"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "deploy_agent_up"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "deploy_agent_store_up"), Some(1.0), "{m}");
    assert!(
        m.contains(&format!(
            "deploy_agent_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );
    assert!(m.contains("# TYPE deploy_agent_operation_duration_seconds histogram"));

    // The same on the plain TCP port.
    let (status, body) = tcp_get(metrics_port, "/metrics").expect("GET /metrics on metrics_listen");
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        body.contains(
            "deploy_agent_operations_total{project=\"web\",kind=\"deploy\",outcome=\"succeeded\"} 1"
        ),
        "{body}"
    );

    // Counters come from the store: a restarted daemon reports the same.
    h.restart_daemon();
    let again = scrape(&h);
    for outcome in ["succeeded", "health_gate_failed", "registry_error"] {
        let series = format!(
            "deploy_agent_operations_total{{project=\"web\",kind=\"deploy\",outcome=\"{outcome}\"}}"
        );
        assert_eq!(
            sample(&again, &series),
            Some(1.0),
            "{series} after a restart:\n{again}"
        );
    }
    wait_until(
        "the restarted daemon's metrics_listen",
        Duration::from_secs(10),
        || tcp_get(metrics_port, "/metrics"),
    );
}

/// Builds the .deb from the binaries this test run has, checks its fields
/// and contents, installs it with dpkg -i, checks where everything landed,
/// upgrades, removes and purges it (packaging/test-deb.sh). Needs root.
#[test]
fn deb_package_builds_installs_and_removes_cleanly() {
    let bin_dir = Path::new(BIN).parent().expect("binary directory");
    let profile = bin_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name");
    let target_dir = bin_dir.parent().expect("target directory");
    let out = Command::new("bash")
        .arg(repo_root().join("packaging/test-deb.sh"))
        .args(["--profile", profile, "--no-build"])
        .current_dir(repo_root())
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run packaging/test-deb.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "packaging/test-deb.sh failed ({}):\n{text}",
        out.status
    );
    assert!(text.contains("all checks passed"), "{text}");
}
