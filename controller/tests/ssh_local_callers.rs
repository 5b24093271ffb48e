//! What the SSH door gives a caller who is already on the host: a member of
//! the `deploy-agent` group can run `deploy-agent serve-stdio` locally (no
//! SSH at all, any environment it likes), or talk to agent.sock and set the
//! `x-deploy-agent-via` header itself.
//!
//! - It cannot take a running fleet deployment's environment lease: a
//!   hand-over needs the lease's token, which only the controller that took
//!   the lease learnt. The refusal is clear and audited, the lease stays
//!   with the controller, and the deployment finishes.
//! - What it says about its SSH session (key, address, controller, even
//!   the op) is recorded as claimed, next to the Unix user the kernel
//!   reported, which is fact.

mod common;
mod ssh_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use deploy_testkit::sshd::Sshd;
use deploy_testkit::{free_port, wait_until};
use serde_json::{Value, json};
use ssh_common::*;

/// What `serve-stdio` did with one request.
struct Served {
    code: Option<i32>,
    lines: Vec<Value>,
    stderr: String,
}

impl Served {
    fn hello(&self) -> &Value {
        self.lines
            .iter()
            .find(|l| l["type"] == "hello")
            .unwrap_or_else(|| panic!("no hello line: {:#?}\n{}", self.lines, self.stderr))
    }

    fn error(&self) -> &Value {
        self.lines
            .iter()
            .find(|l| l["type"] == "error")
            .unwrap_or_else(|| panic!("no error line: {:#?}\n{}", self.lines, self.stderr))
    }

    fn answer(&self) -> &Value {
        &self
            .lines
            .iter()
            .find(|l| l["type"] == "answer")
            .unwrap_or_else(|| panic!("no answer line: {:#?}\n{}", self.lines, self.stderr))["body"]
    }
}

/// The SSH session a local caller pretends to have.
const FORGED_CONNECTION: &str = "203.0.113.7 4242 10.0.0.1 22";

/// Runs `deploy-agent serve-stdio` on `agent`'s host as a local user would:
/// no sshd, the SSH variables set by the caller itself.
fn serve_stdio(agent: &Agent, request: &Value) -> Served {
    let mut c = agent.harness.command(&["serve-stdio"]);
    c.env("SSH_CONNECTION", FORGED_CONNECTION)
        .env_remove("SSH_USER_AUTH")
        .env_remove("SUDO_USER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn deploy-agent serve-stdio");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{request}").expect("write the request");
    }
    let out = child.wait_with_output().expect("serve-stdio output");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Served {
        code: out.status.code(),
        lines,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The environment lease as `lock_status` shows it (`null` when none).
fn lease(agent: &Agent) -> Value {
    let s = serve_stdio(agent, &json!({"op": "lock_status"}));
    assert_eq!(s.code, Some(0), "{:#?}\n{}", s.lines, s.stderr);
    s.answer().clone()
}

#[test]
fn a_local_caller_without_the_token_cannot_take_a_running_deployments_lease() {
    let pki = Pki::new();
    let agents = start_agents(&pki, ENV, &["a"], "\"ci-production\" = \"deployer\"");
    let a = &agents[0];
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = inventory(
        dir.path(),
        "deploy.toml",
        &pki,
        "ci-production",
        &[HostEntry::new(a, None)],
        "",
    );
    run(
        &inv,
        &["deploy", "--env", ENV, "--release", "v1", "--var", "TAG=v1"],
    )
    .expect_code(0);
    // A slow gate, so that the deployment holds the lease for a while.
    std::fs::write(dir.path().join("compose.yml"), compose(20)).expect("write the compose file");
    let running = spawn(
        &inv,
        &[
            "deploy",
            "--env",
            ENV,
            "--release",
            "v2",
            "--var",
            "TAG=v2",
            "--json",
        ],
        &[],
    );
    // The deployment id is no secret: anyone who reads the lease sees it.
    let held = wait_until(
        "the controller's lease on host a",
        Duration::from_secs(60),
        || {
            let l = lease(a);
            if l["identity"] == "mtls:ci-production" {
                Ok(l)
            } else {
                Err(format!("lease: {l}"))
            }
        },
    );
    let deployment = held["deployment_id"]
        .as_str()
        .expect("deployment_id")
        .to_string();

    // The theft: a hand-over from the controller's identity, without the
    // token, then with a made-up one.
    let wrong_token = "0123456789abcdef".repeat(4);
    for token in [None, Some(wrong_token.as_str())] {
        let mut request = json!({
            "deployment_id": deployment,
            "ttl_ms": 60_000,
            "hand_over_from": "mtls:ci-production",
        });
        if let Some(t) = token {
            request["hand_over_token"] = json!(t);
        }
        let s = serve_stdio(
            a,
            &json!({"op": "lock", "request": request, "caller": {"controller": "ci-production"}}),
        );
        assert_eq!(s.code, Some(6), "{:#?}\n{}", s.lines, s.stderr);
        let e = s.error();
        assert_eq!(e["status"], 403, "{e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("hand_over_token")
                && message.contains("mtls:ci-production")
                && message.contains("nothing changed"),
            "{message}"
        );
        // It said who it is, and that is recorded as a claim.
        let who = s.hello()["who"].as_str().unwrap_or_default().to_string();
        assert!(
            who.starts_with(&format!("ssh:{} (claimed: ", Sshd::user()))
                && who.contains("from=203.0.113.7"),
            "{who}"
        );
        assert_eq!(lease(a)["identity"], "mtls:ci-production");
    }

    // Nor can it deploy inside that deployment (another project, so that
    // only the lease stands in its way).
    let port = free_port().to_string();
    let s = serve_stdio(
        a,
        &json!({"op": "deploy", "request": {
            "project": "intruder",
            "release": "x1",
            "compose_path": "compose.yml",
            "compose_text": compose(1),
            "vars": {"TAG": "v1", "PORT": port},
            "deployment_id": deployment,
        }}),
    );
    assert_eq!(s.code, Some(4), "{:#?}\n{}", s.lines, s.stderr);
    let refused = s
        .lines
        .iter()
        .find(|l| l["type"] == "result" || l["type"] == "error")
        .unwrap_or_else(|| panic!("{:#?}", s.lines));
    assert!(
        refused.to_string().contains("is locked by deployment"),
        "{refused}"
    );

    // The controller keeps its lease and finishes.
    let r = running.wait();
    r.expect_code(0);
    assert!(
        !warnings(&r.json_lines())
            .iter()
            .any(|w| w.contains("renew") || w.contains("lock")),
        "{r}"
    );
    assert_eq!(a.harness.current_release("web").as_deref(), Some("v2"));
    assert!(a.harness.history("intruder").is_empty());

    // The refusals are in the audit log; the token never is.
    let audit = a.harness.audit_export(None);
    let refusals: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "lock.refused" && e["detail"]["hand_over_from"].is_string())
        .collect();
    assert_eq!(refusals.len(), 2, "{audit:#?}");
    for e in &refusals {
        assert!(
            e["who"].as_str().is_some_and(|w| w.contains("(claimed: ")),
            "{e}"
        );
        assert_eq!(e["detail"]["deployment_id"], deployment.as_str());
        assert_eq!(e["detail"]["holder"]["identity"], "mtls:ci-production");
    }
    assert!(!audit.iter().any(|e| e["action"] == "lock.handed_over"));
    assert!(
        audit.iter().any(|e| e["action"] == "lock.released"
            && e["who"] == "mtls:ci-production"
            && e["detail"]["deployment_id"] == deployment.as_str()),
        "{audit:#?}"
    );
    let exported = serde_json::to_string(&audit).expect("audit as JSON");
    assert!(!exported.contains(&wrong_token));
    a.harness.audit_verify().expect_code(0);
}

/// A request on agent.sock whose `x-deploy-agent-via` header the caller
/// made up: another user, key, address and controller, and op `ping`
/// (which would leave no `ssh.request` record) on a `lock_status` request.
#[test]
fn a_forged_via_header_is_recorded_as_claimed() {
    let pki = Pki::new();
    let agents = start_agents(&pki, ENV, &["a"], "\"ci-production\" = \"deployer\"");
    let a = &agents[0];
    let via = json!({
        "user": "secalice",
        "key_fingerprint": "SHA256:FORGED",
        "client_ip": "203.0.113.7",
        "client_port": 4242,
        "controller": "ci-production",
        "op": "ping",
    });
    let header = base64::engine::general_purpose::STANDARD.encode(via.to_string());
    let mut sock =
        UnixStream::connect(a.harness.state_dir().join("agent.sock")).expect("connect agent.sock");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    write!(
        sock,
        "GET /v1/lease HTTP/1.1\r\nHost: localhost\r\nx-deploy-agent-via: {header}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut answer = String::new();
    sock.read_to_string(&mut answer).expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let me = Sshd::user();
    let expected =
        format!("ssh:{me} (claimed: key=SHA256:FORGED from=203.0.113.7 controller=ci-production)");
    let audit = a.harness.audit_export(None);
    let req = audit
        .iter()
        .find(|e| e["action"] == "ssh.request")
        .unwrap_or_else(|| panic!("the request left no ssh.request record: {audit:#?}"));
    assert_eq!(req["who"], expected.as_str(), "{req}");
    let d = &req["detail"];
    // Facts: the user the kernel reported, the operation that ran.
    assert_eq!(d["user"], me.as_str(), "{d}");
    assert_eq!(d["op"], "lock_status", "{d}");
    // Claims, said to be claims.
    assert_eq!(d["claimed"]["user"], "secalice", "{d}");
    assert_eq!(d["claimed"]["key_fingerprint"], "SHA256:FORGED", "{d}");
    assert_eq!(d["claimed"]["client_ip"], "203.0.113.7", "{d}");
    assert_eq!(d["claimed"]["controller"], "ci-production", "{d}");
    assert!(
        d["key_fingerprint"].is_null() && d["client_ip"].is_null(),
        "{d}"
    );
    assert!(
        !audit
            .iter()
            .any(|e| e["who"].as_str().is_some_and(|w| w.contains("secalice"))),
        "{audit:#?}"
    );
}
