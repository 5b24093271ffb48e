//! Webhook notifications (`[notify]` in agent.toml): a receiver in the test
//! records what the agent POSTs. Start, success, a failed health gate, a
//! rollback, the daemon's automatic rollback after `deploy --no-wait`, and a
//! receiver that is down or answers 500 (the deploy is the same, the
//! failures are counted in /metrics). Real Docker Engine, real registry
//! (`scripts/test-env.sh`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_testkit::{Compose, Harness, free_port, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");
const PROJECT: &str = "web";

/// An HTTP server on 127.0.0.1 that records every POST body and answers
/// `status` (keep-alive, like a real webhook).
struct Receiver {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
    requests: Arc<AtomicUsize>,
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (b, r) = (bodies.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, r) = (b.clone(), r.clone());
                std::thread::spawn(move || serve(stream, status, &b, &r));
            }
        });
        Receiver {
            port,
            bodies,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// The `deploy_agent` objects received so far, in order.
    fn notes(&self) -> Vec<Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["deploy_agent"].clone())
            .collect()
    }

    /// Waits until `n` notifications arrived; returns all of them.
    fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Value> {
        wait_until(&format!("{n} notifications"), timeout, || {
            let notes = self.notes();
            if notes.len() >= n {
                Ok(notes)
            } else {
                Err(format!("{notes:#?}"))
            }
        })
    }

    /// The whole body of the first notification matching `pred`.
    fn body_where(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .find(|b| pred(&b["deploy_agent"]))
            .cloned()
            .unwrap_or(Value::Null)
    }
}

fn serve(stream: TcpStream, status: u16, bodies: &Mutex<Vec<Value>>, requests: &AtomicUsize) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        assert!(request_line.starts_with("POST /hook "), "{request_line:?}");
        requests.fetch_add(1, Ordering::SeqCst);
        if status == 200 {
            bodies
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
        }
        let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn with_webhook(url: &str) -> Harness {
    Harness::builder(BIN)
        .config_line("[notify]")
        .config_line(&format!("webhook = \"{url}\""))
        .config_line("timeout = \"2s\"")
        .start()
}

fn web(h: &Harness, port: u16) -> PathBuf {
    h.write_compose("compose.yml", &Compose::web(port))
}

/// `deploy_agent_notifications_total{outcome="…"}` from the daemon.
fn notifications_total(h: &Harness, outcome: &str) -> u64 {
    let mut s = UnixStream::connect(h.state_dir().join("agent.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let series = format!("deploy_agent_notifications_total{{outcome=\"{outcome}\"}} ");
    answer
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{answer}"))
        .trim()
        .parse()
        .unwrap()
}

fn wait_counted(h: &Harness, outcome: &str, n: u64, timeout: Duration) {
    wait_until(
        &format!("{n} notifications counted {outcome}"),
        timeout,
        || match notifications_total(h, outcome) {
            c if c == n => Ok(()),
            c => Err(format!("{c}")),
        },
    );
}

#[test]
fn a_deploy_and_a_rollback_notify_their_start_and_their_end() {
    let receiver = Receiver::start(200);
    let h = with_webhook(&receiver.url());
    let port = h.free_port();
    let file = web(&h, port);

    let out = h.deploy_with(PROJECT, &file, "v1", &["--reason", "ticket-42"], &[]);
    out.expect_code(0);
    let notes = receiver.wait_for(2, Duration::from_secs(10));
    assert_eq!(notes[0]["event"], "started", "{notes:#?}");
    assert_eq!(notes[1]["event"], "succeeded", "{notes:#?}");
    for n in &notes {
        assert_eq!(n["operation"], "deploy", "{n:#}");
        assert_eq!(n["project"], PROJECT, "{n:#}");
        assert_eq!(n["release"], "v1", "{n:#}");
        assert_eq!(n["previous"], Value::Null, "{n:#}");
        assert_eq!(n["reason"], "ticket-42", "{n:#}");
        assert_eq!(n["automatic"], false, "{n:#}");
        assert!(n["host"].as_str().is_some_and(|s| !s.is_empty()), "{n:#}");
        assert!(
            n["who"].as_str().is_some_and(|s| s.starts_with("unix:")),
            "{n:#}"
        );
    }
    assert_eq!(notes[0]["outcome"], Value::Null);
    assert_eq!(notes[1]["outcome"], "succeeded");
    assert_eq!(notes[1]["serving"], "v1");
    assert!(notes[1]["duration_ms"].is_u64(), "{:#}", notes[1]);
    let text = receiver.body_where(|n| n["event"] == "succeeded")["text"].clone();
    assert!(
        text.as_str()
            .is_some_and(|t| t.starts_with("Deploy of web v1 succeeded on ")),
        "{text}"
    );

    h.deploy_ok(PROJECT, &file, "v2");
    receiver.wait_for(4, Duration::from_secs(10));
    h.rollback(PROJECT, None).expect_code(0);
    let notes = receiver.wait_for(6, Duration::from_secs(10));
    assert_eq!(notes.len(), 6, "one notification each: {notes:#?}");
    let (start, end) = (&notes[4], &notes[5]);
    assert_eq!(start["event"], "started", "{start:#}");
    assert_eq!(start["operation"], "rollback", "{start:#}");
    assert_eq!(start["release"], "v1", "{start:#}");
    assert_eq!(start["previous"], "v2", "{start:#}");
    assert_eq!(end["event"], "rolled_back", "{end:#}");
    assert_eq!(end["operation"], "rollback", "{end:#}");
    assert_eq!(end["automatic"], false, "{end:#}");
    assert_eq!(end["outcome"], "succeeded", "{end:#}");
    assert_eq!(end["serving"], "v1", "{end:#}");
    wait_counted(&h, "sent", 6, Duration::from_secs(5));
    assert_eq!(notifications_total(&h, "failed"), 0);
}

#[test]
fn a_release_that_fails_its_health_gate_notifies_failed_with_the_reason() {
    let receiver = Receiver::start(200);
    let h = with_webhook(&receiver.url());
    let port = h.free_port();
    let file = web(&h, port);
    h.deploy_ok(PROJECT, &file, "v1");
    // demo:v3 answers 500 to everything, /health included.
    let out = h.deploy(PROJECT, &file, "v3");
    out.expect_code(1);
    let notes = receiver.wait_for(4, Duration::from_secs(10));
    assert_eq!(notes.len(), 4, "{notes:#?}");
    assert_eq!(notes[2]["event"], "started", "{notes:#?}");
    let failed = &notes[3];
    assert_eq!(failed["event"], "failed", "{failed:#}");
    assert_eq!(failed["operation"], "deploy", "{failed:#}");
    assert_eq!(failed["release"], "v3", "{failed:#}");
    assert_eq!(failed["previous"], "v1", "{failed:#}");
    assert_eq!(failed["serving"], "v1", "{failed:#}");
    assert_eq!(failed["outcome"], "health_gate_failed", "{failed:#}");
    assert_eq!(failed["automatic"], false, "{failed:#}");
    assert_eq!(failed["failure"]["step"], "await_healthy", "{failed:#}");
    let reason = failed["failure"]["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{failed:#}");
    let message = out.result()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains(reason),
        "the notification's reason is the result's: {reason:?} in {message:?}"
    );
    assert_eq!(failed["message"], message.as_str());
    let text = receiver.body_where(|n| n["event"] == "failed")["text"].clone();
    let text = text.as_str().unwrap_or_default();
    assert!(
        text.starts_with("Deploy of web v3 failed on ") && text.contains("v1 is serving"),
        "{text}"
    );
}

/// Service `web` from `demo:${TAG}` with an observation window of 15 s.
fn observed(h: &Harness, port: u16) -> PathBuf {
    let text = format!(
        "x-deploy:\n  observe: {{window: 15s}}\nservices:\n  web:\n    image: 127.0.0.1:5000/demo:${{TAG}}\n    ports: [\"127.0.0.1:{port}:80\"]\n    x-deploy:\n      health: {{http: /health, interval: 300ms, deadline: 15s}}\n      drain_timeout: 5s\n"
    );
    h.write_file("observed.yml", &text)
}

fn deploy_tag(
    h: &Harness,
    file: &Path,
    release: &str,
    tag: &str,
    extra: &[&str],
) -> deploy_testkit::CliOutput {
    let var = format!("TAG={tag}");
    let mut args = vec!["--var", var.as_str()];
    args.extend_from_slice(extra);
    h.deploy_with(PROJECT, file, release, &args, &[])
}

#[test]
fn the_daemons_automatic_rollback_after_no_wait_is_notified_as_automatic() {
    let receiver = Receiver::start(200);
    let h = with_webhook(&receiver.url());
    let port = h.free_port();
    let file = observed(&h, port);
    deploy_tag(&h, &file, "good", "v1", &[]).expect_code(0);
    // demo:crash serves, then exits 1 after ~5 s: inside the window, after
    // the CLI has gone.
    let out = deploy_tag(&h, &file, "crash", "crash", &["--no-wait"]);
    out.expect_code(0);
    let rolled_back = wait_until(
        "the automatic rollback's notification",
        Duration::from_secs(40),
        || {
            receiver
                .notes()
                .into_iter()
                .find(|n| n["release"] == "crash" && n["event"] != "started")
                .ok_or_else(|| format!("{:#?}", receiver.notes()))
        },
    );
    assert_eq!(rolled_back["event"], "rolled_back", "{rolled_back:#}");
    assert_eq!(rolled_back["automatic"], true, "{rolled_back:#}");
    assert_eq!(rolled_back["operation"], "deploy", "{rolled_back:#}");
    assert_eq!(
        rolled_back["outcome"], "health_gate_failed",
        "{rolled_back:#}"
    );
    assert_eq!(rolled_back["previous"], "good", "{rolled_back:#}");
    assert_eq!(rolled_back["serving"], "good", "{rolled_back:#}");
    assert_eq!(rolled_back["failure"]["step"], "observe", "{rolled_back:#}");
    let reason = rolled_back["failure"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("exited with code 1"), "{rolled_back:#}");
    let crash: Vec<Value> = receiver
        .notes()
        .into_iter()
        .filter(|n| n["release"] == "crash")
        .collect();
    assert_eq!(crash.len(), 2, "started, then one ending: {crash:#?}");
    assert_eq!(crash[0]["event"], "started");
    let text = receiver.body_where(|n| n["event"] == "rolled_back")["text"].clone();
    assert!(
        text.as_str()
            .is_some_and(|t| t.starts_with("web crash was rolled back automatically on ")),
        "{text}"
    );
    h.assert_serving(port, "v1");
    h.assert_current(PROJECT, "good");
}

/// The deploy answers as if there were no webhook: same exit code and
/// outcome, and before the notifications are given up (each takes three
/// attempts, 1 s and 2 s apart); the failures are then counted.
fn a_broken_webhook_changes_nothing(url: &str) {
    let h = with_webhook(url);
    let port = h.free_port();
    let file = web(&h, port);
    let out = h.deploy_ok(PROJECT, &file, "v1");
    assert_eq!(out.result()["outcome"], "succeeded");
    assert!(
        notifications_total(&h, "failed") < 2,
        "the deploy answered only after its notifications were given up"
    );
    h.assert_serving(port, "v1");
    wait_counted(&h, "failed", 2, Duration::from_secs(20));
    assert_eq!(notifications_total(&h, "sent"), 0);
    h.deploy(PROJECT, &file, "v3").expect_code(1);
    h.assert_current(PROJECT, "v1");
    wait_counted(&h, "failed", 4, Duration::from_secs(20));
}

#[test]
fn a_webhook_that_is_down_changes_nothing_and_is_counted() {
    // Nothing listens there: every attempt is refused.
    let url = format!("http://127.0.0.1:{}/hook", free_port());
    a_broken_webhook_changes_nothing(&url);
}

#[test]
fn a_webhook_that_answers_500_changes_nothing_is_retried_and_counted() {
    let receiver = Receiver::start(500);
    a_broken_webhook_changes_nothing(&receiver.url());
    // Two deploys, two notifications each, three attempts each.
    assert_eq!(receiver.requests.load(Ordering::SeqCst), 12);
}

#[test]
fn without_a_daemon_the_cli_delivers_before_it_exits() {
    let receiver = Receiver::start(200);
    let h = Harness::builder(BIN)
        .no_daemon()
        .config_line("[notify]")
        .config_line(&format!("webhook = \"{}\"", receiver.url()))
        .config_line("events = [\"succeeded\", \"failed\"]")
        .start();
    let port = h.free_port();
    let file = web(&h, port);
    h.deploy_ok(PROJECT, &file, "v1");
    // No waiting: the CLI flushed before it exited.
    let notes = receiver.notes();
    assert_eq!(notes.len(), 1, "only the events asked for: {notes:#?}");
    assert_eq!(notes[0]["event"], "succeeded");
    assert_eq!(notes[0]["release"], "v1");
}
