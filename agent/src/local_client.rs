//! The CLI's side of the local API: HTTP/1.1 over `STATE_DIR/agent.sock`.
//!
//! `Ok(None)` from these calls means "no daemon answers": the CLI then does
//! the work itself, under the same `HostLock`.

use std::io::ErrorKind;
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::wire::{ApiError, Event};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot talk to the deploy-agent daemon on {socket}: {message}")]
    Daemon { socket: String, message: String },
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

/// POST an operation; call `on_event` for each streamed event until it
/// returns false (the daemon carries on with the operation regardless).
pub async fn post_operation(
    socket: &Path,
    path: &str,
    body: &impl Serialize,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<Option<()>, ClientError> {
    let err = |message: String| ClientError::Daemon {
        socket: socket.display().to_string(),
        message,
    };
    let Some(mut sender) = connect(socket).await? else {
        return Ok(None);
    };
    let json = serde_json::to_vec(body).map_err(|e| err(e.to_string()))?;
    let req = http::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json)))
        .map_err(|e| err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).to_string())
            .unwrap_or_default();
        return Err(err(format!("it answered {status}: {body}")));
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| err(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            buf.extend_from_slice(data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let event: Event = serde_json::from_slice(&line)
                    .map_err(|e| err(format!("unexpected answer: {e}")))?;
                if !on_event(event) {
                    return Ok(Some(()));
                }
            }
        }
    }
    Ok(Some(()))
}

/// GET a JSON document.
pub async fn get_json<T: DeserializeOwned>(
    socket: &Path,
    path: &str,
) -> Result<Option<Result<T, ApiError>>, ClientError> {
    let err = |message: String| ClientError::Daemon {
        socket: socket.display().to_string(),
        message,
    };
    let Some(mut sender) = connect(socket).await? else {
        return Ok(None);
    };
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| err(e.to_string()))?;
    let ok = resp.status().is_success();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    if ok {
        let v =
            serde_json::from_slice(&bytes).map_err(|e| err(format!("unexpected answer: {e}")))?;
        Ok(Some(Ok(v)))
    } else {
        let e: ApiError = serde_json::from_slice(&bytes)
            .map_err(|e| err(format!("unexpected error answer: {e}")))?;
        Ok(Some(Err(e)))
    }
}

// --- SSH transport (issue 5) ------------------------------------------------

/// A response of the daemon, its body still unread.
pub struct RawResponse {
    pub status: u16,
    pub body: hyper::body::Incoming,
}

/// Sends one request with extra headers (`serve-stdio` adds the SSH
/// caller's); `Ok(None)` when no daemon answers on `socket`.
pub async fn send(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&'static str, String)],
) -> Result<Option<RawResponse>, ClientError> {
    let err = |message: String| ClientError::Daemon {
        socket: socket.display().to_string(),
        message,
    };
    let Some(mut sender) = connect(socket).await? else {
        return Ok(None);
    };
    let mut req = http::Request::builder()
        .method(method)
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
    Ok(Some(RawResponse {
        status: resp.status().as_u16(),
        body: resp.into_body(),
    }))
}

// --- end issue 5 --------------------------------------------------------------
