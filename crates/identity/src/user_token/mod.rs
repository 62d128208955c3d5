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
mod grant;
mod jwks;
mod settings;
mod verifier;

pub use cache::TokenMemo;
pub use error::{JwksError, TokenRejection};
pub use grant::ApprovalGrant;
pub use settings::{
    AlgorithmError, JwksSource, SigningAlgorithm, UserTokenSettings, parse_algorithm,
};
pub use verifier::{JwksStats, UserTokenVerifier};

/// The `iss` a compact JWT claims, read without verifying anything: only for choosing
/// which key set verifies it (that verification then checks `iss` again). `None` for
/// anything that is not a plausible token.
pub fn unverified_issuer(token: &str) -> Option<String> {
    const MAX: usize = 64 * 1024;
    if token.len() > MAX {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    claims::claimed_issuer(payload)
}

/// Entry point for `fuzz/` (cargo-fuzz lives outside the workspace and sees only public
/// items): runs the JOSE header and claims checks of a compact JWT on untrusted input, the
/// way the verifier does before and after the signature check, and asserts that the issuer
/// a key set is chosen by reads as the claims check reads it. Not part of the API.
#[doc(hidden)]
pub fn fuzz_header_and_claims(token: &str) {
    use settings::SigningAlgorithm as Alg;
    let mut segments = token.splitn(3, '.');
    let (Some(header), Some(payload)) = (segments.next(), segments.next()) else {
        return;
    };
    let _ = claims::parse_header(header, &[Alg::Es256, Alg::Rs256, Alg::EdDsa]);
    // The key set is chosen by the claimed `iss` before the claims are checked: wherever
    // the claims object parses, the choice must read the `iss` it holds.
    if let Some(mut object) = claims::decode_object(payload) {
        let issuer = match object.remove("iss") {
            Some(serde_json::Value::String(issuer)) => Some(issuer),
            _ => None,
        };
        assert_eq!(claims::claimed_issuer(payload), issuer, "iss of {payload}");
    }
    let rules = claims::ClaimRules {
        issuers: vec!["https://idp.example.org".to_owned()],
        audiences: vec!["orders-api".to_owned()],
        max_lifetime_secs: 3600,
        skew_secs: 60,
        groups_claim: "groups".to_owned(),
        require_actor_binding: true,
        max_actor_depth: 4,
    };
    if let Ok(checked) = claims::parse_claims(payload, &rules)
        && let Ok(caller) = portcullis_core::SpiffeId::parse("spiffe://example.org/agent")
    {
        let now = checked.user.expires_at.saturating_sub(1);
        let _ = claims::check_per_call(&checked, &rules, &caller, now);
    }
}
