//! SPIFFE trust bundles: for each accepted trust domain, the roots that may sign its SVIDs.

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

/// One trust domain's roots, with the expiry of each kept for the expiry gauge.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub roots: Vec<CertificateDer<'static>>,
    /// `(subject, not_after unix seconds)` per root.
    pub expiries: Vec<(String, i64)>,
}

/// The accepted trust domains and their bundles. A trust domain not in here is refused.
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

/// Reads a PEM bundle, dropping roots that are expired at `now`.
pub fn read_bundle(path: &Path, now: SystemTime) -> Result<Bundle, BundleError> {
    let read_error = |source| BundleError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
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
