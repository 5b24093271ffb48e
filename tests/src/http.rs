//! A minimal HTTP/1.1 client on hyper, for one-off requests to 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONNECTION, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The answer to [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// The body, whitespace-trimmed (the demo images answer `v1\n`).
    pub body: String,
}

/// `GET http://127.0.0.1:{port}{path}` on a new connection, with a timeout.
/// Errors are strings meant for assertion messages.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<HttpResponse, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async {
        match tokio::time::timeout(timeout, get_new_connection(port, path, None)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "GET http://127.0.0.1:{port}{path}: no answer within {timeout:?}"
            )),
        }
    })
}

/// One request on a fresh TCP connection with `Connection: close`.
pub(crate) async fn get_new_connection(
    port: u16,
    path: &str,
    authorization: Option<&str>,
) -> Result<HttpResponse, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::get(path)
        .header(HOST, format!("127.0.0.1:{port}"))
        .header(CONNECTION, "close");
    if let Some(a) = authorization {
        req = req.header(AUTHORIZATION, a);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET {addr}{path}: {}", error_chain(&e)))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {addr}{path}: reading body: {}", error_chain(&e)))?
        .to_bytes();
    conn.abort();
    Ok(HttpResponse {
        status,
        body: body_text(&body),
    })
}

/// The body as trimmed text, cut at 200 characters.
pub(crate) fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// An error and its sources, `a: b: c`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
