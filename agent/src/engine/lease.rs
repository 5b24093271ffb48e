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

use super::{Engine, OpError};
use crate::config::{AgentConfig, environment};
use crate::store::lease::LeaseError;
use crate::store::{AuditEntry, Store};
use crate::wire::{
    APPROVAL_ACTION, ApprovalRecorded, ApprovalRequest, GiveUpLeaseRequest, Lease, LeaseGranted,
    LeaseRequest, Outcome, Query, ReleaseInfo,
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
        LeaseError::Store(_) => OpError::new(Outcome::EnvironmentError, message),
    }
}

impl Engine {
    fn audit_lock(
        &self,
        who: &str,
        action: &str,
        detail: serde_json::Value,
    ) -> Result<(), OpError> {
        let mut entry = AuditEntry::new(who, action);
        entry.detail = detail;
        self.store.append_audit(&entry).map(|_| ()).map_err(|e| {
            OpError::new(
                Outcome::EnvironmentError,
                format!(
                    "the lock request was not completed: its audit record could not be written: {e}"
                ),
            )
        })
    }

    /// `lock_status`: the lease in force, if any.
    pub fn current_lease(&self) -> Result<Option<Lease>, OpError> {
        let env = environment(&self.config);
        Ok(self.store.active_lease(env, jiff::Timestamp::now())?)
    }

    /// `lock`: take (or extend) the environment lease for `caller`; with
    /// `hand_over_from`, take it over from that identity within the same
    /// deployment (callers over SSH only).
    pub fn take_lease(&self, caller: &Caller, req: &LeaseRequest) -> Result<LeaseGranted, OpError> {
        let who = caller.to_string();
        let ttl = check_request(&req.deployment_id, Some(req.ttl_ms))?;
        let env = environment(&self.config).to_string();
        let now = jiff::Timestamp::now();
        let result = match &req.hand_over_from {
            Some(from) => {
                if !matches!(caller, Caller::Ssh { .. }) {
                    return Err(OpError::new(
                        Outcome::ConfigError,
                        "hand_over_from is only accepted from a caller over SSH (deploy-agent serve-stdio)",
                    ));
                }
                self.store
                    .hand_over_lease(
                        &env,
                        &req.deployment_id,
                        from,
                        &who,
                        req.purpose.as_deref(),
                        ttl,
                        now,
                    )
                    .map(|(a, handed)| (a, handed.then(|| from.clone())))
            }
            None => self
                .store
                .acquire_lease(
                    &env,
                    &req.deployment_id,
                    &who,
                    req.purpose.as_deref(),
                    ttl,
                    now,
                )
                .map(|a| (a, None)),
        };
        let (a, handed_from) = match result {
            Ok(r) => r,
            Err(e) => {
                let e = lease_error(e);
                if let Some(h) = &e.holder {
                    let detail = serde_json::json!({
                        "environment": env,
                        "deployment_id": req.deployment_id,
                        "holder": h,
                    });
                    self.audit_lock(&who, "lock.refused", detail)?;
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
            self.audit_lock(&who, "lock.handed_over", detail)?;
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
            self.audit_lock(&who, action, detail)?;
            tracing::info!(who = %who, deployment = %req.deployment_id, "{action} for environment {env}");
        }
        Ok(LeaseGranted {
            lease: a.lease,
            took_over: a.took_over,
        })
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
            self.audit_lock(&who, "lock.released", detail)?;
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
            .acquire_lease(
                "production",
                "d1",
                "mtls:ci",
                Some("deploy of v2"),
                Duration::from_secs(60),
                jiff::Timestamp::now(),
            )
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
}
