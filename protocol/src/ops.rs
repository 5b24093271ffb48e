//! The operation table: every operation of the agent's API, once.
//!
//! Each [`Op`] has a [`Spec`]: its HTTP method and path (the `/v1` API, on
//! `agent.sock` and over mutual TLS), the [`Role`] it needs, what it takes
//! (nothing, a [`Query`], or a JSON body), whether its answer streams
//! (JSON lines of [`Event`]s, the last one the result) and whether
//! `serve-stdio` (the SSH transport) offers it. Its request and response
//! types are tied to it by a [`Call`] type in [`call`].
//!
//! Everything that speaks the API is derived from this table: the agent's
//! router and role check, `serve-stdio`'s op ↔ route mapping, and the
//! controller's client. A path written anywhere else is a bug.
//!
//! The table also holds the one query-limit policy ([`Query::limit_for`]).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::wire::{
    ApprovalRecorded, ApprovalRequest, DeployRequest, GiveUpLeaseRequest, HistoryEntry, Lease,
    LeaseGranted, LeaseRequest, OperationResult, PullRequest, PullResult, ReleaseInfo, Role,
    RollbackRequest, StatusReport,
};
use crate::{AuditRecord, Event};

/// An operation of the agent's API. Its serde name is `serve-stdio`'s `op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Ping,
    Deploy,
    Rollback,
    Status,
    History,
    Pull,
    Audit,
    Release,
    /// Take (or extend) the environment lease. Its `op` name over SSH is
    /// `lock`, as before the lease had one name.
    #[serde(rename = "lock")]
    TakeLease,
    #[serde(rename = "lock_status")]
    LeaseStatus,
    #[serde(rename = "renew")]
    RenewLease,
    #[serde(rename = "unlock")]
    GiveUpLease,
    Approve,
    Metrics,
}

/// The HTTP method of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// What an operation takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Nothing.
    Nothing,
    /// A [`Query`] (in the URL; `serve-stdio`'s `request` object).
    Query,
    /// A JSON body (`serve-stdio`'s `request` object).
    Body,
}

/// What an operation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One JSON document.
    Json,
    /// JSON lines: [`Event::Progress`]s, then one [`Event::Result`].
    Events,
    /// Plain text (`ping`: `ok`; `metrics`: the Prometheus text format).
    Text,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub op: Op,
    pub method: Method,
    pub path: &'static str,
    /// A former path of the operation, still routed to it (and checked
    /// against the same role).
    pub alias: Option<&'static str>,
    /// The role an mTLS identity needs (the unix socket trusts its users).
    pub role: Role,
    pub input: Input,
    pub output: Output,
    /// Offered by `deploy-agent serve-stdio` (the SSH transport).
    pub over_ssh: bool,
}

impl Spec {
    /// Whether the answer is a stream of events.
    pub fn streams(&self) -> bool {
        self.output == Output::Events
    }
}

const fn spec(
    op: Op,
    method: Method,
    path: &'static str,
    role: Role,
    input: Input,
    output: Output,
    over_ssh: bool,
) -> Spec {
    Spec {
        op,
        method,
        path,
        alias: None,
        role,
        input,
        output,
        over_ssh,
    }
}

const fn formerly(alias: &'static str, mut spec: Spec) -> Spec {
    spec.alias = Some(alias);
    spec
}

use Input::{Body, Nothing};
use Method::{Delete, Get, Post};
use Output::{Events, Json, Text};
use Role::{Approver, Deployer, Reader};

/// The table. Deny by default: a route not in it needs [`Role::Deployer`]
/// (and is not found anyway).
#[rustfmt::skip]
pub const OPERATIONS: [Spec; 14] = [
    spec(Op::Ping,        Get,    "/v1/ping",        Reader,   Nothing,      Text,   true),
    spec(Op::Deploy,      Post,   "/v1/deploy",      Deployer, Body,         Events, true),
    spec(Op::Rollback,    Post,   "/v1/rollback",    Deployer, Body,         Events, true),
    spec(Op::Status,      Get,    "/v1/status",      Reader,   Input::Query, Json,   true),
    spec(Op::History,     Get,    "/v1/history",     Reader,   Input::Query, Json,   true),
    spec(Op::Pull,        Post,   "/v1/pull",        Deployer, Body,         Json,   true),
    spec(Op::Audit,       Get,    "/v1/audit",       Reader,   Input::Query, Json,   true),
    spec(Op::Release,     Get,    "/v1/release",     Reader,   Input::Query, Json,   true),
    formerly("/v1/lock",
    spec(Op::TakeLease,   Post,   "/v1/lease",       Deployer, Body,         Json,   true)),
    formerly("/v1/lock",
    spec(Op::LeaseStatus, Get,    "/v1/lease",       Reader,   Nothing,      Json,   true)),
    formerly("/v1/lock/renew",
    spec(Op::RenewLease,  Post,   "/v1/lease/renew", Deployer, Body,         Json,   true)),
    formerly("/v1/lock",
    spec(Op::GiveUpLease, Delete, "/v1/lease",       Deployer, Body,         Json,   true)),
    spec(Op::Approve,     Post,   "/v1/approvals",   Approver, Body,         Json,   false),
    spec(Op::Metrics,     Get,    "/metrics",        Reader,   Nothing,      Text,   false),
];

impl Op {
    /// Every operation, in table order.
    pub fn all() -> impl Iterator<Item = Op> {
        OPERATIONS.iter().map(|s| s.op)
    }

    pub fn spec(self) -> &'static Spec {
        // The table holds every variant exactly once (a test checks it).
        OPERATIONS
            .iter()
            .find(|s| s.op == self)
            .unwrap_or(&OPERATIONS[0])
    }

    /// The operation's name: `serve-stdio`'s `op`, and the word in messages.
    pub fn name(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Deploy => "deploy",
            Op::Rollback => "rollback",
            Op::Status => "status",
            Op::History => "history",
            Op::Pull => "pull",
            Op::Audit => "audit",
            Op::Release => "release",
            Op::TakeLease => "lock",
            Op::LeaseStatus => "lock_status",
            Op::RenewLease => "renew",
            Op::GiveUpLease => "unlock",
            Op::Approve => "approve",
            Op::Metrics => "metrics",
        }
    }

    /// The operation a request line names (`HEAD` reads as `GET`).
    pub fn route(method: &str, path: &str) -> Option<Op> {
        let method = if method == "HEAD" { "GET" } else { method };
        OPERATIONS
            .iter()
            .find(|s| (s.path == path || s.alias == Some(path)) && s.method.as_str() == method)
            .map(|s| s.op)
    }

    /// The role a request needs: its operation's, else (an unknown route,
    /// another method) [`Role::Deployer`]: deny by default.
    pub fn required_role(method: &str, path: &str) -> Role {
        Op::route(method, path)
            .map(|op| op.spec().role)
            .unwrap_or(Role::Deployer)
    }

    /// Path and query of a request of this operation.
    pub fn path_and_query(self, query: &Query) -> String {
        let spec = self.spec();
        if spec.input != Input::Query {
            return spec.path.to_string();
        }
        let mut pairs = Vec::new();
        if self == Op::Audit || query.limit.is_some() {
            pairs.push(format!("limit={}", query.limit_for(self)));
        }
        if let Some(p) = &query.project {
            pairs.push(format!("project={}", encode(p)));
        }
        if let Some(r) = &query.release {
            pairs.push(format!("release={}", encode(r)));
        }
        if pairs.is_empty() {
            spec.path.to_string()
        } else {
            format!("{}?{}", spec.path, pairs.join("&"))
        }
    }
}

/// The query of a read operation (`status`, `history`, `audit`,
/// `release`): URL parameters over HTTP, the `request` object over SSH.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

impl Query {
    pub fn project(project: &str) -> Query {
        Query {
            project: Some(project.to_string()),
            ..Query::default()
        }
    }

    /// The number of rows `op` answers with: the query's `limit`, else the
    /// operation's default, never more than its maximum.
    pub fn limit_for(&self, op: Op) -> usize {
        let (default, max) = match op {
            Op::History => (1000, 100_000),
            Op::Audit => (100, 100_000),
            _ => (1000, 100_000),
        };
        self.limit.unwrap_or(default).min(max)
    }

    /// The fields `op` needs, checked before anything is contacted.
    pub fn check(&self, op: Op) -> Result<(), String> {
        match op {
            Op::History if self.project.is_none() => Err(format!(
                "{} needs a project (?project=P; over SSH request.project)",
                op.name()
            )),
            Op::Release if self.project.is_none() || self.release.is_none() => Err(format!(
                "{} needs a project and a release (?project=P&release=R; over SSH request.project and request.release)",
                op.name()
            )),
            _ => Ok(()),
        }
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An operation with its request and response types: the typed face of a
/// row of [`OPERATIONS`], for clients.
pub trait Call {
    const OP: Op;
    /// A [`Query`], a body type, or `()` for none.
    type Request: Serialize + DeserializeOwned + Send + Sync;
    /// The JSON answer; for a streaming operation the final result (the
    /// events before it are handed out as they come).
    type Response: Serialize + DeserializeOwned + Send;
}

/// One [`Call`] type per operation.
pub mod call {
    use super::*;

    macro_rules! calls {
        ($($name:ident: $op:expr, $req:ty => $resp:ty;)*) => {$(
            #[doc = concat!("The `", stringify!($name), "` operation.")]
            pub struct $name;
            impl Call for $name {
                const OP: Op = $op;
                type Request = $req;
                type Response = $resp;
            }
        )*};
    }

    calls! {
        Ping: Op::Ping, () => String;
        Deploy: Op::Deploy, DeployRequest => OperationResult;
        Rollback: Op::Rollback, RollbackRequest => OperationResult;
        Status: Op::Status, Query => StatusReport;
        History: Op::History, Query => Vec<HistoryEntry>;
        Pull: Op::Pull, PullRequest => PullResult;
        Audit: Op::Audit, Query => Vec<AuditRecord>;
        Release: Op::Release, Query => ReleaseInfo;
        TakeLease: Op::TakeLease, LeaseRequest => LeaseGranted;
        LeaseStatus: Op::LeaseStatus, () => Option<Lease>;
        RenewLease: Op::RenewLease, LeaseRequest => Lease;
        GiveUpLease: Op::GiveUpLease, GiveUpLeaseRequest => Option<Lease>;
        Approve: Op::Approve, ApprovalRequest => ApprovalRecorded;
        Metrics: Op::Metrics, () => String;
    }

    /// Keeps [`Event`] in the docs' reach: streamed answers are events.
    pub type Streamed = Event;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_in_the_table_once_and_routes_back_to_itself() {
        let mut seen = std::collections::HashSet::new();
        for s in OPERATIONS {
            assert!(seen.insert(s.op), "{:?} twice", s.op);
            assert_eq!(s.op.spec(), &s);
            assert_eq!(Op::route(s.method.as_str(), s.path), Some(s.op));
            if let Some(alias) = s.alias {
                assert_eq!(Op::route(s.method.as_str(), alias), Some(s.op));
            }
            let json = serde_json::to_string(&s.op).unwrap();
            assert_eq!(json, format!("\"{}\"", s.op.name()));
        }
        assert_eq!(seen.len(), OPERATIONS.len());
    }

    #[test]
    fn reads_need_reader_approvals_approver_everything_else_deployer() {
        for p in [
            "/v1/ping",
            "/v1/status",
            "/v1/history",
            "/v1/audit",
            "/v1/release",
            "/v1/lease",
            "/v1/lock",
            "/metrics",
        ] {
            assert_eq!(Op::required_role("GET", p), Role::Reader, "{p}");
            assert_eq!(Op::required_role("HEAD", p), Role::Reader, "{p}");
        }
        assert_eq!(Op::required_role("POST", "/v1/approvals"), Role::Approver);
        for (m, p) in [
            ("POST", "/v1/deploy"),
            ("POST", "/v1/rollback"),
            ("POST", "/v1/pull"),
            ("POST", "/v1/lease"),
            ("POST", "/v1/lease/renew"),
            ("DELETE", "/v1/lease"),
            ("POST", "/v1/lock"),
            ("POST", "/v1/lock/renew"),
            ("DELETE", "/v1/lock"),
            ("POST", "/v1/status"),
            ("GET", "/v1/unknown"),
            ("GET", "/v1/status/../deploy"),
            ("GET", "/v1/approvals"),
        ] {
            assert_eq!(Op::required_role(m, p), Role::Deployer, "{m} {p}");
        }
    }

    #[test]
    fn queries_encode_and_limits_follow_one_policy() {
        let q = Query {
            project: Some("a b".into()),
            ..Query::default()
        };
        assert_eq!(Op::Status.path_and_query(&q), "/v1/status?project=a%20b");
        assert_eq!(Op::Status.path_and_query(&Query::default()), "/v1/status");
        assert_eq!(
            Op::Audit.path_and_query(&q),
            "/v1/audit?limit=100&project=a%20b"
        );
        let q = Query {
            project: Some("web".into()),
            release: Some("v1".into()),
            limit: Some(1_000_000),
        };
        assert_eq!(q.limit_for(Op::Audit), 100_000);
        assert_eq!(q.limit_for(Op::History), 100_000);
        assert_eq!(Query::default().limit_for(Op::History), 1000);
        assert_eq!(
            Op::Release.path_and_query(&q),
            "/v1/release?limit=100000&project=web&release=v1"
        );
        assert!(Query::default().check(Op::History).is_err());
        assert!(Query::project("web").check(Op::Release).is_err());
        assert!(q.check(Op::Release).is_ok());
        assert_eq!(Op::TakeLease.path_and_query(&q), "/v1/lease");
    }
}
