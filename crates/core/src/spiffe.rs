//! SPIFFE IDs, parsed strictly as the SPIFFE ID specification (`SPIFFE-ID.md`) says.
//!
//! A SPIFFE ID is the identity a policy names, so two spellings of one workload must never
//! become two principals. This parser therefore accepts only the canonical form: a lower-case
//! `spiffe` scheme, a lower-case trust domain and no percent-encoding. Upper-case variants,
//! which the spec calls case-insensitive and some libraries canonicalise, are rejected
//! rather than silently folded (see the DIVERGENCE rows of the test vectors).

use std::fmt;

/// `spiffe://`, the only accepted prefix (spec §2: the scheme MUST be `spiffe`).
const SCHEME: &str = "spiffe://";
/// Spec §2.3: implementations MUST support URIs up to 2048 bytes and SHOULD NOT generate
/// longer ones; we refuse them, as rust-spiffe does.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Spec §2.3: the trust domain is at most 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID. Messages name the rule, never echo the input, so they are
/// safe to log next to attacker-chosen certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("scheme must be exactly \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain may only contain lower-case letters, digits, '.', '-' and '_'")]
    BadTrustDomainChar,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("path segments may only contain letters, digits, '.', '-' and '_'")]
    BadPathSegmentChar,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path has a trailing '/'")]
    TrailingSlash,
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
}

/// A trust domain name (spec §2.1), e.g. `prod.example.org`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme), as used for configuration keys.
    pub fn parse(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A syntactically valid SPIFFE ID. The path may be empty (the trust domain's own ID);
/// [`SpiffeId::is_workload`] tells whether it can name a workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (equal to `uri.len()` when there is no path).
    path_start: usize,
}

impl SpiffeId {
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        // Checked last so that a long ID with a more specific defect reports that defect.
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(Self {
            uri: input.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, with its leading `/`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// X509-SVID spec §3: a leaf's SPIFFE ID MUST have a non-root path. A root-only ID names a
    /// trust domain (its CA), never a calling workload.
    pub fn is_workload(&self) -> bool {
        !self.path().is_empty()
    }

    /// The Kubernetes namespace and service account when the path follows the
    /// `/ns/<namespace>/sa/<service-account>` convention used by SPIRE and cert-manager.
    pub fn kubernetes_service_account(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Spec §2.1: lower-case letters, digits, dots, dashes and underscores. That excludes ports,
/// user info, IPv6 literals and percent-encoding without checking for each separately.
fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if !td
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    Ok(())
}

/// Spec §2.2: `/`-separated segments of `[A-Za-z0-9.-_]`, none empty, none `.` or `..`, and no
/// trailing `/`. Query, fragment and percent-encoding fall out of the character set.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is the empty string before it.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            return Err(if segments.peek().is_none() {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment
            });
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(SpiffeIdError::BadPathSegmentChar);
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "spiffe_tests.rs"]
mod tests;
