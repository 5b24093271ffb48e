//! The identity a client certificate carries.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The identity a certificate (DER) carries: its subject CN, else its first
/// DNS (or URI) subject alternative name. The agent authorizes by it; the
/// controller names itself by it.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .filter(|s| !s.is_empty())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        GeneralName::DNSName(d) | GeneralName::URI(d) => Some(d.to_string()),
        _ => None,
    })
}
