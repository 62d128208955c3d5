//! Signed checkpoints for the audit trail (Ed25519, RFC 8032, through aws-lc-rs, which the
//! TLS stack already builds).
//!
//! A checkpoint line is a link of the hash chain like any other, and carries an Ed25519
//! signature over its own `prev_hash` and `time`: since `prev_hash` commits to every line
//! before it, a signed checkpoint vouches for the whole trail up to it. Whoever can rewrite
//! the audit file can recompute a plain hash chain, but not these signatures without the
//! sidecar's key; what lies after the last checkpoint (the unsigned tail) is the only part
//! that can be cut without a trace, and `audit.checkpoint_interval` bounds it in time.
//!
//! Keys are files: the signing key a PKCS#8 PEM `PRIVATE KEY` (as `openssl genpkey
//! -algorithm ed25519` writes, or `portcullis audit keygen`), the verifying key an SPKI PEM
//! `PUBLIC KEY` (`openssl pkey -pubout`).

use std::path::Path;

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use sha2::{Digest, Sha256};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4): SEQUENCE { SEQUENCE {
/// OID 1.3.101.112 }, BIT STRING (32 bytes) }.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// What a checkpoint signature covers: a fixed context string, the hash of the line before
/// the checkpoint, and the checkpoint's time.
pub(crate) fn message(prev_hash: &str, time: &str) -> Vec<u8> {
    format!("portcullis-audit-checkpoint-v1\n{prev_hash}\n{time}").into_bytes()
}

/// The sidecar's checkpoint signing key (`audit.signing_key`).
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("not a PEM PKCS#8 Ed25519 private key")]
    NotPrivateKey,
    #[error("not a PEM Ed25519 public key (SubjectPublicKeyInfo)")]
    NotPublicKey,
}

impl SigningKey {
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path)
            .map_err(|e| KeyError::Read(path.display().to_string(), e.to_string()))?;
        Self::from_pem(&pem)
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPrivateKey)?;
        let pair = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|_| KeyError::NotPrivateKey)?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    /// A new key: its PKCS#8 PEM and the public key's SPKI PEM.
    pub fn generate() -> Result<(String, String), KeyError> {
        let document = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| KeyError::NotPrivateKey)?;
        let pair =
            Ed25519KeyPair::from_pkcs8(document.as_ref()).map_err(|_| KeyError::NotPrivateKey)?;
        let mut spki = SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        Ok((
            pem("PRIVATE KEY", document.as_ref()),
            pem("PUBLIC KEY", &spki),
        ))
    }

    /// Short id of the public key (first 16 hex digits of its SHA-256), written in each
    /// start line so a verifier can tell which key to use.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The signature (hex) of a checkpoint.
    pub(crate) fn sign(&self, prev_hash: &str, time: &str) -> String {
        hex::encode(self.pair.sign(&message(prev_hash, time)).as_ref())
    }
}

/// A checkpoint verifying key (`audit verify --key`).
#[derive(Debug, Clone)]
pub struct VerifyingKey {
    raw: [u8; 32],
}

impl VerifyingKey {
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path)
            .map_err(|e| KeyError::Read(path.display().to_string(), e.to_string()))?;
        Self::from_pem(&pem)
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der =
            SubjectPublicKeyInfoDer::from_pem_slice(pem).map_err(|_| KeyError::NotPublicKey)?;
        let key = der
            .as_ref()
            .strip_prefix(SPKI_PREFIX.as_slice())
            .and_then(|raw| <[u8; 32]>::try_from(raw).ok())
            .ok_or(KeyError::NotPublicKey)?;
        Ok(Self { raw: key })
    }

    pub fn key_id(&self) -> String {
        key_id(&self.raw)
    }

    /// Whether `signature` (hex) signs the checkpoint with this `prev_hash` and `time`.
    pub(crate) fn verifies(&self, prev_hash: &str, time: &str, signature: &str) -> bool {
        let Ok(signature) = hex::decode(signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, &self.raw)
            .verify(&message(prev_hash, time), &signature)
            .is_ok()
    }
}

fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in encoded.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_signs_what_its_public_half_verifies() {
        let (private, public) = SigningKey::generate().unwrap();
        let signing = SigningKey::from_pem(private.as_bytes()).unwrap();
        let verifying = VerifyingKey::from_pem(public.as_bytes()).unwrap();
        assert_eq!(signing.key_id(), verifying.key_id());
        let signature = signing.sign("abc", "2026-01-01T00:00:00.000Z");
        assert!(verifying.verifies("abc", "2026-01-01T00:00:00.000Z", &signature));
        assert!(!verifying.verifies("abd", "2026-01-01T00:00:00.000Z", &signature));
        assert!(!verifying.verifies("abc", "2026-01-01T00:00:01.000Z", &signature));
        let (_, other) = SigningKey::generate().unwrap();
        let other = VerifyingKey::from_pem(other.as_bytes()).unwrap();
        assert!(!other.verifies("abc", "2026-01-01T00:00:00.000Z", &signature));
        assert!(VerifyingKey::from_pem(private.as_bytes()).is_err());
        assert!(SigningKey::from_pem(public.as_bytes()).is_err());
    }
}
