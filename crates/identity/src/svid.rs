//! X509-SVID leaf checks (SPIFFE X509-SVID spec §4 and §5), on DER bytes alone.

use portcullis_core::{SpiffeId, SpiffeIdError};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a leaf certificate does not identify a caller. [`SvidRejection::reason`] is the
/// `reason` label of `portcullis_tls_handshake_failures_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidRejection {
    #[error("certificate is not valid DER X.509")]
    Malformed,
    #[error("leaf has no URI SAN")]
    NoUriSan,
    #[error("leaf has more than one URI SAN")]
    MultipleUriSans,
    #[error("leaf URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(SpiffeIdError),
    #[error("leaf SPIFFE ID has no path, so it names a trust domain, not a workload")]
    RootOnlyId,
    #[error("trust domain is not accepted")]
    UnknownTrustDomain,
    #[error("leaf is a CA certificate")]
    CaLeaf,
    #[error("leaf key usage includes keyCertSign or cRLSign")]
    SigningKeyUsage,
    #[error("leaf lacks the clientAuth extended key usage")]
    MissingClientAuth,
    #[error("leaf key usage lacks digitalSignature")]
    LeafKeyUsage,
    #[error("a CA certificate in the chain lacks keyCertSign")]
    IssuerKeyUsage,
}

impl SvidRejection {
    pub fn reason(&self) -> &'static str {
        match self {
            SvidRejection::Malformed => "malformed_certificate",
            SvidRejection::NoUriSan => "no_uri_san",
            SvidRejection::MultipleUriSans => "multiple_uri_sans",
            SvidRejection::InvalidSpiffeId(_) => "invalid_spiffe_id",
            SvidRejection::RootOnlyId => "root_only_id",
            SvidRejection::UnknownTrustDomain => "unknown_trust_domain",
            SvidRejection::CaLeaf => "ca_leaf",
            SvidRejection::SigningKeyUsage => "signing_key_usage",
            SvidRejection::MissingClientAuth => "missing_client_auth",
            SvidRejection::LeafKeyUsage => "leaf_key_usage",
            SvidRejection::IssuerKeyUsage => "issuer_key_usage",
        }
    }
}

/// The caller's SPIFFE ID: the single URI SAN of `leaf_der`, which must be a workload ID.
///
/// X509-SVID §2: "An X.509 SVID MUST contain exactly one URI SAN". Any number other than one
/// is rejected rather than picking one, since the choice would be an attacker's to make.
pub fn caller_spiffe_id(leaf_der: &[u8]) -> Result<SpiffeId, SvidRejection> {
    let cert = parse(leaf_der)?;
    spiffe_id_of(&cert)
}

/// Every X509-SVID leaf rule: the identity, plus §4.1 (not a CA), §4.3 (no keyCertSign or
/// cRLSign; digitalSignature set) and §4.4 (clientAuth, which this proxy requires to be
/// present, not merely permitted by an absent EKU extension).
pub fn check_leaf(leaf_der: &[u8]) -> Result<SpiffeId, SvidRejection> {
    let leaf = inspect_leaf(leaf_der)?;
    leaf.require_digital_signature()?;
    Ok(leaf.id)
}

/// What the handshake needs from a leaf that passed every rule checked before the chain.
#[derive(Debug)]
pub(crate) struct Leaf {
    pub(crate) id: SpiffeId,
    digital_signature: bool,
}

impl Leaf {
    /// X509-SVID §4.3: "Leaf SVIDs MUST set digitalSignature." The handshake applies this
    /// after the chain verified, so an untrusted certificate is refused for its trust first.
    pub(crate) fn require_digital_signature(&self) -> Result<(), SvidRejection> {
        if self.digital_signature {
            Ok(())
        } else {
            Err(SvidRejection::LeafKeyUsage)
        }
    }
}

/// The leaf rules that do not need the chain, in one parse.
pub(crate) fn inspect_leaf(leaf_der: &[u8]) -> Result<Leaf, SvidRejection> {
    let cert = parse(leaf_der)?;
    let id = spiffe_id_of(&cert)?;
    let digital_signature = leaf_key_rules(&cert)?;
    let eku = cert
        .extended_key_usage()
        .map_err(|_| SvidRejection::Malformed)?;
    if !eku.is_some_and(|ext| ext.value.client_auth || ext.value.any) {
        return Err(SvidRejection::MissingClientAuth);
    }
    Ok(Leaf {
        id,
        digital_signature,
    })
}

/// §4.1 (a leaf is not a CA) and the first half of §4.3 (no keyCertSign or cRLSign), for
/// callers and this workload alike. Returns whether digitalSignature is set; an absent key
/// usage extension sets nothing, so it does not set digitalSignature.
fn leaf_key_rules(cert: &X509Certificate<'_>) -> Result<bool, SvidRejection> {
    let basic = cert
        .basic_constraints()
        .map_err(|_| SvidRejection::Malformed)?;
    if basic.is_some_and(|ext| ext.value.ca) {
        return Err(SvidRejection::CaLeaf);
    }
    let key_usage = cert.key_usage().map_err(|_| SvidRejection::Malformed)?;
    match key_usage {
        Some(ext) if ext.value.key_cert_sign() || ext.value.crl_sign() => {
            Err(SvidRejection::SigningKeyUsage)
        }
        Some(ext) => Ok(ext.value.digital_signature()),
        None => Ok(false),
    }
}

/// X509-SVID §4.3 "Signing certificates MUST set keyCertSign" (RFC 5280 §4.2.1.3: a key
/// without it must not be used to verify certificate signatures). WebPKI path building does
/// not check this for intermediates or roots, so the verifier applies it to the verified path.
pub(crate) fn may_sign_certificates(ca_der: &[u8]) -> bool {
    parse(ca_der)
        .ok()
        .and_then(|cert| {
            cert.key_usage()
                .ok()
                .flatten()
                .map(|ext| ext.value.key_cert_sign())
        })
        .unwrap_or(false)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidRejection> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(SvidRejection::Malformed),
    }
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidRejection> {
    // A duplicated SAN extension is an error here, not a second place to hide a URI.
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidRejection::Malformed)?
        .ok_or(SvidRejection::NoUriSan)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris.next().ok_or(SvidRejection::NoUriSan)?;
    if uris.next().is_some() {
        return Err(SvidRejection::MultipleUriSans);
    }
    let id = SpiffeId::parse(uri).map_err(SvidRejection::InvalidSpiffeId)?;
    if !id.is_workload() {
        return Err(SvidRejection::RootOnlyId);
    }
    Ok(id)
}

/// What a serving certificate's leaf says about itself: the workload it names and its
/// validity window (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingLeaf {
    pub id: SpiffeId,
    pub not_before: i64,
    pub not_after: i64,
}

/// The X509-SVID rules this workload's own certificate must meet to serve agents: exactly
/// one URI SAN naming a workload (§2), not a CA, no signing key usage and digitalSignature set
/// (§4.1, §4.3). Validity and the chain are checked by the caller, which knows the time and
/// the bundles.
pub fn check_serving_leaf(leaf_der: &[u8]) -> Result<ServingLeaf, SvidRejection> {
    let cert = parse(leaf_der)?;
    let id = spiffe_id_of(&cert)?;
    if !leaf_key_rules(&cert)? {
        return Err(SvidRejection::LeafKeyUsage);
    }
    Ok(ServingLeaf {
        id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}
