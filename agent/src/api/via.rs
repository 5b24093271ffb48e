//! Requests over SSH: `deploy-agent serve-stdio` (run by the controller
//! over SSH) hands a request to the daemon on agent.sock with the SSH
//! details of its caller in the [`VIA_HEADER`] header.
//!
//! Invariant: only agent.sock honours the header ([`ssh_via`] is layered
//! on the unix socket's router only; the HTTPS API never looks at it). The
//! Unix user comes from the kernel (`SO_PEERCRED`), as for every local
//! request; the header adds the SSH details. Every request over SSH but the
//! keep-alives leaves an `ssh.request` audit record before it is carried
//! out ([`audit_ssh_request`]).

use std::sync::Arc;

use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::response::Response;
use base64::Engine as _;
use deploy_protocol::Caller;

use super::{Api, Peer, error_response};
use crate::engine::OpError;
use crate::store::{AuditEntry, Store};
use crate::wire::{Outcome, ServedBy, SshCaller};

/// The header that carries the SSH caller (base64 of [`SshCaller`] JSON)
/// from `serve-stdio` to the daemon over agent.sock.
pub const VIA_HEADER: &str = "x-deploy-agent-via";

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
    served_by: ServedBy,
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

/// On agent.sock: a request carrying [`VIA_HEADER`] is recorded as that
/// SSH caller, with the Unix user the kernel reported.
pub async fn ssh_via(
    State(api): State<Arc<Api>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(value) = req.headers().get(VIA_HEADER) else {
        return next.run(req).await;
    };
    let via = match decode_via(value.as_bytes()) {
        Ok(c) => c,
        Err(m) => return error_response(OpError::new(Outcome::ConfigError, m)),
    };
    let user = match req.extensions().get::<ConnectInfo<Peer>>() {
        Some(ConnectInfo(Peer {
            caller: Caller::Unix { user },
        })) => user.clone(),
        _ => "unknown".to_string(),
    };
    let caller = Caller::Ssh {
        user,
        via: Box::new(via),
    };
    let who = caller.to_string();
    let Caller::Ssh { via, .. } = &caller else {
        return next.run(req).await;
    };
    if let Err(e) = audit_ssh_request(&api.engine.store, &who, via, ServedBy::Daemon) {
        return error_response(e);
    }
    tracing::info!(who = %who, op = %via.op, "request over SSH (deploy-agent serve-stdio)");
    req.extensions_mut().insert(ConnectInfo(Peer { caller }));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
