//! `portcullis replay`: recorded requests decided again against another policy set.
//!
//! Each audit record of a decided request carries `input`, the [`Question`] the proxy asked
//! (agent, user claims, action, resource, request fields, protocol fields and the time of the
//! decision). Replaying asks it again, at the recorded time, and reports every request whose
//! decision changes. Records without a decision (refused before any policy ran, start and
//! checkpoint lines) are not requests the policies decided, and are skipped.

use serde::Serialize;

use super::{Question, check};
use crate::PolicyEngine;

/// One request whose decision changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `file:line` of the record.
    pub record: String,
    pub request_id: String,
    pub agent: String,
    pub user: Option<String>,
    pub action: String,
    pub resource: String,
    /// The recorded decision (`shadow_deny` is read as the `deny` it stands for).
    pub before: String,
    pub after: String,
    /// Determining policies of the new decision, agent question first.
    pub determining: Vec<String>,
}

/// What a replay found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Records with a decision and the input to repeat it.
    pub replayed: usize,
    /// Records with a decision but no `input` (written by an older version), or whose input
    /// cannot be asked any more: listed, never silently dropped.
    pub unreplayable: Vec<String>,
    pub changed: Vec<Change>,
}

/// Replays `records` (`(file:line, record)`, in order) against `engine`.
pub fn replay<'a>(
    engine: &PolicyEngine,
    records: impl IntoIterator<Item = (String, &'a serde_json::Value)>,
) -> ReplayReport {
    let mut report = ReplayReport::default();
    for (at, record) in records {
        let Some(before) = record["decision"].as_str() else {
            continue;
        };
        let before = match before {
            "shadow_deny" => "deny",
            other => other,
        };
        // A batch is decided whole: denied when any message is. Its record's own `input` is
        // one message's, so each message's question is asked again.
        let questions: Result<Vec<Question>, String> = match record["calls"].as_array() {
            Some(calls) if !calls.is_empty() => calls
                .iter()
                .enumerate()
                .map(|(index, call)| {
                    serde_json::from_value::<Question>(call["input"].clone()).map_err(|e| {
                        format!("no usable input for message {index} of the batch: {e}")
                    })
                })
                .collect(),
            _ => serde_json::from_value::<Question>(record["input"].clone())
                .map(|question| vec![question])
                .map_err(|e| format!("no usable input: {e}")),
        };
        let questions = match questions {
            Ok(questions) => questions,
            Err(e) => {
                report.unreplayable.push(format!("{at}: {e}"));
                continue;
            }
        };
        let mut decided = None;
        for question in &questions {
            match check(engine, question, false) {
                Ok(answer) => {
                    // The batch's decision: its first message not allowed, else its last.
                    let refused = answer.decision != "allow";
                    decided = Some((question, answer));
                    if refused {
                        break;
                    }
                }
                Err(e) => {
                    report.unreplayable.push(format!("{at}: {e}"));
                    decided = None;
                    break;
                }
            }
        }
        let Some((question, answer)) = decided else {
            continue;
        };
        report.replayed += 1;
        if answer.decision != before {
            report.changed.push(Change {
                record: at,
                request_id: record["request_id"].as_str().unwrap_or_default().to_owned(),
                agent: question.agent.clone(),
                user: question.user.as_ref().map(|u| u.sub.clone()),
                action: question.action.clone().unwrap_or_default(),
                resource: question.resource.clone().unwrap_or_default(),
                before: before.to_owned(),
                after: answer.decision.to_owned(),
                determining: answer.determining().cloned().collect(),
            });
        }
    }
    report
}
