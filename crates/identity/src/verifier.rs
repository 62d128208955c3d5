//! The client-certificate verifier: X509-SVID rules first, then the chain against the roots
//! of the trust domain the SVID claims, and only those, then the key-usage rules on the path
//! that verified.
//!
//! Plain `WebPkiClientVerifier` over the union of all bundles would accept a certificate
//! issued by trust domain B's CA that claims to be in trust domain A. Keeping one set of
//! trust anchors per trust domain and choosing it by the leaf's own SPIFFE ID closes that gap.
//! The chain is verified with webpki directly (as `WebPkiClientVerifier` does, no CRLs) because
//! only webpki's [`VerifiedPath`](webpki::VerifiedPath) says which intermediates and which root
//! were used, and X509-SVID §4.3 puts a rule on each of them.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::server::VerifierBuilderError;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};

use crate::bundle::TrustBundles;
use crate::svid::{self, SvidRejection};

#[derive(Debug)]
pub struct SpiffeClientVerifier {
    by_trust_domain: HashMap<String, DomainRoots>,
    provider: Arc<CryptoProvider>,
}

/// One trust domain's roots as webpki trust anchors, with whether each root itself may sign
/// certificates (keyCertSign), decided once when the bundle is loaded.
#[derive(Debug)]
struct DomainRoots {
    anchors: Vec<TrustAnchor<'static>>,
    may_sign: Vec<bool>,
}

impl SpiffeClientVerifier {
    pub fn new(
        bundles: &TrustBundles,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, VerifierBuilderError> {
        let mut by_trust_domain = HashMap::new();
        for (domain, bundle) in bundles.iter() {
            let mut roots = DomainRoots {
                anchors: Vec::with_capacity(bundle.roots.len()),
                may_sign: Vec::with_capacity(bundle.roots.len()),
            };
            // Roots were parsed when the bundle was read; a root webpki cannot use is skipped
            // here and the bundle fails below if none is left. A bundle with no root at all
            // (a reload removed every one) is kept, without anchors: its trust domain's
            // callers are refused, as removed roots must be.
            for root in &bundle.roots {
                if let Ok(anchor) = webpki::anchor_from_trusted_cert(root) {
                    roots.anchors.push(anchor.to_owned());
                    roots.may_sign.push(svid::may_sign_certificates(root));
                }
            }
            if roots.anchors.is_empty() && !bundle.roots.is_empty() {
                return Err(VerifierBuilderError::NoRootAnchors);
            }
            by_trust_domain.insert(domain.as_str().to_owned(), roots);
        }
        Ok(Self {
            by_trust_domain,
            provider,
        })
    }

    /// The chain against `roots` (RFC 5280 path validation by webpki, clientAuth EKU), then
    /// keyCertSign on every CA certificate of the path it found.
    fn verify_chain(
        &self,
        roots: &DomainRoots,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Error> {
        // A trust domain with no root trusts no issuer; webpki is not asked to search nothing.
        if roots.anchors.is_empty() {
            return Err(CertificateError::UnknownIssuer.into());
        }
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let path = leaf
            .verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                &roots.anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(pki_error)?;
        let root_may_sign = roots
            .anchors
            .iter()
            .position(|anchor| anchor == path.anchor())
            .is_some_and(|index| roots.may_sign[index]);
        let intermediates_may_sign = path
            .intermediate_certificates()
            .all(|ca| svid::may_sign_certificates(ca.der().as_ref()));
        if root_may_sign && intermediates_may_sign {
            Ok(())
        } else {
            Err(reject(SvidRejection::IssuerKeyUsage))
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    /// DESIGN: a connection without a valid client certificate never gets an HTTP response.
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA names are advertised: an agent holds one SVID and sends it regardless, and the
    /// list would tell any scanner which trust domains this workload accepts.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // Leaf rules run before the chain so that a rejection names the precise rule broken
        // (webpki folds several of them into generic errors).
        let leaf = svid::inspect_leaf(end_entity).map_err(reject)?;
        let roots = self
            .by_trust_domain
            .get(leaf.id.trust_domain_name())
            .ok_or_else(|| reject(SvidRejection::UnknownTrustDomain))?;
        self.verify_chain(roots, end_entity, intermediates, now)?;
        leaf.require_digital_signature().map_err(reject)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// webpki's chain errors as the rustls errors `WebPkiClientVerifier` would have produced, so
/// [`handshake_failure_reason`] labels them the same way. Revocation errors cannot occur: no
/// CRLs are given.
fn pki_error(error: webpki::Error) -> Error {
    use webpki::Error as E;
    match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding.into(),
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        E::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        E::InvalidCertValidity => CertificateError::Expired.into(),
        E::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        #[allow(deprecated)]
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose.into()
        }
        #[allow(deprecated)]
        E::UnsupportedSignatureAlgorithm
        | E::UnsupportedSignatureAlgorithmForPublicKey
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            CertificateError::UnsupportedSignatureAlgorithm.into()
        }
        // Path-length, name-constraint, CA-as-leaf and the rest: one bounded label.
        other => CertificateError::Other(OtherError(Arc::new(other))).into(),
    }
}

fn reject(rejection: SvidRejection) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(rejection))))
}

/// A bounded label for a failed handshake, for `portcullis_tls_handshake_failures_total`.
pub fn handshake_failure_reason(error: &Error) -> &'static str {
    match error {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::Revoked => "revoked",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "missing_client_auth"
            }
            CertificateError::Other(OtherError(inner)) => inner
                .downcast_ref::<SvidRejection>()
                .map_or("invalid_certificate", SvidRejection::reason),
            _ => "invalid_certificate",
        },
        Error::NoApplicationProtocol | Error::PeerIncompatible(_) => "incompatible",
        Error::AlertReceived(_) => "alert_received",
        _ => "protocol_error",
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use portcullis_core::TrustDomain;
    use portcullis_test_support::pki::{Ca, Svid};
    use rustls::pki_types::UnixTime;
    use rustls::server::danger::ClientCertVerifier as _;

    use super::{SpiffeClientVerifier, handshake_failure_reason};
    use crate::bundle::{Bundle, TrustBundles, parse_bundle};
    use crate::server::crypto_provider;

    #[test]
    fn a_trust_domain_without_roots_refuses_its_callers() -> Result<(), Box<dyn std::error::Error>>
    {
        let (a, b) = (Ca::new("a.example")?, Ca::new("b.example")?);
        let mut bundles = TrustBundles::new();
        bundles.insert(
            TrustDomain::parse("a.example")?,
            parse_bundle(
                a.cert_pem().as_bytes(),
                Path::new("a.pem"),
                SystemTime::now(),
            )?,
        );
        // What a reload that removed every root of b.example leaves.
        bundles.insert(
            TrustDomain::parse("b.example")?,
            Bundle {
                roots: Vec::new(),
                expiries: Vec::new(),
            },
        );
        let verifier = SpiffeClientVerifier::new(&bundles, crypto_provider())?;
        let verify =
            |svid: &Svid| verifier.verify_client_cert(&svid.cert_der, &svid.chain, UnixTime::now());
        assert!(verify(&a.svid("spiffe://a.example/ns/x/sa/y")?).is_ok());
        // Its own CA, or another trust domain's: nothing chains to no root.
        for issuer in [&b, &a] {
            match verify(&issuer.svid("spiffe://b.example/ns/x/sa/y")?) {
                Err(error) => assert_eq!(handshake_failure_reason(&error), "unknown_ca"),
                Ok(_) => panic!("a caller of a trust domain without roots was accepted"),
            }
        }
        Ok(())
    }
}
