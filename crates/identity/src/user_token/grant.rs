//! Approval grants: a JWT an approver signs for one challenged call (DESIGN, "Approval and
//! upstream credentials"). Verified with exactly the user-token rules (RFC 8725: algorithm
//! allow-list, no keys from the token, no `crit`; `iss`, `aud`, `exp`/`nbf`/`iat` with skew,
//! the lifetime cap), against its own key set, with `aud` the sidecar's SPIFFE ID. On top of
//! those: a `digest` and a `jti` claim, both required.
//!
//! What it does not: compare the digest with the call, or remember `jti`s (single use is the
//! proxy's, which sees every request).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::claims;
use super::error::TokenRejection;
use super::verifier::UserTokenVerifier;

/// The claims of a grant whose signature and standard claims verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalGrant {
    /// `sub`: who approved.
    pub approver: String,
    pub issuer: String,
    /// `digest`: the challenge digest this grant approves (`sha256:<hex>`).
    pub digest: String,
    /// `jti`: the grant's id; a grant is used at most once.
    pub jti: String,
    /// `exp`, unix seconds: how long its `jti` must be remembered.
    pub expires_at: u64,
}

/// Longest `digest` or `jti` accepted: a digest is 71 bytes; ids are short by convention.
const MAX_CLAIM_BYTES: usize = 256;

impl UserTokenVerifier {
    /// Verifies an approval grant at the system clock's time. Build the verifier with the
    /// grant settings (`approval.*`; audiences = the sidecar's own SPIFFE ID, actor binding
    /// off). Grants are not cached: each is meant to be seen once.
    pub async fn verify_grant(&self, token: &str) -> Result<ApprovalGrant, TokenRejection> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.verify_grant_at(token, now).await
    }

    /// [`verify_grant`](Self::verify_grant) at `now` (unix seconds).
    pub async fn verify_grant_at(
        &self,
        token: &str,
        now: u64,
    ) -> Result<ApprovalGrant, TokenRejection> {
        let (checked, payload) = self.verified_claims(token, now).await?;
        let object = claims::decode_object(payload).ok_or(TokenRejection::Malformed("claims"))?;
        let text = |name: &'static str| match object.get(name) {
            None => Err(TokenRejection::MissingClaim(name)),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_CLAIM_BYTES => Ok(s.clone()),
            Some(_) => Err(TokenRejection::Malformed(name)),
        };
        let digest = text("digest")?;
        let jti = text("jti")?;
        Ok(ApprovalGrant {
            approver: checked.user.subject.clone(),
            issuer: checked.user.issuer.clone(),
            digest,
            jti,
            expires_at: checked.user.expires_at,
        })
    }
}
