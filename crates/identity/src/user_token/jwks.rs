//! JWKS parsing (RFC 7517) into pre-parsed verification keys, and key selection for a token.
//!
//! Pure: bytes in, key set out. Loading from a file or URL lives in `source.rs`. Keys are
//! parsed and validated once here, so a broken key is skipped at load time (and logged)
//! instead of failing every request that names it.

use std::fmt;

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::error::JwksError;
use super::settings::SigningAlgorithm;

/// A parsed JWKS: every key usable with at least one allowed algorithm.
pub(crate) struct KeySet {
    keys: Vec<VerifyingKey>,
    /// SHA-256 of the document, to tell a changed JWKS from a re-read of the same one.
    digest: [u8; 32],
    /// Set when the set is installed; cached verifications from another generation are
    /// not reused, so a key removed from the JWKS stops working at once.
    generation: u64,
}

struct VerifyingKey {
    kid: Option<String>,
    /// One pre-parsed key per algorithm this JWK may be used with: the intersection of
    /// what its key type supports, what is allowed, and its own `alg` when present.
    verifiers: Vec<(SigningAlgorithm, ParsedPublicKey)>,
}

/// The outcome of looking up the key for a token's `kid` and `alg`.
pub(crate) enum KeyLookup<'a> {
    Found(&'a ParsedPublicKey),
    /// No key with this `kid` (or, without `kid`, no key for this algorithm).
    Unknown,
    /// The `kid` names keys, but none of them may be used with this algorithm.
    WrongAlgorithm,
    /// Several keys would fit; guessing would let a token pick among keys.
    Ambiguous,
}

/// The members of a JWK we read; everything else is ignored (RFC 7517 §4: unknown members
/// are ignored).
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    key_use: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
    /// Private-key members (RFC 7518 §6.2.2, §6.3.2, §6.4.1): a JWKS that publishes them is
    /// a leaked key, and such a JWK is not used.
    d: Option<serde::de::IgnoredAny>,
    k: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawJwkSet {
    keys: Option<Vec<serde_json::Value>>,
}

impl KeySet {
    /// Parses a JWKS document. Keys that are malformed, private, of an unsupported type, or
    /// not usable with any allowed algorithm are skipped (RFC 7517 §5: implementations
    /// should ignore JWKs they do not understand); a set left with no key is an error.
    pub(crate) fn parse(bytes: &[u8], allowed: &[SigningAlgorithm]) -> Result<Self, JwksError> {
        let raw: RawJwkSet = serde_json::from_slice(bytes).map_err(JwksError::Json)?;
        let raw_keys = raw.keys.ok_or(JwksError::NoKeysArray)?;
        let mut keys = Vec::with_capacity(raw_keys.len());
        for (index, value) in raw_keys.into_iter().enumerate() {
            match serde_json::from_value::<RawJwk>(value) {
                Ok(jwk) => match VerifyingKey::from_jwk(&jwk, allowed) {
                    Ok(key) => keys.push(key),
                    Err(why) => {
                        tracing::warn!(index, kid = jwk.kid.as_deref(), why, "jwks key skipped")
                    }
                },
                Err(error) => tracing::warn!(index, %error, "jwks key skipped: not a jwk"),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(KeySet {
            keys,
            digest: Sha256::digest(bytes).into(),
            generation: 0,
        })
    }

    pub(crate) fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn digest(&self) -> [u8; 32] {
        self.digest
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Selects the key for a token. With a `kid`, only keys carrying that `kid` are
    /// candidates (RFC 7515 §4.1.4). Without one, a key is used only when it is the single
    /// key usable with the token's algorithm: trying every key would let a token search
    /// the set, and is not what the issuer meant.
    pub(crate) fn select(&self, kid: Option<&str>, alg: SigningAlgorithm) -> KeyLookup<'_> {
        let mut named = false;
        let mut found = None;
        let mut count = 0usize;
        for key in &self.keys {
            if let Some(kid) = kid {
                if key.kid.as_deref() != Some(kid) {
                    continue;
                }
                named = true;
            }
            if let Some(parsed) = key.verifier(alg) {
                count += 1;
                found = Some(parsed);
            }
        }
        match (count, found) {
            (1, Some(parsed)) => KeyLookup::Found(parsed),
            (0, _) if named => KeyLookup::WrongAlgorithm,
            (0, _) => KeyLookup::Unknown,
            _ => KeyLookup::Ambiguous,
        }
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field(
                "kids",
                &self
                    .keys
                    .iter()
                    .map(|k| k.kid.as_deref())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl VerifyingKey {
    fn verifier(&self, alg: SigningAlgorithm) -> Option<&ParsedPublicKey> {
        self.verifiers
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, parsed)| parsed)
    }

    fn from_jwk(jwk: &RawJwk, allowed: &[SigningAlgorithm]) -> Result<Self, &'static str> {
        if jwk.d.is_some() || jwk.k.is_some() {
            return Err("jwk carries private or symmetric key material");
        }
        // RFC 7517 §4.2, §4.3: a key published for another purpose is not a signing key.
        if jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
            return Err("use is not sig");
        }
        if let Some(ops) = &jwk.key_ops
            && !ops.iter().any(|op| op == "verify")
        {
            return Err("key_ops does not include verify");
        }
        // RFC 8725 §3.1: a key is bound to the algorithm it declares.
        let declared = match jwk.alg.as_deref() {
            None => None,
            Some(name) => Some(SigningAlgorithm::from_name(name).ok_or("unsupported alg")?),
        };
        let usable = |alg: &SigningAlgorithm| {
            allowed.contains(alg) && declared.is_none_or(|declared| declared == *alg)
        };

        let verifiers = match jwk.kty.as_str() {
            "EC" => {
                let (alg, verification, len) = match jwk.crv.as_deref() {
                    Some("P-256") => (
                        SigningAlgorithm::Es256,
                        &signature::ECDSA_P256_SHA256_FIXED,
                        32,
                    ),
                    Some("P-384") => (
                        SigningAlgorithm::Es384,
                        &signature::ECDSA_P384_SHA384_FIXED,
                        48,
                    ),
                    _ => return Err("unsupported ec curve"),
                };
                if !usable(&alg) {
                    return Err("no allowed algorithm for this key");
                }
                let x = decode_coordinate(jwk.x.as_deref(), len)?;
                let y = decode_coordinate(jwk.y.as_deref(), len)?;
                // SEC 1 §2.3.3 uncompressed point; parsing checks it is on the curve.
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                let parsed =
                    ParsedPublicKey::new(verification, point).map_err(|_| "ec point rejected")?;
                vec![(alg, parsed)]
            }
            "OKP" => {
                // RFC 8037 §2: OKP with crv Ed25519; Ed448 and X25519 are not signing keys here.
                if jwk.crv.as_deref() != Some("Ed25519") {
                    return Err("unsupported okp curve");
                }
                if !usable(&SigningAlgorithm::EdDsa) {
                    return Err("no allowed algorithm for this key");
                }
                let x = decode_coordinate(jwk.x.as_deref(), 32)?;
                let parsed = ParsedPublicKey::new(&signature::ED25519, x)
                    .map_err(|_| "ed25519 key rejected")?;
                vec![(SigningAlgorithm::EdDsa, parsed)]
            }
            "RSA" => {
                let n = decode_b64(jwk.n.as_deref()).ok_or("bad n")?;
                let e = decode_b64(jwk.e.as_deref()).ok_or("bad e")?;
                // RFC 7518 §6.3.1.1 forbids leading zero octets; tolerate them (some issuers
                // emit them) since they do not change the value.
                let n = strip_leading_zeros(&n);
                let e = strip_leading_zeros(&e);
                // RFC 7518 §3.3, §3.5: 2048 bits minimum. Checked here so a short key is
                // reported once at load rather than as bad signatures on every request.
                let bits = match n.first() {
                    Some(first) => n.len() * 8 - first.leading_zeros() as usize,
                    None => 0,
                };
                if !(2048..=8192).contains(&bits) {
                    return Err("rsa modulus outside 2048..=8192 bits");
                }
                let components = RsaPublicKeyComponents { n, e };
                let mut verifiers = Vec::new();
                for alg in SigningAlgorithm::ALL.iter().filter(|a| usable(a)) {
                    let Some(params) = rsa_parameters(*alg) else {
                        continue;
                    };
                    let parsed = components
                        .to_parsed_public_key(params)
                        .map_err(|_| "rsa key rejected")?;
                    verifiers.push((*alg, parsed));
                }
                if verifiers.is_empty() {
                    return Err("no allowed algorithm for this key");
                }
                verifiers
            }
            _ => return Err("unsupported kty"),
        };
        Ok(VerifyingKey {
            kid: jwk.kid.clone(),
            verifiers,
        })
    }
}

fn rsa_parameters(alg: SigningAlgorithm) -> Option<&'static signature::RsaParameters> {
    Some(match alg {
        SigningAlgorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        SigningAlgorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        SigningAlgorithm::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        SigningAlgorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
        SigningAlgorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
        SigningAlgorithm::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
        SigningAlgorithm::Es256 | SigningAlgorithm::Es384 | SigningAlgorithm::EdDsa => {
            return None;
        }
    })
}

fn decode_b64(value: Option<&str>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(value?).ok()
}

/// RFC 7518 §6.2.1.2: coordinates are the full-length octet string for the curve.
fn decode_coordinate(value: Option<&str>, len: usize) -> Result<Vec<u8>, &'static str> {
    let bytes = decode_b64(value).ok_or("bad key coordinate")?;
    if bytes.len() != len {
        return Err("key coordinate has the wrong length");
    }
    Ok(bytes)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
#[path = "jwks_tests.rs"]
mod tests;
