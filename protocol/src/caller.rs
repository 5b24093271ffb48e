//! Who makes a request, as a type.
//!
//! Records (the engine's operations, the environment lease, the audit log)
//! keep the caller as text, [`Caller`]'s `Display`: `unix:<user>`,
//! `mtls:<certificate identity>`, `ssh:<user> (claimed: key=… from=…
//! controller=…)`, or the agent itself. Decisions are made on the type,
//! never on the text.
//!
//! What the text states as fact is what the kernel or the TLS handshake
//! vouched for (the Unix user, the certificate's identity); an SSH
//! caller's key, address and controller are what it said, and the text
//! says so.

use std::fmt;

use crate::wire::SshCaller;

/// The identity recorded for the agent's own repairs.
pub const RECONCILER: &str = "deploy-agent (reconciliation)";

/// Who makes a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A local user: the CLI's own user, or the peer of `agent.sock` as
    /// the kernel reports it (`SO_PEERCRED`). `user` is a name, or
    /// `uid=N` when the uid has none.
    Unix { user: String },
    /// A client certificate over the HTTPS API: its identity (CN).
    Mtls { identity: String },
    /// A request over SSH (`deploy-agent serve-stdio`): `user` is the Unix
    /// user it runs as, as the kernel reported it (fact); `via` the SSH
    /// details it reported (claims: see [`SshCaller`]).
    Ssh { user: String, via: Box<SshCaller> },
    /// The agent itself (reconciliation).
    Agent,
}

/// How a caller reached the agent: the kind of a [`Caller`], also readable
/// back from a recorded identity ([`Transport::of_recorded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Mtls,
    Ssh,
    Agent,
}

impl Transport {
    /// The transport a recorded identity (an audit record's `who`) names.
    pub fn of_recorded(who: &str) -> Option<Transport> {
        if who.starts_with(MTLS) {
            Some(Transport::Mtls)
        } else if who.starts_with(SSH) {
            Some(Transport::Ssh)
        } else if who.starts_with(UNIX) {
            Some(Transport::Unix)
        } else if who == RECONCILER {
            Some(Transport::Agent)
        } else {
            None
        }
    }
}

const UNIX: &str = "unix:";
const MTLS: &str = "mtls:";
const SSH: &str = "ssh:";

impl Caller {
    pub fn unix(user: impl Into<String>) -> Caller {
        Caller::Unix { user: user.into() }
    }

    pub fn mtls(identity: impl Into<String>) -> Caller {
        Caller::Mtls {
            identity: identity.into(),
        }
    }

    pub fn transport(&self) -> Transport {
        match self {
            Caller::Unix { .. } => Transport::Unix,
            Caller::Mtls { .. } => Transport::Mtls,
            Caller::Ssh { .. } => Transport::Ssh,
            Caller::Agent => Transport::Agent,
        }
    }

    /// The certificate identity of an mTLS caller.
    pub fn mtls_identity(&self) -> Option<&str> {
        match self {
            Caller::Mtls { identity } => Some(identity),
            _ => None,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unix { user } => write!(f, "{UNIX}{user}"),
            Caller::Mtls { identity } => write!(f, "{MTLS}{identity}"),
            Caller::Ssh { user, via } => f.write_str(&via.who(user)),
            Caller::Agent => f.write_str(RECONCILER),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_identities_read_back_as_their_transport() {
        let ssh = Caller::Ssh {
            user: "deploy".into(),
            via: Box::new(SshCaller {
                user: "deploy".into(),
                key_fingerprint: "SHA256:abc".into(),
                client_ip: "10.0.0.5".into(),
                controller: Some("ci".into()),
                op: "deploy".into(),
                ..SshCaller::default()
            }),
        };
        for (c, text, t) in [
            (Caller::unix("root"), "unix:root", Transport::Unix),
            (
                Caller::mtls("ci-production"),
                "mtls:ci-production",
                Transport::Mtls,
            ),
            (
                ssh,
                "ssh:deploy (claimed: key=SHA256:abc from=10.0.0.5 controller=ci)",
                Transport::Ssh,
            ),
            (Caller::Agent, RECONCILER, Transport::Agent),
        ] {
            assert_eq!(c.to_string(), text);
            assert_eq!(c.transport(), t);
            assert_eq!(Transport::of_recorded(text), Some(t));
        }
        assert_eq!(Transport::of_recorded("someone"), None);
        assert_eq!(Caller::mtls("x").mtls_identity(), Some("x"));
        assert_eq!(Caller::unix("x").mtls_identity(), None);
    }
}
