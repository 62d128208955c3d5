//! The JOSE header and JWT claims checks: pure functions over decoded JSON, no keys, no I/O.
//!
//! Checks are split in two. [`parse_claims`] does everything that depends only on the
//! signed token and the settings (required claims, types, `iss`, `aud`, lifetime, the
//! shape of `act`/`may_act`); its result may be cached. [`check_per_call`] does what depends
//! on the clock or the caller (`exp`, `nbf`, `iat`, actor binding) and runs on every call,
//! cache hit or not.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use portcullis_core::{SpiffeId, UserClaims};
use serde_json::{Map, Value};

use super::error::TokenRejection;
use super::settings::SigningAlgorithm;

/// The settings the claim checks use, in the units they compare in.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRules {
    pub(crate) issuers: Vec<String>,
    pub(crate) audiences: Vec<String>,
    pub(crate) max_lifetime_secs: u64,
    pub(crate) skew_secs: u64,
    pub(crate) groups_claim: String,
    pub(crate) require_actor_binding: bool,
    pub(crate) max_actor_depth: usize,
}

/// The protected header members this verifier acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) alg: SigningAlgorithm,
    pub(crate) kid: Option<String>,
    /// `typ` (RFC 7515 §4.1.9), when present; see [`type_allowed`].
    pub(crate) typ: Option<String>,
}

/// RFC 8725 §3.11: a token of another kind (an ID token, a logout token, a `dpop+jwt`)
/// must not be accepted as an access token just because its signature and claims fit. When
/// `typ` is present it must be one of `allowed`; media type names compare case-insensitively
/// and the `application/` prefix may be omitted (RFC 7515 §4.1.9).
pub(crate) fn type_allowed(typ: Option<&str>, allowed: &[String]) -> bool {
    let bare = |t: &str| -> String {
        let t = t.trim().to_ascii_lowercase();
        t.strip_prefix("application/")
            .map(str::to_owned)
            .unwrap_or(t)
    };
    typ.is_none_or(|typ| allowed.iter().any(|a| bare(a) == bare(typ)))
}

/// Header members that carry or point at a key. RFC 8725 §3.10 warns against trusting
/// them; a token naming its own key proves nothing, and fetching a URL a token chose is
/// a server-side request forgery. Their mere presence rejects the token, and nothing is
/// fetched (RFC 7515 §4.1.2, §4.1.3, §4.1.5, §4.1.6).
const KEY_HEADERS: [&str; 4] = ["jwk", "jku", "x5u", "x5c"];

/// Decodes and checks the JOSE header (RFC 7515 §4). The library is not trusted to do this:
/// it accepts `crit`, and the checks here must run before any key is looked up.
pub(crate) fn parse_header(
    segment: &str,
    allowed: &[SigningAlgorithm],
) -> Result<Header, TokenRejection> {
    let header = decode_object(segment).ok_or(TokenRejection::Malformed("header"))?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(TokenRejection::Malformed("header alg")),
        None => return Err(TokenRejection::Malformed("header without alg")),
    };
    // RFC 8725 §3.1: the algorithm comes from the allow-list, never from the token alone;
    // `none` and HS* are not even representable.
    let alg = SigningAlgorithm::from_name(alg)
        .filter(|alg| allowed.contains(alg))
        .ok_or(TokenRejection::AlgorithmNotAllowed)?;
    if KEY_HEADERS.iter().any(|name| header.contains_key(*name)) {
        return Err(TokenRejection::UntrustedKeyHeader);
    }
    // RFC 7515 §4.1.11: a recipient that does not understand a listed extension must
    // reject the JWS. This verifier understands none, and `crit: []` is itself invalid.
    if header.contains_key("crit") {
        return Err(TokenRejection::UnknownCrit);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenRejection::Malformed("header kid")),
    };
    let typ = match header.get("typ") {
        None => None,
        Some(Value::String(typ)) => Some(typ.clone()),
        Some(_) => return Err(TokenRejection::Malformed("header typ")),
    };
    Ok(Header { alg, kid, typ })
}

/// The claims of a token whose signature verified and whose static checks passed. Cached
/// by token hash; [`check_per_call`] hands out its [`UserClaims`] for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckedToken {
    /// What every call presenting the token gets, shared: a request with a cached token
    /// copies none of its claims (the audit record and the decision keep this `Arc`).
    /// `actor_chain` holds the subjects of the nested `act` claims, outermost first.
    pub(crate) user: Arc<UserClaims>,
    not_before: Option<u64>,
    issued_at: u64,
    /// `may_act.sub`, when the token carries `may_act`.
    may_act: Option<String>,
}

/// Decodes the payload and runs every check that depends only on the token and settings.
pub(crate) fn parse_claims(
    segment: &str,
    rules: &ClaimRules,
) -> Result<CheckedToken, TokenRejection> {
    let claims = decode_object(segment).ok_or(TokenRejection::Malformed("claims"))?;

    // RFC 7519 §4.1.4: `exp` is what bounds a stolen token; a token without it is refused.
    let expires_at =
        numeric_date(&claims, "exp", Rounding::Down)?.ok_or(TokenRejection::MissingClaim("exp"))?;
    // Strict reading of "exp - iat <= max_lifetime": without `iat` the lifetime cannot be
    // bounded by what the issuer asserted, so the token is refused rather than measured
    // from now (which would let a token live forever by being re-presented).
    let issued_at =
        numeric_date(&claims, "iat", Rounding::Up)?.ok_or(TokenRejection::MissingClaim("iat"))?;
    let not_before = numeric_date(&claims, "nbf", Rounding::Up)?;

    let issuer = required_string(&claims, "iss")?;
    let subject = required_string(&claims, "sub")?;

    // RFC 7519 §4.1.1: `iss` compared as a case-sensitive string.
    if !rules.issuers.contains(&issuer) {
        return Err(TokenRejection::WrongIssuer);
    }
    // RFC 7519 §4.1.3: `aud` is a string or an array of strings; the token is for us when
    // one of them is ours.
    let audience_ok = match claims.get("aud") {
        None => return Err(TokenRejection::MissingClaim("aud")),
        Some(Value::String(aud)) => rules.audiences.contains(aud),
        Some(Value::Array(values)) => {
            let mut ok = false;
            for value in values {
                let aud = value.as_str().ok_or(TokenRejection::Malformed("aud"))?;
                ok |= rules.audiences.iter().any(|accepted| accepted == aud);
            }
            ok
        }
        Some(_) => return Err(TokenRejection::Malformed("aud")),
    };
    if !audience_ok {
        return Err(TokenRejection::WrongAudience);
    }

    if lifetime_exceeds(&claims, rules.max_lifetime_secs)? {
        return Err(TokenRejection::LifetimeTooLong);
    }

    let actor_chain = match claims.get("act") {
        None => Vec::new(),
        Some(act) => actor_chain(act, rules.max_actor_depth)?,
    };
    // RFC 8693 §4.4: `may_act` is a JSON object naming the party allowed to act.
    let may_act = match claims.get("may_act") {
        None => None,
        Some(Value::Object(may_act)) => match may_act.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => Some(sub.clone()),
            _ => return Err(TokenRejection::ActorMalformed),
        },
        Some(_) => return Err(TokenRejection::ActorMalformed),
    };

    Ok(CheckedToken {
        user: Arc::new(UserClaims {
            subject,
            issuer,
            scopes: scopes(&claims)?,
            email: optional_string(&claims, "email")?,
            groups: match claims.get(&rules.groups_claim) {
                None => Vec::new(),
                Some(value) => string_set(value).ok_or(TokenRejection::Malformed("groups"))?,
            },
            actor_chain,
            expires_at,
        }),
        not_before,
        issued_at,
        may_act,
    })
}

/// The checks that depend on the clock or the caller; run on every call.
pub(crate) fn check_per_call(
    token: &CheckedToken,
    rules: &ClaimRules,
    caller: &SpiffeId,
    now: u64,
) -> Result<Arc<UserClaims>, TokenRejection> {
    check_times(token, rules, now)?;

    // RFC 8693 §4.1: the outermost `act` is the current actor, which must be the workload
    // presenting the token; a token lifted by another workload is then useless.
    match token.user.actor_chain.first() {
        Some(actor) if actor != caller.as_str() => return Err(TokenRejection::ActorMismatch),
        Some(_) => {}
        None if rules.require_actor_binding => return Err(TokenRejection::ActorMissing),
        None => {}
    }
    if token
        .may_act
        .as_deref()
        .is_some_and(|allowed| allowed != caller.as_str())
    {
        return Err(TokenRejection::MayActDenied);
    }

    Ok(Arc::clone(&token.user))
}

/// `exp`, `nbf` and `iat` against the clock, with the configured skew.
pub(crate) fn check_times(
    token: &CheckedToken,
    rules: &ClaimRules,
    now: u64,
) -> Result<(), TokenRejection> {
    let skew = rules.skew_secs;
    // RFC 7519 §4.1.4: the current time must be before `exp` (plus the allowed leeway).
    if now >= token.user.expires_at.saturating_add(skew) {
        return Err(TokenRejection::Expired);
    }
    // RFC 7519 §4.1.5: not accepted before `nbf`; checked, never skipped.
    if token
        .not_before
        .is_some_and(|nbf| now.saturating_add(skew) < nbf)
    {
        return Err(TokenRejection::NotYetValid);
    }
    // RFC 7519 §4.1.6 leaves `iat` informational; a token minted in the future is an
    // issuer clock fault or a forgery attempt at the lifetime cap, so it is refused.
    if token.issued_at > now.saturating_add(skew) {
        return Err(TokenRejection::IssuedInFuture);
    }
    Ok(())
}

/// RFC 8693 §4.1: `act` is an object whose `sub` names the actor, nesting the prior actors
/// in its own `act`. Walked iteratively and cut off at `max_depth`.
fn actor_chain(act: &Value, max_depth: usize) -> Result<Vec<String>, TokenRejection> {
    let mut chain = Vec::new();
    let mut current = act;
    loop {
        let Value::Object(actor) = current else {
            return Err(TokenRejection::ActorMalformed);
        };
        match actor.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => chain.push(sub.clone()),
            _ => return Err(TokenRejection::ActorMalformed),
        }
        if chain.len() > max_depth {
            return Err(TokenRejection::ActorChainTooDeep);
        }
        match actor.get("act") {
            Some(next) => current = next,
            None => return Ok(chain),
        }
    }
}

/// `scope` (RFC 8693 §4.2: space-separated string) or, when absent, `scp` (an array of
/// strings, or a space-separated string as some issuers emit). Duplicates dropped.
fn scopes(claims: &Map<String, Value>) -> Result<Vec<String>, TokenRejection> {
    match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(scope)), _) => Ok(split_scopes(scope)),
        (Some(_), _) => Err(TokenRejection::Malformed("scope")),
        (None, Some(Value::String(scp))) => Ok(split_scopes(scp)),
        (None, Some(scp)) => string_set(scp).ok_or(TokenRejection::Malformed("scp")),
        (None, None) => Ok(Vec::new()),
    }
}

fn split_scopes(scope: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in scope.split(' ').filter(|s| !s.is_empty()) {
        if !out.iter().any(|seen| seen == s) {
            out.push(s.to_owned());
        }
    }
    out
}

/// An array of strings as an ordered set; `None` when the value is not such an array.
fn string_set(value: &Value) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in value.as_array()? {
        let s = item.as_str()?;
        if !out.iter().any(|seen| seen == s) {
            out.push(s.to_owned());
        }
    }
    Some(out)
}

fn required_string(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<String, TokenRejection> {
    match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(TokenRejection::Malformed(name)),
        None => Err(TokenRejection::MissingClaim(name)),
    }
}

fn optional_string(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, TokenRejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenRejection::Malformed(name)),
    }
}

#[derive(Clone, Copy)]
enum Rounding {
    Down,
    Up,
}

/// RFC 7519 §2 NumericDate: seconds since the epoch, possibly fractional. Fractions are
/// rounded in the direction that shortens validity (`exp` down, `nbf`/`iat` up).
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
    rounding: Rounding,
) -> Result<Option<u64>, TokenRejection> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let Value::Number(number) = value else {
        return Err(TokenRejection::Malformed(name));
    };
    if let Some(secs) = number.as_u64() {
        return Ok(Some(secs));
    }
    match number.as_f64() {
        // Negative or beyond u64 range (~5.8e11 years): not a date this verifier meets.
        Some(secs) if (0.0..1.8e19).contains(&secs) => {
            let rounded = match rounding {
                Rounding::Down => secs.floor(),
                Rounding::Up => secs.ceil(),
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(Some(rounded as u64))
        }
        _ => Err(TokenRejection::Malformed(name)),
    }
}

/// Whether `exp - iat` (both present and numbers: checked before) is over `max` seconds,
/// measured on the dates as given. The rounded dates would not do: they are rounded the ways
/// that shorten validity, `iat` up and `exp` down, which lengthens the lifetime they measure
/// by up to two seconds less than it is (`iat` 1000.01, `exp` 4601.99 would read 3600).
fn lifetime_exceeds(claims: &Map<String, Value>, max: u64) -> Result<bool, TokenRejection> {
    let (Some(Value::Number(exp)), Some(Value::Number(iat))) =
        (claims.get("exp"), claims.get("iat"))
    else {
        return Err(TokenRejection::Malformed("exp"));
    };
    if let (Some(exp), Some(iat)) = (exp.as_u64(), iat.as_u64()) {
        let lifetime = exp
            .checked_sub(iat)
            .ok_or(TokenRejection::Malformed("exp before iat"))?;
        return Ok(lifetime > max);
    }
    match (exp.as_f64(), iat.as_f64()) {
        (Some(exp), Some(iat)) if exp >= iat =>
        {
            #[allow(clippy::cast_precision_loss)]
            Ok(exp - iat > max as f64)
        }
        _ => Err(TokenRejection::Malformed("exp before iat")),
    }
}

/// The `iss` of an undecoded payload segment, if it is a string: what chooses the key set
/// a token is verified with, before its signature is checked. Read without building the
/// claims object (that took an allocation per claim, on every request of a connection
/// whose tokens change): only `iss`'s value is kept, the other members are checked for
/// well-formed JSON and skipped. Wherever [`decode_object`] reads the segment, this gives
/// what its `iss` member holds; where it does not (a name given twice, of which this keeps
/// the last `iss`; a number out of range, a string that is not UTF-8 in another member), the
/// claims check refuses the token whichever key set verifies it.
pub(crate) fn claimed_issuer(segment: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).ok()?;
    let ClaimedIssuer(issuer) = serde_json::from_slice(&bytes).ok()?;
    issuer
}

/// A claims object's `iss`, when a string (see [`claimed_issuer`]).
struct ClaimedIssuer(Option<String>);

impl<'de> serde::Deserialize<'de> for ClaimedIssuer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ClaimedIssuerVisitor)
    }
}

struct ClaimedIssuerVisitor;

impl<'de> serde::de::Visitor<'de> for ClaimedIssuerVisitor {
    type Value = ClaimedIssuer;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<ClaimedIssuer, A::Error> {
        let mut issuer = None;
        while let Some(IsIssuer(is_issuer)) = map.next_key()? {
            if is_issuer {
                issuer = match map.next_value()? {
                    Value::String(value) => Some(value),
                    _ => None,
                };
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(ClaimedIssuer(issuer))
    }
}

/// Whether a member's name (escapes resolved) is `iss`, without copying it.
struct IsIssuer(bool);

impl<'de> serde::Deserialize<'de> for IsIssuer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = IsIssuer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<IsIssuer, E> {
                Ok(IsIssuer(name == "iss"))
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// base64url without padding (RFC 7515 §2), then a JSON object that names each member once,
/// at every depth. RFC 7515 §4 and RFC 7519 §4 let a parser either refuse a name given twice
/// or keep the last; a token is read by more than Portcullis ([`portcullis_core::json`]), so
/// one that names a member twice, in its claims or its JOSE header, is refused.
pub(crate) fn decode_object(segment: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).ok()?;
    let Value::Object(map) = serde_json::from_slice(&bytes).ok()? else {
        return None;
    };
    // A second reading, of the names only: the map above has already kept one of each.
    portcullis_core::json::has_unique_names(&bytes).then_some(map)
}

#[cfg(test)]
#[path = "claims_tests.rs"]
mod tests;
