//! Requests over SSH: `deploy-agent serve-stdio` (run by the controller
//! over SSH) hands a request to the daemon on agent.sock with the SSH
//! details of its caller in the [`VIA_HEADER`] header.
//!
//! Invariant: only agent.sock honours the header ([`ssh_via`] is layered
//! on the unix socket's router only; the HTTPS API never looks at it). The
//! Unix user comes from the kernel (`SO_PEERCRED`), as for every local
//! request, and the op from the route the request takes; the header adds
//! the SSH details, which are recorded as what they are: claims. Any local
//! user who can reach agent.sock can write the header, and `serve-stdio`
//! itself only knows what its environment says, which its caller sets
//! (sshd, or anyone who runs it by hand). Every request over SSH but the
//! keep-alives leaves an `ssh.request` audit record before it is carried
//! out ([`audit_ssh_request`]).

use std::sync::Arc;

use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::response::Response;
use base64::Engine as _;
use deploy_protocol::{Caller, Op};

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

/// The detail of an `ssh.request` audit record: as fact, the op served,
/// the Unix user the kernel reported (`user`) and who served it; under
/// `claimed`, everything the caller said about its SSH session (and the
/// user and op it said, when they are not the facts).
pub fn ssh_request_detail(user: &str, via: &SshCaller, served_by: ServedBy) -> serde_json::Value {
    let mut claimed = serde_json::json!({
        "sudo_user": via.sudo_user,
        "key_fingerprint": via.key_fingerprint,
        "key_type": via.key_type,
        "client_ip": via.client_ip,
        "client_port": via.client_port,
        "controller": via.controller,
        "accepted_host_key": via.accepted_host_key,
    });
    if via.user != user {
        claimed["user"] = serde_json::Value::String(via.user.clone());
    }
    serde_json::json!({
        "op": via.op,
        "transport": "ssh",
        "user": user,
        "claimed": claimed,
        "served_by": served_by,
    })
}

/// Appends the `ssh.request` audit record of a request over SSH: `user`
/// is the Unix user it runs as (fact), `via` what it said (claims), its
/// `op` the op being served.
pub fn audit_ssh_request(
    store: &Store,
    user: &str,
    via: &SshCaller,
    served_by: ServedBy,
) -> Result<(), OpError> {
    if !audited(&via.op) && via.accepted_host_key.is_none() {
        return Ok(());
    }
    let mut entry = AuditEntry::new(via.who(user), "ssh.request");
    entry.detail = ssh_request_detail(user, via, served_by);
    store.append_audit(&entry).map(|_| ()).map_err(|e| {
        OpError::new(
            Outcome::EnvironmentError,
            format!("the request over SSH was not carried out: its audit record could not be written: {e}"),
        )
    })
}

/// On agent.sock: a request carrying [`VIA_HEADER`] is recorded as that
/// SSH caller, with the Unix user the kernel reported and the op of the
/// route it takes (whatever the header says of either).
pub async fn ssh_via(
    State(api): State<Arc<Api>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(value) = req.headers().get(VIA_HEADER) else {
        return next.run(req).await;
    };
    let Some(op) = Op::route(req.method().as_str(), req.uri().path()) else {
        // No such operation: the router answers 404, as to anyone.
        return next.run(req).await;
    };
    let mut via = match decode_via(value.as_bytes()) {
        Ok(c) => c,
        Err(m) => return error_response(OpError::new(Outcome::ConfigError, m)),
    };
    let claimed_op = std::mem::replace(&mut via.op, op.name().to_string());
    let user = match req.extensions().get::<ConnectInfo<Peer>>() {
        Some(ConnectInfo(Peer {
            caller: Caller::Unix { user },
        })) => user.clone(),
        _ => "unknown".to_string(),
    };
    if let Err(e) = audit_ssh_request(&api.engine.store, &user, &via, ServedBy::Daemon) {
        return error_response(e);
    }
    let who = via.who(&user);
    if claimed_op != via.op {
        tracing::warn!(who = %who, op = %via.op, "request over agent.sock with a via header that claims op {claimed_op:?}");
    }
    tracing::info!(who = %who, op = %via.op, "request over SSH (deploy-agent serve-stdio; the SSH details are the caller's claims)");
    let caller = Caller::Ssh {
        user,
        via: Box::new(via),
    };
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
            "ssh:deploy (claimed: key=SHA256:abc from=10.0.0.5 controller=ci-production)"
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

    /// What a local caller put in the header: another user, a made-up key
    /// and address. The record keeps the kernel's user as the user, and
    /// every SSH detail under `claimed`.
    #[test]
    fn the_audit_record_separates_facts_from_claims() {
        let forged = SshCaller {
            user: "secalice".into(),
            key_fingerprint: "SHA256:FORGED".into(),
            client_ip: "203.0.113.7".into(),
            client_port: Some(4242),
            controller: Some("ci-production".into()),
            op: "lock_status".into(),
            ..SshCaller::default()
        };
        let d = ssh_request_detail("mallory", &forged, ServedBy::Daemon);
        assert_eq!(d["user"], "mallory");
        assert_eq!(d["op"], "lock_status");
        assert_eq!(d["served_by"], "daemon");
        assert_eq!(d["claimed"]["user"], "secalice");
        assert_eq!(d["claimed"]["key_fingerprint"], "SHA256:FORGED");
        assert_eq!(d["claimed"]["client_ip"], "203.0.113.7");
        assert_eq!(d["claimed"]["client_port"], 4242);
        assert_eq!(d["claimed"]["controller"], "ci-production");
        assert!(d.get("key_fingerprint").is_none() && d.get("client_ip").is_none());
        // The claimed user is only there when it is not the fact.
        let honest = SshCaller {
            user: "mallory".into(),
            ..forged
        };
        let d = ssh_request_detail("mallory", &honest, ServedBy::InProcess);
        assert!(d["claimed"].get("user").is_none(), "{d}");

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        audit_ssh_request(&store, "mallory", &honest, ServedBy::Daemon).unwrap();
        let keep_alive = SshCaller {
            op: "renew".into(),
            ..honest
        };
        audit_ssh_request(&store, "mallory", &keep_alive, ServedBy::Daemon).unwrap();
        let records = store.audit(None, 10).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            records[0].who,
            "ssh:mallory (claimed: key=SHA256:FORGED from=203.0.113.7 controller=ci-production)"
        );
    }
}
