//! Approval of consequential calls (DESIGN, "Approval and upstream credentials").
//!
//! A permit marked `@approval("required")` makes the decision `approval_required`. The caller
//! is answered 428 with a challenge whose digest names exactly this call: agent, user,
//! action, resource, the canonical JSON of the protocol fields (tool arguments, model
//! options) and the policy-set hash. An approver signs a grant (a JWT) for that digest; the
//! agent repeats the call with it in `x-portcullis-approval`, and the call (that one, once)
//! is forwarded as `approved`.
//!
//! Order inside the step: verify the grant (the user-token rules, `aud` = our SPIFFE ID),
//! compare digests, and only then spend the `jti`, so a grant presented for another call is
//! not burnt by it. A grant that does not verify is 401 `invalid_approval`; one already
//! spent is 401 `approval_replayed`; a valid grant for another digest (other arguments, other
//! agent, a policy change since) leaves the call at 428 with the fresh challenge.
//!
//! What it does not: decide (Cedar did; a grant only lifts the approval requirement of a
//! call the policies already permit), or fetch keys over the network per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use portcullis_identity::user_token::{ApprovalGrant, TokenRejection, UserTokenVerifier};
use portcullis_policy::{AuthzInput, Evaluation};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::Shared;
use crate::audit::{AuditApproval, AuditGuard};
use crate::body::ResponseBody;
use crate::error::Refusal;

/// The header carrying a grant. Under `x-portcullis-*`, so it is stripped before forwarding.
pub const APPROVAL_HEADER: &str = "x-portcullis-approval";

/// `approval:` in the config, checked.
#[derive(Debug, Clone)]
pub struct ApprovalOptions {
    /// Built with `approval.jwks_file`, `approval.issuers`, audiences = the sidecar's own
    /// SPIFFE ID and `approval.max_lifetime` as the lifetime cap.
    pub verifier: UserTokenVerifier,
    /// `approval.max_lifetime`: also what the challenge's `expires` is computed from.
    pub max_lifetime: Duration,
    /// The skew the verifier allows past `exp`: a spent `jti` is kept that long after it.
    pub clock_skew: Duration,
    /// `approval.max_tracked_grants`: spent `jti`s remembered at once.
    pub max_tracked_grants: usize,
}

/// What the approval step holds for the life of the proxy.
#[derive(Debug)]
pub(crate) struct Approvals {
    options: Option<ApprovalOptions>,
    spent: SpentGrants,
}

/// The challenge of a 428: what an approver is asked to approve.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Challenge {
    pub digest: String,
    pub action: &'static str,
    pub resource: String,
    /// Unix seconds: a grant issued now for this challenge is valid until then at the latest.
    pub expires: i64,
}

/// Outcome of the approval step for one call that needs approval.
#[derive(Debug)]
pub(crate) enum Approval {
    /// A valid, unspent grant for exactly this call.
    Granted(ApprovalGrant),
    /// No grant, or one for another digest: answer 428 with this challenge.
    Challenged(Challenge),
}

impl Approvals {
    pub(crate) fn new(options: Option<ApprovalOptions>) -> Self {
        let capacity = options.as_ref().map_or(0, |o| o.max_tracked_grants);
        Self {
            options,
            spent: SpentGrants::new(capacity),
        }
    }

    /// Whether grants can be verified at all (`approval:` configured).
    pub(crate) fn enabled(&self) -> bool {
        self.options.is_some()
    }

    /// Decides whether `grant` (the header's value, if any) approves the call `input` decided
    /// against policy set `policy_hash`. `Err` for a grant that is present and invalid or
    /// spent; the detail for the audit record is pushed to `errors`.
    pub(crate) async fn check(
        &self,
        input: &AuthzInput<'_>,
        exactly: Exactly<'_>,
        policy_hash: &str,
        grant: Option<&str>,
        errors: &mut Vec<String>,
    ) -> Result<Approval, Refusal> {
        let digest = digest(input, exactly, policy_hash);
        let lifetime = self
            .options
            .as_ref()
            .map_or(Duration::from_secs(300), |o| o.max_lifetime);
        let challenge = || Challenge {
            digest: digest.clone(),
            action: input.action.name(),
            resource: input.resource.to_string(),
            expires: input
                .now
                .saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
        };
        let (Some(options), Some(grant)) = (&self.options, grant) else {
            return Ok(Approval::Challenged(challenge()));
        };
        let verified =
            options
                .verifier
                .verify_grant(grant)
                .await
                .map_err(|rejection: TokenRejection| {
                    errors.push(format!("approval grant: {rejection}"));
                    Refusal::InvalidApproval(rejection.reason())
                })?;
        // Constant-time comparison is not needed: the digest is not a secret, and a grant's
        // signature already verified.
        if verified.digest != digest {
            errors.push(format!(
                "approval grant {:?} from {:?} is for another call (digest {})",
                verified.jti, verified.approver, verified.digest
            ));
            return Ok(Approval::Challenged(challenge()));
        }
        // Refused at once when already spent; spent only once the call is about to go out
        // ([`Approvals::spend`]), so a call stopped later (a rate limit, an unavailable
        // credential, a denied message of its batch) does not use the approval up.
        let now = u64::try_from(input.now).unwrap_or(0);
        if self.spent.is_spent(&verified.issuer, &verified.jti, now) {
            errors.push(format!(
                "approval grant {:?} from {:?} was already used",
                verified.jti, verified.approver
            ));
            return Err(Refusal::ApprovalReplayed);
        }
        Ok(Approval::Granted(verified))
    }

    /// Spends `grant` (its `jti`, until it expires): last before the approved call is
    /// forwarded, once nothing else can stop it. A grant spent meanwhile (the same grant on
    /// two concurrent calls) is a replay.
    pub(crate) fn spend(
        &self,
        grant: &ApprovalGrant,
        now: i64,
        errors: &mut Vec<String>,
    ) -> Result<(), Refusal> {
        let skew = self
            .options
            .as_ref()
            .map_or(0, |options| options.clock_skew.as_secs());
        let keep_until = grant.expires_at.saturating_add(skew);
        let now = u64::try_from(now).unwrap_or(0);
        match self.spent.spend(&grant.issuer, &grant.jti, keep_until, now) {
            Spend::Fresh => Ok(()),
            Spend::Replayed => {
                errors.push(format!(
                    "approval grant {:?} from {:?} was already used",
                    grant.jti, grant.approver
                ));
                Err(Refusal::ApprovalReplayed)
            }
            Spend::Full => {
                errors.push("too many unexpired approval grants to remember; refused".to_owned());
                Err(Refusal::InvalidApproval("replay_store_full"))
            }
        }
    }
}

/// Pipeline stage 4b, for a call whose decision is `approval_required`: with a grant for
/// exactly this call the evaluation becomes `approved` (and carries its permit); without one
/// `challenge` is set for the 428. The audit record gets the digest, and the approver when a
/// grant was accepted. The accepted grant is returned, to be spent last before forwarding
/// ([`Approvals::spend`]).
pub(crate) async fn step(
    shared: &Shared,
    input: &AuthzInput<'_>,
    exactly: Exactly<'_>,
    evaluation: &mut Evaluation,
    headers: &http::HeaderMap,
    audit: &mut AuditGuard,
    challenge: &mut Option<Challenge>,
) -> Result<Option<ApprovalGrant>, Refusal> {
    let count = |result: &str| {
        shared
            .metrics
            .approval_grants
            .with_label_values(&[result])
            .inc();
    };
    let mut values = headers.get_all(APPROVAL_HEADER).iter();
    let grant = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(value), None) => match value.to_str() {
            Ok(value) => Some(value.trim()),
            Err(_) => {
                count("invalid");
                audit
                    .record
                    .errors
                    .push("approval grant is not ASCII".to_owned());
                return Err(Refusal::InvalidApproval("malformed"));
            }
        },
        (Some(_), Some(_)) => {
            count("invalid");
            audit
                .record
                .errors
                .push("more than one approval header".to_owned());
            return Err(Refusal::InvalidApproval("malformed"));
        }
    };
    if grant.is_some() && !shared.approvals.enabled() {
        audit
            .record
            .errors
            .push("approval grant presented, but approval is not configured".to_owned());
    }
    let outcome = shared
        .approvals
        .check(
            input,
            exactly,
            &evaluation.policy_hash,
            grant,
            &mut audit.record.errors,
        )
        .await;
    match outcome {
        Ok(Approval::Granted(grant)) => {
            count("approved");
            evaluation.approve();
            audit.record.approval = Some(Box::new(AuditApproval {
                digest: grant.digest.clone(),
                approver: Some(grant.approver.clone()),
                issuer: Some(grant.issuer.clone()),
                jti: Some(grant.jti.clone()),
            }));
            Ok(Some(grant))
        }
        Ok(Approval::Challenged(issued)) => {
            if grant.is_some() {
                count("other_call");
            }
            audit.record.approval = Some(Box::new(AuditApproval {
                digest: issued.digest.clone(),
                approver: None,
                issuer: None,
                jti: None,
            }));
            *challenge = Some(issued);
            Ok(None)
        }
        Err(refusal) => {
            count(match refusal {
                Refusal::ApprovalReplayed => "replayed",
                _ => "invalid",
            });
            Err(refusal)
        }
    }
}

/// The 428 answer: `{"error":{"code":"approval_required","request_id":…,"challenge":{…}}}`.
/// The same shape on every route, protocol routes included: the challenge is read by
/// whatever obtains approval, not by the model or MCP client library.
pub(crate) fn challenge_response(
    challenge: &Challenge,
    request_id: &str,
) -> http::Response<ResponseBody> {
    use http_body_util::BodyExt as _;
    let body = serde_json::json!({
        "error": {
            "code": Refusal::ApprovalRequired.reason(),
            "request_id": request_id,
            "challenge": challenge,
        }
    })
    .to_string();
    let mut response = http::Response::new(
        http_body_util::Full::new(bytes::Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = Refusal::ApprovalRequired.status();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// What the upstream acts on beyond the Cedar input, for the digest: a grant is for exactly
/// one call, so a request that differs from the approved one only in its query string, its
/// body or the endpoint it is sent to must not carry it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Exactly<'a> {
    /// The request target's query string.
    pub query: Option<&'a str>,
    /// `sha256:<hex>` of what the body says: the canonical JSON of a model call's body, the
    /// bytes of a generic route's body. `None` where the protocol fields carry it (an MCP
    /// message's tool arguments: the JSON-RPC envelope, its `id` included, changes between a
    /// call and its retry with the grant).
    pub content: Option<&'a str>,
}

/// `sha256:<hex>` of the canonical JSON of what the call is: agent, user, action, resource,
/// protocol fields, the request's method, path, query and host, what its body says
/// ([`Exactly`]), policy-set hash. Canonical: object keys sorted, no insignificant space, so
/// the same call gives the same digest whatever order the caller wrote its JSON in.
pub(crate) fn digest(input: &AuthzInput<'_>, exactly: Exactly<'_>, policy_hash: &str) -> String {
    let mut protocol: Vec<_> = input.protocol_context.iter().collect();
    protocol.sort_by_key(|(key, _)| *key);
    let value = serde_json::json!({
        "agent": input.agent.as_str(),
        "user": input.user.map(|u| serde_json::json!({ "sub": u.subject, "iss": u.issuer })),
        "action": input.action.name(),
        "resource": { "type": input.resource.entity_type(), "id": input.resource.id() },
        "protocol": protocol
            .into_iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect::<serde_json::Map<_, _>>(),
        "request": {
            "method": input.request.method,
            "path": input.request.path,
            "query": exactly.query,
            "host": input.request.host,
        },
        "content": exactly.content,
        "policy_hash": policy_hash,
    });
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

/// [`Exactly::content`] of a model call: its body's canonical JSON, so a retry whose SDK
/// writes the same request with its keys in another order carries the same digest. The body
/// was checked as one strict JSON value when it was classified.
pub(crate) fn message_content(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    Some(bytes_content(canonical.as_bytes()))
}

/// [`Exactly::content`] of a generic route's body: its bytes, whatever they encode.
pub(crate) fn bytes_content(body: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(body)))
}

/// RFC 8785-style canonical form: keys sorted by their UTF-16 code units (equal to byte order
/// for the ASCII keys protocols use), strings and numbers as serde_json writes them.
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Grant ids already used, each kept until its grant could no longer verify anyway (its
/// `exp` plus the skew). Bounded: when full, expired entries are evicted first; if none has
/// expired the grant is refused rather than the memory grown or an unexpired id forgotten
/// (forgetting would let that grant be replayed).
#[derive(Debug)]
struct SpentGrants {
    capacity: usize,
    entries: Mutex<HashMap<(String, String), u64>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Spend {
    Fresh,
    Replayed,
    Full,
}

impl SpentGrants {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn is_spent(&self, issuer: &str, jti: &str, now: u64) -> bool {
        // A poisoned lock: taken as spent (refused) rather than risk a replay.
        let Ok(entries) = self.entries.lock() else {
            return true;
        };
        entries
            .get(&(issuer.to_owned(), jti.to_owned()))
            .is_some_and(|until| *until > now)
    }

    fn spend(&self, issuer: &str, jti: &str, keep_until: u64, now: u64) -> Spend {
        // A poisoned lock means a panic mid-update: refuse rather than risk a replay.
        let Ok(mut entries) = self.entries.lock() else {
            return Spend::Full;
        };
        let key = (issuer.to_owned(), jti.to_owned());
        if let Some(until) = entries.get(&key)
            && *until > now
        {
            return Spend::Replayed;
        }
        if entries.len() >= self.capacity {
            entries.retain(|_, until| *until > now);
        }
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            return Spend::Full;
        }
        entries.insert(key, keep_until);
        Spend::Fresh
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_id_is_spent_once_and_forgotten_after_it_expires() {
        let spent = SpentGrants::new(2);
        assert_eq!(spent.spend("iss", "a", 100, 10), Spend::Fresh);
        assert_eq!(spent.spend("iss", "a", 100, 11), Spend::Replayed);
        // Another issuer's id is another grant.
        assert_eq!(spent.spend("other", "a", 100, 11), Spend::Fresh);
        // Full, nothing expired: refused, never an unexpired id forgotten.
        assert_eq!(spent.spend("iss", "b", 100, 12), Spend::Full);
        assert_eq!(spent.spend("iss", "a", 100, 12), Spend::Replayed);
        // Once they expired, room is made and memory stays bounded.
        assert_eq!(spent.spend("iss", "b", 300, 101), Spend::Fresh);
        assert_eq!(spent.len(), 1);
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let value = serde_json::json!({"b": [ {"z": 1, "a": "x"} ], "a": {"d": true, "c": null}});
        let mut out = String::new();
        write_canonical(&value, &mut out);
        assert_eq!(out, r#"{"a":{"c":null,"d":true},"b":[{"a":"x","z":1}]}"#);
    }
}
