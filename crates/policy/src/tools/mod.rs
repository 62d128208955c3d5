//! Policy tooling for security teams: `check`, `test`, `replay`, `suggest` and `analyze` as library
//! functions over one input type, [`Question`]. Every answer comes from
//! [`crate::PolicyEngine::evaluate`], the function the proxy calls, so "check agrees with the
//! proxy" holds by construction. The binary only parses flags and prints.
//!
//! A [`Question`] is also what the proxy records in each audit record's `input` field: a
//! recorded request can be decided again, against another policy set, exactly as it was.

mod analyze;
mod question;
mod replay;
mod suggest;
mod test;

pub use analyze::{
    AnalysisReport, AnalyzeError, Counterexample, Narrowing, NeverErrors, SOLVER_TIME_LIMIT_MS,
    analyze,
};
pub use question::{Question, QuestionError, UserSpec};
pub use replay::{Change, ReplayReport, replay};
pub use suggest::suggest;
pub use test::{CaseResult, Expect, TestCase, TestReport, parse_cases, run_tests};

use portcullis_core::Decision;

use crate::{PolicyEngine, QueryOutcome};

/// The answer `portcullis check` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Answer {
    /// `allow`, `deny` or `approval_required` (tools always evaluate as `enforce`).
    pub decision: &'static str,
    pub agent: Outcome,
    /// Absent for an autonomous call.
    pub user: Option<Outcome>,
    pub policy_hash: String,
}

/// One question's answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub allowed: bool,
    pub determining: Vec<String>,
    pub errors: Vec<String>,
    /// With `--explain`, on a denied question: the permits whose scope matched this request
    /// but whose conditions were false (or errored): the ones that almost allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub near_misses: Option<Vec<String>>,
}

impl Answer {
    pub fn decision(&self) -> Decision {
        match self.decision {
            "allow" => Decision::Allow,
            "approval_required" => Decision::ApprovalRequired,
            _ => Decision::Deny,
        }
    }

    /// Determining policies of both questions, agent first.
    pub fn determining(&self) -> impl Iterator<Item = &String> {
        self.agent
            .determining
            .iter()
            .chain(self.user.iter().flat_map(|u| u.determining.iter()))
    }
}

/// Decides `question` against `engine` (evaluated as `enforce`, whatever its mode: a tool
/// asks what the policies say).
pub fn check(
    engine: &PolicyEngine,
    question: &Question,
    explain: bool,
) -> Result<Answer, QuestionError> {
    let owned = question.resolve()?;
    let input = owned.input();
    let evaluation = engine.evaluate(&input);
    let decision = match evaluation.decision {
        // A shadow-mode engine says shadow_deny where the policies deny.
        Decision::ShadowDeny => Decision::Deny,
        other => other,
    };
    let near = if explain && decision != Decision::Allow {
        Some(
            engine
                .scope_matched_permits(&input)
                .map_err(QuestionError)?,
        )
    } else {
        None
    };
    let outcome = |q: &QueryOutcome, near: Option<&Vec<String>>| Outcome {
        allowed: q.allowed,
        determining: q.determining.to_vec(),
        errors: q.errors.clone(),
        near_misses: near.filter(|_| !q.allowed).map(|permits| {
            permits
                .iter()
                .filter(|id| !q.determining.contains(id))
                .cloned()
                .collect()
        }),
    };
    Ok(Answer {
        decision: decision.name(),
        agent: outcome(&evaluation.agent, near.as_ref().map(|n| &n.0)),
        user: evaluation
            .user
            .as_ref()
            .map(|u| outcome(u, near.as_ref().and_then(|n| n.1.as_ref()))),
        policy_hash: evaluation.policy_hash.to_string(),
    })
}
