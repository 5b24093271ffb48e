//! Errors of the proxy process and of its control client.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking to the proxy, or running it.
///
/// The messages are shown to operators as-is (the daemon logs them and the
/// CLI prints them), so each says what happened and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Nothing listens on the control socket: the file is missing or the
    /// connection was refused (a stale socket left by a dead proxy).
    #[error(
        "the proxy is not running (no answer on {}): start it with `deploy-agent proxy --state-dir {}` or `systemctl start deploy-proxy`",
        socket.display(),
        state_dir.display()
    )]
    NotRunning {
        socket: PathBuf,
        state_dir: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The proxy answered `Error { message }`: it understood the request but
    /// could not carry it out, and changed nothing (e.g. "cannot listen on
    /// 0.0.0.0:8080: Address already in use (os error 98)").
    #[error("the proxy refused the request: {message}")]
    Rejected { message: String },

    /// The proxy accepted the connection but did not answer in time. The data
    /// path is separate from the control path, so traffic is most likely still
    /// flowing; the proxy may be overloaded or wedged.
    #[error(
        "the proxy did not answer on {} within {timeout:?}: check `journalctl -u deploy-proxy`, and restart it if it stays unresponsive",
        socket.display()
    )]
    Timeout { socket: PathBuf, timeout: Duration },

    /// Another proxy process already answers on the control socket.
    #[error(
        "another proxy is already running on {}: stop it first (`systemctl stop deploy-proxy`) or use another --state-dir",
        socket.display()
    )]
    AlreadyRunning { socket: PathBuf },

    /// The proxy closed the control connection without answering (it was
    /// stopping, or handing over to a successor).
    #[error(
        "the proxy on {} closed the connection without answering: check `journalctl -u deploy-proxy`",
        socket.display()
    )]
    Unanswered { socket: PathBuf },

    /// `deploy-agent proxy --take-over` found no proxy to take over from.
    #[error(
        "nothing to take over: no proxy answers on {}; start it without --take-over",
        socket.display()
    )]
    NothingToTakeOver {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The running proxy refused or broke off the handover; it keeps
    /// serving, and this process exits without having served anything.
    #[error("the running proxy did not hand over its listeners: {detail}")]
    HandoverFailed { detail: String },

    /// A file or socket operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// The peer sent something that is not a valid control message.
    #[error(
        "proxy control protocol error: {detail} (are the daemon and the proxy the same version? restart the proxy after an upgrade)"
    )]
    Protocol { detail: String },
}

impl ProxyError {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ProxyError::Io {
            context: context.into(),
            source,
        }
    }
}
