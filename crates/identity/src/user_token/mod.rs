//! User-token verification: the JWT an agent forwards for the user it acts for, checked
//! against a JWKS per RFC 7519 and the JWT best current practices of RFC 8725, and bound
//! to the calling workload through RFC 8693 actor claims.
//!
//! What it does: algorithm allow-list (asymmetric only), key selection by `kid` from a
//! JWKS file (polled) or URL (fetched, cached, refreshed, refetched on an unknown `kid` at
//! most once per interval), refusal of keys the token brings (`jwk`, `jku`, `x5u`, `x5c`)
//! and of `crit`, `exp`/`nbf`/`iat` with bounded skew, `iss`, `aud`, a lifetime cap, actor
//! binding, and a cache of verified tokens so a repeated token costs no signature check.
//!
//! What it does not: decide anything (Cedar does, from the returned [`UserClaims`]), read
//! the token from a request, or keep metrics itself; the proxy reads the counters here.
//!
//! [`UserClaims`]: portcullis_core::UserClaims

mod cache;
mod claims;
mod error;
mod fetch;
mod jwks;
mod settings;
mod verifier;

pub use error::{JwksError, TokenRejection};
pub use settings::{
    AlgorithmError, JwksSource, SigningAlgorithm, UserTokenSettings, parse_algorithm,
};
pub use verifier::{JwksStats, UserTokenVerifier};
