//! A throw-away OpenSSH server on 127.0.0.1 for the SSH transport's tests
//!: its own host key, a client key pair in `authorized_keys`, a
//! `known_hosts` file that lists the host key, `ExposeAuthInfo yes` (so the
//! remote command can tell which key logged in), on a free high port.
//!
//! It runs `/usr/sbin/sshd -D -e -f CONFIG` as the current user (root in
//! CI: `.ci/run` installs openssh-server). Without `/usr/sbin/sshd` or
//! `ssh-keygen` the test PANICS saying so: SSH tests never skip.

use std::fs::{self, File};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::free_port;

const SSHD: &str = "/usr/sbin/sshd";

/// Key types for [`Sshd::key_pair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Ed25519,
    Rsa,
}

impl KeyType {
    fn arg(self) -> &'static [&'static str] {
        match self {
            KeyType::Ed25519 => &["-t", "ed25519"],
            KeyType::Rsa => &["-t", "rsa", "-b", "3072"],
        }
    }
}

/// A private key file and its public key line.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private: PathBuf,
    /// `ssh-ed25519 AAAA… comment`.
    pub public: String,
    /// `SHA256:…` as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
}

/// Panics with a clear message unless sshd and ssh-keygen are installed.
pub fn require_sshd() {
    assert!(
        Path::new(SSHD).is_file(),
        "{SSHD} is missing: the SSH transport's tests need a real OpenSSH server \
         (apt-get install openssh-server; .ci/run installs it)"
    );
    let ok = Command::new("ssh-keygen")
        .arg("-?")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "ssh-keygen is missing: apt-get install openssh-client (openssh-server depends on it)"
    );
}

/// Generates a key pair in `dir` (no passphrase).
pub fn key_pair(dir: &Path, name: &str, kind: KeyType) -> KeyPair {
    let private = dir.join(name);
    let _ = fs::remove_file(&private);
    let _ = fs::remove_file(private.with_extension("pub"));
    let out = Command::new("ssh-keygen")
        .args(kind.arg())
        .args(["-q", "-N", "", "-C", name, "-f"])
        .arg(&private)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = fs::read_to_string(format!("{}.pub", private.display()))
        .expect("read the public key")
        .trim()
        .to_string();
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(format!("{}.pub", private.display()))
        .output()
        .expect("run ssh-keygen -lf");
    let fingerprint = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    KeyPair {
        private,
        public,
        fingerprint,
    }
}

/// One sshd. Dropping it stops it.
pub struct Sshd {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub host_key: KeyPair,
    /// A client key in `authorized_keys`.
    pub client_key: KeyPair,
    /// A `known_hosts` file listing this server's host key.
    pub known_hosts: PathBuf,
}

impl Sshd {
    /// An sshd whose authorized client key is an ed25519 key.
    pub fn start() -> Sshd {
        Sshd::start_with(KeyType::Ed25519)
    }

    /// An sshd whose authorized client key is of type `client`.
    pub fn start_with(client: KeyType) -> Sshd {
        require_sshd();
        // sshd refuses to start without its privilege separation directory.
        let _ = fs::create_dir_all("/run/sshd");
        let dir = tempfile::Builder::new()
            .prefix("deploy-sshd-")
            .tempdir()
            .expect("temporary directory for sshd");
        let host_key = key_pair(dir.path(), "host_ed25519", KeyType::Ed25519);
        let client_key = key_pair(dir.path(), "client_key", client);
        fs::write(
            dir.path().join("authorized_keys"),
            format!("{}\n", client_key.public),
        )
        .expect("write authorized_keys");
        let port = free_port();
        let known_hosts = dir.path().join("known_hosts");
        let mut sshd = Sshd {
            port,
            dir,
            child: None,
            host_key,
            client_key,
            known_hosts,
        };
        fs::write(&sshd.known_hosts, sshd.known_hosts_line()).expect("write known_hosts");
        sshd.spawn();
        sshd
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let config = d.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 StrictModes no\nUsePAM no\nPidFile {pid}\nExposeAuthInfo yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nLogLevel VERBOSE\nMaxStartups 100\nMaxSessions 100\n",
                port = self.port,
                hk = self.host_key.private.display(),
                ak = d.join("authorized_keys").display(),
                pid = d.join("sshd.pid").display(),
            ),
        )
        .expect("write sshd_config");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the sshd log");
        let mut c = Command::new(SSHD);
        c.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs in the child.
        unsafe {
            c.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "{SSHD} exited ({status}) before listening on 127.0.0.1:{}:\n{}",
                    self.port,
                    self.log()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{SSHD} did not listen on 127.0.0.1:{} within 10 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// The temporary directory of this server (keys, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// How many logins with a public key sshd accepted so far.
    pub fn accepted_logins(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// This server's `known_hosts` line: `[127.0.0.1]:PORT ssh-ed25519 AAAA…`.
    pub fn known_hosts_line(&self) -> String {
        let mut parts = self.host_key.public.split_whitespace();
        let kind = parts.next().unwrap_or_default();
        let key = parts.next().unwrap_or_default();
        format!("[127.0.0.1]:{} {kind} {key}\n", self.port)
    }

    /// A `known_hosts` file in this server's directory that lists another
    /// key for this server: what a reinstalled host (or someone in the
    /// middle) looks like.
    pub fn wrong_known_hosts(&self) -> PathBuf {
        let other = key_pair(self.dir.path(), "other_host_key", KeyType::Ed25519);
        let mut parts = other.public.split_whitespace();
        let kind = parts.next().unwrap_or_default();
        let key = parts.next().unwrap_or_default();
        let path = self.dir.path().join("known_hosts_wrong");
        fs::write(&path, format!("[127.0.0.1]:{} {kind} {key}\n", self.port))
            .expect("write known_hosts_wrong");
        path
    }

    /// An empty `known_hosts` file (the host is unknown).
    pub fn empty_known_hosts(&self) -> PathBuf {
        let path = self.dir.path().join("known_hosts_empty");
        fs::write(&path, "").expect("write known_hosts_empty");
        path
    }

    /// The Unix user the tests log in as (the current user).
    pub fn user() -> String {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
