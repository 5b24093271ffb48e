//! The HTTPS API's connection limits, end to end (agent/src/api/tls.rs):
//!
//! - hundreds of TLS connections that complete the handshake and then say
//!   nothing, from a certificate with no grant on this agent and from a
//!   granted one, neither starve the HTTPS API (another identity's request
//!   answers) nor the local `agent.sock` (`deploy-agent status` answers);
//!   the daemon's descriptors stay bounded; every stalled connection is
//!   closed; one connection over the per-identity cap is answered 503 with
//!   an `ApiError` that names the limit; a certificate with no grant still
//!   gets its 403 (one audit record for a burst of them), and is closed. The daemon runs with a limit of 512
//!   descriptors (half systemd's default soft limit), so that a few hundred
//!   connections are enough to exhaust it without the caps.
//! - with `api_idle_timeout_secs = 2`: a silent connection, half a request
//!   head, half a request body, a kept-alive HTTP/1.1 connection and an idle
//!   HTTP/2 connection (its client answering PINGs, like deploy-controller)
//!   are all closed, and the HTTP/2 client's next request simply works; a
//!   deploy whose answer streams for longer than that is not cut.
//! - over `api_max_connections`, a connection is closed as soon as it is
//!   accepted, before TLS; the API answers again once the others are gone.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use deploy_controller::pki::Issued;
use deploy_testkit::wait_until;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const ENV: &str = "production";
/// The defaults of `api_max_connections` and
/// `api_max_connections_per_identity`.
const MAX_CONNECTIONS: usize = 256;
const MAX_PER_IDENTITY: usize = 32;
/// The daemon's descriptor limit in these tests.
const NOFILE: u64 = 512;

/// A rustls client configuration presenting `who`'s certificate.
fn client_config(pki: &Pki, who: &Issued) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.ca()).expect("read the CA") {
        roots.add(c.expect("the CA's PEM")).expect("add the CA");
    }
    let chain = CertificateDer::pem_file_iter(&who.cert)
        .expect("read the client certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("the client certificate's PEM");
    let key = PrivateKeyDer::from_pem_file(&who.key).expect("read the client key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A TLS connection to the agent, past the handshake.
struct Conn {
    tls: StreamOwned<ClientConnection, TcpStream>,
    /// What [`Conn::closed`] read.
    received: Vec<u8>,
}

impl Conn {
    /// Connects and completes the handshake; `Err` when the agent closed
    /// or refused the connection before that.
    fn open(cfg: &Arc<ClientConfig>, port: u16) -> Result<Conn, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .and_then(|()| tcp.set_write_timeout(Some(Duration::from_secs(5))))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let mut conn =
            ClientConnection::new(cfg.clone(), name).map_err(|e| format!("TLS client: {e}"))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| format!("handshake: {e}"))?;
        }
        Ok(Conn {
            tls: StreamOwned::new(conn, tcp),
            received: Vec::new(),
        })
    }

    /// Whether the agent has closed the connection (without waiting).
    fn closed(&mut self) -> bool {
        if self.tls.sock.set_nonblocking(true).is_err() {
            return true;
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.tls.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    /// Sends raw bytes.
    fn send(&mut self, bytes: &[u8]) {
        self.tls
            .write_all(bytes)
            .and_then(|()| self.tls.flush())
            .expect("send on the TLS connection");
    }

    /// One HTTP/1.1 request on a connection that stays open: the status.
    fn exchange(&mut self, method: &str, path: &str) -> u16 {
        self.send(format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self.tls.read(&mut buf).expect("read the answer");
            assert!(n > 0, "the connection closed before the answer");
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().expect("content-length"))
                })
                .expect("a content-length");
            if body.len() >= length {
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("a status");
            }
        }
    }

    /// One HTTP/1.1 request with `Connection: close`: the status and body.
    fn request(mut self, method: &str, path: &str) -> Result<(u16, String), String> {
        self.tls
            .sock
            .set_nonblocking(false)
            .map_err(|e| e.to_string())?;
        self.tls
            .sock
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        write!(
            self.tls,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .and_then(|()| self.tls.flush())
        .map_err(|e| format!("sending {method} {path}: {e}"))?;
        let mut answer = Vec::new();
        if let Err(e) = self.tls.read_to_end(&mut answer)
            && answer.is_empty()
        {
            return Err(format!("no answer to {method} {path}: {e}"));
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok((status, body.to_string()))
    }
}

/// Opens `n` connections from 8 threads at once and keeps those that got
/// past the handshake; also returns how many did not.
fn open_stalled(cfg: &Arc<ClientConfig>, port: u16, n: usize) -> (Vec<Conn>, usize) {
    let threads = 8;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut open = Vec::new();
                    let mut refused = 0;
                    for _ in (t..n).step_by(threads) {
                        match Conn::open(cfg, port) {
                            Ok(c) => open.push(c),
                            Err(_) => refused += 1,
                        }
                    }
                    (open, refused)
                })
            })
            .collect();
        let mut open = Vec::new();
        let mut refused = 0;
        for h in handles {
            let (o, r) = h.join().expect("a connecting thread panicked");
            open.extend(o);
            refused += r;
        }
        (open, refused)
    })
}

fn still_open(conns: &mut [Conn]) -> usize {
    conns.iter_mut().map(|c| usize::from(!c.closed())).sum()
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
}

/// `GET /v1/status` over HTTPS with reqwest as `who` (a fresh client, as
/// the controller makes), with a generous timeout.
fn https_get(ca: &Path, who: &Issued, port: u16, path: &str) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).expect("read CA")).expect("CA");
        let pem = [
            std::fs::read(&who.cert).expect("cert"),
            b"\n".to_vec(),
            std::fs::read(&who.key).expect("key"),
        ]
        .concat();
        let c = reqwest::Client::builder()
            .tls_certs_only([ca])
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let r = c
            .get(format!("https://127.0.0.1:{port}{path}"))
            .send()
            .await
            .map_err(|e| deploy_controller::client::error_chain(&e))?;
        let status = r.status().as_u16();
        let body = r
            .text()
            .await
            .map_err(|e| deploy_controller::client::error_chain(&e))?;
        Ok((status, body))
    })
}

/// The text of `GET /metrics` on the plain `metrics_listen` port.
fn metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics_listen");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("send GET /metrics");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the metrics");
    text
}

/// The value of the sample `name{labels}` (`labels` as written, e.g.
/// `reason="no_grant"`; empty for none).
fn sample(text: &str, name: &str, labels: &str) -> u64 {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix:?} in:\n{text}"))
}

/// `deploy-agent status --json` through agent.sock, given a minute.
fn local_status(agent: &Agent) -> Result<(), String> {
    let mut child = agent
        .harness
        .command(&["status", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn deploy-agent status: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("`deploy-agent status` got no answer on agent.sock within 60 s".into());
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "`deploy-agent status` failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The CLI asks the daemon on agent.sock (it works in its own process
    // only when nothing listens there); its answer is the status JSON.
    serde_json::from_str::<serde_json::Value>(stdout.trim())
        .map(|_| ())
        .map_err(|e| format!("`deploy-agent status --json` is not JSON ({e}): {stdout}"))
}

#[test]
fn stalled_connections_starve_neither_the_api_nor_agent_sock() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = Pki::new();
    let agents = start_agents(
        &pki,
        ENV,
        &["a1"],
        "\"ci-production\" = \"deployer\", \"dashboard\" = \"reader\"",
    );
    let agent = &agents[0];
    let pid = agent.harness.daemon_pid().expect("the daemon runs");
    let limit = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .status()
        .expect("run prlimit (util-linux)");
    assert!(limit.success(), "prlimit --nofile on the daemon: {limit}");
    let before = descriptors(pid);

    // The attack: a certificate of this CA with no grant here, and a
    // granted reader, each opening 300 connections and saying nothing.
    let no_grant = client_config(&pki, &pki.client("ci-staging"));
    let granted = client_config(&pki, &pki.client("dashboard"));
    let (mut stalled_no_grant, refused_no_grant) = open_stalled(&no_grant, agent.api, 300);
    let (mut stalled_granted, refused_granted) = open_stalled(&granted, agent.api, 300);
    eprintln!(
        "past the handshake: {} without a grant ({refused_no_grant} refused before), {} granted ({refused_granted} refused before)",
        stalled_no_grant.len(),
        stalled_granted.len()
    );

    // While they are held: the daemon's descriptors stay bounded, another
    // identity's request answers, and so does agent.sock.
    let prod = pki.client("ci-production");
    match https_get(&pki.ca(), &prod, agent.api, "/v1/status") {
        Ok((200, _)) => {}
        other => panic!("a granted identity's request during the attack: {other:?}"),
    }
    if let Err(e) = local_status(agent) {
        panic!("agent.sock during the attack: {e}");
    }
    let during = descriptors(pid);
    eprintln!("daemon descriptors: {before} before, {during} during");
    assert!(
        during <= before + MAX_CONNECTIONS + 8,
        "the daemon holds {during} descriptors ({before} before): more than api_max_connections ({MAX_CONNECTIONS}) connections"
    );

    // Every stalled connection is closed: at once over a cap, else when its
    // time to send a first request is up (10 s).
    wait_until(
        "the stalled connections to be closed",
        Duration::from_secs(90),
        || {
            let (a, b) = (
                still_open(&mut stalled_no_grant),
                still_open(&mut stalled_granted),
            );
            if a + b == 0 {
                Ok(())
            } else {
                Err(format!("{a} without a grant and {b} granted still open"))
            }
        },
    );
    drop((stalled_no_grant, stalled_granted));

    // One connection over the per-identity cap is answered 503, saying so.
    // (Each of the first 32 has a request answered, so that the agent has
    // surely admitted it: with TLS 1.3 a client is past the handshake
    // before the agent is.)
    let mut held = Vec::new();
    for i in 0..MAX_PER_IDENTITY {
        let mut c = Conn::open(&granted, agent.api)
            .unwrap_or_else(|e| panic!("connection {i} of {MAX_PER_IDENTITY}: {e}"));
        assert_eq!(c.exchange("GET", "/v1/ping"), 200, "connection {i}");
        held.push(c);
    }
    let extra = Conn::open(&granted, agent.api).expect("the connection over the cap");
    let (status, body) = extra
        .request("GET", "/v1/status")
        .expect("an answer over the cap");
    assert_eq!(status, 503, "over the per-identity cap: {body}");
    let error: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not an ApiError ({e}): {body}"));
    let message = error["message"].as_str().unwrap_or_default();
    for needle in ["mtls:dashboard", "32", "api_max_connections_per_identity"] {
        assert!(message.contains(needle), "{needle:?} in {message:?}");
    }
    assert_eq!(
        still_open(&mut held),
        MAX_PER_IDENTITY,
        "the connections within the cap are kept"
    );
    drop(held);

    // A certificate with no grant still learns why (403, on each attempt),
    // its connection is closed by the agent after that answer, and a burst
    // of denials leaves one audit record.
    let mut denied = Conn::open(&no_grant, agent.api).expect("handshake without a grant");
    assert_eq!(denied.exchange("GET", "/v1/status"), 403);
    wait_until(
        "the agent to close the connection of a certificate with no grant",
        Duration::from_secs(30),
        || {
            if denied.closed() {
                Ok(())
            } else {
                Err("open".to_string())
            }
        },
    );
    for _ in 0..5 {
        let (status, body) = Conn::open(&no_grant, agent.api)
            .expect("handshake without a grant")
            .request("GET", "/v1/history")
            .expect("an answer");
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("mtls:ci-staging") && body.contains("needs role reader"),
            "{body}"
        );
    }
    let records = agent
        .harness
        .audit_export(None)
        .into_iter()
        .filter(|a| a["action"] == "api.denied" && a["who"] == "mtls:ci-staging")
        .count();
    assert_eq!(records, 1, "api.denied records of mtls:ci-staging");

    // Refusals are counted.
    let (status, text) = https_get(&pki.ca(), &prod, agent.api, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    for reason in ["no_grant", "max_per_identity"] {
        let n = sample(
            &text,
            "deploy_agent_https_connections_refused_total",
            &format!("reason=\"{reason}\""),
        );
        assert!(n > 0, "refusals for {reason}: {n}");
    }
}

fn inventory(dir: &Path, ca: &Path, client: &Issued, agent: &Agent, healthy_after: u32) -> PathBuf {
    let mut t = tls_table("tls", ca, client);
    t.push_str(&format!(
        "\n[environments.{ENV}]\nproject = \"web\"\ncompose = \"compose.yml\"\n\n[[environments.{ENV}.hosts]]\n{}",
        agent.host_toml("")
    ));
    let path = dir.join("deploy.toml");
    std::fs::write(&path, t).expect("write the inventory");
    std::fs::write(dir.join("compose.yml"), compose(healthy_after))
        .expect("write the compose file");
    path
}

#[test]
fn idle_and_stalled_connections_are_closed_but_a_long_deploy_is_not() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = Pki::new();
    let metrics_port = deploy_testkit::free_port();
    let agents = start_agents_with(
        &pki,
        ENV,
        &["t1"],
        "\"ci-production\" = \"deployer\"",
        &[
            "api_idle_timeout_secs = 2",
            &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
        ],
    );
    let agent = &agents[0];
    let who = pki.client("ci-production");
    let prod = client_config(&pki, &who);

    // Silent after the handshake; half a request head; a request head and
    // part of the body it announced; a complete request on a connection
    // kept alive.
    let mut silent = Conn::open(&prod, agent.api).expect("handshake");
    let mut half_head = Conn::open(&prod, agent.api).expect("handshake");
    half_head.send(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let mut half_body = Conn::open(&prod, agent.api).expect("handshake");
    half_body.send(
        b"POST /v1/pull HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"project\":",
    );
    let mut kept = Conn::open(&prod, agent.api).expect("handshake");
    assert_eq!(kept.exchange("GET", "/v1/ping"), 200);
    // An HTTP/2 client that PINGs while idle, as deploy-controller's does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let h2 = {
        let ca =
            reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).expect("read CA")).expect("CA");
        let pem = [
            std::fs::read(&who.cert).expect("cert"),
            b"\n".to_vec(),
            std::fs::read(&who.key).expect("key"),
        ]
        .concat();
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .http2_keep_alive_interval(Duration::from_millis(500))
            .http2_keep_alive_while_idle(true)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
    };
    let url = format!("https://127.0.0.1:{}/v1/status", agent.api);
    let get = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let r = h2
                .get(&url)
                .send()
                .await
                .expect("GET /v1/status over HTTP/2");
            (r.version(), r.status().as_u16())
        })
    };
    assert_eq!(get(&rt), (reqwest::Version::HTTP_2, 200));

    let mut conns = [
        ("silent", &mut silent),
        ("half a request head", &mut half_head),
        ("half a request body", &mut half_body),
        ("kept alive", &mut kept),
    ];
    wait_until(
        "the idle and stalled connections to be closed",
        Duration::from_secs(60),
        || {
            let open: Vec<&str> = conns
                .iter_mut()
                .filter_map(|(what, c)| (!c.closed()).then_some(*what))
                .collect();
            if open.is_empty() {
                Ok(())
            } else {
                Err(format!("still open: {open:?}"))
            }
        },
    );
    let answer = String::from_utf8_lossy(&half_body.received).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("request body"),
        "the stalled body's answer: {answer:?}"
    );
    // The HTTP/2 connection was closed too (while the runtime, hence the
    // client's PINGs, kept running), and the client's next request opens a
    // new one.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = tokio::task::spawn_blocking(move || metrics(metrics_port))
                .await
                .expect("metrics");
            let open = sample(&text, "deploy_agent_https_connections", "");
            if open == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{open} HTTPS connections still open after 60 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let text = metrics(metrics_port);
    assert!(
        sample(
            &text,
            "deploy_agent_https_connections_timed_out_total",
            "phase=\"idle\""
        ) >= 1,
        "{text}"
    );
    assert_eq!(get(&rt), (reqwest::Version::HTTP_2, 200));

    // A deploy whose answer streams for longer than the idle timeout: its
    // health gate alone needs 15 probes 200 ms apart.
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = inventory(dir.path(), &pki.ca(), &who, agent, 15);
    let r = run(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v1",
            "--var",
            "TAG=v1",
            "--transport",
            "agent",
        ],
    );
    r.expect_code(0);
    assert!(
        r.duration > Duration::from_secs(3),
        "the deploy must outlast api_idle_timeout_secs for this test to mean anything: {r}"
    );
    assert_eq!(releases(&inv, ENV), vec![Some("v1".into())]);
}

#[test]
fn over_api_max_connections_a_connection_is_closed_on_accept() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = Pki::new();
    let metrics_port = deploy_testkit::free_port();
    let agents = start_agents_with(
        &pki,
        ENV,
        &["c1"],
        "\"ci-production\" = \"deployer\"",
        &[
            "api_max_connections = 20",
            &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
        ],
    );
    let agent = &agents[0];
    let who = pki.client("ci-production");

    // (Nothing else holds a place: start_agents' probe of the port is gone.)
    wait_until(
        "no HTTPS connection to be open",
        Duration::from_secs(30),
        || match sample(&metrics(metrics_port), "deploy_agent_https_connections", "") {
            0 => Ok(()),
            n => Err(format!("{n} open")),
        },
    );
    // 30 connections that never start TLS: 20 wait in the handshake (10 s),
    // the others are closed at once.
    let mut conns: Vec<TcpStream> = (0..30)
        .map(|_| TcpStream::connect(("127.0.0.1", agent.api)).expect("connect"))
        .collect();
    let closed = |c: &mut TcpStream| {
        c.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        !matches!(c.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    };
    let count_closed = |conns: &mut [TcpStream]| {
        conns
            .iter_mut()
            .map(|c| usize::from(closed(c)))
            .sum::<usize>()
    };
    wait_until(
        "the connections over api_max_connections to be closed",
        Duration::from_secs(30),
        || match count_closed(&mut conns) {
            n if n >= 10 => Ok(()),
            n => Err(format!("{n} closed")),
        },
    );
    let held = 30 - count_closed(&mut conns);
    assert!(
        held <= 20,
        "{held} connections held, over api_max_connections = 20"
    );
    // While they hold every place, a client's connection is closed before
    // TLS (a handshake failure for it). (Unless the handshake timeout freed
    // places meanwhile: then this proves nothing.)
    let attempt = https_get(&pki.ca(), &who, agent.api, "/v1/status");
    if held == 20 && count_closed(&mut conns) == 10 {
        match attempt {
            Err(e) => eprintln!("a client while the agent is full: {e}"),
            Ok(answer) => panic!("20 connections hold api_max_connections = 20, yet: {answer:?}"),
        }
    }
    assert!(
        sample(
            &metrics(metrics_port),
            "deploy_agent_https_connections_refused_total",
            "reason=\"max_connections\""
        ) >= 10
    );
    // The handshake timeout frees the places; the API answers again.
    wait_until(
        "every connection to be closed",
        Duration::from_secs(60),
        || match count_closed(&mut conns) {
            30 => Ok(()),
            n => Err(format!("{n} of 30 closed")),
        },
    );
    wait_until(
        "the API to answer again",
        Duration::from_secs(30),
        || match https_get(&pki.ca(), &who, agent.api, "/v1/status") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let text = metrics(metrics_port);
    assert!(
        sample(
            &text,
            "deploy_agent_https_connections_timed_out_total",
            "phase=\"handshake\""
        ) >= held as u64,
        "{held} connections waited in the handshake:\n{text}"
    );
}
