//! The agent's API: its whole HTTP face, derived from the operation table
//! (`deploy_protocol::ops`).
//!
//! - [`router`]: one route per row of the table (`/v1/…` and `/metrics`),
//!   each handing the request to [`Api::dispatch`] with the caller as a
//!   [`Caller`]. The daemon serves it on `agent.sock` (the peer's Unix user
//!   from `SO_PEERCRED`; a request from `serve-stdio` may name its SSH
//!   caller, see [`via`]) and over HTTPS.
//! - [`tls`]: the HTTPS listener (`api_listen` in agent.toml). Each request
//!   is authorized ([`authz`]) by the client certificate's identity and the
//!   role `[grants]` gives it in this agent's `environment`; a refusal is a
//!   403 with an [`ApiError`] saying who, where and what role, and an
//!   `api.denied` audit record.
//! - [`status_of`]: the one mapping from an error to an HTTP status.
//!
//! Invariant: statuses, headers and bodies are chosen here and nowhere
//! else; the engine answers with domain errors ([`OpError`]).

pub mod authz;
mod dispatch;
pub mod limits;
pub mod tls;
pub mod via;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{self, ConnectInfo};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use deploy_protocol::ops::{Input, Method, OPERATIONS};
use deploy_protocol::{Caller, Op, jsonl};
use tokio::net::UnixListener;

pub use dispatch::{Answer, Api, typed};

use crate::engine::OpError;
use crate::wire::{ApiError, Outcome};

/// The largest request body accepted (a compose file travels in it).
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// Who is on the other end of a connection: an axum `ConnectInfo`, set
/// from `SO_PEERCRED` on agent.sock and from the client certificate over
/// HTTPS.
#[derive(Clone, Debug)]
pub struct Peer {
    pub caller: Caller,
}

impl connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        let user = stream
            .io()
            .peer_cred()
            .map(|c| unix_user(c.uid()))
            .unwrap_or_else(|_| "unknown".into());
        Peer {
            caller: Caller::unix(user),
        }
    }
}

/// The name of a uid (or `uid=N` when it has none).
pub fn unix_user(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => format!("uid={uid}"),
    }
}

/// The caller of this process (the CLI, `serve-stdio`).
pub fn process_user() -> String {
    unix_user(nix::unistd::getuid().as_raw())
}

/// The HTTP status of an error answer.
pub fn status_of(e: &OpError) -> StatusCode {
    if e.not_found {
        return StatusCode::NOT_FOUND;
    }
    match e.outcome {
        Outcome::ConfigError => StatusCode::BAD_REQUEST,
        Outcome::Denied => StatusCode::FORBIDDEN,
        Outcome::Locked => StatusCode::CONFLICT,
        Outcome::RegistryError => StatusCode::BAD_GATEWAY,
        Outcome::EnvironmentError => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer: its status and the [`ApiError`] JSON.
pub fn error_response(e: OpError) -> Response {
    let status = status_of(&e);
    json_response(status, &e.into_api())
}

/// An [`ApiError`] as an answer.
pub fn api_error_response(status: StatusCode, e: &ApiError) -> Response {
    json_response(status, e)
}

fn json_response<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// An answer as HTTP: JSON, text, or JSON lines streamed as they come.
pub fn answer_response(op: Op, answer: Answer) -> Response {
    match answer {
        Answer::Json(v) => json_response(StatusCode::OK, &v),
        Answer::Text(t) => {
            let content_type = if op == Op::Metrics {
                crate::metrics::CONTENT_TYPE
            } else {
                "text/plain; charset=utf-8"
            };
            ([(header::CONTENT_TYPE, content_type)], t).into_response()
        }
        Answer::Events(rx) => {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let event = rx.recv().await?;
                Some((
                    Ok::<_, std::convert::Infallible>(jsonl::encode(&event).unwrap_or_default()),
                    rx,
                ))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(Body::from_stream(stream))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

/// The request's JSON: its body, or its query as an object.
fn input(op: Op, uri: &Uri, body: &Bytes) -> Result<serde_json::Value, OpError> {
    let bad = |m: String| OpError::new(Outcome::ConfigError, m);
    match op.spec().input {
        Input::Nothing => Ok(serde_json::Value::Null),
        Input::Query => {
            let q: axum::extract::Query<deploy_protocol::Query> =
                axum::extract::Query::try_from_uri(uri)
                    .map_err(|e| bad(format!("the query of {} is not valid: {e}", op.name())))?;
            serde_json::to_value(q.0).map_err(|e| bad(e.to_string()))
        }
        Input::Body => serde_json::from_slice(body)
            .map_err(|e| bad(format!("the body of {} is not valid JSON: {e}", op.name()))),
    }
}

async fn handle(
    State((api, op)): State<(Arc<Api>, Op)>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    uri: Uri,
    body: Bytes,
) -> Response {
    let input = match input(op, &uri, &body) {
        Ok(v) => v,
        Err(e) => return error_response(e),
    };
    match api.dispatch(op, &peer.caller, input).await {
        Ok(answer) => answer_response(op, answer),
        Err(e) => error_response(e),
    }
}

/// The router of the operation table.
pub fn router(api: Arc<Api>) -> Router {
    let mut router = Router::new();
    for spec in OPERATIONS {
        let filter = match spec.method {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Delete => MethodFilter::DELETE,
        };
        for path in std::iter::once(spec.path).chain(spec.alias) {
            router = router.route(path, on(filter, handle).with_state((api.clone(), spec.op)));
        }
    }
    router.layer(DefaultBodyLimit::max(MAX_REQUEST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_statuses() {
        let st = |o| status_of(&OpError::new(o, "x"));
        assert_eq!(st(Outcome::Denied), StatusCode::FORBIDDEN);
        assert_eq!(st(Outcome::Locked), StatusCode::CONFLICT);
        assert_eq!(st(Outcome::ConfigError), StatusCode::BAD_REQUEST);
        assert_eq!(st(Outcome::RegistryError), StatusCode::BAD_GATEWAY);
        assert_eq!(
            st(Outcome::EnvironmentError),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status_of(&OpError::not_found("x")), StatusCode::NOT_FOUND);
    }
}
