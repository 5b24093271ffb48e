//! Which transport a call takes: the HTTPS API, or SSH when the agent
//! cannot be reached (see the module doc of [`super`]), and the per-host
//! state that makes the choice sticky.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_protocol::ops::Call;
use deploy_protocol::{Event, LeaseRequest, LeaseToken, Op, OperationResult, ServedBy};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::https::delivery;
use super::{AgentClient, CONNECT_TIMEOUT, CallError, Delivery, error_chain, to_value};
use crate::inventory::{Environment, Host, SshSettings};
use crate::ssh::Session;

/// `--transport`: how the controller reaches the agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The HTTPS API; SSH only for a host whose agent cannot be reached
    /// (refused, timeout, TLS handshake failure) and that has SSH details.
    #[default]
    Auto,
    /// The HTTPS API only.
    Agent,
    /// SSH only (every host needs SSH details).
    Ssh,
}

/// The transport flags of a command.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransportOptions {
    pub transport: Transport,
    /// Accept (and record in known_hosts) the key of a host that is not
    /// there yet. Never a changed key. Said loudly and audited on the host.
    pub accept_new_host_keys: bool,
}

/// Where the controller's warnings about a host's route go.
pub type Notice = Arc<dyn Fn(&str) + Send + Sync>;

/// Which way a call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    Agent,
    Ssh,
}

/// Per-host routing state, shared by the clones of one [`AgentClient`].
pub(super) struct Route {
    pub(super) transport: Transport,
    pub(super) ssh: Option<SshSettings>,
    pub(super) accept_new: bool,
    pub(super) connect_timeout: Duration,
    /// This controller's identity (its certificate's CN), told to the
    /// agent over SSH and used to hand the lease over.
    pub(super) identity: Option<String>,
    pub(super) notice: Option<Notice>,
    pub(super) session: tokio::sync::Mutex<Option<Arc<Session>>>,
    pub(super) state: Mutex<RouteState>,
}

#[derive(Default)]
pub(super) struct RouteState {
    /// Why this host is on SSH (sticky for the rest of the run).
    pub(super) on_ssh: Option<String>,
    /// The lease this run took over mutual TLS, with the token of the
    /// agent's newest answer: what hands it over if the host falls back to
    /// SSH.
    pub(super) held: Option<LeaseRequest>,
    pub(super) pending_handover: Option<LeaseRequest>,
    /// A host key accepted as new in this run, not yet told to the agent.
    pub(super) accepted_host_key: Option<String>,
    /// What the last answer over SSH said about the host: `daemon` or
    /// `in_process`.
    pub(super) served_by: Option<ServedBy>,
    /// Whether the warning that `serve-stdio` changes the host itself (no
    /// daemon) was given since the host was last found with a daemon.
    pub(super) told_in_process: bool,
}

impl Route {
    pub(super) fn agent_only() -> Route {
        Route {
            transport: Transport::Agent,
            ssh: None,
            accept_new: false,
            connect_timeout: CONNECT_TIMEOUT,
            identity: None,
            notice: None,
            session: tokio::sync::Mutex::new(None),
            state: Mutex::new(RouteState::default()),
        }
    }

    pub(super) fn with_state<T>(&self, f: impl FnOnce(&mut RouteState) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    pub(super) fn notice(&self, msg: &str) {
        match &self.notice {
            Some(n) => n(msg),
            None => eprintln!("warning: {msg}"),
        }
    }

    /// A `lock` answered over mutual TLS: the lease and its token (none
    /// from an agent that predates them), for a hand-over to SSH.
    pub(super) fn held_over_mtls(&self, req: &LeaseRequest, token: Option<LeaseToken>) {
        let held = LeaseRequest {
            hand_over_token: token,
            ..req.clone()
        };
        self.with_state(|s| s.held = Some(held));
    }

    pub(super) fn released(&self) {
        self.with_state(|s| {
            s.held = None;
            s.pending_handover = None;
        });
    }
}

/// How a host was reached, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteReport {
    /// `agent` or `ssh`.
    pub transport: &'static str,
    /// Why SSH was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Over SSH: `daemon` (the host's daemon did the work; only its HTTPS
    /// API was unreachable) or `in_process` (no daemon answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<ServedBy>,
}

impl AgentClient {
    pub(super) fn with_route(
        host: &Host,
        http: reqwest::Client,
        transport: Transport,
        env: &Environment,
        opts: &TransportOptions,
        identity: Option<String>,
        notice: &Notice,
    ) -> AgentClient {
        AgentClient {
            host: host.name.clone(),
            addr: host.agent.clone(),
            http,
            tls: None,
            route: Arc::new(Route {
                transport,
                ssh: host.ssh.clone(),
                accept_new: opts.accept_new_host_keys,
                connect_timeout: env.connect_timeout,
                identity,
                notice: Some(notice.clone()),
                session: tokio::sync::Mutex::new(None),
                state: Mutex::new(RouteState::default()),
            }),
        }
    }

    /// How this host was reached so far.
    pub fn route_report(&self) -> RouteReport {
        let (on_ssh, served_by) = self.route.with_state(|s| (s.on_ssh.clone(), s.served_by));
        match (self.route.transport, on_ssh) {
            (Transport::Ssh, None) => RouteReport {
                transport: "ssh",
                reason: Some("--transport ssh".into()),
                served_by,
            },
            (_, Some(reason)) => RouteReport {
                transport: "ssh",
                reason: Some(reason),
                served_by,
            },
            _ => RouteReport {
                transport: "agent",
                reason: None,
                served_by: None,
            },
        }
    }

    /// Whether the next call goes over SSH without trying the agent.
    pub(super) fn ssh_now(&self) -> bool {
        match self.route.transport {
            Transport::Ssh => true,
            Transport::Agent => false,
            Transport::Auto => self.route.with_state(|s| s.on_ssh.is_some()),
        }
    }

    /// After a failed call to the agent: whether to carry on over SSH.
    pub(super) async fn fall_back(&self, e: &CallError) -> bool {
        if self.route.transport != Transport::Auto {
            return false;
        }
        let Some(ssh) = &self.route.ssh else {
            return false;
        };
        let mut reason = match e {
            CallError::Unreachable { message, .. } => message.clone(),
            other => other.to_string(),
        };
        match e.delivery() {
            Delivery::Never => {}
            Delivery::Possible => return false,
            Delivery::Lost => match self.probe().await {
                Some(again) => reason = format!("{reason}; then {again}"),
                None => return false,
            },
        }
        let first = self.route.with_state(|s| {
            let first = s.on_ssh.is_none();
            s.on_ssh = Some(reason.clone());
            // A lease taken over mutual TLS moves to the SSH identity.
            if first && let Some(held) = s.held.take() {
                s.pending_handover = Some(held);
            }
            first
        });
        if first {
            self.route.notice(&format!(
                "host {}: its agent cannot be reached at https://{} ({reason}); falling back to SSH ({}) for this host",
                self.host,
                self.addr,
                ssh.target()
            ));
        }
        true
    }

    /// Asks the agent anything, after a connection that closed with no
    /// answer: `None` if it answers (it is up, so the failed call is not
    /// routed around), else why it did not.
    pub(super) async fn probe(&self) -> Option<String> {
        let sent = self
            .http
            .get(self.url("/v1/lock"))
            .timeout(self.route.connect_timeout + Duration::from_secs(2))
            .send()
            .await;
        match sent {
            Ok(_) => None,
            Err(e) if delivery(&e) != Delivery::Possible => Some(error_chain(&e)),
            Err(_) => None,
        }
    }

    pub(super) async fn routed_via<T, F, Fut>(
        &self,
        op: Op,
        request: serde_json::Value,
        timeout: Duration,
        agent: F,
    ) -> Result<(T, Via), CallError>
    where
        T: DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        if self.ssh_now() {
            return self
                .ssh_call(op, request, timeout, None)
                .await
                .map(|v| (v, Via::Ssh));
        }
        match agent().await {
            Ok(v) => Ok((v, Via::Agent)),
            Err(e) if self.fall_back(&e).await => self
                .ssh_call(op, request, timeout, Some(&e))
                .await
                .map(|v| (v, Via::Ssh)),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn routed_operation<C: Call<Response = OperationResult>>(
        &self,
        req: &C::Request,
        mut on_event: impl FnMut(&Event),
    ) -> Result<OperationResult, CallError> {
        if self.ssh_now() {
            return self
                .ssh_operation(C::OP, to_value(req), &mut on_event, None)
                .await;
        }
        match self.https_operation::<C>(req, &mut on_event).await {
            Err(e) if self.fall_back(&e).await => {
                self.ssh_operation(C::OP, to_value(req), &mut on_event, Some(&e))
                    .await
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_held_over_mtls_keeps_the_token_of_the_newest_answer() {
        let route = Route::agent_only();
        let req = LeaseRequest {
            deployment_id: "d1".into(),
            ttl_ms: 30_000,
            purpose: None,
            hand_over_from: None,
            hand_over_token: None,
        };
        let held = || route.with_state(|s| s.held.clone());
        route.held_over_mtls(&req, Some(LeaseToken::new("first")));
        route.held_over_mtls(&req, Some(LeaseToken::new("second")));
        let h = held().expect("held");
        assert_eq!(h.deployment_id, "d1");
        assert_eq!(h.hand_over_token, Some(LeaseToken::new("second")));
        route.released();
        assert!(held().is_none());
    }
}
