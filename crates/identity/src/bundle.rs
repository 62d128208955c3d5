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

/// One trust domain's roots, with the expiry of each kept for the expiry gauge and for
/// dropping a root once it expires. The default, no roots, is what a reloaded bundle file that
/// holds no usable root leaves: that trust domain's callers are refused.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    pub roots: Vec<CertificateDer<'static>>,
    /// `(subject, not_after unix seconds)` per root, in the order of `roots`.
    pub expiries: Vec<(String, i64)>,
}

impl Bundle {
    /// This bundle without its roots expired at `now` (unix seconds), with the subjects of
    /// those dropped; `None` when none has expired. webpki never reads a trust anchor's
    /// validity, so a root that expires while loaded keeps anchoring chains until it is taken
    /// out: the identity producers call this as time passes.
    pub fn without_expired(&self, now: i64) -> Option<(Bundle, Vec<String>)> {
        let expired = |index: usize| {
            self.expiries
                .get(index)
                .is_some_and(|(_, not_after)| *not_after < now)
        };
        if !(0..self.roots.len()).any(expired) {
            return None;
        }
        let mut kept = Bundle::default();
        let mut dropped = Vec::new();
        for (index, root) in self.roots.iter().enumerate() {
            let expiry = self.expiries.get(index);
            if expired(index) {
                dropped.extend(expiry.map(|(subject, _)| subject.clone()));
                continue;
            }
            kept.roots.push(root.clone());
            kept.expiries.extend(expiry.cloned());
        }
        Some((kept, dropped))
    }

    /// The earliest `notAfter` (unix seconds) of its roots.
    pub fn next_expiry(&self) -> Option<i64> {
        self.expiries.iter().map(|(_, not_after)| *not_after).min()
    }
}

/// The subjects of the roots dropped from each trust domain's bundle.
pub type DroppedRoots = Vec<(TrustDomain, Vec<String>)>;

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

    /// These bundles without their roots expired at `now` (unix seconds), with the subjects
    /// dropped per trust domain; `None` when no root has expired. A trust domain left without
    /// roots stays, empty: its callers are refused (removing it could leave no bundle at all).
    pub fn without_expired(&self, now: i64) -> Option<(Self, DroppedRoots)> {
        let mut kept = self.clone();
        let mut dropped = Vec::new();
        for (domain, bundle) in &self.bundles {
            if let Some((bundle, subjects)) = bundle.without_expired(now) {
                kept.bundles.insert(domain.clone(), bundle);
                dropped.push((domain.clone(), subjects));
            }
        }
        (!dropped.is_empty()).then_some((kept, dropped))
    }

    /// The earliest `notAfter` (unix seconds) of any root.
    pub fn next_expiry(&self) -> Option<i64> {
        self.bundles.values().filter_map(Bundle::next_expiry).min()
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
    let now = crate::serving::unix(now);
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
/// keys with `"use": "x509-svid"` carry the roots in `x5c` (base64 DER, RFC 7517 §4.7).
/// `jwt-svid` keys are for JWT-SVIDs and are ignored here. X509-SVID §6.2: "If `x5c` is not
/// set, or is empty, then the entry MUST be ignored", and "If the `x5c` parameter contains
/// multiple values, then all but the first MUST be ignored". A first value that is not base64
/// is an error: the document is damaged, and a reload keeps the last good roots.
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
        /// `null` reads as not set.
        #[serde(default)]
        x5c: Option<Vec<String>>,
    }

    let document: Document = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut roots = Vec::new();
    for (index, key) in document.keys.iter().enumerate() {
        if key.usage.as_deref() != Some("x509-svid") {
            continue;
        }
        let Some(cert) = key.x5c.as_deref().and_then(<[String]>::first) else {
            continue;
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
    use portcullis_core::TrustDomain;
    use portcullis_test_support::pki::Ca;

    use super::{BundleError, TrustBundles, parse_bundle, subject_and_expiry};

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

    /// X509-SVID §6.2: an `x509-svid` entry without `x5c` (or with it empty) is ignored, and
    /// of several `x5c` values only the first is the entry's root.
    #[test]
    fn x509_svid_entries_are_read_as_the_spec_says() -> Result<(), Box<dyn std::error::Error>> {
        let (a, b, c) = (
            Ca::new("td.example")?,
            Ca::new("td.example")?,
            Ca::new("td.example")?,
        );
        let document = serde_json::json!({
            "keys": [
                {"use": "x509-svid", "kty": "EC"},
                {"use": "x509-svid", "kty": "EC", "x5c": []},
                {"use": "x509-svid", "kty": "EC", "x5c": null},
                // Ignored values are not even decoded.
                {"use": "x509-svid", "kty": "EC", "x5c": [x5c(&a), x5c(&c), "%%%"]},
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

    /// Roots expired at a given time are dropped; a trust domain left without roots stays,
    /// empty (refusing its callers), and nothing is rebuilt while no root has expired.
    #[test]
    fn expired_roots_are_dropped_and_an_emptied_domain_stays()
    -> Result<(), Box<dyn std::error::Error>> {
        let now = time::OffsetDateTime::now_utc();
        let short = |domain: &str| {
            Ca::with_validity(
                domain,
                now - time::Duration::hours(1),
                now + time::Duration::hours(1),
            )
        };
        let (long, own_short, partner) = (
            Ca::new("td.example")?,
            short("td.example")?,
            short("partner.example")?,
        );
        let mut bundles = TrustBundles::new();
        let pem = format!("{}{}", long.cert_pem(), own_short.cert_pem());
        let read = |pem: &str| parse_bundle(pem.as_bytes(), Path::new("b.pem"), SystemTime::now());
        bundles.insert(TrustDomain::parse("td.example")?, read(&pem)?);
        bundles.insert(
            TrustDomain::parse("partner.example")?,
            read(&partner.cert_pem())?,
        );
        let in_two_hours = crate::serving::unix(SystemTime::now()) + 2 * 3600;

        assert!(bundles.without_expired(in_two_hours - 3 * 3600).is_none());
        let (kept, dropped) = bundles
            .without_expired(in_two_hours)
            .ok_or("nothing dropped")?;
        let roots = |domain: &str| {
            kept.get(domain)
                .map(|b| (b.roots.clone(), b.expiries.len()))
        };
        assert_eq!(roots("td.example"), Some((vec![long.cert_der()], 1)));
        assert_eq!(roots("partner.example"), Some((vec![], 0)));
        assert_eq!(dropped.len(), 2);
        assert!(kept.without_expired(in_two_hours).is_none());
        let expiry = |ca: &Ca| subject_and_expiry(&ca.cert_der()).map(|(_, at)| at);
        assert_eq!(
            bundles.next_expiry(),
            expiry(&own_short).min(expiry(&partner))
        );
        Ok(())
    }

    #[test]
    fn malformed_spiffe_bundles_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let cases = [
            // The entry's root itself is damaged: not ignored, refused.
            serde_json::json!({"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]}).to_string(),
            serde_json::json!({"keys": "none"}).to_string(),
            serde_json::json!({"keys": [{"use": "x509-svid", "x5c": "not a list"}]}).to_string(),
            "{\"keys\": [".to_owned(),
        ];
        for case in cases {
            let parsed = parse_bundle(case.as_bytes(), Path::new("b.json"), SystemTime::now());
            assert!(matches!(parsed, Err(BundleError::Json { .. })), "{case}");
        }
        // No usable root: only JWT keys, or only x509-svid keys the spec says to ignore.
        let no_root = [
            serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC"}]}),
            serde_json::json!({"keys": [
                {"use": "x509-svid", "kty": "EC"},
                {"use": "x509-svid", "kty": "EC", "x5c": []},
            ]}),
        ];
        for case in no_root {
            let parsed = parse_bundle(
                case.to_string().as_bytes(),
                Path::new("b.json"),
                SystemTime::now(),
            );
            assert!(matches!(parsed, Err(BundleError::Empty { .. })), "{case}");
        }
        Ok(())
    }
}
