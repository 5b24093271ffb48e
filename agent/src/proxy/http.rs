//! HTTP mode: one hyper service per accepted connection, forwarding each
//! request to a backend picked from the listener's current route table.
//!
//! Request bodies are buffered (up to [`MAX_REQUEST_BODY`]) so that a request
//! that never reached a backend can be sent again to another one; that is
//! what hides the instant a container stops. Response bodies stream.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::routes::{Lease, RouteTable};

/// Largest request body the proxy buffers; larger requests get 413.
pub(crate) const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

/// Body of the proxy's own 502.
const BAD_GATEWAY: &str = "bad gateway: backend unavailable\n";

/// The response body type of the proxy's service.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What a connection's service needs to forward requests.
#[derive(Clone)]
pub(crate) struct HttpContext {
    /// The listener's route table, reloaded for every request so that a
    /// keep-alive connection follows route switches between its requests.
    pub(crate) table: Arc<ArcSwap<RouteTable>>,
    pub(crate) bind: SocketAddr,
    pub(crate) peer: SocketAddr,
    /// Set when a successor proxy took the listener over: HTTP/1 responses
    /// then carry `Connection: close` (HTTP/2 clients get a GOAWAY instead).
    pub(crate) closing: Arc<AtomicBool>,
}

/// The service function: never fails, errors become 4xx/5xx responses.
pub(crate) async fn serve_request(
    req: Request<Incoming>,
    ctx: HttpContext,
) -> Result<Response<ProxyBody>, Infallible> {
    let http1 = req.version() <= Version::HTTP_11;
    let mut response = forward(req, &ctx).await;
    if http1 && ctx.closing.load(Ordering::SeqCst) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// The request, cleaned up for the backend, minus the URI's authority (which
/// depends on the backend picked).
struct Outgoing {
    method: Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    body: Bytes,
}

impl Outgoing {
    fn to_request(&self, backend: SocketAddr) -> Result<Request<Full<Bytes>>, http::Error> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(backend.to_string())
            .path_and_query(self.path_and_query.clone())
            .build()?;
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        // Backends are spoken to in HTTP/1.1, whatever the client used.
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers.clone();
        Ok(request)
    }
}

async fn forward(req: Request<Incoming>, ctx: &HttpContext) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let client_version = parts.version;

    let body = match read_body(&parts.headers, body).await {
        Ok(body) => body,
        Err(status) => {
            ctx.table.load().unrouted.record(status);
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request body too large\n"
            } else {
                "cannot read request body\n"
            };
            return plain(status, message);
        }
    };

    let mut headers = parts.headers;
    let host = original_host(&headers, &parts.uri);
    prepare_request_headers(&mut headers, host.as_ref(), ctx.peer);
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        headers,
        body,
    };

    // One try, plus one retry when the request certainly (or, for idempotent
    // methods, harmlessly) did not get processed.
    let mut avoid = None;
    loop {
        // Reload: if the route switched since the first attempt, the retry
        // goes to the new backends.
        let table = ctx.table.load();
        let Some(lease) = table.pick(avoid) else {
            table.unrouted.record_failure();
            return plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n");
        };
        drop(table);
        let target = lease.target();

        let request = match outgoing.to_request(target.addr) {
            Ok(request) => request,
            Err(err) => {
                tracing::warn!(bind = %ctx.bind, path = %outgoing.path_and_query, "cannot build the upstream request: {err}");
                target.counts.record_failure();
                return plain(StatusCode::BAD_GATEWAY, BAD_GATEWAY);
            }
        };

        match target.client.request(request).await {
            Ok(response) => {
                target.counts.record(response.status());
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = client_version;
                let body = LeasedBody { inner: body, lease };
                return Response::from_parts(parts, body.boxed_unsync());
            }
            Err(err) if avoid.is_none() && is_retryable(&err, &outgoing.method) => {
                tracing::debug!(
                    bind = %ctx.bind,
                    backend = %target.addr,
                    container = %target.container,
                    "request did not reach the backend, retrying: {}",
                    error_chain(&err)
                );
                avoid = Some(target.addr);
            }
            Err(err) => {
                tracing::warn!(
                    bind = %ctx.bind,
                    backend = %target.addr,
                    container = %target.container,
                    release = %target.release,
                    method = %outgoing.method,
                    path = %outgoing.path_and_query,
                    "cannot forward request: {}",
                    error_chain(&err)
                );
                target.counts.record_failure();
                return plain(StatusCode::BAD_GATEWAY, BAD_GATEWAY);
            }
        }
    }
}

/// Buffers the request body, refusing bodies over [`MAX_REQUEST_BODY`].
async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, StatusCode> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_REQUEST_BODY as u64) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        }
        // The client sent a malformed body or went away.
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// The host the client asked for: the Host header, or (HTTP/2) the URI's
/// authority.
fn original_host(headers: &HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    headers.get(header::HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// Makes the client's headers fit for the backend: hop-by-hop headers go,
/// Host is kept (set from the authority for HTTP/2 clients), and the
/// X-Forwarded-* headers tell the app who really called.
fn prepare_request_headers(headers: &mut HeaderMap, host: Option<&HeaderValue>, peer: SocketAddr) {
    strip_hop_by_hop(headers);
    // The body is already buffered; the backend must not wait for a
    // `100 Continue` round trip.
    headers.remove(header::EXPECT);

    if let Some(host) = host {
        headers.insert(header::HOST, host.clone());
        if !headers.contains_key("x-forwarded-host") {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
        }
    }

    // `::ffff:a.b.c.d` (a v4 client on a dual-stack listener) as `a.b.c.d`.
    let peer_ip = peer.ip().to_canonical().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(previous) if !previous.trim().is_empty() => format!("{previous}, {peer_ip}"),
        _ => peer_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
    // Kept when present: a TLS terminator in front of the proxy knows better.
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
    }
}

/// Removes the headers that describe one connection rather than the message
/// (RFC 9110 section 7.6.1), including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
    ] {
        headers.remove(name);
    }
    let proxy_headers: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy_headers {
        headers.remove(name);
    }
}

/// Whether a failed forward may be sent again.
///
/// Always when the request provably never left: the connection could not be
/// established, or hyper dropped the request before writing it. For
/// idempotent methods also when the connection broke before any response
/// (typically a keep-alive connection the backend closed at the same instant,
/// or a container stopping): running such a request twice is harmless by
/// definition, while answering 502 is not.
fn is_retryable(err: &hyper_util::client::legacy::Error, method: &Method) -> bool {
    if err.is_connect() {
        return true;
    }
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(hyper_err) = cause.downcast_ref::<hyper::Error>() {
            if hyper_err.is_canceled() {
                return true;
            }
            if is_idempotent(method) && (hyper_err.is_incomplete_message() || hyper_err.is_closed())
            {
                return true;
            }
        }
        if let Some(io_err) = cause.downcast_ref::<io::Error>()
            && is_idempotent(method)
            && matches!(
                io_err.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// "outer: inner: innermost", because hyper's own messages are terse.
fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A short plain-text response produced by the proxy itself.
fn plain(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(message.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The backend's response body, holding the backend's [`Lease`] until hyper
/// drops it: after the last byte went to the client, or when the client went
/// away. Until then the backend counts as having a request in flight.
struct LeasedBody {
    inner: Incoming,
    #[allow(dead_code)] // held for its Drop
    lease: Lease,
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_forwarding_headers_added() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("proxy-authorization", HeaderValue::from_static("basic x"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        let host = HeaderValue::from_static("example.com");
        let peer = SocketAddr::from(([192, 0, 2, 7], 5555));

        prepare_request_headers(&mut headers, Some(&host), peer);

        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "transfer-encoding",
            "upgrade",
            "te",
        ] {
            assert!(!headers.contains_key(gone), "{gone} should be stripped");
        }
        assert_eq!(headers["x-app"], "kept");
        assert_eq!(headers["host"], "example.com");
        assert_eq!(headers["x-forwarded-host"], "example.com");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "http");
    }
}
