//! SPIFFE trust bundles: for each accepted trust domain, the roots that may sign its SVIDs.
//! A bundle file is PEM (one or more certificates) or SPIFFE bundle JSON (a JWK set whose
//! `x509-svid` keys carry the roots in `x5c`, as SPIRE federation endpoints publish).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use portcullis_core::TrustDomain;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a SPIFFE bundle: {message}")]
    Json { path: PathBuf, message: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no certificates found")]
    Empty { path: PathBuf },
    #[error("{path}: certificate {index} is not valid X.509")]
    Malformed { path: PathBuf, index: usize },
    #[error("{path}: every root has expired")]
    AllExpired { path: PathBuf },
}

/// One trust domain's roots, with the expiry of each kept for the expiry gauge. The default,
/// no roots, is what a reloaded bundle file that holds no usable root leaves: that trust
/// domain's callers are refused.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    pub roots: Vec<CertificateDer<'static>>,
    /// `(subject, not_after unix seconds)` per root.
    pub expiries: Vec<(String, i64)>,
}

/// The accepted trust domains and their bundles. A trust domain not in here is refused, and so
/// is one whose bundle has no roots.
#[derive(Debug, Clone, Default)]
pub struct TrustBundles {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `path` as the bundle of `domain`. Expired roots are dropped, so a stale root left
    /// in a bundle cannot be used to sign a chain; a bundle left with none is an error.
    pub fn load(&mut self, domain: TrustDomain, path: &Path) -> Result<(), BundleError> {
        let bundle = read_bundle(path, SystemTime::now())?;
        self.bundles.insert(domain, bundle);
        Ok(())
    }

    pub fn insert(&mut self, domain: TrustDomain, bundle: Bundle) {
        self.bundles.insert(domain, bundle);
    }

    pub fn get(&self, domain: &str) -> Option<&Bundle> {
        self.bundles
            .iter()
            .find(|(name, _)| name.as_str() == domain)
            .map(|(_, bundle)| bundle)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TrustDomain, &Bundle)> {
        self.bundles.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

/// Reads a bundle file (PEM or SPIFFE bundle JSON), dropping roots that are expired at `now`.
pub fn read_bundle(path: &Path, now: SystemTime) -> Result<Bundle, BundleError> {
    let bytes = std::fs::read(path).map_err(|source| BundleError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_bundle(&bytes, path, now)
}

/// Parses bundle bytes read from `path` (named in errors). A document starting with `{` is
/// SPIFFE bundle JSON; anything else is PEM.
pub fn parse_bundle(bytes: &[u8], path: &Path, now: SystemTime) -> Result<Bundle, BundleError> {
    let certs = if bytes.trim_ascii_start().starts_with(b"{") {
        spiffe_bundle_roots(bytes).map_err(|message| BundleError::Json {
            path: path.to_owned(),
            message,
        })?
    } else {
        let read_error = |source| BundleError::Read {
            path: path.to_owned(),
            source,
        };
        CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_error)?
    };
    if certs.is_empty() {
        return Err(BundleError::Empty {
            path: path.to_owned(),
        });
    }
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut bundle = Bundle {
        roots: Vec::new(),
        expiries: Vec::new(),
    };
    for (index, cert) in certs.into_iter().enumerate() {
        let (subject, not_after) = subject_and_expiry(&cert).ok_or(BundleError::Malformed {
            path: path.to_owned(),
            index,
        })?;
        if not_after < now {
            tracing::warn!(path = %path.display(), %subject, "dropping expired root from trust bundle");
            continue;
        }
        bundle.expiries.push((subject, not_after));
        bundle.roots.push(cert);
    }
    if bundle.roots.is_empty() {
        return Err(BundleError::AllExpired {
            path: path.to_owned(),
        });
    }
    Ok(bundle)
}

/// The subject (RFC 4514 form) and `notAfter` (unix seconds) of a certificate.
pub fn subject_and_expiry(der: &[u8]) -> Option<(String, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        cert.subject().to_string(),
        cert.validity().not_after.timestamp(),
    ))
}

/// The X.509 roots of a SPIFFE bundle (SPIFFE Trust Domain and Bundle §4): a JWK set whose
/// keys with `"use": "x509-svid"` each carry exactly one certificate in `x5c` (base64 DER, RFC
/// 7517 §4.7). `jwt-svid` keys are for JWT-SVIDs and are ignored here.
fn spiffe_bundle_roots(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use base64::Engine as _;

    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Key>,
    }
    #[derive(serde::Deserialize)]
    struct Key {
        #[serde(rename = "use")]
        usage: Option<String>,
        #[serde(default)]
        x5c: Vec<String>,
    }

    let document: Document = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut roots = Vec::new();
    for (index, key) in document.keys.iter().enumerate() {
        if key.usage.as_deref() != Some("x509-svid") {
            continue;
        }
        let [cert] = key.x5c.as_slice() else {
            return Err(format!(
                "keys[{index}]: an x509-svid key must carry exactly one certificate in x5c"
            ));
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(cert)
            .map_err(|e| format!("keys[{index}].x5c[0]: not base64: {e}"))?;
        roots.push(CertificateDer::from(der));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use base64::Engine as _;
    use portcullis_test_support::pki::Ca;

    use super::{BundleError, parse_bundle};

    fn x5c(ca: &Ca) -> String {
        base64::engine::general_purpose::STANDARD.encode(ca.cert_der())
    }

    #[test]
    fn spiffe_bundle_json_yields_its_x509_roots_only() -> Result<(), Box<dyn std::error::Error>> {
        let (a, b) = (Ca::new("td.example")?, Ca::new("td.example")?);
        let document = serde_json::json!({
            "spiffe_sequence": 7,
            "keys": [
                {"use": "x509-svid", "kty": "EC", "x5c": [x5c(&a)]},
                {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "x", "y": "y"},
                {"use": "x509-svid", "kty": "EC", "x5c": [x5c(&b)]},
            ],
        });
        let bundle = parse_bundle(
            document.to_string().as_bytes(),
            Path::new("b.json"),
            SystemTime::now(),
        )?;
        assert_eq!(bundle.roots, vec![a.cert_der(), b.cert_der()]);
        Ok(())
    }

    #[test]
    fn malformed_spiffe_bundles_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let a = Ca::new("td.example")?;
        let cases = [
            serde_json::json!({"keys": [{"use": "x509-svid", "x5c": [x5c(&a), x5c(&a)]}]}),
            serde_json::json!({"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]}),
            serde_json::json!({"keys": "none"}),
        ];
        for case in cases {
            let parsed = parse_bundle(
                case.to_string().as_bytes(),
                Path::new("b.json"),
                SystemTime::now(),
            );
            assert!(matches!(parsed, Err(BundleError::Json { .. })), "{case}");
        }
        // Only JWT keys: no roots at all.
        let jwt_only = serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC"}]});
        let parsed = parse_bundle(
            jwt_only.to_string().as_bytes(),
            Path::new("b.json"),
            SystemTime::now(),
        );
        assert!(matches!(parsed, Err(BundleError::Empty { .. })));
        Ok(())
    }
}
