//! Calls over SSH: `deploy-agent serve-stdio` on the host, one request
//! per SSH channel, answered in JSON lines ([`StdioLine`]).

use std::sync::Arc;
use std::time::Duration;

use deploy_protocol::{
    Caller, Event, Op, OperationResult, Role, ServedBy, StdioCaller, StdioLine, StdioRequest,
};
use serde::de::DeserializeOwned;

use super::{AgentClient, CallError, snippet, to_value};
use crate::ssh::{self, Session};

impl AgentClient {
    pub(super) fn ssh_error(&self, message: String, agent: Option<&CallError>) -> CallError {
        CallError::Ssh {
            host: self.host.clone(),
            target: self
                .route
                .ssh
                .as_ref()
                .map(|s| s.target())
                .unwrap_or_else(|| "no ssh table".into()),
            message,
            agent: agent.map(|e| match e {
                CallError::Unreachable { message, .. } => message.clone(),
                other => other.to_string(),
            }),
            config: false,
        }
    }

    /// The host's SSH session, connected on first use (and again if it
    /// dropped).
    pub(super) async fn session(
        &self,
        agent: Option<&CallError>,
    ) -> Result<Arc<Session>, CallError> {
        let Some(settings) = &self.route.ssh else {
            return Err(self.ssh_error(
                "this host has no SSH details in the inventory".into(),
                agent,
            ));
        };
        let mut slot = self.route.session.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let session = Session::connect(
            &self.host,
            settings,
            self.route.accept_new,
            self.route.connect_timeout,
        )
        .await
        .map_err(|e| {
            let mut err = self.ssh_error(e.to_string(), agent);
            if let CallError::Ssh { config, .. } = &mut err {
                *config = matches!(e, ssh::SshError::Key { .. });
            }
            err
        })?;
        if let Some(k) = &session.accepted_host_key {
            self.route.notice(&format!(
                "host {}: ACCEPTED A NEW SSH HOST KEY {k} for {} and added it to {} (--accept-new-host-keys); \
                 the host's audit log records it",
                self.host,
                session.target(),
                settings.known_hosts.display()
            ));
            let k = k.clone();
            self.route.with_state(|s| s.accepted_host_key = Some(k));
        }
        let session = Arc::new(session);
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Runs one `serve-stdio` request; lines go to `on_line`.
    pub(super) async fn stdio(
        &self,
        op: Op,
        request: serde_json::Value,
        agent: Option<&CallError>,
        mut on_line: impl FnMut(StdioLine),
    ) -> Result<ssh::StdioOutcome, CallError> {
        let session = self.session(agent).await?;
        let Some(settings) = &self.route.ssh else {
            return Err(self.ssh_error("this host has no SSH details".into(), agent));
        };
        // A lease taken over mutual TLS is handed to the SSH identity first,
        // with the token the agent gave this controller in its `lock` answer
        // (the proof that it is the holder; `held` carries it).
        let handover = self.route.with_state(|s| s.pending_handover.take());
        if let Some(mut held) = handover {
            held.hand_over_from = self
                .route
                .identity
                .as_ref()
                .map(|i| Caller::mtls(i.clone()).to_string());
            let req = StdioRequest {
                op: Op::TakeLease,
                request: to_value(&held),
                caller: self.caller(),
            };
            let mut refused = None;
            let r = ssh::serve_stdio(&session, settings, &req, |l| {
                if let StdioLine::Error { error, .. } = l {
                    refused = Some(error.message);
                }
            })
            .await;
            match (r, refused) {
                (Ok(_), None) => self.route.notice(&format!(
                    "host {}: the environment lock of deployment {} moved to this controller's SSH identity",
                    self.host, held.deployment_id
                )),
                (Ok(_), Some(m)) => self.route.notice(&format!(
                    "host {}: could not move the environment lock to the SSH identity: {m}",
                    self.host
                )),
                (Err(e), _) => self.route.notice(&format!(
                    "host {}: could not move the environment lock to the SSH identity: {e}",
                    self.host
                )),
            }
        }
        let req = StdioRequest {
            op,
            request,
            caller: self.caller(),
        };
        let served_by = &mut None;
        let outcome = ssh::serve_stdio(&session, settings, &req, |line| {
            if let StdioLine::Hello(h) = &line {
                *served_by = Some(h.served_by);
            }
            on_line(line)
        })
        .await
        .map_err(|e| self.ssh_error(e.to_string(), agent))?;
        if let Some(by) = served_by.take() {
            // Said once, and only for an operation that changes the host:
            // a read does no work there worth a warning.
            let changes = op.spec().role == Role::Deployer;
            let tell = self.route.with_state(|s| {
                s.served_by = Some(by);
                let tell = by == ServedBy::InProcess && changes && !s.told_in_process;
                if by != ServedBy::InProcess {
                    s.told_in_process = false;
                } else if tell {
                    s.told_in_process = true;
                }
                tell
            });
            if tell {
                self.route.notice(&format!(
                    "host {}: no deploy-agent daemon answers there; `deploy-agent serve-stdio` does the work itself (a deploy or rollback under the host lock, as the daemon would)",
                    self.host
                ));
            }
        }
        Ok(outcome)
    }

    /// What the controller tells the agent about itself.
    pub(super) fn caller(&self) -> StdioCaller {
        StdioCaller {
            controller: self.route.identity.clone(),
            accepted_host_key: self.route.with_state(|s| s.accepted_host_key.take()),
        }
    }

    pub(super) fn no_answer(
        &self,
        op: Op,
        o: &ssh::StdioOutcome,
        agent: Option<&CallError>,
    ) -> CallError {
        let mut msg = format!(
            "`deploy-agent serve-stdio` ({}) ended with {} and no answer",
            op.name(),
            o.exec.describe()
        );
        if !o.exec.stderr.is_empty() {
            msg.push_str(&format!(": {}", snippet(o.exec.stderr.as_bytes())));
        }
        if !o.stray.is_empty() {
            msg.push_str(&format!(
                " (it printed: {})",
                snippet(o.stray.join(" | ").as_bytes())
            ));
        }
        if o.exec.exit_status == Some(127) {
            msg.push_str(
                "; is deploy-agent installed there? Check `command` in the inventory's ssh table",
            );
        }
        self.ssh_error(msg, agent)
    }

    pub(super) async fn ssh_call<T: DeserializeOwned>(
        &self,
        op: Op,
        request: serde_json::Value,
        timeout: Duration,
        agent: Option<&CallError>,
    ) -> Result<T, CallError> {
        let mut answer = None;
        let mut error = None;
        let run = self.stdio(op, request, agent, |line| match line {
            StdioLine::Answer { body, .. } => answer = Some(body),
            StdioLine::Error { status, error: e } => error = Some((status, e)),
            _ => {}
        });
        let outcome = tokio::time::timeout(timeout, run).await.map_err(|_| {
            self.ssh_error(
                format!(
                    "`deploy-agent serve-stdio` ({}) did not answer within {timeout:?}",
                    op.name()
                ),
                agent,
            )
        })??;
        match (answer, error) {
            (Some(body), _) => serde_json::from_value(body).map_err(|e| {
                self.protocol(format!(
                    "serve-stdio {} answered something unexpected: {e}",
                    op.name()
                ))
            }),
            (None, Some((status, error))) => Err(CallError::Api {
                host: self.host.clone(),
                status,
                error,
            }),
            (None, None) => Err(self.no_answer(op, &outcome, agent)),
        }
    }

    pub(super) async fn ssh_operation(
        &self,
        op: Op,
        request: serde_json::Value,
        on_event: &mut impl FnMut(&Event),
        agent: Option<&CallError>,
    ) -> Result<OperationResult, CallError> {
        let mut result = None;
        let mut error = None;
        let outcome = self
            .stdio(op, request, agent, |line| match line {
                StdioLine::Progress(p) => on_event(&Event::Progress(p)),
                StdioLine::Result(r) => {
                    on_event(&Event::Result(r.clone()));
                    result = Some(r);
                }
                StdioLine::Error { status, error: e } => error = Some((status, e)),
                _ => {}
            })
            .await?;
        match (result, error) {
            (Some(r), _) => Ok(r),
            (None, Some((status, error))) => Err(CallError::Api {
                host: self.host.clone(),
                status,
                error,
            }),
            (None, None) => Err(self.no_answer(op, &outcome, agent)),
        }
    }
}
