//! Handing the listening sockets to a successor proxy, so that the proxy
//! itself can be upgraded (or restarted) without refusing a connection.
//!
//! Restarting a proxy closes its listening sockets: until the new process
//! binds them again, connections are refused, and those waiting in the old
//! accept queues are reset. Instead, like nginx's binary upgrade and
//! Envoy's hot restart, the successor is given the very same sockets:
//!
//! 1. The successor (`deploy-agent proxy --take-over`) connects to the
//!    control socket and sends `{"op":"hand_over","pid":N}`.
//! 2. The running proxy takes its registry lock (no route changes from now
//!    on) and answers one [`Message::Listeners`] line with every listening
//!    socket attached (`SCM_RIGHTS`), in the same order as the routes, with
//!    each route's response counters so the observation gates' figures
//!    carry on.
//! 3. The successor reads the persisted routes (unchanged, since the lock
//!    is held), binds its control socket under a temporary name and answers
//!    [`Message::Ready`].
//! 4. The running proxy renames that socket over `proxy.sock` (atomic: a
//!    client finds one proxy or the other, never none), answers
//!    [`Message::Done`] and stops accepting; it tells HTTP/1 clients
//!    `Connection: close` on their next response and exits once its open
//!    connections are done.
//! 5. The successor starts accepting on the shared sockets: connections
//!    queued meanwhile are accepted by it.
//!
//! Anything going wrong before step 4 leaves the running proxy as it was.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, Interest};
use tokio::net::UnixStream;

use super::protocol::{ClassCounts, ControlRequest};
use super::{HANDOVER_TIMEOUT, ProxyError, SOCKET_FILE};

/// At most this many sockets go in one handover (the kernel's limit for
/// one `SCM_RIGHTS` message is 253).
pub(crate) const MAX_LISTENERS: usize = 250;

/// Longest handover line accepted.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// The handover conversation after the successor's request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "handover", rename_all = "snake_case")]
pub(crate) enum Message {
    /// Running → successor, with the sockets attached in this order.
    Listeners { routes: Vec<HandedRoute> },
    /// Successor → running: its control socket is bound as `socket` (a file
    /// name in the state directory).
    Ready { socket: String },
    /// Running → successor: `proxy.sock` is yours; start accepting.
    Done,
    /// Either way: the handover is off; the running proxy keeps serving.
    Refused { message: String },
}

/// One listening socket as handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HandedRoute {
    pub(crate) bind: SocketAddr,
    /// The route's response counters by release (`""`: requests with no
    /// backend), so that they continue in the successor.
    pub(crate) releases: BTreeMap<String, ClassCounts>,
}

/// The file name under which a successor binds its control socket.
pub(crate) fn successor_socket_name(pid: u32) -> String {
    format!("{SOCKET_FILE}.{pid}")
}

// ---- the running proxy's side ----------------------------------------------

/// Sends `message` with `sockets` attached to its first byte.
pub(crate) async fn send_with_sockets(
    stream: &UnixStream,
    message: &Message,
    sockets: &[RawFd],
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut sent = 0;
    while sent < line.len() {
        stream.writable().await?;
        let attempt = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&line[sent..])];
            let rights = [ControlMessage::ScmRights(sockets)];
            let cmsgs: &[ControlMessage] = if sent == 0 && !sockets.is_empty() {
                &rights
            } else {
                &[]
            };
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match attempt {
            Ok(n) => sent += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Sends one message line without sockets.
pub(crate) async fn send(stream: &UnixStream, message: &Message) -> io::Result<()> {
    send_with_sockets(stream, message, &[]).await
}

/// Waits for the successor's [`Message::Ready`] and checks the socket name
/// it gives (a file of the state directory, named after its pid).
pub(crate) async fn await_ready(stream: &mut UnixStream, successor: u32) -> Result<String, String> {
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stream);
    let read = tokio::time::timeout(HANDOVER_TIMEOUT, reader.read_line(&mut line)).await;
    match read {
        Err(_) => Err(format!(
            "process {successor} was not ready within {HANDOVER_TIMEOUT:?}"
        )),
        Ok(Err(err)) => Err(format!("reading from process {successor}: {err}")),
        Ok(Ok(0)) => Err(format!(
            "process {successor} hung up before it was ready (see its log)"
        )),
        Ok(Ok(_)) => match serde_json::from_str::<Message>(&line) {
            Ok(Message::Ready { socket }) if socket == successor_socket_name(successor) => {
                Ok(socket)
            }
            Ok(Message::Ready { socket }) => Err(format!(
                "process {successor} bound its control socket as {socket:?}, expected {:?}",
                successor_socket_name(successor)
            )),
            Ok(Message::Refused { message }) => {
                Err(format!("process {successor} gave up: {message}"))
            }
            Ok(other) => Err(format!("process {successor} sent {other:?}")),
            Err(err) => Err(format!(
                "process {successor} sent an invalid line {:?}: {err}",
                line.trim_end()
            )),
        },
    }
}

// ---- the successor's side ---------------------------------------------------

/// What the successor got: the sockets by address, and the conversation to
/// finish once its control socket is bound.
pub(crate) struct Taken {
    stream: BufReader<StdUnixStream>,
    pub(crate) listeners: Vec<(HandedRoute, OwnedFd)>,
}

/// Asks the proxy on `state_dir`'s control socket for its listeners.
/// Blocking: run it before the successor serves anything.
pub(crate) fn take(state_dir: &Path) -> Result<Taken, ProxyError> {
    let socket = state_dir.join(SOCKET_FILE);
    let mut stream =
        StdUnixStream::connect(&socket).map_err(|source| ProxyError::NothingToTakeOver {
            socket: socket.clone(),
            source,
        })?;
    let io_err =
        |what: &str, err: io::Error| ProxyError::io(format!("{what} {}", socket.display()), err);
    stream
        .set_read_timeout(Some(HANDOVER_TIMEOUT))
        .map_err(|err| io_err("cannot set a timeout on", err))?;
    let mut request = serde_json::to_vec(&ControlRequest::HandOver {
        pid: std::process::id(),
    })
    .map_err(|err| ProxyError::Protocol {
        detail: format!("cannot encode the handover request: {err}"),
    })?;
    request.push(b'\n');
    stream
        .write_all(&request)
        .map_err(|err| io_err("cannot send the handover request to", err))?;

    let (line, sockets) = receive_with_sockets(&stream)
        .map_err(|err| io_err("cannot receive the listeners from", err))?;
    let routes = match parse(&line)? {
        Message::Listeners { routes } => routes,
        Message::Refused { message } => return Err(ProxyError::HandoverFailed { detail: message }),
        other => {
            return Err(ProxyError::HandoverFailed {
                detail: format!("unexpected answer {other:?}"),
            });
        }
    };
    if routes.len() != sockets.len() {
        return Err(ProxyError::HandoverFailed {
            detail: format!(
                "{} routes but {} sockets arrived",
                routes.len(),
                sockets.len()
            ),
        });
    }
    Ok(Taken {
        stream: BufReader::new(stream),
        listeners: routes.into_iter().zip(sockets).collect(),
    })
}

impl Taken {
    /// Says the control socket `socket` (a file name in the state directory)
    /// is bound, and waits for the running proxy to hand `proxy.sock` over.
    pub(crate) fn ready(mut self, socket: String) -> Result<(), ProxyError> {
        let mut line =
            serde_json::to_vec(&Message::Ready { socket }).map_err(|err| ProxyError::Protocol {
                detail: format!("cannot encode the ready message: {err}"),
            })?;
        line.push(b'\n');
        let failed = |err: io::Error| ProxyError::HandoverFailed {
            detail: format!("the running proxy went away: {err}"),
        };
        self.stream.get_mut().write_all(&line).map_err(failed)?;
        let mut answer = String::new();
        let read = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_line(&mut answer)
            .map_err(failed)?;
        if read == 0 {
            return Err(ProxyError::HandoverFailed {
                detail:
                    "the running proxy hung up before handing over its control socket (see its log)"
                        .to_string(),
            });
        }
        match parse(answer.as_bytes())? {
            Message::Done => Ok(()),
            Message::Refused { message } => Err(ProxyError::HandoverFailed { detail: message }),
            other => Err(ProxyError::HandoverFailed {
                detail: format!("unexpected answer {other:?}"),
            }),
        }
    }
}

fn parse(line: &[u8]) -> Result<Message, ProxyError> {
    // The running proxy may also answer a plain control error (e.g. an
    // older version that does not know the request).
    if let Ok(super::protocol::ControlResponse::Error { message }) =
        serde_json::from_slice::<super::protocol::ControlResponse>(line)
    {
        return Err(ProxyError::HandoverFailed { detail: message });
    }
    serde_json::from_slice(line).map_err(|err| ProxyError::Protocol {
        detail: format!(
            "invalid handover message {:?}: {err}",
            String::from_utf8_lossy(line).trim_end()
        ),
    })
}

/// Reads one line, collecting the sockets that came with it.
fn receive_with_sockets(stream: &StdUnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut sockets = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while !line.contains(&b'\n') {
        if line.len() > MAX_LINE {
            return Err(io::Error::other(format!(
                "handover line longer than {MAX_LINE} bytes"
            )));
        }
        let mut space = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let bytes = message.bytes;
        for cmsg in message.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel has just installed `fd` in this
                    // process for us (SCM_RIGHTS); nothing else refers to it,
                    // so this is its one owner.
                    sockets.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the running proxy hung up without handing over (see its log)",
            ));
        }
        line.extend_from_slice(&chunk[..bytes]);
    }
    if let Some(end) = line.iter().position(|b| *b == b'\n') {
        line.truncate(end);
    }
    Ok((line, sockets))
}

/// Removes a successor's control socket that was never handed `proxy.sock`.
pub(crate) fn remove_successor_socket(state_dir: &Path, name: &str) {
    let path: PathBuf = state_dir.join(name);
    if let Err(err) = std::fs::remove_file(&path) {
        tracing::debug!("cannot remove {}: {err}", path.display());
    }
}
