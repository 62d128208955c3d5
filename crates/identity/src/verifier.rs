//! The client-certificate verifier: X509-SVID rules first, then the chain against the roots
//! of the trust domain the SVID claims, and only those.
//!
//! Plain `WebPkiClientVerifier` over the union of all bundles would accept a certificate
//! issued by trust domain B's CA that claims to be in trust domain A. Keeping one webpki
//! verifier per trust domain and choosing it by the leaf's own SPIFFE ID closes that gap.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::bundle::TrustBundles;
use crate::svid::{self, SvidRejection};

#[derive(Debug)]
pub struct SpiffeClientVerifier {
    by_trust_domain: HashMap<String, Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    pub fn new(
        bundles: &TrustBundles,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let mut by_trust_domain = HashMap::new();
        for (domain, bundle) in bundles.iter() {
            let mut roots = RootCertStore::empty();
            // Roots were parsed when the bundle was read; a root webpki cannot use is skipped
            // here and the bundle fails below if none is left.
            roots.add_parsable_certificates(bundle.roots.iter().cloned());
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()?;
            by_trust_domain.insert(domain.as_str().to_owned(), verifier);
        }
        Ok(Self {
            by_trust_domain,
            provider,
        })
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
        let id = svid::check_leaf(end_entity).map_err(reject)?;
        let verifier = self
            .by_trust_domain
            .get(id.trust_domain_name())
            .ok_or_else(|| reject(SvidRejection::UnknownTrustDomain))?;
        verifier.verify_client_cert(end_entity, intermediates, now)
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
