//! The mTLS server configuration agents connect to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::NoServerSessionStorage;

use crate::bundle::TrustBundles;
use crate::claim::RecordingVerifier;
use crate::verifier::SpiffeClientVerifier;

#[derive(Debug, thiserror::Error)]
pub enum ServerIdentityError {
    #[error("cannot read certificate chain {path}: {source}")]
    Cert {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no certificates found")]
    NoCert { path: PathBuf },
    #[error("cannot read private key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no trust bundle configured")]
    NoBundles,
    #[error("trust bundle unusable: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("certificate and key rejected: {0}")]
    Tls(#[from] rustls::Error),
}

/// This workload's own SVID: the certificate chain it presents, and its key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl ServerIdentity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, ServerIdentityError> {
        let cert_pem = std::fs::read(cert).map_err(|source| ServerIdentityError::Cert {
            path: cert.to_owned(),
            source: rustls::pki_types::pem::Error::Io(source),
        })?;
        let key_pem = std::fs::read(key).map_err(|source| ServerIdentityError::Key {
            path: key.to_owned(),
            source: rustls::pki_types::pem::Error::Io(source),
        })?;
        Self::from_pem(&cert_pem, cert, &key_pem, key)
    }

    /// Parses PEM bytes read from `cert` and `key` (the paths name the files in errors).
    pub fn from_pem(
        cert_pem: &[u8],
        cert: &Path,
        key_pem: &[u8],
        key: &Path,
    ) -> Result<Self, ServerIdentityError> {
        let cert_chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| ServerIdentityError::Cert {
                path: cert.to_owned(),
                source,
            })?;
        if cert_chain.is_empty() {
            return Err(ServerIdentityError::NoCert {
                path: cert.to_owned(),
            });
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| ServerIdentityError::Key {
                path: key.to_owned(),
                source,
            })?;
        Ok(Self { cert_chain, key })
    }
}

/// The crypto provider every TLS object of Portcullis uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Draws the provider's first random bytes, so that the first handshakes do not pay for it.
///
/// aws-lc seeds its generator once per process, on first use, from CPU timing jitter: about
/// 25 ms of CPU here. Left to the first handshake, every connection arriving meanwhile waits
/// behind it (a fresh proxy took 72 ms to answer its first 16 connections, 39 ms the next 16).
/// Call it before accepting connections. An error means there is no random source, and so no
/// TLS: callers refuse to start.
pub fn seed_random() -> Result<(), rustls::crypto::GetRandomFailed> {
    let mut bytes = [0u8; 32];
    crypto_provider().secure_random.fill(&mut bytes)
}

/// TLS 1.3 and 1.2, ALPN `h2` then `http/1.1`, client certificates mandatory and checked by
/// [`SpiffeClientVerifier`].
///
/// Resumption is disabled (no session cache, no tickets): a resumed session skips client
/// certificate verification, so it would outlive a trust bundle change or a revoked caller.
/// A full handshake per connection is the price; connections are long-lived and pooled.
pub fn server_config(
    identity: ServerIdentity,
    bundles: &TrustBundles,
) -> Result<Arc<ServerConfig>, ServerIdentityError> {
    if bundles.is_empty() {
        return Err(ServerIdentityError::NoBundles);
    }
    let provider = crypto_provider();
    let verifier = SpiffeClientVerifier::new(bundles, provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(Arc::new(RecordingVerifier { inner: verifier }))
        .with_single_cert(identity.cert_chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}
