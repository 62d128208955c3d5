//! The config sections of consequential actions (DESIGN, "Approval and upstream
//! credentials"): `approval`, `limits.rate`, `routes[].credential`. Raw → checked, every error with its YAML path,
//! like the rest of [`super`].

use std::time::Duration;

use portcullis_identity::user_token::{JwksSource, UserTokenSettings, parse_algorithm};
use portcullis_proxy::credential::{CredentialSpec, TokenExchangeSpec};
use portcullis_proxy::rate::{RatePer, RateRule};
use serde::Deserialize;

use super::{Base, Errors, duration, file};

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawApproval {
    jwks_file: Option<String>,
    #[serde(default)]
    issuers: Vec<String>,
    algorithms: Option<Vec<String>>,
    max_lifetime: Option<String>,
    clock_skew: Option<String>,
    max_tracked_grants: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRate {
    per: Option<String>,
    requests_per_minute: Option<u32>,
    burst: Option<u32>,
}

/// `approval`, checked. The verifier is built by `Config::into_options`, once the sidecar's
/// own SPIFFE ID (the grants' `aud`) is known.
#[derive(Debug, Clone)]
pub struct ApprovalConfig {
    /// Audiences are filled in with the serving SPIFFE ID.
    pub settings: UserTokenSettings,
    pub max_tracked_grants: usize,
}

/// `approval.max_lifetime` when not set (DESIGN: default `5m`).
const DEFAULT_GRANT_LIFETIME: Duration = Duration::from_secs(300);

pub(super) fn approval(
    raw: RawApproval,
    base: Base<'_>,
    errors: &mut Errors,
) -> Option<ApprovalConfig> {
    let before = errors.0.len();
    let jwks = file(base, "approval.jwks_file", raw.jwks_file.as_deref(), errors);
    if raw.issuers.is_empty() {
        errors.add("approval.issuers", "at least one issuer is required");
    }
    let mut algorithms = Vec::new();
    for (index, name) in raw.algorithms.unwrap_or_default().iter().enumerate() {
        match parse_algorithm(name) {
            Ok(alg) => algorithms.push(alg),
            Err(e) => errors.add(format!("approval.algorithms[{index}]"), e.to_string()),
        }
    }
    let max_lifetime = duration("approval.max_lifetime", raw.max_lifetime.as_deref(), errors)
        .unwrap_or(DEFAULT_GRANT_LIFETIME);
    let clock_skew = duration("approval.clock_skew", raw.clock_skew.as_deref(), errors);
    // A grant approves one call: an hour is far longer than a person's approval takes.
    super::check_short(
        errors,
        "approval.max_lifetime",
        Some(max_lifetime),
        std::time::Duration::from_secs(3600),
    );
    super::check_short(
        errors,
        "approval.clock_skew",
        clock_skew,
        super::MAX_CLOCK_SKEW,
    );
    if raw.max_tracked_grants == Some(0) {
        errors.add("approval.max_tracked_grants", "must be greater than 0");
    }
    if errors.0.len() != before {
        return None;
    }
    let mut settings = UserTokenSettings::new(
        JwksSource::File(jwks?),
        raw.issuers,
        Vec::new(),
        max_lifetime,
    );
    // A grant is signed by an approver, not presented through an actor chain.
    settings.require_actor_binding = false;
    if !algorithms.is_empty() {
        settings.algorithms = algorithms;
    }
    if let Some(skew) = clock_skew {
        settings.clock_skew = skew;
    }
    Some(ApprovalConfig {
        settings,
        max_tracked_grants: raw.max_tracked_grants.unwrap_or(10_000),
    })
}

pub(super) fn rates(raw: Vec<RawRate>, errors: &mut Errors) -> Vec<RateRule> {
    let mut rules = Vec::new();
    for (index, rate) in raw.into_iter().enumerate() {
        let path = format!("limits.rate[{index}]");
        let per = match rate.per.as_deref() {
            Some("agent") => Some(RatePer::Agent),
            Some("user") => Some(RatePer::User),
            Some("tool") => Some(RatePer::Tool),
            Some(other) => {
                errors.add(
                    format!("{path}.per"),
                    format!("{other:?} is not one of: agent, user, tool"),
                );
                None
            }
            None => {
                errors.add(format!("{path}.per"), "required");
                None
            }
        };
        let rpm = match rate.requests_per_minute {
            Some(0) | None => {
                errors.add(
                    format!("{path}.requests_per_minute"),
                    "required, greater than 0",
                );
                None
            }
            rpm => rpm,
        };
        if rate.burst == Some(0) {
            errors.add(format!("{path}.burst"), "must be greater than 0");
            continue;
        }
        if let (Some(per), Some(rpm)) = (per, rpm) {
            rules.push(RateRule {
                per,
                requests_per_minute: rpm,
                // Without a burst, a minute's worth may come at once.
                burst: rate.burst.unwrap_or(rpm),
            });
        }
    }
    rules
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawCredential {
    file: Option<String>,
    header: Option<String>,
    prefix: Option<String>,
    token_exchange: Option<RawTokenExchange>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawTokenExchange {
    endpoint: Option<String>,
    audience: Option<String>,
    /// Space-separated, as in RFC 6749 §3.3.
    scope: Option<String>,
    /// PEM roots of the token service's certificate.
    ca_file: Option<String>,
    timeout: Option<String>,
}

/// `routes[i].credential`.
pub(super) fn credential(
    raw: RawCredential,
    path: &str,
    base: Base<'_>,
    errors: &mut Errors,
) -> Option<CredentialSpec> {
    match (raw.file.as_deref(), raw.token_exchange) {
        (Some(_), Some(_)) => {
            errors.add(path, "set one of file and token_exchange, not both");
            None
        }
        (None, None) => {
            errors.add(path, "one of file or token_exchange is required");
            None
        }
        (Some(file_path), None) => {
            let header_name = raw.header.as_deref().unwrap_or("authorization");
            let header = match http::HeaderName::from_bytes(header_name.as_bytes()) {
                Ok(header) => Some(header),
                Err(_) => {
                    errors.add(
                        format!("{path}.header"),
                        format!("{header_name:?} is not a header name"),
                    );
                    None
                }
            };
            let prefix = raw.prefix.unwrap_or_else(|| {
                if header_name.eq_ignore_ascii_case("authorization") {
                    "Bearer ".to_owned()
                } else {
                    String::new()
                }
            });
            let file = file(base, &format!("{path}.file"), Some(file_path), errors);
            Some(CredentialSpec::File {
                path: file?,
                header: header?,
                prefix,
            })
        }
        (None, Some(exchange)) => {
            for (key, set) in [
                ("header", raw.header.is_some()),
                ("prefix", raw.prefix.is_some()),
            ] {
                if set {
                    errors.add(
                        format!("{path}.{key}"),
                        "applies to file credentials only (an exchanged token goes in authorization)",
                    );
                }
            }
            token_exchange(exchange, &format!("{path}.token_exchange"), base, errors)
                .map(CredentialSpec::TokenExchange)
        }
    }
}

fn token_exchange(
    raw: RawTokenExchange,
    path: &str,
    base: Base<'_>,
    errors: &mut Errors,
) -> Option<TokenExchangeSpec> {
    let endpoint_path = format!("{path}.endpoint");
    let endpoint = match raw.endpoint.as_deref().map(str::parse::<http::Uri>) {
        None => {
            errors.add(&endpoint_path, "required");
            None
        }
        Some(Ok(uri)) if uri.scheme_str() == Some("https") && uri.host().is_some() => Some(uri),
        Some(_) => {
            errors.add(
                &endpoint_path,
                "must be an https:// URL (the sidecar authenticates with its SVID over mTLS)",
            );
            None
        }
    };
    let audience = match raw.audience {
        Some(audience) if !audience.trim().is_empty() => Some(audience),
        _ => {
            errors.add(format!("{path}.audience"), "required");
            None
        }
    };
    let ca_file = file(
        base,
        &format!("{path}.ca_file"),
        raw.ca_file.as_deref(),
        errors,
    );
    let timeout = duration(&format!("{path}.timeout"), raw.timeout.as_deref(), errors)
        .unwrap_or(Duration::from_secs(5));
    Some(TokenExchangeSpec {
        endpoint: endpoint?,
        audience: audience?,
        scope: raw
            .scope
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        ca_file: ca_file?,
        timeout,
    })
}
