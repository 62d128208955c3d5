//! The shadow set (`policy.shadow_dir`): a candidate policy set decided beside the enforced
//! one on every request and never enforced. Where the two disagree on whether the request
//! may go through, `portcullis_shadow_disagreements_total{action,kind}` counts it
//! (`would_allow`: the candidate allows what the enforced set refuses; `would_deny`: the
//! reverse), and every audit record says what the candidate decided (`shadow`).
//!
//! Deny and approval-required both keep a request from the upstream, so they do not
//! disagree; in `policy.mode: shadow` the enforced set's `shadow_deny` counts as the deny it
//! stands for.

use std::sync::Arc;
use std::time::Duration;

use portcullis_core::Decision;
use portcullis_policy::{AuthzInput, PolicyEngine, ReloadOutcome};
use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// The `shadow` field of an audit record.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowOutcome {
    /// The candidate's decision, as `enforce` would make it.
    pub decision: &'static str,
    /// `would_allow` or `would_deny` when it disagrees with the enforced decision.
    pub disagreement: Option<&'static str>,
    pub policies: crate::audit::AuditPolicies,
    pub errors: Vec<String>,
    pub policy_hash: String,
}

/// Decides `input` with the shadow set and counts a disagreement with `enforced`.
pub(crate) fn decide(
    shadow: &PolicyEngine,
    input: &AuthzInput<'_>,
    enforced: Decision,
    metrics: &Metrics,
) -> ShadowOutcome {
    let evaluation = shadow.evaluate(input);
    let candidate = match evaluation.decision {
        Decision::ShadowDeny => Decision::Deny,
        other => other,
    };
    let disagreement = match (enforced == Decision::Allow, candidate == Decision::Allow) {
        (true, false) => Some("would_deny"),
        (false, true) => Some("would_allow"),
        _ => None,
    };
    if let Some(kind) = disagreement {
        metrics
            .shadow_disagreements
            .with_label_values(&[input.action.name(), kind])
            .inc();
    }
    let mut errors = evaluation.agent.errors.clone();
    if let Some(user) = &evaluation.user {
        errors.extend(user.errors.iter().cloned());
    }
    ShadowOutcome {
        decision: candidate.name(),
        disagreement,
        policies: crate::audit::AuditPolicies {
            agent: evaluation.agent.determining.clone(),
            user: evaluation.user.as_ref().map(|u| u.determining.clone()),
        },
        errors,
        policy_hash: evaluation.policy_hash.to_string(),
    }
}

/// Keeps the shadow set current, like the enforced one: a change that loads is swapped in,
/// one that does not is logged and the last good candidate stays.
pub(crate) async fn reload(
    shadow: Arc<PolicyEngine>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    while crate::beat(interval, &mut shutdown).await {
        let engine = shadow.clone();
        let Ok(outcome) =
            tokio::task::spawn_blocking(move || crate::reload_and_release(&engine)).await
        else {
            continue;
        };
        match outcome {
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Reloaded(hash) => {
                tracing::info!(%hash, "shadow policy set reloaded");
            }
            ReloadOutcome::Failed(errors) => {
                for error in &errors {
                    tracing::warn!(%error, "shadow policy reload failed; keeping the last good set");
                }
            }
        }
    }
}
