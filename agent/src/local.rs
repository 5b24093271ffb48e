//! The local door: how the CLI and `serve-stdio` reach the engine. A
//! request goes to the daemon on `STATE_DIR/agent.sock` (HTTP/1.1, the
//! operation table's method and path) when one answers; otherwise this
//! process opens the engine and does the work itself, under the same host
//! lock, through the same [`Api::dispatch`]. Either way the answer is a
//! [`Reply`].

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use deploy_protocol::jsonl::Splitter;
use deploy_protocol::ops::{Input, Output};
use deploy_protocol::{Caller, Op, Query};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::api::{self, Answer, Api};
use crate::config::{AgentConfig, DEFAULT_CONFIG};
use crate::engine::{Engine, OpError};
use crate::wire::{ApiError, Event, Outcome, ServedBy};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot talk to the deploy-agent daemon on {socket}: {message}")]
    Daemon { socket: String, message: String },
}

/// An answer, from the daemon or from this process.
pub enum Reply {
    Json(serde_json::Value),
    Text(String),
    Events(Events),
    /// A refusal or failure, with the HTTP status the API answers it with.
    Refused {
        status: u16,
        error: ApiError,
    },
}

impl Reply {
    pub fn refused(e: OpError) -> Reply {
        Reply::Refused {
            status: api::status_of(&e).as_u16(),
            error: e.into_api(),
        }
    }

    fn from_answer(a: Answer) -> Reply {
        match a {
            Answer::Json(v) => Reply::Json(v),
            Answer::Text(t) => Reply::Text(t),
            Answer::Events(rx) => Reply::Events(Events::Local(rx)),
        }
    }

    /// A JSON answer, typed; a refusal as the [`OpError`] it was.
    pub fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, OpError> {
        match self {
            Reply::Json(v) => serde_json::from_value(v).map_err(|e| {
                OpError::new(Outcome::EnvironmentError, format!("unexpected answer: {e}"))
            }),
            Reply::Refused { error, .. } => Err(OpError::new(error.outcome, error.message)),
            Reply::Text(_) | Reply::Events(_) => Err(OpError::new(
                Outcome::EnvironmentError,
                "unexpected answer: not a JSON document",
            )),
        }
    }
}

/// The events of a deploy or rollback, as they come.
pub enum Events {
    /// JSON lines streamed by the daemon.
    Daemon {
        body: hyper::body::Incoming,
        lines: Splitter,
    },
    /// An operation running in this process.
    Local(mpsc::UnboundedReceiver<Event>),
}

impl Events {
    /// The next event; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Event, String>> {
        match self {
            Events::Local(rx) => rx.recv().await.map(Ok),
            Events::Daemon { body, lines } => loop {
                if let Some(line) = lines.next_line() {
                    return Some(
                        serde_json::from_slice(&line)
                            .map_err(|e| format!("unexpected answer from the daemon: {e}")),
                    );
                }
                match body.frame().await? {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref()
                            && let Err(e) = lines.push(data)
                        {
                            return Some(Err(e.to_string()));
                        }
                    }
                    Err(e) => {
                        return Some(Err(format!(
                            "the daemon's answer broke off: {e}; it finishes the operation on its own (see `deploy-agent status`)"
                        )));
                    }
                }
            },
        }
    }
}

async fn connect(
    socket: &Path,
) -> Result<Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>, ClientError> {
    let err = |message: String| ClientError::Daemon {
        socket: socket.display().to_string(),
        message,
    };
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(None);
        }
        Err(e) => return Err(err(e.to_string())),
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Some(sender))
}

/// Sends `op` with `input` (its body, or its [`Query`] as JSON) to the
/// daemon on `socket`, with extra `headers`; `Ok(None)` when no daemon
/// answers there.
pub async fn call(
    socket: &Path,
    op: Op,
    input: &serde_json::Value,
    headers: &[(&'static str, String)],
) -> Result<Option<Reply>, ClientError> {
    let err = |message: String| ClientError::Daemon {
        socket: socket.display().to_string(),
        message,
    };
    let spec = op.spec();
    let (path, body) = match spec.input {
        Input::Nothing => (spec.path.to_string(), None),
        Input::Query => {
            let q: Query = api::typed(op, input.clone()).map_err(|e| err(e.message))?;
            (op.path_and_query(&q), None)
        }
        Input::Body => (
            spec.path.to_string(),
            Some(serde_json::to_vec(input).map_err(|e| err(e.to_string()))?),
        ),
    };
    let Some(mut sender) = connect(socket).await? else {
        return Ok(None);
    };
    let mut req = http::Request::builder()
        .method(spec.method.as_str())
        .uri(path)
        .header("host", "localhost");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let body = resp.into_body();
    if status.is_success() && spec.output == Output::Events {
        return Ok(Some(Reply::Events(Events::Daemon {
            body,
            lines: Splitter::new(),
        })));
    }
    let bytes = body
        .collect()
        .await
        .map_err(|e| err(format!("cannot read its answer: {e}")))?
        .to_bytes();
    if !status.is_success() {
        let error = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            ApiError::new(
                Outcome::EnvironmentError,
                format!(
                    "the daemon answered {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
            )
        });
        return Ok(Some(Reply::Refused {
            status: status.as_u16(),
            error,
        }));
    }
    Ok(Some(match spec.output {
        Output::Text => Reply::Text(String::from_utf8_lossy(&bytes).to_string()),
        _ => Reply::Json(
            serde_json::from_slice(&bytes).map_err(|e| err(format!("unexpected answer: {e}")))?,
        ),
    }))
}

/// The local door of one process: the daemon if it answers, else an
/// engine of its own, opened on first need.
pub struct Local {
    pub state_dir: PathBuf,
    /// `--config`; `None`: the default file, if present.
    config_path: Option<PathBuf>,
    /// Headers for the daemon (`serve-stdio`'s SSH caller).
    headers: Vec<(&'static str, String)>,
    api: Option<Api>,
}

impl Local {
    pub fn new(state_dir: &Path, config_path: Option<PathBuf>) -> Local {
        Local {
            state_dir: state_dir.to_path_buf(),
            config_path,
            headers: Vec::new(),
            api: None,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Local {
        self.headers.push((name, value));
        self
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("agent.sock")
    }

    /// Hands `op` to the daemon; `Ok(None)` when none answers.
    pub async fn via_daemon(
        &self,
        op: Op,
        input: &serde_json::Value,
    ) -> Result<Option<Reply>, ClientError> {
        call(&self.socket(), op, input, &self.headers).await
    }

    /// Does `op` in this process (no daemon answers).
    pub async fn in_process(&mut self, op: Op, caller: &Caller, input: serde_json::Value) -> Reply {
        if op == Op::Deploy && input.get("no_wait") == Some(&serde_json::Value::Bool(true)) {
            return Reply::refused(OpError::new(
                Outcome::ConfigError,
                format!(
                    "no_wait (--no-wait) needs the daemon (deploy-agent run) to finish the observation window, and none answers on {}",
                    self.socket().display()
                ),
            ));
        }
        let api = match self.api().await {
            Ok(api) => api,
            Err(e) => return Reply::refused(e),
        };
        match api.dispatch(op, caller, input).await {
            Ok(answer) => Reply::from_answer(answer),
            Err(e) => Reply::refused(e),
        }
    }

    /// Hands `op` to the daemon, else does it here; says which.
    pub async fn perform(
        &mut self,
        op: Op,
        caller: &Caller,
        input: serde_json::Value,
    ) -> Result<(ServedBy, Reply), ClientError> {
        if let Some(reply) = self.via_daemon(op, &input).await? {
            return Ok((ServedBy::Daemon, reply));
        }
        Ok((
            ServedBy::InProcess,
            self.in_process(op, caller, input).await,
        ))
    }

    /// This process's engine, opened on first use.
    pub async fn api(&mut self) -> Result<&Api, OpError> {
        if self.api.is_none() {
            let (path, required) = match &self.config_path {
                Some(p) => (p.clone(), true),
                None => (PathBuf::from(DEFAULT_CONFIG), false),
            };
            let config = AgentConfig::load(&path, required)
                .map_err(|e| OpError::new(Outcome::ConfigError, e.to_string()))?;
            let engine = Engine::open(&self.state_dir, config).await?;
            self.api = Some(Api::in_process(engine));
        }
        self.api
            .as_ref()
            .ok_or_else(|| OpError::new(Outcome::EnvironmentError, "the engine did not open"))
    }

    /// Sends webhook notifications still queued by an operation done here.
    pub async fn finish(&self) {
        if let Some(api) = &self.api {
            api.engine.notifier.flush_before_exit().await;
        }
    }
}
