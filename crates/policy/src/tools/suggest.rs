//! `portcullis suggest`: least-privilege permits from what an audit trail shows was allowed.
//!
//! One policy per agent. It permits exactly the (action, resource) pairs observed allowed for
//! that agent, separately for autonomous calls and for each user it acted for:
//! - the agent question: `principal == Agent::"…"`, with `context.delegated` as observed;
//! - the user question (delegated calls): `principal == User::"<sub>"` with
//!   `context.agent.id` = the agent.
//!
//! So replaying the same trail against the suggestion allows every request that was allowed
//! and, for everything else the trail holds, no other (agent, delegated, user, action,
//! resource) combination. Conditions the observed policies had on other context fields
//! (model options, tool arguments, time) are not inferred: that is for the person reviewing
//! the suggestion.

use std::collections::{BTreeMap, BTreeSet};

use super::Question;

/// What one agent was seen doing, allowed.
#[derive(Debug, Default)]
struct Observed {
    /// (delegated, action, resource) for the agent question.
    agent: BTreeSet<(bool, String, String)>,
    /// (user sub, action, resource) for the user question.
    user: BTreeSet<(String, String, String)>,
}

/// Cedar source of the suggested policies for `records` (audit records, in any order).
/// Records not allowed, or without `input`, are ignored.
pub fn suggest<'a>(records: impl IntoIterator<Item = &'a serde_json::Value>) -> String {
    let mut agents: BTreeMap<String, Observed> = BTreeMap::new();
    for record in records {
        if record["decision"].as_str() != Some("allow") {
            continue;
        }
        let Ok(question) = serde_json::from_value::<Question>(record["input"].clone()) else {
            continue;
        };
        let Ok(resolved) = question.resolve() else {
            continue;
        };
        let action = resolved.action().name().to_owned();
        let resource = resolved.resource().to_string();
        let observed = agents
            .entry(resolved.agent().as_str().to_owned())
            .or_default();
        let user = resolved.user();
        observed
            .agent
            .insert((user.is_some(), action.clone(), resource.clone()));
        if let Some(user) = user {
            observed
                .user
                .insert((user.subject.clone(), action, resource));
        }
    }
    let mut out = String::from(
        "// Suggested by `portcullis suggest` from observed allowed requests: one policy per\n\
         // agent, permitting exactly what it was seen doing. Review before enforcing.\n",
    );
    for (agent, observed) in &agents {
        let actions: BTreeSet<&String> = observed
            .agent
            .iter()
            .map(|(_, a, _)| a)
            .chain(observed.user.iter().map(|(_, a, _)| a))
            .collect();
        let mut terms = Vec::new();
        for (delegated, action, resource) in &observed.agent {
            terms.push(format!(
                "(principal == Agent::{agent:?} && context.delegated == {delegated} && action == Action::{action:?} && resource == {resource})"
            ));
        }
        for (sub, action, resource) in &observed.user {
            terms.push(format!(
                "(principal == User::{sub:?} && context.agent.id == {agent:?} && action == Action::{action:?} && resource == {resource})"
            ));
        }
        out.push_str(&format!(
            "\n@id(\"suggested-{}\")\npermit (\n  principal,\n  action in [{}],\n  resource\n)\nwhen {{\n  {}\n}};\n",
            slug(agent),
            actions
                .iter()
                .map(|a| format!("Action::{a:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            terms.join(" ||\n  "),
        ));
    }
    out
}

/// `spiffe://td/ns/a/sa/b` → `td-ns-a-sa-b`: an id a person can read in audit records.
fn slug(agent: &str) -> String {
    agent
        .trim_start_matches("spiffe://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}
