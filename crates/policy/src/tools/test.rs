//! `portcullis test`: table-driven policy tests with coverage.
//!
//! A test file holds a top-level `cases:` list. Each case is a [`Question`] plus `name`,
//! `expect` and, optionally, `determining` (the policy ids that must decide it, in any
//! order). Coverage is the share of policies that determine at least one case: a policy no
//! case exercises is a policy nobody has checked.

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

use super::{Answer, Question, check};
use crate::PolicyEngine;

/// The decision a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Allow,
    Deny,
    ApprovalRequired,
}

impl Expect {
    pub fn name(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::ApprovalRequired => "approval_required",
        }
    }
}

/// One case of a test file.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub question: Question,
    pub expect: Expect,
    pub determining: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    cases: Vec<serde_yaml::Mapping>,
}

/// Parses a test file. Every problem is reported (`cases[3].expect: ...`), not just the first.
pub fn parse_cases(yaml: &str) -> Result<Vec<TestCase>, Vec<String>> {
    let file: File = serde_yaml::from_str(yaml).map_err(|e| vec![e.to_string()])?;
    let mut cases = Vec::new();
    let mut errors = Vec::new();
    for (index, mut map) in file.cases.into_iter().enumerate() {
        let mut take = |key: &str| map.remove(key);
        let name = take("name").and_then(|v| v.as_str().map(str::to_owned));
        let label = format!(
            "cases[{index}]{}",
            name.as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        let expect = take("expect");
        let determining = take("determining");
        let Some(name) = name else {
            errors.push(format!("{label}.name: required (a string)"));
            continue;
        };
        let expect = match expect.map(serde_yaml::from_value::<Expect>) {
            Some(Ok(expect)) => Some(expect),
            Some(Err(e)) => {
                errors.push(format!(
                    "{label}.expect: {e} (one of: allow, deny, approval_required)"
                ));
                None
            }
            None => {
                errors.push(format!(
                    "{label}.expect: required (allow, deny or approval_required)"
                ));
                None
            }
        };
        let determining = match determining.map(serde_yaml::from_value::<Vec<String>>) {
            None => Some(None),
            Some(Ok(ids)) => Some(Some(ids)),
            Some(Err(e)) => {
                errors.push(format!("{label}.determining: {e}"));
                None
            }
        };
        let question = match serde_yaml::from_value::<Question>(serde_yaml::Value::Mapping(map)) {
            Ok(question) => Some(question),
            Err(e) => {
                errors.push(format!("{label}: {e}"));
                None
            }
        };
        if let (Some(expect), Some(determining), Some(question)) = (expect, determining, question) {
            cases.push(TestCase {
                name,
                question,
                expect,
                determining,
            });
        }
    }
    if errors.is_empty() {
        Ok(cases)
    } else {
        Err(errors)
    }
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    /// `None` when the case passed.
    pub failure: Option<String>,
    pub answer: Option<Answer>,
}

/// Every case's outcome, and coverage.
#[derive(Debug, Clone)]
pub struct TestReport {
    pub results: Vec<CaseResult>,
    /// Policy ids that determined no case, with their file.
    pub uncovered: Vec<(String, String)>,
    pub policies: usize,
}

impl TestReport {
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_some()).count()
    }

    /// Percent of policies that determined at least one case (100 for an empty set).
    pub fn coverage(&self) -> f64 {
        if self.policies == 0 {
            return 100.0;
        }
        let covered = self.policies - self.uncovered.len();
        covered as f64 * 100.0 / self.policies as f64
    }
}

/// Runs `cases` against `engine`.
pub fn run_tests(engine: &PolicyEngine, cases: &[TestCase]) -> TestReport {
    let mut covered = BTreeSet::new();
    let mut results = Vec::new();
    for case in cases {
        let answer = match check(engine, &case.question, false) {
            Ok(answer) => answer,
            Err(e) => {
                results.push(CaseResult {
                    name: case.name.clone(),
                    failure: Some(format!("  cannot ask: {e}")),
                    answer: None,
                });
                continue;
            }
        };
        covered.extend(answer.determining().cloned());
        let failure = diff(case, &answer);
        results.push(CaseResult {
            name: case.name.clone(),
            failure,
            answer: Some(answer),
        });
    }
    let listed = engine.policy_files();
    let policies = listed.len();
    let uncovered = listed
        .into_iter()
        .filter(|(id, _)| !covered.contains(id))
        .collect();
    TestReport {
        results,
        uncovered,
        policies,
    }
}

/// What differs between the expectation and the answer, as `-` expected / `+` actual lines.
fn diff(case: &TestCase, answer: &Answer) -> Option<String> {
    let mut out = String::new();
    if answer.decision != case.expect.name() {
        out.push_str(&format!(
            "  - decision: {}\n  + decision: {}\n",
            case.expect.name(),
            answer.decision
        ));
    }
    if let Some(expected) = &case.determining {
        let expected: BTreeSet<&String> = expected.iter().collect();
        let actual: BTreeSet<&String> = answer.determining().collect();
        if expected != actual {
            out.push_str(&format!(
                "  - determining: {}\n  + determining: {}\n",
                List(&expected),
                List(&actual)
            ));
        }
    }
    if out.is_empty() {
        return None;
    }
    out.push_str(&format!("    {}", Explained(answer)));
    Some(out)
}

struct List<'a>(&'a BTreeSet<&'a String>);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<&str> = self.0.iter().map(|s| s.as_str()).collect();
        write!(f, "[{}]", items.join(", "))
    }
}

/// `agent: deny (no permit applies); user: allow by [a]`, with errors.
pub(crate) struct Explained<'a>(pub(crate) &'a Answer);

impl fmt::Display for Explained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |f: &mut fmt::Formatter<'_>, name: &str, o: &super::Outcome| {
            let verdict = if o.allowed { "allow" } else { "deny" };
            write!(f, "{name}: {verdict}")?;
            if o.determining.is_empty() {
                if !o.allowed {
                    write!(f, " (no permit applies)")?;
                }
            } else {
                write!(f, " by [{}]", o.determining.join(", "))?;
            }
            if !o.errors.is_empty() {
                write!(f, " errors: {}", o.errors.join("; "))?;
            }
            Ok(())
        };
        q(f, "agent", &self.0.agent)?;
        match &self.0.user {
            Some(user) => {
                write!(f, "; ")?;
                q(f, "user", user)
            }
            None => write!(f, "; autonomous call (no user question)"),
        }
    }
}
