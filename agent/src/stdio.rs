//! `deploy-agent serve-stdio`: one request on stdin, JSON lines on stdout.
//!
//! This is what `deploy-controller` runs over SSH when a host's agent
//! cannot be reached over its HTTPS API (issue 5; docs/ssh.md). The request
//! is a [`StdioRequest`]: an op (`deploy`, `rollback`, `status`, `history`,
//! `pull`, `audit`, `release`, `lock`, `lock_status`, `renew`, `unlock`,
//! `ping`) with the same JSON body the HTTPS API takes. The answer is a
//! [`StdioLine::Hello`] line, then either the operation's progress lines and
//! its result (`deploy`, `rollback`: the same JSON lines as the daemon
//! streams) or one `answer` / `error` line. Every line is flushed as it is
//! written, so progress arrives live. The exit status is the operation's
//! exit code (0 for an answer; the outcome's code for an error).
//!
//! One engine does the work whichever way the request came:
//! - when the daemon answers on `STATE_DIR/agent.sock`, the request is
//!   handed to it with the caller in the `x-deploy-agent-via` header
//!   ([`VIA_HEADER`]), which the daemon honours on its unix socket only
//!   (the kernel tells it the Unix user; the header adds the SSH details);
//! - otherwise this process opens the engine itself and does the work under
//!   the same host lock, exactly as `deploy-agent deploy` does.
//!
//! Either way the caller is recorded as
//! `ssh:<user> key=SHA256:… from=<ip> controller=<CN>` ([`SshCaller::who`])
//! in the engine's records, the lease and the audit log, and every request
//! but `ping` and `renew` leaves an `ssh.request` audit record with all the
//! details (key type, client port, op, a host key the controller accepted
//! as new).

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;

use crate::api::{self, Refusal};
use crate::config::{AgentConfig, DEFAULT_CONFIG};
use crate::engine::{Engine, OpError};
use crate::local_client;
use crate::store::{AuditEntry, Store};
use crate::wire::{
    ApiError, DeployRequest, Event, LockRequest, OperationResult, Outcome, PullRequest,
    RollbackRequest, SshCaller, StdioCaller, StdioHello, StdioLine, StdioOp, StdioQuery,
    StdioRequest, UnlockRequest, exit,
};

/// The header that carries the SSH caller (base64 of [`SshCaller`] JSON)
/// from `serve-stdio` to the daemon over agent.sock. Ignored anywhere else
/// (the HTTPS API's router does not look at it).
pub const VIA_HEADER: &str = "x-deploy-agent-via";

/// The largest request accepted on stdin (a compose file travels in it).
const MAX_REQUEST: u64 = 16 * 1024 * 1024;

/// `x-deploy-agent-via`'s value for `caller`.
pub fn encode_via(caller: &SshCaller) -> String {
    let json = serde_json::to_vec(caller).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(json)
}

/// The caller in an `x-deploy-agent-via` header.
pub fn decode_via(value: &[u8]) -> Result<SshCaller, String> {
    let json = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|e| format!("{VIA_HEADER} is not base64: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("{VIA_HEADER} is not an SSH caller: {e}"))
}

/// `(key type, SHA256:fingerprint)` of the first public key in the text of
/// sshd's `$SSH_USER_AUTH` file (`publickey ssh-ed25519 AAAA…` lines).
pub fn key_from_auth_info(text: &str) -> Option<(String, String)> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        if parts.next()? != "publickey" {
            return None;
        }
        let key_type = parts.next()?.to_string();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(parts.next()?)
            .ok()?;
        let digest = Sha256::digest(&blob);
        let fp = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
        Some((key_type, format!("SHA256:{fp}")))
    })
}

/// The Unix user this process runs as.
pub fn process_user() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => std::env::var("USER").unwrap_or_else(|_| format!("uid={uid}")),
    }
}

/// The SSH caller from sshd's environment and what the controller said.
pub fn caller_from_env(op: StdioOp, said: &StdioCaller) -> SshCaller {
    let (key_type, key_fingerprint) = std::env::var_os("SSH_USER_AUTH")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| key_from_auth_info(&t))
        .map(|(t, f)| (Some(t), f))
        .unwrap_or((None, "unknown".to_string()));
    let connection = std::env::var("SSH_CONNECTION").unwrap_or_default();
    let mut fields = connection.split_whitespace();
    let client_ip = fields.next().unwrap_or("unknown").to_string();
    let client_port = fields.next().and_then(|p| p.parse().ok());
    SshCaller {
        user: process_user(),
        sudo_user: std::env::var("SUDO_USER").ok().filter(|s| !s.is_empty()),
        key_fingerprint,
        key_type,
        client_ip,
        client_port,
        controller: said.controller.clone().filter(|c| !c.is_empty()),
        accepted_host_key: said.accepted_host_key.clone(),
        op: op.as_str().to_string(),
    }
}

/// Whether a request of `op` leaves an `ssh.request` audit record (all but
/// the keep-alives: `ping` and the lease renewals).
pub fn audited(op: &str) -> bool {
    !matches!(op, "ping" | "renew")
}

/// Appends the `ssh.request` audit record of a request over SSH.
pub fn audit_ssh_request(
    store: &Store,
    who: &str,
    caller: &SshCaller,
    served_by: &str,
) -> Result<(), OpError> {
    if !audited(&caller.op) && caller.accepted_host_key.is_none() {
        return Ok(());
    }
    let mut entry = AuditEntry::new(who, "ssh.request");
    entry.detail = serde_json::json!({
        "op": caller.op,
        "transport": "ssh",
        "user": caller.user,
        "sudo_user": caller.sudo_user,
        "key_fingerprint": caller.key_fingerprint,
        "key_type": caller.key_type,
        "client_ip": caller.client_ip,
        "client_port": caller.client_port,
        "controller": caller.controller,
        "accepted_host_key": caller.accepted_host_key,
        "served_by": served_by,
    });
    store.append_audit(&entry).map(|_| ()).map_err(|e| {
        OpError::new(
            Outcome::EnvironmentError,
            format!("the request over SSH was not carried out: its audit record could not be written: {e}"),
        )
    })
}

/// Writes JSON lines to stdout, flushing each. A closed stdout (the SSH
/// connection dropped) is ignored: the operation still runs to its end.
struct Out;

impl Out {
    fn line(&self, line: &StdioLine) {
        if let Ok(json) = serde_json::to_string(line) {
            self.raw(json.as_bytes());
        }
    }

    fn raw(&self, json: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(json);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }

    fn event(&self, e: &Event) {
        if let Ok(json) = serde_json::to_string(e) {
            self.raw(json.as_bytes());
        }
    }

    /// An error line; returns the exit code that goes with it.
    fn refusal(&self, r: Refusal) -> i32 {
        let code = r.error.outcome.exit_code();
        eprintln!("deploy-agent serve-stdio: {}", r.error.message);
        self.line(&StdioLine::Error {
            status: r.status.as_u16(),
            error: r.error,
        });
        code
    }

    fn answer(&self, body: serde_json::Value) -> i32 {
        self.line(&StdioLine::Answer { status: 200, body });
        exit::SUCCESS
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    ApiError::new(Outcome::ConfigError, message).into()
}

/// The op's request, typed.
fn typed<T: serde::de::DeserializeOwned>(req: &StdioRequest) -> Result<T, Refusal> {
    serde_json::from_value(req.request.clone()).map_err(|e| {
        bad_request(format!(
            "the request of op {} is not valid: {e}",
            req.op.as_str()
        ))
    })
}

fn query(req: &StdioRequest) -> Result<StdioQuery, Refusal> {
    if req.request.is_null() {
        return Ok(StdioQuery::default());
    }
    typed(req)
}

/// A request, validated, as it goes to the daemon: method, path, body.
fn http_form(req: &StdioRequest) -> Result<(http::Method, String, Option<Vec<u8>>), Refusal> {
    use http::Method;
    let body = |v: serde_json::Value| serde_json::to_vec(&v).ok();
    let q = |req: &StdioRequest| -> Result<StdioQuery, Refusal> { query(req) };
    Ok(match req.op {
        StdioOp::Ping => (Method::GET, "/v1/ping".into(), None),
        StdioOp::Deploy => {
            let r: DeployRequest = typed(req)?;
            (Method::POST, "/v1/deploy".into(), body(to_value(&r)))
        }
        StdioOp::Rollback => {
            let r: RollbackRequest = typed(req)?;
            (Method::POST, "/v1/rollback".into(), body(to_value(&r)))
        }
        StdioOp::Pull => {
            let r: PullRequest = typed(req)?;
            (Method::POST, "/v1/pull".into(), body(to_value(&r)))
        }
        StdioOp::Lock | StdioOp::Renew => {
            let r: LockRequest = typed(req)?;
            let path = if req.op == StdioOp::Lock {
                "/v1/lock"
            } else {
                "/v1/lock/renew"
            };
            (Method::POST, path.into(), body(to_value(&r)))
        }
        StdioOp::Unlock => {
            let r: UnlockRequest = typed(req)?;
            (Method::DELETE, "/v1/lock".into(), body(to_value(&r)))
        }
        StdioOp::LockStatus => (Method::GET, "/v1/lock".into(), None),
        StdioOp::Status => {
            let q = q(req)?;
            let path = match &q.project {
                Some(p) => format!("/v1/status?project={}", encode(p)),
                None => "/v1/status".into(),
            };
            (Method::GET, path, None)
        }
        StdioOp::History => {
            let q = q(req)?;
            let Some(p) = q.project else {
                return Err(bad_request("op history needs request.project"));
            };
            (
                Method::GET,
                format!("/v1/history?project={}", encode(&p)),
                None,
            )
        }
        StdioOp::Audit => {
            let q = q(req)?;
            let mut path = format!("/v1/audit?limit={}", q.limit.unwrap_or(100));
            if let Some(p) = &q.project {
                path.push_str(&format!("&project={}", encode(p)));
            }
            (Method::GET, path, None)
        }
        StdioOp::Release => {
            let q = q(req)?;
            let (Some(p), Some(r)) = (q.project, q.release) else {
                return Err(bad_request(
                    "op release needs request.project and request.release",
                ));
            };
            (
                Method::GET,
                format!("/v1/release?project={}&release={}", encode(&p), encode(&r)),
                None,
            )
        }
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads the one request line from stdin.
async fn read_request() -> Result<StdioRequest, Refusal> {
    use tokio::io::AsyncReadExt;
    let mut reader = tokio::io::BufReader::new(tokio::io::stdin().take(MAX_REQUEST));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| bad_request(format!("cannot read the request from stdin: {e}")))?;
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(bad_request(
            "no request on stdin: give one JSON object, e.g. {\"op\":\"status\",\"request\":{\"project\":\"web\"}}",
        ));
    }
    serde_json::from_slice(&line).map_err(|e| {
        bad_request(format!(
            "the request on stdin is not valid ({e}); expected {{\"op\": \"deploy\"|\"rollback\"|\"status\"|…, \"request\": {{…}}, \"caller\": {{\"controller\": …}}}}"
        ))
    })
}

/// `deploy-agent serve-stdio`. Returns the exit code.
pub async fn serve(state_dir: &Path, config: Option<PathBuf>, version: &str) -> i32 {
    let out = Out;
    let req = match read_request().await {
        Ok(r) => r,
        Err(r) => return out.refusal(r),
    };
    let caller = caller_from_env(req.op, &req.caller);
    let who = caller.who(&caller.user);
    let hello = |served_by: &str| {
        StdioLine::Hello(StdioHello {
            served_by: served_by.to_string(),
            who: who.clone(),
            host: api::hostname(),
            version: version.to_string(),
        })
    };
    let form = match http_form(&req) {
        Ok(f) => f,
        Err(r) => return out.refusal(r),
    };
    let sock = state_dir.join("agent.sock");
    match via_daemon(&sock, &req, &caller, form, &out, || {
        out.line(&hello("daemon"))
    })
    .await
    {
        Ok(Some(code)) => return code,
        Ok(None) => {}
        Err(message) => {
            return out.refusal(ApiError::new(Outcome::EnvironmentError, message).into());
        }
    }

    // No daemon: this process does the work.
    let (path, required) = match config {
        Some(p) => (p, true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let config = match AgentConfig::load(&path, required) {
        Ok(c) => c,
        Err(e) => return out.refusal(bad_request(e.to_string())),
    };
    let engine = match Engine::open(state_dir, config).await {
        Ok(e) => e,
        Err(e) => return out.refusal(e.into()),
    };
    out.line(&hello("in_process"));
    if let Err(e) = audit_ssh_request(&engine.store, &who, &caller, "in_process") {
        return out.refusal(e.into());
    }
    let code = in_process(&engine, &req, &who, &out).await;
    engine.notifier.flush_before_exit().await;
    code
}

/// Hands the request to the daemon; `Ok(None)` when none answers.
async fn via_daemon(
    sock: &Path,
    req: &StdioRequest,
    caller: &SshCaller,
    (method, path, body): (http::Method, String, Option<Vec<u8>>),
    out: &Out,
    hello: impl FnOnce(),
) -> Result<Option<i32>, String> {
    let headers = [(VIA_HEADER, encode_via(caller))];
    let resp = match local_client::send(sock, method, &path, body, &headers).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    hello();
    let streaming = matches!(req.op, StdioOp::Deploy | StdioOp::Rollback);
    let ok = (200..300).contains(&resp.status);
    if streaming && ok {
        // Pass the daemon's JSON lines through as they come.
        let mut body = resp.body;
        let mut buf: Vec<u8> = Vec::new();
        let mut code = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                format!("the daemon's answer broke off: {e}; it finishes the operation on its own (see `deploy-agent status`)")
            })?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    if let Ok(Event::Result(r)) = serde_json::from_slice::<Event>(line) {
                        code = Some(r.exit_code);
                    }
                    out.raw(line);
                }
            }
        }
        return Ok(Some(code.ok_or_else(|| {
            "the daemon's answer ended without a result; it finishes the operation on its own (see `deploy-agent status`)".to_string()
        })?));
    }
    let bytes = resp
        .body
        .collect()
        .await
        .map_err(|e| format!("cannot read the daemon's answer: {e}"))?
        .to_bytes();
    if ok {
        let body = if req.op == StdioOp::Ping {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).to_string())
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("the daemon answered something unexpected: {e}"))?
        };
        out.line(&StdioLine::Answer {
            status: resp.status,
            body,
        });
        return Ok(Some(exit::SUCCESS));
    }
    let error: ApiError = serde_json::from_slice(&bytes).map_err(|_| {
        format!(
            "the daemon answered {}: {}",
            resp.status,
            String::from_utf8_lossy(&bytes).trim()
        )
    })?;
    let status =
        http::StatusCode::from_u16(resp.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    Ok(Some(out.refusal(Refusal { status, error })))
}

/// The request, done by this process.
async fn in_process(engine: &Engine, req: &StdioRequest, who: &str, out: &Out) -> i32 {
    match req.op {
        StdioOp::Deploy => {
            let r: DeployRequest = match typed(req) {
                Ok(r) => r,
                Err(e) => return out.refusal(e),
            };
            if r.no_wait {
                return out.refusal(bad_request(
                    "no_wait needs the daemon (deploy-agent run) to finish the observation window, and none answers on this host",
                ));
            }
            run_operation(out, |tx| async move { engine.deploy(&r, who, &tx).await }).await
        }
        StdioOp::Rollback => {
            let r: RollbackRequest = match typed(req) {
                Ok(r) => r,
                Err(e) => return out.refusal(e),
            };
            run_operation(out, |tx| async move { engine.rollback(&r, who, &tx).await }).await
        }
        _ => match answer_here(engine, req, who).await {
            Ok(v) => out.answer(v),
            Err(e) => out.refusal(e),
        },
    }
}

/// The answer of a non-streaming op, done by this process.
async fn answer_here(
    engine: &Engine,
    req: &StdioRequest,
    who: &str,
) -> Result<serde_json::Value, Refusal> {
    Ok(match req.op {
        StdioOp::Ping | StdioOp::Deploy | StdioOp::Rollback => {
            serde_json::Value::String("ok".into())
        }
        StdioOp::Status => {
            let q = query(req)?;
            to_value(&engine.status(q.project.as_deref()).await?)
        }
        StdioOp::History => {
            let q = query(req)?;
            let Some(p) = q.project else {
                return Err(bad_request("op history needs request.project"));
            };
            let h = engine
                .store
                .history(&p, q.limit.unwrap_or(1000))
                .map_err(OpError::from)?;
            to_value(&h)
        }
        StdioOp::Audit => {
            let q = query(req)?;
            let limit = q.limit.unwrap_or(100).min(100_000);
            let records = engine
                .store
                .audit(q.project.as_deref(), limit)
                .map_err(OpError::from)?;
            to_value(&records)
        }
        StdioOp::Release => {
            let q = query(req)?;
            to_value(&api::release_info(engine, q.project, q.release)?)
        }
        StdioOp::Pull => {
            let r: PullRequest = typed(req)?;
            let pulled = api::pull::pre_pull(engine, &r).await?;
            tracing::info!(who = %who, project = %r.project, release = %r.release, "pre-pulled {} image(s) over SSH", pulled.digests.len());
            to_value(&pulled)
        }
        StdioOp::Lock => {
            let r: LockRequest = typed(req)?;
            to_value(&api::take_lease(engine, who, &r)?)
        }
        StdioOp::Renew => {
            let r: LockRequest = typed(req)?;
            to_value(&api::renew_lease(engine, who, &r)?)
        }
        StdioOp::Unlock => {
            let r: UnlockRequest = typed(req)?;
            to_value(&api::give_up_lease(engine, who, &r)?)
        }
        StdioOp::LockStatus => to_value(&api::current_lease(engine)?),
    })
}

/// Runs a deploy or rollback here, writing its events as they come.
async fn run_operation<F, Fut>(out: &Out, op: F) -> i32
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<Event>) -> Fut,
    Fut: std::future::Future<Output = OperationResult>,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let fut = op(tx);
    tokio::pin!(fut);
    let result = loop {
        tokio::select! {
            result = &mut fut => break result,
            Some(e) = rx.recv() => out.event(&e),
        }
    };
    while let Ok(e) = rx.try_recv() {
        out.event(&e);
    }
    let code = result.exit_code;
    out.event(&Event::Result(result));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_fingerprint_is_openssh_s() {
        // `ssh-keygen -lf` of this key prints
        // SHA256:YPwOdEa9q7Y3C0mvEFTNs9vsZK8dovVh0aD6QnVgW+o.
        let text = "publickey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n";
        let (t, fp) = key_from_auth_info(text).unwrap();
        assert_eq!(t, "ssh-ed25519");
        assert!(fp.starts_with("SHA256:") && fp.len() == 50, "{fp}");
        assert_eq!(key_from_auth_info("password\n"), None);
        assert_eq!(key_from_auth_info(""), None);
    }

    #[test]
    fn the_via_header_round_trips_and_the_identity_is_stable() {
        let c = SshCaller {
            user: "deploy".into(),
            key_fingerprint: "SHA256:abc".into(),
            client_ip: "10.0.0.5".into(),
            client_port: Some(51234),
            controller: Some("ci-production".into()),
            op: "deploy".into(),
            ..SshCaller::default()
        };
        assert_eq!(decode_via(encode_via(&c).as_bytes()).unwrap(), c);
        assert!(decode_via(b"not base64!").is_err());
        let who = c.who("deploy");
        assert_eq!(
            who,
            "ssh:deploy key=SHA256:abc from=10.0.0.5 controller=ci-production"
        );
        // Another connection (another port) is the same identity.
        let other = SshCaller {
            client_port: Some(4000),
            op: "renew".into(),
            ..c.clone()
        };
        assert_eq!(other.who("deploy"), who);
        assert!(audited("deploy") && audited("status") && !audited("renew"));
    }

    #[test]
    fn requests_are_checked_before_anything_is_contacted() {
        let r: StdioRequest = serde_json::from_str(r#"{"op":"history","request":{}}"#).unwrap();
        let e = http_form(&r).unwrap_err();
        assert!(
            e.error.message.contains("request.project"),
            "{}",
            e.error.message
        );
        let r: StdioRequest =
            serde_json::from_str(r#"{"op":"deploy","request":{"project":1}}"#).unwrap();
        assert!(http_form(&r).is_err());
        let r: StdioRequest = serde_json::from_str(
            r#"{"op":"status","request":{"project":"a b"},"caller":{"controller":"ci"}}"#,
        )
        .unwrap();
        let (m, path, body) = http_form(&r).unwrap();
        assert_eq!(
            (m, path.as_str(), body),
            (http::Method::GET, "/v1/status?project=a%20b", None)
        );
        assert!(serde_json::from_str::<StdioRequest>(r#"{"op":"format_disk"}"#).is_err());
    }
}
