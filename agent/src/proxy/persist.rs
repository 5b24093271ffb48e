//! The routes file, `STATE_DIR/proxy-routes.json`: what a restarted proxy
//! serves before the daemon says anything.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ProxyError;
use super::ROUTES_FILE;
use super::protocol::Route;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct RoutesFile {
    version: u32,
    routes: Vec<Route>,
}

/// Reads the persisted routes; none if the file does not exist.
///
/// A file that cannot be parsed is moved aside (`.corrupt`) and the proxy
/// starts with no routes rather than not at all: the daemon re-sends its
/// routes when it finds them missing, which it cannot do to a proxy that
/// refuses to start.
pub(crate) fn load(state_dir: &Path) -> Result<Vec<Route>, ProxyError> {
    let path = state_dir.join(ROUTES_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => {
            return Err(ProxyError::io(
                format!("cannot read the routes file {}", path.display()),
                err,
            ));
        }
    };
    match serde_json::from_str::<RoutesFile>(&text) {
        Ok(file) => Ok(file.routes),
        Err(err) => {
            let aside = path.with_extension("json.corrupt");
            tracing::error!(
                "the routes file {} is not valid ({err}); moving it to {} and starting with no routes until the daemon sends them again",
                path.display(),
                aside.display()
            );
            if let Err(err) = fs::rename(&path, &aside) {
                tracing::error!("cannot move {} aside: {err}", path.display());
            }
            Ok(Vec::new())
        }
    }
}

/// Replaces the routes file atomically and durably: write a temporary file,
/// fsync it, rename it over the old one, fsync the directory. Runs on the
/// blocking pool so a slow disk never stalls the data path's workers.
pub(crate) async fn save(state_dir: &Path, routes: Vec<Route>) -> Result<(), ProxyError> {
    let dir = state_dir.to_path_buf();
    let path = dir.join(ROUTES_FILE);
    let written = tokio::task::spawn_blocking(move || save_blocking(&dir, routes)).await;
    match written {
        Ok(result) => result.map_err(|err| {
            ProxyError::io(format!("cannot save the routes to {}", path.display()), err)
        }),
        Err(join_err) => Err(ProxyError::io(
            format!("cannot save the routes to {}", path.display()),
            io::Error::other(join_err.to_string()),
        )),
    }
}

fn save_blocking(dir: &Path, routes: Vec<Route>) -> io::Result<()> {
    let file = RoutesFile {
        version: FORMAT_VERSION,
        routes,
    };
    let mut json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    json.push(b'\n');

    let tmp: PathBuf = dir.join(format!("{ROUTES_FILE}.tmp"));
    let mut out = File::create(&tmp)?;
    out.write_all(&json)?;
    out.sync_all()?;
    drop(out);
    fs::rename(&tmp, dir.join(ROUTES_FILE))?;
    File::open(dir)?.sync_all()
}
