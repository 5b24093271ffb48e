//! The SSH transport: a russh client that runs `deploy-agent`
//! on a host whose agent cannot be reached over its HTTPS API.
//!
//! - **Host keys are always verified** against the inventory's
//!   `known_hosts` file. An unknown key is refused (unless
//!   `--accept-new-host-keys`, which records it in that file, says so
//!   loudly and tells the agent, which audits it); a changed key is refused
//!   always. The error names the host, the file and the key's fingerprint.
//! - **Keys**: ed25519 or RSA (SHA-2 signatures), unencrypted, from a file
//!   or from an environment variable holding the key's text (CI secrets).
//! - **One session per host** per controller run, one channel per call:
//!   `deploy-agent serve-stdio` reads one JSON request on stdin and
//!   answers in JSON lines ([`StdioLine`]), streamed as they come.
//! - [`Session::exec`] is also what `deploy-controller install` uses to
//!   run commands and upload files (their bytes on the channel's stdin).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_protocol::{StdioLine, StdioRequest};
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};

use crate::inventory::{SshKeySource, SshSettings};

/// How much of a remote command's stderr is kept for messages.
const STDERR_KEPT: usize = 16 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SshError {
    #[error(
        "the host key of {host} ({key}) is not in the known_hosts file {}: refusing to connect; \
         check the key with the host's administrator, then add it \
         (ssh-keyscan -p {port} {address} >> {}) or run once with --accept-new-host-keys",
        file.display(), file.display()
    )]
    UnknownHostKey {
        host: String,
        address: String,
        port: u16,
        key: String,
        file: PathBuf,
    },
    #[error(
        "the host key of {host} CHANGED: it presents {key}, which does not match line {line} of {}; \
         refusing to connect (a reinstalled host, or someone in the middle). Check with the host's \
         administrator and correct that line",
        file.display()
    )]
    ChangedHostKey {
        host: String,
        key: String,
        file: PathBuf,
        line: usize,
    },
    #[error("cannot check the host key of {host} against {}: {message}", file.display())]
    KnownHosts {
        host: String,
        file: PathBuf,
        message: String,
    },
    #[error("the SSH private key ({source_desc}) is not usable: {message}")]
    Key {
        source_desc: String,
        message: String,
    },
    #[error("cannot connect to sshd at {target}: {message}")]
    Connect { target: String, message: String },
    #[error(
        "sshd at {target} refused the key ({source_desc}) for user {user}: add its public key to that user's authorized_keys"
    )]
    Auth {
        target: String,
        user: String,
        source_desc: String,
    },
    #[error("the SSH session to {target} failed: {message}")]
    Session { target: String, message: String },
}

/// What the host-key check found, kept for the error message.
#[derive(Debug, Clone)]
enum KeyCheck {
    Known,
    Accepted(String),
    Unknown(String),
    Changed { key: String, line: usize },
    Failed(String),
}

struct Verifier {
    host: String,
    address: String,
    port: u16,
    known_hosts: PathBuf,
    accept_new: bool,
    seen: Arc<Mutex<Option<KeyCheck>>>,
}

fn describe_key(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm().as_str(),
        key.fingerprint(HashAlg::Sha256)
    )
}

impl Verifier {
    fn check(&self, key: &PublicKey) -> KeyCheck {
        let described = describe_key(key);
        match russh::keys::check_known_hosts_path(&self.address, self.port, key, &self.known_hosts)
        {
            Ok(true) => KeyCheck::Known,
            Ok(false) if self.accept_new => {
                match learn(&self.address, self.port, key, &self.known_hosts) {
                    Ok(()) => KeyCheck::Accepted(described),
                    Err(e) => {
                        KeyCheck::Failed(format!("cannot add the new key {described} to it: {e}"))
                    }
                }
            }
            Ok(false) => KeyCheck::Unknown(described),
            Err(russh::keys::Error::KeyChanged { line }) => KeyCheck::Changed {
                key: described,
                line,
            },
            Err(e) => KeyCheck::Failed(e.to_string()),
        }
    }
}

/// Appends `[address]:port type key` (or `address type key` on port 22)
/// to a known_hosts file, creating it if needed.
fn learn(address: &str, port: u16, key: &PublicKey, path: &Path) -> Result<(), String> {
    use std::io::Write;
    let openssh = key.to_openssh().map_err(|e| e.to_string())?;
    let host = if port == 22 {
        address.to_string()
    } else {
        format!("[{address}]:{port}")
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let existing = std::fs::read(path).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let sep = if existing.is_empty() || existing.ends_with(b"\n") {
        ""
    } else {
        "\n"
    };
    writeln!(f, "{sep}{host} {openssh}").map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let outcome = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check(key),
            PublicKeyOrCertificate::Certificate(_) => KeyCheck::Failed(format!(
                "host {} presented an SSH certificate; only plain host keys listed in known_hosts are accepted",
                self.host
            )),
        };
        let ok = matches!(outcome, KeyCheck::Known | KeyCheck::Accepted(_));
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(outcome);
        }
        Ok(ok)
    }
}

/// The private key, loaded.
fn load_key(source: &SshKeySource) -> Result<PrivateKey, SshError> {
    let bad = |message: String| SshError::Key {
        source_desc: source.to_string(),
        message,
    };
    let key = match source {
        SshKeySource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                bad(format!(
                    "cannot read it: {e}; set `key` in the inventory's ssh table to the private key file"
                ))
            })?;
            russh::keys::decode_secret_key(&text, None)
        }
        SshKeySource::Env(var) => {
            let text = std::env::var(var).map_err(|_| {
                bad(format!(
                    "the environment variable {var} is not set (or not UTF-8); put the private key's text in it \
                     (e.g. a CI secret), or set `key` to a file instead of `key_env`"
                ))
            })?;
            russh::keys::decode_secret_key(&text, None)
        }
    };
    let key = key.map_err(|e| {
        bad(format!(
            "{e}; give an unencrypted OpenSSH private key (ssh-keygen -t ed25519 -N '')"
        ))
    })?;
    let algorithm = key.algorithm();
    if algorithm.as_str() == "ssh-ed25519" || algorithm.clone().is_rsa() {
        Ok(key)
    } else {
        Err(bad(format!(
            "it is a {} key; use an ed25519 or RSA key",
            algorithm.as_str()
        )))
    }
}

/// An open SSH session to one host.
pub struct Session {
    handle: client::Handle<Verifier>,
    target: String,
    /// `<type> SHA256:…` when this session accepted the host's key as new.
    pub accepted_host_key: Option<String>,
}

/// What a remote command gave back.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// `None` when it ended without an exit status (killed by a signal).
    pub exit_status: Option<u32>,
    pub signal: Option<String>,
    /// The end of its stderr.
    pub stderr: String,
}

impl ExecOutput {
    /// `exit 2`, `signal KILL`, … for messages.
    pub fn describe(&self) -> String {
        match (&self.exit_status, &self.signal) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("signal {s}"),
            (None, None) => "no exit status".into(),
        }
    }
}

impl Session {
    /// Connects, verifies the host key, authenticates.
    pub async fn connect(
        host: &str,
        settings: &SshSettings,
        accept_new: bool,
        timeout: Duration,
    ) -> Result<Session, SshError> {
        let target = settings.target();
        let key = load_key(&settings.key)?;
        if !accept_new && !settings.known_hosts.is_file() {
            return Err(SshError::KnownHosts {
                host: host.to_string(),
                file: settings.known_hosts.clone(),
                message: format!(
                    "the file does not exist; create it with the host's key (ssh-keyscan -p {} {} > {})",
                    settings.port,
                    settings.address,
                    settings.known_hosts.display()
                ),
            });
        }
        let seen = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            host: host.to_string(),
            address: settings.address.clone(),
            port: settings.port,
            known_hosts: settings.known_hosts.clone(),
            accept_new,
            seen: seen.clone(),
        };
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            inactivity_timeout: None,
            nodelay: true,
            ..client::Config::default()
        });
        let connecting =
            client::connect(config, (settings.address.as_str(), settings.port), verifier);
        let connected = tokio::time::timeout(timeout, connecting).await;
        let key_check = seen.lock().ok().and_then(|s| s.clone());
        let mut handle = match connected {
            Err(_) => {
                return Err(SshError::Connect {
                    target,
                    message: format!("no answer within {timeout:?} (connect_timeout)"),
                });
            }
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                return Err(match key_check {
                    Some(KeyCheck::Unknown(key)) => SshError::UnknownHostKey {
                        host: host.to_string(),
                        address: settings.address.clone(),
                        port: settings.port,
                        key,
                        file: settings.known_hosts.clone(),
                    },
                    Some(KeyCheck::Changed { key, line }) => SshError::ChangedHostKey {
                        host: host.to_string(),
                        key,
                        file: settings.known_hosts.clone(),
                        line,
                    },
                    Some(KeyCheck::Failed(message)) => SshError::KnownHosts {
                        host: host.to_string(),
                        file: settings.known_hosts.clone(),
                        message,
                    },
                    _ => SshError::Connect {
                        target,
                        message: e.to_string(),
                    },
                });
            }
        };
        let accepted_host_key = match key_check {
            Some(KeyCheck::Accepted(k)) => Some(k),
            _ => None,
        };
        let hash = if key.algorithm().is_rsa() {
            tokio::time::timeout(timeout, handle.best_supported_rsa_hash())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                .flatten()
                .or(Some(HashAlg::Sha256))
        } else {
            None
        };
        let auth = tokio::time::timeout(
            timeout,
            handle.authenticate_publickey(
                settings.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            ),
        )
        .await
        .map_err(|_| SshError::Connect {
            target: target.clone(),
            message: format!("authentication did not finish within {timeout:?}"),
        })?
        .map_err(|e| SshError::Session {
            target: target.clone(),
            message: format!("authentication failed: {e}"),
        })?;
        if !auth.success() {
            return Err(SshError::Auth {
                target,
                user: settings.user.clone(),
                source_desc: settings.key.to_string(),
            });
        }
        Ok(Session {
            handle,
            target,
            accepted_host_key,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs `command`, writes `stdin` to it then closes it, and calls
    /// `on_line` with each line of its stdout as it arrives.
    pub async fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<ExecOutput, SshError> {
        let broken = |e: russh::Error| SshError::Session {
            target: self.target.clone(),
            message: e.to_string(),
        };
        let mut channel = self.handle.channel_open_session().await.map_err(broken)?;
        channel.exec(true, command).await.map_err(broken)?;
        if !stdin.is_empty() {
            channel.data(stdin).await.map_err(broken)?;
        }
        channel.eof().await.map_err(broken)?;
        let mut out = ExecOutput {
            exit_status: None,
            signal: None,
            stderr: String::new(),
        };
        let mut stderr: Vec<u8> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    buf.extend_from_slice(&data);
                    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=nl).collect();
                        on_line(line.trim_ascii_end());
                    }
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    stderr.extend_from_slice(&data);
                    if stderr.len() > STDERR_KEPT {
                        let cut = stderr.len() - STDERR_KEPT;
                        stderr.drain(..cut);
                    }
                }
                ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    out.signal = Some(format!("{signal_name:?}"))
                }
                _ => {}
            }
        }
        if !buf.trim_ascii().is_empty() {
            on_line(buf.trim_ascii_end());
        }
        out.stderr = String::from_utf8_lossy(&stderr).trim().to_string();
        Ok(out)
    }

    /// Closes the session.
    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "done", "en")
            .await;
    }
}

/// `'text'` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The remote command line that runs `deploy-agent ARGS` on the host:
/// the inventory's `env` assignments, its `command`, then `args`.
pub fn agent_command(settings: &SshSettings, args: &str) -> String {
    let mut cmd = String::new();
    if !settings.env.is_empty() {
        cmd.push_str("env ");
        for (k, v) in &settings.env {
            cmd.push_str(&shell_quote(&format!("{k}={v}")));
            cmd.push(' ');
        }
    }
    cmd.push_str(&settings.command);
    cmd.push(' ');
    cmd.push_str(args);
    cmd
}

/// What one `serve-stdio` call gave back.
#[derive(Debug)]
pub struct StdioOutcome {
    pub exec: ExecOutput,
    /// Lines that were not JSON of a known kind (kept for messages).
    pub stray: Vec<String>,
}

/// Runs `deploy-agent serve-stdio` with `req`; each answer line goes to
/// `on_line` as it comes.
pub async fn serve_stdio(
    session: &Session,
    settings: &SshSettings,
    req: &StdioRequest,
    mut on_line: impl FnMut(StdioLine),
) -> Result<StdioOutcome, SshError> {
    let mut input = serde_json::to_vec(req).map_err(|e| SshError::Session {
        target: session.target.clone(),
        message: format!("cannot encode the request: {e}"),
    })?;
    input.push(b'\n');
    let mut stray = Vec::new();
    let exec =
        session
            .exec(&agent_command(settings, "serve-stdio"), &input, |line| {
                match serde_json::from_slice::<StdioLine>(line) {
                    Ok(l) => on_line(l),
                    Err(_) => {
                        if stray.len() < 20 {
                            stray.push(String::from_utf8_lossy(line).to_string());
                        }
                    }
                }
            })
            .await?;
    Ok(StdioOutcome { exec, stray })
}

/// Whether a path is absolute and plain (install targets are quoted, but
/// a path with a newline or a NUL is refused outright).
pub fn plain_path(p: &Path) -> bool {
    let s = p.to_string_lossy();
    p.is_absolute() && !s.contains(['\n', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("deploy-agent"), "deploy-agent");
        assert_eq!(shell_quote("/a b"), "'/a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn the_remote_command_sets_the_environment() {
        let mut s = SshSettings {
            address: "h".into(),
            port: 22,
            user: "u".into(),
            key: SshKeySource::Env("K".into()),
            known_hosts: "/kh".into(),
            command: "/usr/bin/deploy-agent".into(),
            env: BTreeMap::new(),
        };
        assert_eq!(
            agent_command(&s, "serve-stdio"),
            "/usr/bin/deploy-agent serve-stdio"
        );
        s.env
            .insert("DEPLOY_AGENT_STATE_DIR".into(), "/tmp/a b".into());
        s.env.insert("A".into(), "1".into());
        assert_eq!(
            agent_command(&s, "serve-stdio"),
            "env A=1 'DEPLOY_AGENT_STATE_DIR=/tmp/a b' /usr/bin/deploy-agent serve-stdio"
        );
    }

    #[test]
    fn keys_from_the_environment_must_be_there_and_usable() {
        let e = load_key(&SshKeySource::Env("DEPLOY_TEST_SURELY_UNSET_KEY".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("DEPLOY_TEST_SURELY_UNSET_KEY") && e.contains("not set"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id");
        std::fs::write(&p, "not a key").unwrap();
        let e = load_key(&SshKeySource::File(p.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        let e = load_key(&SshKeySource::File(dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
