//! The environment lock, fleet-wide: a lease on every host's agent, owned
//! by this deployment (its id and the certificate's identity), renewed in
//! the background while the controller runs, released at the end; if the
//! controller dies, the leases expire and the next deployment takes them
//! over (each agent audits that).
//!
//! Two controllers must never both win, and one must always win: every
//! controller takes the lease of the environment's *first* host before any
//! other, so the first host decides; then the others in parallel (two
//! round trips whatever the number of hosts).

use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy_protocol::{GiveUpLeaseRequest, Lease, LeaseRequest, Outcome};
use futures_util::future::join_all;
use tokio::task::JoinHandle;

use crate::client::{AgentClient, CallError};
use crate::report::Reporter;

/// Why the lock could not be taken.
#[derive(Debug)]
pub enum LockFailure {
    /// Another deployment holds it (on `host`).
    Held { host: String, message: String },
    /// A host could not be asked.
    Error(CallError),
}

impl LockFailure {
    pub fn exit_code(&self) -> i32 {
        match self {
            LockFailure::Held { .. } => crate::exit::LOCKED,
            LockFailure::Error(e) => e.outcome().exit_code(),
        }
    }

    pub fn message(&self) -> String {
        match self {
            LockFailure::Held { host, message } => format!("host {host}: {message}"),
            LockFailure::Error(e) => e.to_string(),
        }
    }
}

/// The lease held on every host.
pub struct FleetLease {
    clients: Vec<AgentClient>,
    request: LeaseRequest,
    renewer: Option<JoinHandle<()>>,
}

fn held(e: &CallError) -> Option<&Lease> {
    match e {
        CallError::Api { error, .. } if error.outcome == Outcome::Locked => error.holder.as_deref(),
        _ => None,
    }
}

impl FleetLease {
    /// Takes the lease on every host, waiting up to `wait` for a holder to
    /// finish (none: fail at once).
    pub async fn acquire(
        clients: &[AgentClient],
        deployment_id: &str,
        ttl: Duration,
        purpose: &str,
        wait: Option<Duration>,
        out: &Reporter,
    ) -> Result<FleetLease, LockFailure> {
        let request = LeaseRequest {
            deployment_id: deployment_id.to_string(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            purpose: Some(purpose.to_string()),
            hand_over_from: None,
            hand_over_token: None,
        };
        let deadline = Instant::now() + wait.unwrap_or_default();
        let mut told = false;
        let Some(leader) = clients.first() else {
            return Ok(FleetLease {
                clients: vec![],
                request,
                renewer: None,
            });
        };
        loop {
            // 1. The first host decides who wins.
            let stale = match leader.lock(&request).await {
                Ok(g) => {
                    if let Some(old) = &g.took_over {
                        out.warn(&format!(
                            "host {}: took over the expired lock of deployment {} ({})",
                            leader.host, old.deployment_id, old.identity
                        ));
                    }
                    g.took_over.map(|l| l.deployment_id)
                }
                Err(e) if held(&e).is_some() => {
                    if Instant::now() >= deadline {
                        return Err(LockFailure::Held {
                            host: leader.host.clone(),
                            message: match &e {
                                CallError::Api { error, .. } => error.message.clone(),
                                other => other.to_string(),
                            },
                        });
                    }
                    if !told {
                        out.phase(&format!("waiting for the environment lock: {e}"));
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(LockFailure::Error(e)),
            };
            // 2. The others, in parallel. A host still showing the lease of
            // the deployment we just took over from (its expiry is a few
            // milliseconds later there) is retried until that expiry.
            let lease = FleetLease {
                clients: clients.to_vec(),
                request: request.clone(),
                renewer: None,
            };
            match lease.acquire_rest(stale.as_deref(), ttl, out).await {
                Ok(()) => return Ok(lease),
                Err(failure) => {
                    lease.release(out).await;
                    let retry =
                        matches!(failure, LockFailure::Held { .. }) && Instant::now() < deadline;
                    if !retry {
                        return Err(failure);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn acquire_rest(
        &self,
        stale: Option<&str>,
        ttl: Duration,
        out: &Reporter,
    ) -> Result<(), LockFailure> {
        let mut pending: Vec<&AgentClient> = self.clients.iter().skip(1).collect();
        let give_up = Instant::now() + ttl + Duration::from_secs(1);
        loop {
            let results = join_all(pending.iter().map(|c| c.lock(&self.request))).await;
            let mut again = Vec::new();
            for (c, r) in pending.iter().zip(results) {
                match r {
                    Ok(g) => {
                        if let Some(old) = &g.took_over {
                            out.warn(&format!(
                                "host {}: took over the expired lock of deployment {} ({})",
                                c.host, old.deployment_id, old.identity
                            ));
                        }
                    }
                    Err(e) => match held(&e) {
                        Some(h)
                            if Some(h.deployment_id.as_str()) == stale
                                && Instant::now() < give_up =>
                        {
                            again.push(*c)
                        }
                        Some(_) => {
                            return Err(LockFailure::Held {
                                host: c.host.clone(),
                                message: match &e {
                                    CallError::Api { error, .. } => error.message.clone(),
                                    other => other.to_string(),
                                },
                            });
                        }
                        None => return Err(LockFailure::Error(e)),
                    },
                }
            }
            if again.is_empty() {
                return Ok(());
            }
            pending = again;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Renews the lease on every host every third of its TTL, until
    /// [`FleetLease::release`]. A host that says the lease is no longer ours
    /// is reported at once; its agent will refuse this deployment from then on.
    pub fn start_renewal(&mut self, ttl: Duration, out: Arc<Reporter>) {
        let clients = self.clients.clone();
        let request = self.request.clone();
        let every = (ttl / 3).max(Duration::from_millis(200));
        self.renewer = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let results = join_all(clients.iter().map(|c| c.renew(&request))).await;
                for (c, r) in clients.iter().zip(results) {
                    if let Err(e) = r {
                        out.warn(&format!(
                            "cannot renew the environment lock on {}: {e}",
                            c.host
                        ));
                    }
                }
            }
        }));
    }

    /// Stops renewing and gives the lease up on every host.
    pub async fn release(mut self, out: &Reporter) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        let req = GiveUpLeaseRequest {
            deployment_id: self.request.deployment_id.clone(),
        };
        let results = join_all(self.clients.iter().map(|c| c.unlock(&req))).await;
        for (c, r) in self.clients.iter().zip(results) {
            if let Err(e) = r {
                out.warn(&format!(
                    "cannot release the environment lock on {}: {e}; it expires by itself",
                    c.host
                ));
            }
        }
    }
}

impl Drop for FleetLease {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }
}
