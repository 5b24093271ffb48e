//! `deploy-controller pki`: a private CA and the certificates of agents
//! (server) and clients (CI jobs, operators), with rcgen.
//!
//! Layout of the directory: `ca.pem`, `ca-key.pem`, and for each issued
//! name `NAME.pem` (certificate, then the CA certificate: a chain) and
//! `NAME-key.pem`. Private keys are written with mode 0600. Nothing is ever
//! overwritten: issuing a name twice is an error (remove the files first).
//!
//! The client certificate's CN is the identity agents authorize (agent.toml
//! `[grants]`); agents verify it against the CA, its validity period and its
//! extended key usage (client auth), and the controller verifies an agent's
//! certificate against the CA and the agent's address (a DNS name or IP
//! SAN: issue agent certificates with `--san` for every name and address
//! the inventory uses).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} already exists; nothing was written (remove it first to replace it)", path.display())]
    Exists { path: PathBuf },
    #[error(
        "no CA in {}: {} is missing; create one with `deploy-controller pki init --dir {}`",
        dir.display(), path.display(), dir.display()
    )]
    NoCa { dir: PathBuf, path: PathBuf },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot make the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// An agent's server certificate (TLS server auth).
    Agent,
    /// A client's certificate (TLS client auth); its CN is the identity.
    Client,
}

/// The files of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn ca_paths(dir: &Path) -> Issued {
    Issued {
        cert: dir.join("ca.pem"),
        key: dir.join("ca-key.pem"),
    }
}

pub fn paths(dir: &Path, name: &str) -> Issued {
    Issued {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to a new file (never replacing one).
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io("create", path)(e)
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("write", path))
}

fn refuse_existing(files: &Issued) -> Result<(), PkiError> {
    for p in [&files.cert, &files.key] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    Ok(())
}

/// `pki init`: a new CA valid for `days`.
pub fn init(dir: &Path, days: u32) -> Result<Issued, PkiError> {
    std::fs::create_dir_all(dir).map_err(io("create the directory", dir))?;
    let files = ca_paths(dir);
    refuse_existing(&files)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "deploy-agent fleet CA");
    dn.push(DnType::OrganizationName, "deploy-agent");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::days(i64::from(days.max(1)));
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    write_new(&files.key, &key.serialize_pem(), 0o600)?;
    write_new(&files.cert, &cert.pem(), 0o644)?;
    Ok(files)
}

/// `pki issue`: a certificate for `name`, valid from now for `days`.
pub fn issue(
    dir: &Path,
    name: &str,
    kind: Kind,
    sans: &[String],
    days: u32,
) -> Result<Issued, PkiError> {
    let now = OffsetDateTime::now_utc();
    issue_between(
        dir,
        name,
        kind,
        sans,
        now - time::Duration::minutes(5),
        now + time::Duration::days(i64::from(days.max(1))),
    )
}

/// Like [`issue`], with an explicit validity period (tests make expired
/// certificates with it).
pub fn issue_between(
    dir: &Path,
    name: &str,
    kind: Kind,
    sans: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Issued, PkiError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(PkiError::Invalid(format!(
            "--name {name:?}: use 1-64 characters of letters, digits, `-`, `_` and `.` (it becomes the CN and the file names)"
        )));
    }
    let ca = ca_paths(dir);
    let ca_pem = std::fs::read_to_string(&ca.cert).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PkiError::NoCa {
                dir: dir.to_path_buf(),
                path: ca.cert.clone(),
            }
        } else {
            io("read", &ca.cert)(e)
        }
    })?;
    let ca_key_pem = std::fs::read_to_string(&ca.key).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PkiError::NoCa {
                dir: dir.to_path_buf(),
                path: ca.key.clone(),
            }
        } else {
            io("read", &ca.key)(e)
        }
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| PkiError::Invalid(format!("{}: not a private key: {e}", ca.key.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
        PkiError::Invalid(format!("{}: not a CA certificate: {e}", ca.cert.display()))
    })?;
    let files = paths(dir, name);
    refuse_existing(&files)?;

    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let mut sans = sans.to_vec();
    if kind == Kind::Agent && sans.is_empty() {
        sans.push(name.to_string());
    }
    for s in &sans {
        let not_a_name = |why: String| {
            PkiError::Invalid(format!(
                "--san {s:?} is neither an IP address nor a DNS name: {why}"
            ))
        };
        let san = match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if !is_dns_name(s) => {
                return Err(not_a_name("use letters, digits, `-` and dots".into()));
            }
            Err(_) => SanType::DnsName(
                s.as_str()
                    .try_into()
                    .map_err(|e| not_a_name(format!("{e}")))?,
            ),
        };
        p.subject_alt_names.push(san);
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![match kind {
        Kind::Agent => ExtendedKeyUsagePurpose::ServerAuth,
        Kind::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    p.use_authority_key_identifier_extension = true;
    p.not_before = not_before;
    p.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_new(&files.key, &key.serialize_pem(), 0o600)?;
    write_new(&files.cert, &format!("{}{}", cert.pem(), ca_pem), 0o644)?;
    Ok(files)
}

/// `host`, `web-1.internal`, `*.example.com`.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn first_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn init_then_issue_agent_and_client() {
        let d = tempfile::tempdir().unwrap();
        let ca = init(d.path(), 30).unwrap();
        assert!(ca.cert.is_file() && ca.key.is_file());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ca.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(init(d.path(), 30), Err(PkiError::Exists { .. })));

        let a = issue(
            d.path(),
            "agent-1",
            Kind::Agent,
            &["127.0.0.1".into(), "web-1.internal".into()],
            10,
        )
        .unwrap();
        let pem = std::fs::read_to_string(&a.cert).unwrap();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "leaf + CA");
        let der = first_der(&pem);
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        let cn = x
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "agent-1");
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 2);
        let eku = x.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && !eku.value.client_auth);

        let c = issue(d.path(), "ci-production", Kind::Client, &[], 10).unwrap();
        let der = first_der(&std::fs::read_to_string(&c.cert).unwrap());
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        let eku = x.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.client_auth && !eku.value.server_auth);
        assert!(matches!(
            issue(d.path(), "ci-production", Kind::Client, &[], 10),
            Err(PkiError::Exists { .. })
        ));
    }

    #[test]
    fn issue_needs_a_ca_and_a_good_name() {
        let d = tempfile::tempdir().unwrap();
        let e = issue(d.path(), "x", Kind::Client, &[], 1).unwrap_err();
        assert!(e.to_string().contains("pki init"), "{e}");
        init(d.path(), 1).unwrap();
        assert!(issue(d.path(), "a b", Kind::Client, &[], 1).is_err());
        assert!(issue(d.path(), "../x", Kind::Client, &[], 1).is_err());
        let e = issue(d.path(), "ok", Kind::Agent, &["bad name!".into()], 1).unwrap_err();
        assert!(e.to_string().contains("--san"), "{e}");
        assert!(
            is_dns_name("web-1.internal")
                && is_dns_name("*.example.com")
                && is_dns_name("localhost")
        );
        assert!(!is_dns_name("a..b") && !is_dns_name("-a") && !is_dns_name(""));
    }
}
