//! The environment lease, release records and approvals: what the fleet
//! asks of a host besides deploying.
//!
//! While a controller holds its environment's lease on this host, only its
//! deployment may deploy or roll back here ([`check_lease`]). The lease is a
//! row per environment in the store (`store/lease.rs`); these functions
//! check requests, take/renew/give up the lease and audit each change. They
//! return domain errors ([`OpError`]); the API chooses HTTP statuses.

use std::time::Duration;

use deploy_protocol::Caller;
use sha2::{Digest, Sha256};

use super::{Engine, OpError};
use crate::config::{AgentConfig, environment};
use crate::store::lease::{LeaseAsk, LeaseError, Proof};
use crate::store::{AuditEntry, Store};
use crate::wire::{
    APPROVAL_ACTION, ApprovalRecorded, ApprovalRequest, GiveUpLeaseRequest, Lease, LeaseGranted,
    LeaseRequest, LeaseToken, Outcome, Query, ReleaseInfo,
};

/// Shortest and longest lease a controller may ask for.
pub const MIN_LEASE: Duration = Duration::from_millis(500);
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// Refuses a deploy or rollback while another deployment holds this
/// environment's lease. `who` is the caller's identity: the lease's owner
/// is its deployment id *and* the identity that took it.
pub fn check_lease(
    store: &Store,
    config: &AgentConfig,
    deployment_id: Option<&str>,
    who: &str,
) -> Result<(), OpError> {
    let env = environment(config);
    let Some(lease) = store.active_lease(env, jiff::Timestamp::now())? else {
        return Ok(());
    };
    if deployment_id == Some(lease.deployment_id.as_str()) && who == lease.identity {
        return Ok(());
    }
    Err(OpError::new(
        Outcome::Locked,
        format!(
            "environment {env} is locked by deployment {} ({}{}) until {}: a fleet deployment is in progress on this host; \
             wait for it to end (or for its lock to expire) and retry",
            lease.deployment_id,
            lease.identity,
            lease
                .purpose
                .as_ref()
                .map(|p| format!(", {p}"))
                .unwrap_or_default(),
            lease.expires_at
        ),
    ))
}

fn check_request(deployment_id: &str, ttl_ms: Option<u64>) -> Result<Duration, OpError> {
    if deployment_id.is_empty()
        || deployment_id.len() > 128
        || deployment_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(OpError::new(
            Outcome::ConfigError,
            format!(
                "deployment_id {deployment_id:?} must be 1-128 printable characters without spaces"
            ),
        ));
    }
    let ttl = Duration::from_millis(ttl_ms.unwrap_or(60_000));
    if !(MIN_LEASE..=MAX_LEASE).contains(&ttl) {
        return Err(OpError::new(
            Outcome::ConfigError,
            format!(
                "ttl_ms {} is out of range: a lease lasts between {} ms and {} ms",
                ttl.as_millis(),
                MIN_LEASE.as_millis(),
                MAX_LEASE.as_millis()
            ),
        ));
    }
    Ok(ttl)
}

/// A new lease token (256 random bits, hex) and the SHA-256 the store
/// keeps of it.
fn new_token() -> Result<(LeaseToken, String), OpError> {
    let mut secret = [0u8; 32];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut secret)
        .map_err(|_| {
            OpError::new(
                Outcome::EnvironmentError,
                "the lock request was not completed: no random lease token could be drawn from the \
                 system's random number generator; nothing changed; check the host and retry",
            )
        })?;
    let token = LeaseToken::new(hex::encode(secret));
    let digest = token_digest(&token);
    Ok((token, digest))
}

/// The SHA-256 (hex) of a lease token: all the store ever sees of one.
fn token_digest(token: &LeaseToken) -> String {
    hex::encode(Sha256::digest(token.expose().as_bytes()))
}

fn lease_error(e: LeaseError) -> OpError {
    let message = e.to_string();
    match e {
        LeaseError::Held(holder) => OpError::new(
            Outcome::Locked,
            format!(
                "{message}; wait for that deployment to finish, or retry with --lease-wait DURATION (formerly --lock-wait)"
            ),
        )
        .held_by(Some(holder)),
        LeaseError::NotHolder { current, .. } => OpError::new(
            Outcome::Locked,
            format!(
                "{message}; the lock was lost (it expired, and another deployment may have taken it over)"
            ),
        )
        .held_by(current),
        LeaseError::NoProof { lease, from, proof } => {
            let why = match proof {
                Proof::Missing => "the request has no hand_over_token",
                Proof::Wrong => "its hand_over_token is not the lease's",
                Proof::NoneKept => {
                    "the lease was taken before this agent kept lease tokens, so nobody can prove they hold it"
                }
            };
            OpError::new(
                Outcome::Denied,
                format!(
                    "refused to hand the environment lease of deployment {} over from {from}: {why}; nothing changed, \
                     the lease stays with {} until {}. A hand-over needs the hand_over_token of the holder's newest \
                     `lock` answer, which only the controller that took the lease has (deploy-controller sends it by \
                     itself when it falls back to SSH); anyone else waits for the lease to be released or to expire",
                    lease.deployment_id, lease.identity, lease.expires_at
                ),
            )
        }
        LeaseError::Store(_) => OpError::new(Outcome::EnvironmentError, message),
    }
}

fn audit_lock(
    store: &Store,
    who: &str,
    action: &str,
    detail: serde_json::Value,
) -> Result<(), OpError> {
    let mut entry = AuditEntry::new(who, action);
    entry.detail = detail;
    store.append_audit(&entry).map(|_| ()).map_err(|e| {
        OpError::new(
            Outcome::EnvironmentError,
            format!(
                "the lock request was not completed: its audit record could not be written: {e}"
            ),
        )
    })
}

/// `lock`: take (or extend) the environment lease for `caller`; with
/// `hand_over_from`, take it over from that identity within the same
/// deployment (callers over SSH only, and only with the lease's token).
/// The answer carries a new token for the lease, for this caller only: it
/// is neither logged nor audited.
pub fn take_lease(
    store: &Store,
    config: &AgentConfig,
    caller: &Caller,
    req: &LeaseRequest,
) -> Result<LeaseGranted, OpError> {
    let who = caller.to_string();
    let ttl = check_request(&req.deployment_id, Some(req.ttl_ms))?;
    if req.hand_over_token.is_some() && req.hand_over_from.is_none() {
        return Err(OpError::new(
            Outcome::ConfigError,
            "hand_over_token comes with hand_over_from (the identity that holds the lease); \
             without a hand-over, leave it out",
        ));
    }
    let env = environment(config).to_string();
    let (token, token_sha256) = new_token()?;
    let ask = LeaseAsk {
        environment: &env,
        deployment_id: &req.deployment_id,
        identity: &who,
        purpose: req.purpose.as_deref(),
        ttl,
        now: jiff::Timestamp::now(),
        token_sha256: &token_sha256,
    };
    let result = match &req.hand_over_from {
        Some(from) => {
            if !matches!(caller, Caller::Ssh { .. }) {
                return Err(OpError::new(
                    Outcome::ConfigError,
                    "hand_over_from is only accepted from a caller over SSH (deploy-agent serve-stdio)",
                ));
            }
            let proof = req.hand_over_token.as_ref().map(token_digest);
            store
                .hand_over_lease(&ask, from, proof.as_deref())
                .map(|(a, handed)| (a, handed.then(|| from.clone())))
        }
        None => store.acquire_lease(&ask).map(|a| (a, None)),
    };
    let (a, handed_from) = match result {
        Ok(r) => r,
        Err(LeaseError::NoProof { lease, from, proof }) => {
            let detail = serde_json::json!({
                "environment": env,
                "deployment_id": req.deployment_id,
                "holder": lease,
                "hand_over_from": from,
                "reason": proof.as_str(),
            });
            audit_lock(store, &who, "lock.refused", detail)?;
            tracing::warn!(who = %who, deployment = %req.deployment_id,
                "lock.refused: hand-over of environment {env} from {from} refused ({})", proof.as_str());
            return Err(lease_error(LeaseError::NoProof { lease, from, proof }));
        }
        Err(e) => {
            let e = lease_error(e);
            if let Some(h) = &e.holder {
                let detail = serde_json::json!({
                    "environment": env,
                    "deployment_id": req.deployment_id,
                    "holder": h,
                });
                audit_lock(store, &who, "lock.refused", detail)?;
            }
            return Err(e);
        }
    };
    if let Some(from) = handed_from {
        let detail = serde_json::json!({
            "environment": env,
            "deployment_id": req.deployment_id,
            "purpose": req.purpose,
            "expires_at": a.lease.expires_at,
            "from": from,
        });
        audit_lock(store, &who, "lock.handed_over", detail)?;
        tracing::warn!(who = %who, deployment = %req.deployment_id, "lock.handed_over for environment {env} from {from}");
    } else if !a.extended {
        let action = if a.took_over.is_some() {
            "lock.taken_over"
        } else {
            "lock.acquired"
        };
        let detail = serde_json::json!({
            "environment": env,
            "deployment_id": req.deployment_id,
            "purpose": req.purpose,
            "expires_at": a.lease.expires_at,
            "previous_holder": a.took_over,
        });
        audit_lock(store, &who, action, detail)?;
        tracing::info!(who = %who, deployment = %req.deployment_id, "{action} for environment {env}");
    }
    Ok(LeaseGranted {
        lease: a.lease,
        took_over: a.took_over,
        token: Some(token),
    })
}

impl Engine {
    /// `lock_status`: the lease in force, if any.
    pub fn current_lease(&self) -> Result<Option<Lease>, OpError> {
        let env = environment(&self.config);
        Ok(self.store.active_lease(env, jiff::Timestamp::now())?)
    }

    /// `lock`: see [`take_lease`].
    pub fn take_lease(&self, caller: &Caller, req: &LeaseRequest) -> Result<LeaseGranted, OpError> {
        take_lease(&self.store, &self.config, caller, req)
    }

    /// `renew`.
    pub fn renew_lease(&self, caller: &Caller, req: &LeaseRequest) -> Result<Lease, OpError> {
        let ttl = check_request(&req.deployment_id, Some(req.ttl_ms))?;
        let env = environment(&self.config);
        self.store
            .renew_lease(
                env,
                &req.deployment_id,
                &caller.to_string(),
                ttl,
                jiff::Timestamp::now(),
            )
            .map_err(lease_error)
    }

    /// `unlock`.
    pub fn give_up_lease(
        &self,
        caller: &Caller,
        req: &GiveUpLeaseRequest,
    ) -> Result<Option<Lease>, OpError> {
        check_request(&req.deployment_id, None)?;
        let who = caller.to_string();
        let env = environment(&self.config).to_string();
        let released = self
            .store
            .release_lease(&env, &req.deployment_id, &who)
            .map_err(lease_error)?;
        if released.is_some() {
            let detail = serde_json::json!({
                "environment": env,
                "deployment_id": req.deployment_id,
            });
            audit_lock(&self.store, &who, "lock.released", detail)?;
        }
        Ok(released)
    }

    /// `release`: a release as this host recorded it; not found when this
    /// host never ran it.
    pub fn release_info(&self, q: &Query) -> Result<ReleaseInfo, OpError> {
        q.check(deploy_protocol::Op::Release)
            .map_err(|m| OpError::new(Outcome::ConfigError, m))?;
        let (Some(project), Some(release)) = (q.project.clone(), q.release.clone()) else {
            return Err(OpError::new(
                Outcome::ConfigError,
                "release needs a project and a release",
            ));
        };
        let Some(record) = self.store.release(&project, &release)? else {
            return Err(OpError::not_found(format!(
                "release {release} of project {project} was never deployed on this host (or its record was pruned)"
            )));
        };
        let serving = self
            .store
            .serving(&project)?
            .and_then(|s| s.current)
            .as_deref()
            == Some(release.as_str());
        Ok(ReleaseInfo {
            host: crate::config::hostname(),
            project,
            release,
            state: record.state.as_str().to_string(),
            created_at: record.created_at,
            digests: record.digests,
            serving,
        })
    }

    /// `approve`: from an mTLS identity only (the approver role was checked
    /// by the HTTPS layer). Over the local socket or SSH there is no such
    /// identity, so there is no approving there.
    pub fn record_approval(
        &self,
        caller: &Caller,
        req: &ApprovalRequest,
    ) -> Result<ApprovalRecorded, OpError> {
        let who = caller.to_string();
        if caller.mtls_identity().is_none() {
            return Err(OpError::new(
                Outcome::Denied,
                format!(
                    "{who} cannot approve: approvals come from a client certificate with the approver role \
                     (deploy-controller approve), never over the local socket or SSH"
                ),
            ));
        }
        for (what, v) in [("project", &req.project), ("release", &req.release)] {
            if v.is_empty()
                || v.len() > 128
                || v.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(OpError::new(
                    Outcome::ConfigError,
                    format!("{what} {v:?} must be 1-128 printable characters without spaces"),
                ));
            }
        }
        let mut entry = AuditEntry::new(&who, APPROVAL_ACTION);
        entry.project = Some(req.project.clone());
        entry.release = Some(req.release.clone());
        entry.outcome = Some(Outcome::Succeeded.as_str().to_string());
        entry.reason = req.reason.clone();
        let record = self.store.append_audit(&entry).map_err(|e| {
            OpError::new(
                Outcome::EnvironmentError,
                format!(
                    "the approval was not recorded: its audit record could not be written: {e}"
                ),
            )
        })?;
        tracing::info!(who, project = %req.project, release = %req.release, "release approved");
        Ok(ApprovalRecorded {
            who,
            project: req.project.clone(),
            release: req.release.clone(),
            seq: record.seq,
            ts: record.ts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(std::path::Path::new("agent.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn only_the_lease_holder_deploys_while_it_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let config = cfg("environment = \"production\"").unwrap();
        assert!(check_lease(&store, &config, None, "unix:root").is_ok());
        store
            .acquire_lease(&LeaseAsk {
                environment: "production",
                deployment_id: "d1",
                identity: "mtls:ci",
                purpose: Some("deploy of v2"),
                ttl: Duration::from_secs(60),
                now: jiff::Timestamp::now(),
                token_sha256: &token_digest(&LeaseToken::new("t")),
            })
            .unwrap();
        assert!(check_lease(&store, &config, Some("d1"), "mtls:ci").is_ok());
        for (id, who) in [
            (None, "unix:root"),
            (Some("d2"), "mtls:ci"),
            (Some("d1"), "mtls:other"),
        ] {
            let e = check_lease(&store, &config, id, who).unwrap_err();
            assert_eq!(e.outcome, Outcome::Locked);
            assert!(
                e.message.contains("deployment d1 (mtls:ci, deploy of v2)"),
                "{}",
                e.message
            );
        }
        // Another environment's lease does not matter here.
        let staging = cfg("environment = \"staging\"").unwrap();
        assert!(check_lease(&store, &staging, None, "unix:root").is_ok());
    }

    fn request(deployment_id: &str) -> LeaseRequest {
        LeaseRequest {
            deployment_id: deployment_id.into(),
            ttl_ms: 60_000,
            purpose: Some("deploy of v2".into()),
            hand_over_from: None,
            hand_over_token: None,
        }
    }

    /// A caller of `serve-stdio`: what it says about its SSH session is
    /// whatever it likes (a local user can set sshd's variables too).
    fn over_ssh(user: &str) -> Caller {
        Caller::Ssh {
            user: user.into(),
            via: Box::new(crate::wire::SshCaller {
                user: user.into(),
                key_fingerprint: "SHA256:FORGED".into(),
                client_ip: "203.0.113.7".into(),
                controller: Some("ci-production".into()),
                op: "lock".into(),
                ..Default::default()
            }),
        }
    }

    fn audit_actions(store: &Store) -> Vec<(String, String, serde_json::Value)> {
        store
            .audit(None, 100)
            .unwrap()
            .into_iter()
            .map(|r| (r.who, r.action, r.detail))
            .collect()
    }

    /// The lease of a running fleet deployment, taken over mutual TLS,
    /// against a local caller that names its holder and its deployment id
    /// (both readable by anyone) but does not have its token.
    #[test]
    fn only_the_token_of_the_lease_hands_it_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let config = cfg("environment = \"production\"").unwrap();
        let controller = Caller::mtls("ci-production");
        let granted = take_lease(&store, &config, &controller, &request("d1")).unwrap();
        let token = granted.token.clone().unwrap();
        assert_eq!(token.expose().len(), 64);
        assert!(token.expose().chars().all(|c| c.is_ascii_hexdigit()));
        // Each answer has a new one; the newest counts.
        let again = take_lease(&store, &config, &controller, &request("d1")).unwrap();
        let token = again.token.unwrap();
        assert_ne!(granted.token.unwrap(), token);

        let thief = over_ssh("mallory");
        let theft = |shown: Option<LeaseToken>| LeaseRequest {
            hand_over_from: Some("mtls:ci-production".into()),
            hand_over_token: shown,
            ..request("d1")
        };
        for (shown, why) in [
            (None, "the request has no hand_over_token"),
            (
                Some(LeaseToken::new("0".repeat(64))),
                "its hand_over_token is not the lease's",
            ),
        ] {
            let e = take_lease(&store, &config, &thief, &theft(shown)).unwrap_err();
            assert_eq!(e.outcome, Outcome::Denied, "{}", e.message);
            assert!(e.message.contains(why), "{}", e.message);
            assert!(
                e.message
                    .contains("nothing changed, the lease stays with mtls:ci-production"),
                "{}",
                e.message
            );
            let lease = store.lease("production").unwrap().unwrap();
            assert_eq!(lease.identity, "mtls:ci-production");
        }
        // And so it cannot deploy inside that deployment.
        let who = thief.to_string();
        assert!(check_lease(&store, &config, Some("d1"), &who).is_err());
        let refused: Vec<_> = audit_actions(&store)
            .into_iter()
            .filter(|(_, action, _)| action == "lock.refused")
            .collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        for (w, _, detail) in &refused {
            assert_eq!(w, &who);
            assert_eq!(detail["hand_over_from"], "mtls:ci-production");
            assert_eq!(detail["holder"]["identity"], "mtls:ci-production");
        }
        assert_eq!(refused[0].2["reason"], "no hand_over_token");

        // The controller itself, over SSH, with the token: handed over.
        let ssh = over_ssh("deploy");
        let handed = take_lease(&store, &config, &ssh, &theft(Some(token.clone()))).unwrap();
        assert_eq!(handed.lease.identity, ssh.to_string());
        let new_token = handed.token.unwrap();
        assert_ne!(new_token, token);
        assert!(check_lease(&store, &config, Some("d1"), &ssh.to_string()).is_ok());
        // The token that was shown is spent.
        let e = take_lease(&store, &config, &thief, &theft(Some(token.clone()))).unwrap_err();
        assert_eq!(e.outcome, Outcome::Locked, "{}", e.message);

        // No token, shown or given, is in the audit log.
        let log = serde_json::to_string(&store.audit(None, 100).unwrap()).unwrap();
        assert!(log.contains("lock.handed_over"));
        for t in [&token, &new_token] {
            assert!(!log.contains(t.expose()));
        }
    }

    #[test]
    fn a_hand_over_is_for_callers_over_ssh_and_its_token_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let config = cfg("environment = \"production\"").unwrap();
        let granted = take_lease(&store, &config, &Caller::mtls("ci"), &request("d1")).unwrap();
        let token = granted.token.unwrap();
        let e = take_lease(
            &store,
            &config,
            &Caller::unix("root"),
            &LeaseRequest {
                hand_over_from: Some("mtls:ci".into()),
                hand_over_token: Some(token.clone()),
                ..request("d1")
            },
        )
        .unwrap_err();
        assert_eq!(e.outcome, Outcome::ConfigError);
        assert!(e.message.contains("only accepted from a caller over SSH"));
        let e = take_lease(
            &store,
            &config,
            &over_ssh("deploy"),
            &LeaseRequest {
                hand_over_token: Some(token),
                ..request("d1")
            },
        )
        .unwrap_err();
        assert_eq!(e.outcome, Outcome::ConfigError);
        assert!(
            e.message
                .contains("hand_over_token comes with hand_over_from")
        );
        assert_eq!(
            store.lease("production").unwrap().unwrap().identity,
            "mtls:ci"
        );
    }
}
