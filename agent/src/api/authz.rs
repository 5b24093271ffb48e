//! Authorization of the HTTPS API: who (the client certificate's identity)
//! may call what (the role a route needs), in this agent's environment.
//!
//! Pure functions, so that the whole table is unit-tested. The unix socket
//! does not go through here: a local user who can open `agent.sock` (mode
//! 0660) is trusted as a deployer.

use std::collections::BTreeMap;

use http::Method;

use deploy_protocol::{Caller, Op};

use crate::wire::{Denial, Role};

/// The role a request needs: its operation's in the table; a route the
/// table does not know needs `Deployer` (deny by default).
pub fn required_role(method: &Method, path: &str) -> Role {
    Op::required_role(method.as_str(), path)
}

/// Checks `identity` (the certificate's, without the `mtls:` prefix)
/// against the grants of `environment`. `Ok` carries the granted role.
pub fn authorize(
    grants: &BTreeMap<String, Role>,
    environment: &str,
    identity: &str,
    method: &Method,
    path: &str,
) -> Result<Role, Denial> {
    let required = required_role(method, path);
    let granted = grants.get(identity).copied();
    match granted {
        Some(role) if role.permits(required) => Ok(role),
        _ => Err(Denial {
            identity: Caller::mtls(identity).to_string(),
            environment: environment.to_string(),
            required,
            granted,
        }),
    }
}

/// The message of a 403: what was refused, and what to change.
pub fn denial_message(d: &Denial, method: &Method, path: &str) -> String {
    let who = d.identity.trim_start_matches("mtls:");
    match d.granted {
        None => format!(
            "{method} {path} refused: identity {} has no role in environment {}; it needs role {} \
             (grant it in this agent's agent.toml: [grants] \"{who}\" = \"{}\", or use a certificate made for {})",
            d.identity,
            d.environment,
            d.required.as_str(),
            d.required.as_str(),
            d.environment
        ),
        Some(role) => format!(
            "{method} {path} refused: identity {} is a {} in environment {}; this needs role {}",
            d.identity,
            role.as_str(),
            d.environment,
            d.required.as_str()
        ),
    }
}

pub use deploy_protocol::identity::certificate_identity;

#[cfg(test)]
mod tests {
    use super::*;

    fn grants() -> BTreeMap<String, Role> {
        BTreeMap::from([
            ("ci-production".to_string(), Role::Deployer),
            ("dashboard".to_string(), Role::Reader),
        ])
    }

    #[test]
    fn approving_and_deploying_are_separate_duties() {
        let g = BTreeMap::from([
            ("ci-production".to_string(), Role::Deployer),
            ("tech-lead".to_string(), Role::Approver),
            ("dashboard".to_string(), Role::Reader),
        ]);
        let approve = |who: &str| authorize(&g, "production", who, &Method::POST, "/v1/approvals");
        assert_eq!(
            required_role(&Method::POST, "/v1/approvals"),
            Role::Approver
        );
        assert_eq!(approve("tech-lead"), Ok(Role::Approver));
        let d = approve("ci-production").unwrap_err();
        assert_eq!(
            (d.required, d.granted),
            (Role::Approver, Some(Role::Deployer))
        );
        assert!(approve("dashboard").is_err());
        // An approver reads, and cannot deploy.
        assert!(authorize(&g, "production", "tech-lead", &Method::GET, "/v1/audit").is_ok());
        let d = authorize(&g, "production", "tech-lead", &Method::POST, "/v1/deploy").unwrap_err();
        assert_eq!(d.required, Role::Deployer);
    }

    #[test]
    fn reads_need_reader_and_everything_else_deployer() {
        for p in [
            "/v1/ping",
            "/v1/status",
            "/v1/history",
            "/v1/audit",
            "/v1/release",
            "/v1/lock",
            "/metrics",
        ] {
            assert_eq!(required_role(&Method::GET, p), Role::Reader, "{p}");
        }
        for (m, p) in [
            (Method::POST, "/v1/deploy"),
            (Method::POST, "/v1/rollback"),
            (Method::POST, "/v1/pull"),
            (Method::POST, "/v1/lock"),
            (Method::POST, "/v1/lock/renew"),
            (Method::DELETE, "/v1/lock"),
            (Method::POST, "/v1/status"),
            (Method::GET, "/v1/unknown"),
            (Method::GET, "/v1/status/../deploy"),
        ] {
            assert_eq!(required_role(&m, p), Role::Deployer, "{m} {p}");
        }
    }

    #[test]
    fn a_deployer_may_do_everything_a_reader_only_read() {
        let g = grants();
        assert_eq!(
            authorize(
                &g,
                "production",
                "ci-production",
                &Method::POST,
                "/v1/deploy"
            ),
            Ok(Role::Deployer)
        );
        assert_eq!(
            authorize(
                &g,
                "production",
                "ci-production",
                &Method::GET,
                "/v1/status"
            ),
            Ok(Role::Deployer)
        );
        assert_eq!(
            authorize(&g, "production", "dashboard", &Method::GET, "/v1/audit"),
            Ok(Role::Reader)
        );
        let d =
            authorize(&g, "production", "dashboard", &Method::POST, "/v1/rollback").unwrap_err();
        assert_eq!(d.granted, Some(Role::Reader));
        assert_eq!(d.required, Role::Deployer);
        let msg = denial_message(&d, &Method::POST, "/v1/rollback");
        assert!(
            msg.contains("mtls:dashboard") && msg.contains("reader") && msg.contains("deployer")
        );
    }

    #[test]
    fn an_identity_without_a_grant_is_told_what_it_needs() {
        let d = authorize(
            &grants(),
            "production",
            "ci-staging",
            &Method::GET,
            "/v1/status",
        )
        .unwrap_err();
        assert_eq!(
            d,
            Denial {
                identity: "mtls:ci-staging".into(),
                environment: "production".into(),
                required: Role::Reader,
                granted: None,
            }
        );
        let msg = denial_message(&d, &Method::GET, "/v1/status");
        assert!(msg.contains("mtls:ci-staging"), "{msg}");
        assert!(msg.contains("environment production"), "{msg}");
        assert!(msg.contains("needs role reader"), "{msg}");
    }

    #[test]
    fn identities_are_exact() {
        let g = grants();
        assert!(authorize(&g, "p", "CI-PRODUCTION", &Method::GET, "/v1/status").is_err());
        assert!(authorize(&g, "p", "", &Method::GET, "/v1/status").is_err());
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert_eq!(certificate_identity(b"not a certificate"), None);
    }
}
