//! The `HostLock`: one operation per project on a host at a time, shared by
//! the control daemon and the CLI (which does the work itself when no daemon
//! runs, e.g. over SSH).
//!
//! It is an advisory `flock` on `STATE_DIR/locks/PROJECT.lock`. Why flock and
//! not a lock row in the store: the kernel releases it when its holder dies,
//! so a `kill -9` can never leave a stale lock behind. The holder writes who
//! it is into the file so that a second operation can say who holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy_protocol::caller::RECONCILER;
use serde::{Deserialize, Serialize};

/// How long an operation waits for a reconciliation pass holding its
/// project's lock, whatever its own `--lock-wait`.
pub const RECONCILIATION_WAIT: Duration = Duration::from_secs(120);

/// Who holds a `HostLock`, as written in the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOwner {
    pub pid: u32,
    pub user: String,
    /// e.g. `deploy of v2`.
    pub operation: String,
    /// UTC, RFC 3339.
    pub since: String,
}

impl std::fmt::Display for LockOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}, user {}, since {})",
            self.operation, self.pid, self.user, self.since
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "project {project} is locked by another operation: {}; wait for it, or retry with --lock-wait DURATION",
        holder.as_ref().map(ToString::to_string).unwrap_or_else(|| "holder unknown".into())
    )]
    Held {
        project: String,
        holder: Option<LockOwner>,
    },
    #[error("cannot use the lock file {path}: {source}; check --state-dir and its permissions")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held until dropped.
#[derive(Debug)]
pub struct HostLock {
    _file: File,
    path: PathBuf,
}

impl HostLock {
    /// Take the lock for `project`, waiting up to `wait` (none: fail at
    /// once). A reconciliation pass holding it is always waited for, up to
    /// [`RECONCILIATION_WAIT`]: the agent repairing drift must not turn a
    /// deploy away.
    pub async fn acquire(
        state_dir: &Path,
        project: &str,
        owner: &LockOwner,
        wait: Option<Duration>,
    ) -> Result<HostLock, LockError> {
        let started = Instant::now();
        let deadline = started + wait.unwrap_or_default();
        let mut said = false;
        loop {
            if let Some(lock) = Self::try_acquire(state_dir, project, owner)? {
                return Ok(lock);
            }
            if Instant::now() >= deadline {
                let holder = Self::holder_named(state_dir, project).await;
                let reconciling = holder.as_ref().is_some_and(|h| h.user == RECONCILER);
                if !(reconciling && started.elapsed() < RECONCILIATION_WAIT) {
                    return Err(LockError::Held {
                        project: project.to_string(),
                        holder,
                    });
                }
                if !said {
                    said = true;
                    tracing::info!(
                        project,
                        "waiting for the agent's reconciliation pass to finish (at most {}s)",
                        RECONCILIATION_WAIT.as_secs()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Who holds the lock, read until the holder has written its name: it
    /// writes it right after taking the lock, so a reader racing it may
    /// find the file empty for a moment.
    async fn holder_named(state_dir: &Path, project: &str) -> Option<LockOwner> {
        for _ in 0..50 {
            if let Some(h) = Self::holder(state_dir, project) {
                return Some(h);
            }
            if !Self::is_held(state_dir, project) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self::holder(state_dir, project)
    }

    /// Whether anyone holds the lock now.
    fn is_held(state_dir: &Path, project: &str) -> bool {
        File::open(lock_path(state_dir, project))
            .map(|f| f.try_lock_shared().is_err())
            .unwrap_or(false)
    }

    /// Take the lock if it is free; `Ok(None)` when someone holds it.
    pub fn try_acquire(
        state_dir: &Path,
        project: &str,
        owner: &LockOwner,
    ) -> Result<Option<HostLock>, LockError> {
        let path = lock_path(state_dir, project);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let text = serde_json::to_string(owner).unwrap_or_default();
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        Ok(Some(HostLock { _file: file, path }))
    }

    /// Who holds the lock now; `None` when nobody does (the file keeps the
    /// last holder's name after it is released, so check the lock itself).
    pub fn holder(state_dir: &Path, project: &str) -> Option<LockOwner> {
        let mut file = File::open(lock_path(state_dir, project)).ok()?;
        if file.try_lock_shared().is_ok() {
            return None;
        }
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn lock_path(state_dir: &Path, project: &str) -> PathBuf {
    state_dir.join("locks").join(format!("{project}.lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(op: &str) -> LockOwner {
        LockOwner {
            pid: std::process::id(),
            user: "tester".into(),
            operation: op.into(),
            since: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn second_acquire_fails_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = HostLock::acquire(dir.path(), "web", &owner("deploy of v2"), None)
            .await
            .unwrap();
        let err = HostLock::acquire(dir.path(), "web", &owner("deploy of v3"), None)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("deploy of v2"), "{msg}");
        assert!(msg.contains("--lock-wait"), "{msg}");
    }

    #[tokio::test]
    async fn a_reconciliation_pass_is_waited_for_not_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let pass = LockOwner {
            user: RECONCILER.into(),
            ..owner("reconciliation")
        };
        let held = HostLock::acquire(dir.path(), "web", &pass, None)
            .await
            .unwrap();
        let path = dir.path().to_path_buf();
        // No --lock-wait at all: a CI deploy arriving during a repair.
        let deploy = tokio::spawn(async move {
            HostLock::acquire(&path, "web", &owner("deploy of v2"), None).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !deploy.is_finished(),
            "the deploy gave up on a reconciliation pass"
        );
        drop(held);
        let got = deploy.await.unwrap().unwrap();
        assert_eq!(
            HostLock::holder(dir.path(), "web").map(|o| o.operation),
            Some("deploy of v2".to_string())
        );
        drop(got);
    }

    #[tokio::test]
    async fn a_refusal_names_a_holder_that_is_still_writing_its_name() {
        // The holder takes the flock, then writes who it is: a second
        // operation refused in between must still name it.
        let dir = tempfile::tempdir().unwrap();
        let path = lock_path(dir.path(), "web");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.try_lock().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut file = file;
            let text = serde_json::to_string(&owner("deploy of v2")).unwrap();
            file.write_all(text.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(file);
        });
        let err = HostLock::acquire(dir.path(), "web", &owner("deploy of v3"), None)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("deploy of v2"), "{msg}");
        assert!(!msg.contains("holder unknown"), "{msg}");
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn other_projects_are_independent() {
        let dir = tempfile::tempdir().unwrap();
        let _a = HostLock::acquire(dir.path(), "a", &owner("x"), None)
            .await
            .unwrap();
        assert!(
            HostLock::acquire(dir.path(), "b", &owner("y"), None)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn waiting_acquire_gets_the_lock_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = HostLock::acquire(dir.path(), "web", &owner("first"), None)
            .await
            .unwrap();
        let path = dir.path().to_path_buf();
        let waiter = tokio::spawn(async move {
            HostLock::acquire(
                &path,
                "web",
                &owner("second"),
                Some(Duration::from_secs(10)),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(
            HostLock::holder(dir.path(), "web").map(|o| o.operation),
            Some("second".to_string())
        );
        drop(got);
        assert_eq!(HostLock::holder(dir.path(), "web"), None, "released");
    }
}
