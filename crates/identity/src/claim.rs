//! Who a refused caller claimed to be. rustls reports a failed handshake as an error alone,
//! without the certificate that caused it, so the verifier notes the claim in a slot that
//! belongs to the connection being accepted: a task-local set around the accept future
//! (the verifier runs inside that future's poll). An SRE can then see who is knocking
//! without turning on debug logs.

use std::future::Future;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::svid::{self, SvidRejection};

type Slot = Arc<Mutex<Option<String>>>;

tokio::task_local! {
    static CLAIM: Slot;
}

/// Runs `accept` (a TLS accept future) and returns its output with the identity the peer's
/// certificate claimed if the verifier refused it.
pub async fn with_claim<F: Future>(accept: F) -> (F::Output, Option<String>) {
    let slot = Slot::default();
    let output = CLAIM.scope(slot.clone(), accept).await;
    let claim = slot.lock().ok().and_then(|mut claim| claim.take());
    (output, claim)
}

/// What a leaf claims, for a log line: its SPIFFE ID, or why it has none. Never the raw URI
/// of an invalid ID: that text is the caller's to choose.
pub fn describe_claim(leaf_der: &[u8]) -> String {
    match svid::caller_spiffe_id(leaf_der) {
        Ok(id) => id.to_string(),
        Err(SvidRejection::NoUriSan) => "none".to_owned(),
        Err(rejection) => format!("({})", rejection.reason()),
    }
}

/// Wraps the client verifier; on a refusal it records the claim, then returns the very same
/// error (the failure reason label depends on it).
#[derive(Debug)]
pub(crate) struct RecordingVerifier<V> {
    pub(crate) inner: V,
}

impl<V: ClientCertVerifier> ClientCertVerifier for RecordingVerifier<V> {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verdict = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if verdict.is_err() {
            // Outside an accept scope (a test calling the verifier directly) there is no slot.
            let _ = CLAIM.try_with(|slot| {
                if let Ok(mut claim) = slot.lock() {
                    *claim = Some(describe_claim(end_entity));
                }
            });
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
