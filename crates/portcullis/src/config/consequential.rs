//! The config sections of consequential actions (DESIGN, "Approval and upstream
//! credentials"): `approval`, `limits.rate`. Raw → checked, every error with its YAML path,
//! like the rest of [`super`].

use std::path::Path;
use std::time::Duration;

use portcullis_identity::user_token::{JwksSource, UserTokenSettings, parse_algorithm};
use portcullis_proxy::rate::{RatePer, RateRule};
use serde::Deserialize;

use super::{Errors, duration, file};

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
    base: &Path,
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
