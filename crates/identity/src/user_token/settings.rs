//! Typed, already-validated settings for user-token verification, and the algorithm
//! allow-list vocabulary. The binary's YAML loader maps its raw config onto these; nothing
//! here reads files or environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// A JWS signature algorithm this verifier can check (RFC 7518 §3.1, RFC 8037 §3.1).
///
/// Only asymmetric algorithms exist here. `none` and the HMAC family are not representable:
/// the JWKS is public material, so a shared secret in it would let anyone mint tokens, and
/// RFC 8725 §3.1 asks for an explicit allow-list that never lets the token pick `none` or
/// use a public key as an HMAC secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    Es256,
    Es384,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    /// Ed25519 only (RFC 8037); Ed448 is not supported.
    EdDsa,
}

impl SigningAlgorithm {
    pub const ALL: [SigningAlgorithm; 9] = [
        SigningAlgorithm::Es256,
        SigningAlgorithm::Es384,
        SigningAlgorithm::Rs256,
        SigningAlgorithm::Rs384,
        SigningAlgorithm::Rs512,
        SigningAlgorithm::Ps256,
        SigningAlgorithm::Ps384,
        SigningAlgorithm::Ps512,
        SigningAlgorithm::EdDsa,
    ];

    /// The JOSE `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            SigningAlgorithm::Es256 => "ES256",
            SigningAlgorithm::Es384 => "ES384",
            SigningAlgorithm::Rs256 => "RS256",
            SigningAlgorithm::Rs384 => "RS384",
            SigningAlgorithm::Rs512 => "RS512",
            SigningAlgorithm::Ps256 => "PS256",
            SigningAlgorithm::Ps384 => "PS384",
            SigningAlgorithm::Ps512 => "PS512",
            SigningAlgorithm::EdDsa => "EdDSA",
        }
    }

    /// Exact, case-sensitive lookup of a JOSE `alg` name (RFC 7515 §4.1.1: the value is
    /// case-sensitive). `None` for anything this verifier cannot check, `none` and HS*
    /// included.
    pub fn from_name(name: &str) -> Option<Self> {
        SigningAlgorithm::ALL
            .into_iter()
            .find(|alg| alg.name() == name)
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a configured algorithm name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AlgorithmError {
    #[error("algorithm `none` is never accepted (RFC 8725 section 3.1)")]
    None,
    #[error("symmetric algorithm {0} is not supported: user tokens are verified with public keys")]
    Symmetric(String),
    #[error(
        "unknown algorithm {0}; expected one of ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA"
    )]
    Unknown(String),
}

/// Parses a configured algorithm name, so config validation can say exactly what is wrong.
pub fn parse_algorithm(name: &str) -> Result<SigningAlgorithm, AlgorithmError> {
    if let Some(alg) = SigningAlgorithm::from_name(name) {
        return Ok(alg);
    }
    if name.eq_ignore_ascii_case("none") {
        return Err(AlgorithmError::None);
    }
    if matches!(name, "HS256" | "HS384" | "HS512") {
        return Err(AlgorithmError::Symmetric(name.to_owned()));
    }
    Err(AlgorithmError::Unknown(name.to_owned()))
}

/// Where the JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local file (typically a mounted ConfigMap), polled for changes.
    File(PathBuf),
    /// An `https` URL (plain `http` only for loopback hosts), fetched at start and refreshed.
    Url {
        url: String,
        /// PEM roots to trust for this URL; the compiled-in Mozilla roots when absent.
        ca_file: Option<PathBuf>,
    },
}

/// Everything the verifier needs, already validated by the config loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserTokenSettings {
    pub jwks: JwksSource,
    /// Accepted `iss` values, compared exactly.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; a token is accepted when any of its audiences is listed.
    pub audiences: Vec<String>,
    /// The algorithm allow-list; see [`UserTokenSettings::DEFAULT_ALGORITHMS`].
    pub algorithms: Vec<SigningAlgorithm>,
    /// Upper bound on `exp - iat`.
    pub max_lifetime: Duration,
    /// Tolerance applied to `exp`, `nbf` and `iat`.
    pub clock_skew: Duration,
    /// The claim holding the user's groups (an array of strings).
    pub groups_claim: String,
    /// Reject tokens without an RFC 8693 `act` claim naming the caller.
    pub require_actor_binding: bool,
    /// Tokens longer than this are rejected before any decoding.
    pub max_token_bytes: usize,
    /// Deepest accepted nesting of `act` claims (the caller's own `act` counts as 1).
    pub max_actor_depth: usize,
    /// How often the JWKS file is polled or the JWKS URL refetched.
    pub jwks_refresh_interval: Duration,
    /// Minimum spacing of on-demand JWKS URL fetches caused by an unknown `kid`.
    pub jwks_min_refetch_interval: Duration,
    /// Deadline for one JWKS URL fetch (connect, TLS, headers and body).
    pub jwks_fetch_timeout: Duration,
    /// Largest accepted JWKS document (file or HTTP body).
    pub max_jwks_bytes: usize,
    /// Verified tokens remembered so a repeated token skips the signature check.
    pub cache_capacity: usize,
    /// How long the key set may go without a successful load or refresh before tokens are
    /// refused (`user_token.jwks_max_stale`): a key the issuer removed must stop working even
    /// when its JWKS cannot be reached.
    pub jwks_max_stale: Duration,
    /// Accepted values of the `typ` header when a token has one (`user_token.allowed_types`).
    pub allowed_types: Vec<String>,
}

impl UserTokenSettings {
    /// Asymmetric algorithms only: no `none`, no HMAC (RFC 8725 §3.1, §3.2).
    pub const DEFAULT_ALGORITHMS: [SigningAlgorithm; 9] = SigningAlgorithm::ALL;
    pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);
    pub const DEFAULT_GROUPS_CLAIM: &'static str = "groups";
    pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
    pub const DEFAULT_MAX_ACTOR_DEPTH: usize = 4;
    pub const DEFAULT_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);
    pub const DEFAULT_JWKS_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
    pub const DEFAULT_JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_JWKS_BYTES: usize = 256 * 1024;
    pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
    pub const DEFAULT_JWKS_MAX_STALE: Duration = Duration::from_secs(3600);
    /// RFC 7519 §5.1's `JWT` and RFC 9068's `at+jwt`.
    pub const DEFAULT_ALLOWED_TYPES: [&'static str; 2] = ["JWT", "at+jwt"];

    /// Settings with every optional knob at its default; the four values an operator must
    /// decide are the arguments.
    pub fn new(
        jwks: JwksSource,
        issuers: Vec<String>,
        audiences: Vec<String>,
        max_lifetime: Duration,
    ) -> Self {
        UserTokenSettings {
            jwks,
            issuers,
            audiences,
            algorithms: Self::DEFAULT_ALGORITHMS.to_vec(),
            max_lifetime,
            clock_skew: Self::DEFAULT_CLOCK_SKEW,
            groups_claim: Self::DEFAULT_GROUPS_CLAIM.to_owned(),
            require_actor_binding: true,
            max_token_bytes: Self::DEFAULT_MAX_TOKEN_BYTES,
            max_actor_depth: Self::DEFAULT_MAX_ACTOR_DEPTH,
            jwks_refresh_interval: Self::DEFAULT_JWKS_REFRESH_INTERVAL,
            jwks_min_refetch_interval: Self::DEFAULT_JWKS_MIN_REFETCH_INTERVAL,
            jwks_fetch_timeout: Self::DEFAULT_JWKS_FETCH_TIMEOUT,
            max_jwks_bytes: Self::DEFAULT_MAX_JWKS_BYTES,
            cache_capacity: Self::DEFAULT_CACHE_CAPACITY,
            jwks_max_stale: Self::DEFAULT_JWKS_MAX_STALE,
            allowed_types: Self::DEFAULT_ALLOWED_TYPES.map(str::to_owned).to_vec(),
        }
    }
}
