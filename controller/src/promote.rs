//! Image promotion: an environment deploys the exact digests that its
//! source environment (e.g. staging) recorded for the same release id, so
//! production runs the bytes staging ran, whatever the registry's tags say
//! now.
//!
//! The source's agents are asked for their record of the release
//! (`GET /v1/release`). At least one must have run it successfully
//! (`good`: it passed its gates and served); hosts that ran it must agree on
//! the digests. The controller presents the *deploying* environment's
//! client certificate (so that identity needs the `reader` role on the
//! source's agents) and trusts the *source* environment's CA.

use std::collections::BTreeMap;

use deploy_protocol::ReleaseInfo;
use futures_util::future::join_all;

use crate::client::{self, AgentClient, CallError, Notice, TransportOptions};
use crate::exit;
use crate::inventory::{Environment, Inventory, TlsFiles};
use crate::report::Reporter;

/// A refusal: exit code and message.
#[derive(Debug)]
pub struct Refused {
    pub code: i32,
    pub message: String,
}

/// What the source environment says of the release: the digests its hosts
/// ran, and the facts the promotion gates of `crate::policy` need.
#[derive(Debug, Clone)]
pub struct Promoted {
    pub digests: BTreeMap<String, String>,
    /// When the first host that ran it successfully started running it.
    pub first_ran_at: Option<jiff::Timestamp>,
    /// Hosts that ran it successfully and no longer serve it.
    pub not_serving: Vec<String>,
}

/// The digests `source` recorded for `release`.
pub async fn source_digests(
    inv: &Inventory,
    target: &Environment,
    source: &str,
    release: &str,
    out: &std::sync::Arc<Reporter>,
    transport: &TransportOptions,
) -> Result<Promoted, Refused> {
    let src = inv.environment(source).map_err(|e| Refused {
        code: exit::CONFIG,
        message: format!("--promote-from: {e}"),
    })?;
    // Our certificate for the source's CA; SSH when either has none.
    let tls = match (&src.tls, &target.tls) {
        (Some(s), Some(t)) => Some(TlsFiles {
            ca: s.ca.clone(),
            cert: t.cert.clone(),
            key: t.key.clone(),
        }),
        _ => None,
    };
    let notice: Notice = {
        let out = out.clone();
        std::sync::Arc::new(move |m: &str| out.warn(m))
    };
    let clients: Vec<AgentClient> =
        client::clients(src, tls.as_ref(), transport, notice).map_err(|message| Refused {
            code: exit::CONFIG,
            message,
        })?;
    out.phase(&format!(
        "promotion: asking {} host(s) of {source} which digests release {release} of {} ran",
        clients.len(),
        src.project
    ));
    let answers = join_all(clients.iter().map(|c| c.release(&src.project, release))).await;
    decide(source, release, &src.project, &clients, answers, out)
}

fn decide(
    source: &str,
    release: &str,
    project: &str,
    clients: &[AgentClient],
    answers: Vec<Result<Option<ReleaseInfo>, CallError>>,
    out: &Reporter,
) -> Result<Promoted, Refused> {
    let mut good: Vec<(&str, BTreeMap<String, String>)> = Vec::new();
    let mut first_ran_at: Option<jiff::Timestamp> = None;
    let mut not_serving = Vec::new();
    let mut notes = Vec::new();
    let mut errors: Vec<CallError> = Vec::new();
    for (c, a) in clients.iter().zip(answers) {
        match a {
            Ok(Some(info)) if info.state == "good" || info.serving => {
                if let Ok(at) = info.created_at.parse::<jiff::Timestamp>() {
                    first_ran_at = Some(first_ran_at.map_or(at, |f| f.min(at)));
                }
                if !info.serving {
                    not_serving.push(c.host.clone());
                }
                good.push((&c.host, info.digests));
            }
            Ok(Some(info)) => notes.push(format!("{}: {}", c.host, info.state)),
            Ok(None) => notes.push(format!("{}: never deployed", c.host)),
            Err(e) => {
                out.warn(&format!("promotion: {e}"));
                notes.push(format!("{}: unreachable", c.host));
                errors.push(e);
            }
        }
    }
    let Some((first_host, digests)) = good.first().cloned() else {
        if let Some(e) = errors.first()
            && notes.iter().all(|n| n.ends_with("unreachable"))
        {
            return Err(Refused {
                code: e.outcome().exit_code(),
                message: format!(
                    "promotion from {source}: no host of {source} could be asked about release {release}: {e}"
                ),
            });
        }
        return Err(Refused {
            code: exit::DENIED,
            message: format!(
                "promotion gate: release {release} of {project} never ran successfully in {source} ({}); \
                 deploy it to {source} first",
                notes.join(", ")
            ),
        });
    };
    for (host, d) in &good {
        if *d != digests {
            return Err(Refused {
                code: exit::DENIED,
                message: format!(
                    "promotion gate: the hosts of {source} ran different images for release {release}: \
                     {first_host} ran {digests:?}, {host} ran {d:?}; redeploy {release} to {source} so they agree"
                ),
            });
        }
    }
    Ok(Promoted {
        digests,
        first_ran_at,
        not_serving,
    })
}
