//! Why a user token was refused ([`TokenRejection`]) and why a JWKS could not be loaded
//! ([`JwksError`]). Messages name claims and headers, never token contents.

use std::path::PathBuf;

use thiserror::Error;

/// One variant per way a user token fails. [`TokenRejection::reason`] is the stable label
/// used for `portcullis_user_token_rejections_total{reason}` and the 401 body, so the set is
/// closed and carries no caller-controlled text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenRejection {
    #[error("token exceeds the size limit")]
    TooLarge,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("signature algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("token carries a key or key reference in its header (jwk, jku, x5u or x5c)")]
    UntrustedKeyHeader,
    #[error("token header lists critical extensions")]
    UnknownCrit,
    #[error("no key in the jwks matches the token")]
    UnknownKey,
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("token lifetime exceeds the configured maximum")]
    LifetimeTooLong,
    #[error("required claim {0} missing")]
    MissingClaim(&'static str),
    #[error("issuer not accepted")]
    WrongIssuer,
    #[error("audience not accepted")]
    WrongAudience,
    #[error("token has no act claim and actor binding is required")]
    ActorMissing,
    #[error("act.sub does not name the calling workload")]
    ActorMismatch,
    #[error("malformed act or may_act claim")]
    ActorMalformed,
    #[error("act chain deeper than the configured maximum")]
    ActorChainTooDeep,
    #[error("may_act does not allow the calling workload")]
    MayActDenied,
    #[error("jwks unavailable")]
    JwksUnavailable,
    #[error("token typ is not one of the accepted types")]
    WrongType,
    #[error("the jwks could not be refreshed for longer than jwks_max_stale")]
    JwksStale,
}

impl TokenRejection {
    /// Every reason label, for pre-registering metric series.
    pub const REASONS: [&'static str; 20] = [
        "too_large",
        "malformed",
        "algorithm_not_allowed",
        "untrusted_key_header",
        "unknown_crit",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "lifetime_too_long",
        "missing_claim",
        "wrong_issuer",
        "wrong_audience",
        "actor_missing",
        "actor_mismatch",
        "actor_malformed",
        "actor_chain_too_deep",
        "may_act_denied",
        "jwks_unavailable",
    ];

    /// Stable snake_case label; safe to show to the caller and to use as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenRejection::TooLarge => "too_large",
            TokenRejection::Malformed(_) => "malformed",
            TokenRejection::AlgorithmNotAllowed => "algorithm_not_allowed",
            TokenRejection::UntrustedKeyHeader => "untrusted_key_header",
            TokenRejection::UnknownCrit => "unknown_crit",
            TokenRejection::UnknownKey => "unknown_key",
            TokenRejection::BadSignature => "bad_signature",
            TokenRejection::Expired => "expired",
            TokenRejection::NotYetValid => "not_yet_valid",
            TokenRejection::IssuedInFuture => "issued_in_future",
            TokenRejection::LifetimeTooLong => "lifetime_too_long",
            TokenRejection::MissingClaim(_) => "missing_claim",
            TokenRejection::WrongIssuer => "wrong_issuer",
            TokenRejection::WrongAudience => "wrong_audience",
            TokenRejection::ActorMissing => "actor_missing",
            TokenRejection::ActorMismatch => "actor_mismatch",
            TokenRejection::ActorMalformed => "actor_malformed",
            TokenRejection::ActorChainTooDeep => "actor_chain_too_deep",
            TokenRejection::MayActDenied => "may_act_denied",
            TokenRejection::JwksUnavailable => "jwks_unavailable",
            TokenRejection::WrongType => "wrong_type",
            TokenRejection::JwksStale => "jwks_stale",
        }
    }
}

/// Why a JWKS could not be loaded, fetched or used.
#[derive(Debug, Error)]
pub enum JwksError {
    #[error("reading jwks file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jwks document larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("jwks is not valid json: {0}")]
    Json(#[source] serde_json::Error),
    #[error("jwks has no `keys` array")]
    NoKeysArray,
    #[error("jwks has no key usable with the allowed algorithms")]
    NoUsableKeys,
    #[error("jwks url {0}: {1}")]
    InvalidUrl(String, &'static str),
    #[error("reading ca file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ca file {0} holds no usable certificate")]
    NoCaCertificates(PathBuf),
    #[error("building tls client config: {0}")]
    Tls(#[source] rustls::Error),
    #[error("fetching jwks: {0}")]
    Fetch(String),
    #[error("fetching jwks: http status {0}")]
    Status(u16),
    #[error("fetching jwks timed out")]
    Timeout,
    #[error("no issuers or no audiences configured")]
    Unconfigured,
}
