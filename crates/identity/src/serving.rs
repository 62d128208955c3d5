//! Checks of this workload's own serving identity, shared by `validate`, startup and every
//! reload: a certificate agents will refuse, or one this proxy should not present, is caught
//! here rather than by the first caller.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, Error, InconsistentKeys, RootCertStore};

use crate::bundle::TrustBundles;
use crate::server::ServerIdentity;
use crate::svid::{self, ServingLeaf, SvidRejection};

/// Which configured file a problem is about, so a caller can name its YAML path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingFile {
    Cert,
    Key,
    Bundles,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServingProblem {
    #[error("serving certificate expired at {}", at(.not_after))]
    Expired { not_after: i64 },
    #[error("serving certificate is not valid before {}", at(.not_before))]
    NotYetValid { not_before: i64 },
    #[error("serving certificate is not an X509-SVID: {0}")]
    NotSvid(SvidRejection),
    #[error("private key does not match the serving certificate")]
    KeyMismatch,
    #[error("private key unusable: {0}")]
    KeyUnusable(String),
    #[error("no trust bundle for the serving certificate's own trust domain {0}")]
    NoOwnBundle(String),
    #[error("serving certificate does not chain to the trust bundle of {trust_domain}: {reason}")]
    NotChaining {
        trust_domain: String,
        reason: String,
    },
}

impl ServingProblem {
    pub fn file(&self) -> ServingFile {
        match self {
            ServingProblem::Expired { .. }
            | ServingProblem::NotYetValid { .. }
            | ServingProblem::NotSvid(_)
            | ServingProblem::NotChaining { .. } => ServingFile::Cert,
            ServingProblem::KeyMismatch | ServingProblem::KeyUnusable(_) => ServingFile::Key,
            ServingProblem::NoOwnBundle(_) => ServingFile::Bundles,
        }
    }
}

/// The pair itself: the leaf is a workload X509-SVID and the key is its key.
pub fn check_pair(
    identity: &ServerIdentity,
    provider: &CryptoProvider,
) -> Result<ServingLeaf, ServingProblem> {
    let leaf = identity
        .cert_chain
        .first()
        .ok_or(ServingProblem::NotSvid(SvidRejection::Malformed))?;
    let serving = svid::check_serving_leaf(leaf).map_err(ServingProblem::NotSvid)?;
    match CertifiedKey::from_der(
        identity.cert_chain.clone(),
        identity.key.clone_key(),
        provider,
    ) {
        Ok(_) => Ok(serving),
        Err(Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(ServingProblem::KeyMismatch)
        }
        Err(error) => Err(ServingProblem::KeyUnusable(error.to_string())),
    }
}

/// The leaf's validity window contains `now`.
pub fn check_validity(leaf: &ServingLeaf, now: SystemTime) -> Result<(), ServingProblem> {
    let now = unix(now);
    if now > leaf.not_after {
        return Err(ServingProblem::Expired {
            not_after: leaf.not_after,
        });
    }
    if now < leaf.not_before {
        return Err(ServingProblem::NotYetValid {
            not_before: leaf.not_before,
        });
    }
    Ok(())
}

/// The chain verifies against the roots of the leaf's own trust domain (what an agent of the
/// same trust domain checks), including the serverAuth purpose agents' TLS stacks require.
/// Validity is [`check_validity`]'s concern: the chain is checked at a time inside the
/// leaf's window so that an expired leaf is reported once, as expired. At that time every
/// intermediate must be valid (webpki checks them) and so must the root: webpki does not look
/// at a trust anchor's validity, but an expired root is dropped when a bundle is loaded, and
/// agents whose TLS stack checks it refuse the chain.
pub fn check_chain(
    chain: &[CertificateDer<'static>],
    leaf: &ServingLeaf,
    bundles: &TrustBundles,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<(), ServingProblem> {
    let trust_domain = leaf.id.trust_domain_name();
    let bundle = bundles
        .get(trust_domain)
        .ok_or_else(|| ServingProblem::NoOwnBundle(trust_domain.to_owned()))?;
    let not_chaining = |reason: String| ServingProblem::NotChaining {
        trust_domain: trust_domain.to_owned(),
        reason,
    };
    let at = unix(now).clamp(leaf.not_before, leaf.not_after);
    let mut roots = RootCertStore::empty();
    // `expiries` runs beside `roots`, one entry per root.
    roots.add_parsable_certificates(
        bundle
            .roots
            .iter()
            .zip(&bundle.expiries)
            .filter(|(_, (_, not_after))| *not_after >= at)
            .map(|(root, _)| root.clone()),
    );
    if roots.is_empty() {
        return Err(not_chaining(
            "the bundle holds no usable, unexpired root".to_owned(),
        ));
    }
    let (end_entity, intermediates) = chain
        .split_first()
        .ok_or_else(|| not_chaining("no certificate".to_owned()))?;
    let parsed =
        ParsedCertificate::try_from(end_entity).map_err(|e| not_chaining(e.to_string()))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(at).unwrap_or(0),
    ));
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        at,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|error| not_chaining(chain_reason(&error)))
}

/// Every check, every problem: for `validate` and startup, which list them all.
pub fn check_serving(
    identity: &ServerIdentity,
    bundles: &TrustBundles,
    now: SystemTime,
) -> Result<ServingLeaf, Vec<ServingProblem>> {
    let provider: Arc<CryptoProvider> = crate::server::crypto_provider();
    let mut problems = Vec::new();
    let leaf = match check_pair(identity, &provider) {
        Ok(leaf) => leaf,
        Err(ServingProblem::NotSvid(rejection)) => {
            return Err(vec![ServingProblem::NotSvid(rejection)]);
        }
        Err(problem) => {
            problems.push(problem);
            // The leaf itself is fine; keep checking it so every problem is listed.
            match identity
                .cert_chain
                .first()
                .map(|leaf| svid::check_serving_leaf(leaf))
            {
                Some(Ok(leaf)) => leaf,
                _ => return Err(problems),
            }
        }
    };
    if let Err(problem) = check_validity(&leaf, now) {
        problems.push(problem);
    }
    if let Err(problem) = check_chain(&identity.cert_chain, &leaf, bundles, &provider, now) {
        problems.push(problem);
    }
    if problems.is_empty() {
        Ok(leaf)
    } else {
        Err(problems)
    }
}

fn chain_reason(error: &Error) -> String {
    match error {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "issued by a CA that is not in the bundle".to_owned()
        }
        Error::InvalidCertificate(CertificateError::BadSignature) => {
            "signature does not verify with the bundle's roots".to_owned()
        }
        Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => "extended key usage lacks serverAuth, which agents require of a server".to_owned(),
        other => other.to_string(),
    }
}

/// `time` as unix seconds (0 before the epoch), the unit of certificate validity and of
/// [`crate::bundle::Bundle::expiries`].
pub(crate) fn unix(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A unix time as a person reads it in an error message.
fn at(unix: &i64) -> String {
    let unix = *unix;
    x509_parser::time::ASN1Time::from_timestamp(unix)
        .map_or_else(|_| format!("unix time {unix}"), |t| t.to_string())
}
