//! `deploy-agent serve-stdio`: one request on stdin, JSON lines on stdout.
//!
//! This is what `deploy-controller` runs over SSH when a host's agent
//! cannot be reached over its HTTPS API (docs/ssh.md). The request
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
//! `ssh:<user> (claimed: key=SHA256:… from=<ip> controller=<CN>)`
//! ([`SshCaller::who`]) in the engine's records, the lease and the audit
//! log, and every request but `ping` and `renew` leaves an `ssh.request`
//! audit record with all the details (key type, client port, op, a host key
//! the controller accepted as new).
//!
//! Only the Unix user is a fact: this process's uid, or the kernel's
//! `SO_PEERCRED` on agent.sock. Everything else comes from the environment
//! (`SSH_CONNECTION`, `SSH_USER_AUTH`, `SUDO_USER`) and the request, which
//! sshd sets for a real SSH session but which anyone who runs
//! `serve-stdio` by hand sets as they like; checking that the parent
//! process is sshd would not tell them apart (a user with an SSH shell can
//! `exec` it with any environment), so nothing here is verified, and the
//! records say "claimed". What makes a caller the holder of a lease it did
//! not take is the lease's token, never these details.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use deploy_protocol::ops::Input;
use deploy_protocol::{Caller, Op, Query, jsonl};
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;

use crate::api::via::{VIA_HEADER, audit_ssh_request, encode_via};
use crate::api::{MAX_REQUEST, process_user, typed};
use crate::engine::OpError;
use crate::local::{Local, Reply};
use crate::wire::{
    DeployRequest, Event, GiveUpLeaseRequest, LeaseRequest, Outcome, PullRequest, RollbackRequest,
    ServedBy, SshCaller, StdioCaller, StdioHello, StdioLine, StdioRequest, exit,
};

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

/// The SSH caller from sshd's environment and what the controller said:
/// claims, except `user` (this process's uid).
pub fn caller_from_env(op: Op, said: &StdioCaller) -> SshCaller {
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
        op: op.name().to_string(),
    }
}

/// Writes JSON lines to stdout, flushing each. A closed stdout (the SSH
/// connection dropped) is ignored: the operation still runs to its end.
struct Out;

impl Out {
    fn line(&self, line: &StdioLine) {
        self.write(line);
    }

    fn event(&self, e: &Event) {
        self.write(e);
    }

    fn write<T: serde::Serialize>(&self, v: &T) {
        if let Ok(line) = jsonl::encode(v) {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }

    /// An error line; returns the exit code that goes with it.
    fn refusal(&self, e: OpError) -> i32 {
        self.reply(Reply::refused(e))
    }

    /// Writes a reply; returns the exit code that goes with it.
    fn reply(&self, reply: Reply) -> i32 {
        match reply {
            Reply::Json(body) => self.answer(body),
            Reply::Text(t) => self.answer(serde_json::Value::String(t)),
            Reply::Refused { status, error } => {
                let code = error.outcome.exit_code();
                eprintln!("deploy-agent serve-stdio: {}", error.message);
                self.line(&StdioLine::Error { status, error });
                code
            }
            Reply::Events(_) => exit::ENVIRONMENT,
        }
    }

    fn answer(&self, body: serde_json::Value) -> i32 {
        self.line(&StdioLine::Answer { status: 200, body });
        exit::SUCCESS
    }

    /// Passes a deploy's or rollback's events through as they come.
    async fn events(&self, reply: Reply) -> i32 {
        let Reply::Events(mut events) = reply else {
            return self.reply(reply);
        };
        let mut code = None;
        while let Some(e) = events.next().await {
            match e {
                Ok(e) => {
                    if let Event::Result(r) = &e {
                        code = Some(r.exit_code);
                    }
                    self.event(&e);
                }
                Err(m) => return self.refusal(OpError::new(Outcome::EnvironmentError, m)),
            }
        }
        code.unwrap_or_else(|| {
            self.refusal(OpError::new(
                Outcome::EnvironmentError,
                "the answer ended without a result; the daemon finishes the operation on its own (see `deploy-agent status`)",
            ))
        })
    }
}

fn bad_request(message: impl Into<String>) -> OpError {
    OpError::new(Outcome::ConfigError, message)
}

/// The request, checked before anything is contacted: an op `serve-stdio`
/// offers, a request of the op's type; its JSON as the API takes it.
fn check(req: &StdioRequest) -> Result<serde_json::Value, OpError> {
    let op = req.op;
    if !op.spec().over_ssh {
        return Err(bad_request(format!(
            "op {} is not offered over SSH; use the agent's HTTPS API",
            op.name()
        )));
    }
    let input = req.request.clone();
    let normalized = |v: Result<serde_json::Value, serde_json::Error>| {
        v.map_err(|e| bad_request(format!("the request of op {} is not valid: {e}", op.name())))
    };
    match op.spec().input {
        Input::Nothing => Ok(serde_json::Value::Null),
        Input::Query => {
            let q: Query = typed(op, input)?;
            q.check(op).map_err(|m| bad_request(format!("op {m}")))?;
            normalized(serde_json::to_value(q))
        }
        Input::Body => match op {
            Op::Deploy => normalized(serde_json::to_value(typed::<DeployRequest>(op, input)?)),
            Op::Rollback => normalized(serde_json::to_value(typed::<RollbackRequest>(op, input)?)),
            Op::Pull => normalized(serde_json::to_value(typed::<PullRequest>(op, input)?)),
            Op::TakeLease | Op::RenewLease => {
                normalized(serde_json::to_value(typed::<LeaseRequest>(op, input)?))
            }
            Op::GiveUpLease => normalized(serde_json::to_value(typed::<GiveUpLeaseRequest>(
                op, input,
            )?)),
            _ => Ok(input),
        },
    }
}

/// Reads the one request line from stdin.
async fn read_request() -> Result<StdioRequest, OpError> {
    use tokio::io::AsyncReadExt;
    let limit = u64::try_from(MAX_REQUEST).unwrap_or(u64::MAX);
    let mut reader = tokio::io::BufReader::new(tokio::io::stdin().take(limit));
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
        Err(e) => return out.refusal(e),
    };
    let via = caller_from_env(req.op, &req.caller);
    let input = match check(&req) {
        Ok(v) => v,
        Err(e) => return out.refusal(e),
    };
    // This process's uid: the one fact (and what agent.sock's SO_PEERCRED
    // tells the daemon).
    let user = via.user.clone();
    let caller = Caller::Ssh {
        user: user.clone(),
        via: Box::new(via.clone()),
    };
    let who = caller.to_string();
    let hello = |served_by| {
        StdioLine::Hello(StdioHello {
            served_by,
            who: who.clone(),
            host: crate::config::hostname(),
            version: version.to_string(),
        })
    };
    let mut local = Local::new(state_dir, config).with_header(VIA_HEADER, encode_via(&via));
    match local.via_daemon(req.op, &input).await {
        Ok(Some(reply)) => {
            out.line(&hello(ServedBy::Daemon));
            return out.events(reply).await;
        }
        Ok(None) => {}
        Err(e) => return out.refusal(OpError::new(Outcome::EnvironmentError, e.to_string())),
    }

    // No daemon: this process does the work.
    let store = match local.api().await {
        Ok(api) => api.engine.store.clone(),
        Err(e) => return out.refusal(e),
    };
    out.line(&hello(ServedBy::InProcess));
    if let Err(e) = audit_ssh_request(&store, &user, &via, ServedBy::InProcess) {
        return out.refusal(e);
    }
    let reply = local.in_process(req.op, &caller, input).await;
    let code = out.events(reply).await;
    local.finish().await;
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
    fn requests_are_checked_before_anything_is_contacted() {
        let r: StdioRequest = serde_json::from_str(r#"{"op":"history","request":{}}"#).unwrap();
        let e = check(&r).unwrap_err();
        assert!(e.message.contains("request.project"), "{}", e.message);
        let r: StdioRequest =
            serde_json::from_str(r#"{"op":"deploy","request":{"project":1}}"#).unwrap();
        assert!(check(&r).is_err());
        let r: StdioRequest = serde_json::from_str(
            r#"{"op":"status","request":{"project":"a b"},"caller":{"controller":"ci"}}"#,
        )
        .unwrap();
        let q: Query = typed(Op::Status, check(&r).unwrap()).unwrap();
        assert_eq!(
            (
                Op::Status.spec().method.as_str(),
                Op::Status.path_and_query(&q).as_str()
            ),
            ("GET", "/v1/status?project=a%20b")
        );
        assert!(serde_json::from_str::<StdioRequest>(r#"{"op":"format_disk"}"#).is_err());
        let r: StdioRequest = serde_json::from_str(r#"{"op":"metrics"}"#).unwrap();
        assert!(
            check(&r)
                .unwrap_err()
                .message
                .contains("not offered over SSH")
        );
    }
}
