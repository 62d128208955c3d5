//! `analyze`: formal checks with Cedar's symbolic compiler (`cedar-policy-symcc`) and an SMT
//! solver (cvc5, run as `$CVC5`, else `cvc5` on `PATH`).
//!
//! Two properties, each decided for every request environment of the schema (principal
//! type × action × resource type) and over every entity store the schema allows:
//! - each policy never errors;
//! - with a baseline: the set only narrows it (every request the set allows, the baseline
//!   allows too). The agent and user questions are the same Cedar query with a different
//!   principal type, so per-question narrowing is the whole property.
//!
//! A counterexample comes back as a [`Question`], the input of `check`, and is asked again
//! through [`super::check`] (the proxy's evaluation path) to say whether it reproduces with
//! this directory's `entities.json`: the solver may pick group memberships or attribute
//! values the proxy never builds, and a counterexample that does not reproduce says so
//! rather than pretending. Nothing here reads `entities.json`: a proof holds for any.

use std::collections::BTreeSet;

use cedar_policy::{EntityUid, EvalResult, Policy, PolicySet, RequestEnv, Schema};
use cedar_policy_symcc::solver::LocalSolver;
use cedar_policy_symcc::{CedarSymCompiler, CompiledPolicy, CompiledPolicySet, Env};
use portcullis_core::SpiffeId;
use serde::Serialize;

use super::{Question, UserSpec};
use crate::PolicyEngine;

/// Per-query solver time limit (cvc5 `--tlimit`, milliseconds).
pub const SOLVER_TIME_LIMIT_MS: u32 = 60_000;

/// Why an analysis could not run (as opposed to a property that does not hold).
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    /// The solver executable cannot be started.
    #[error("cannot start the SMT solver {command:?}: {reason}")]
    SolverMissing { command: String, reason: String },
    /// The symbolic compiler or the solver failed on a query.
    #[error("{what}: {reason}")]
    Failed { what: String, reason: String },
}

/// What `analyze` found.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisReport {
    /// Request environments (principal type, action, resource type) analysed.
    pub request_envs: usize,
    /// One entry per policy, in file order.
    pub never_errors: Vec<NeverErrors>,
    /// Present with a baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub narrows: Option<Narrowing>,
}

impl AnalysisReport {
    /// Every property checked was proved.
    pub fn proved(&self) -> bool {
        self.never_errors.iter().all(|p| p.proved) && self.narrows.as_ref().is_none_or(|n| n.proved)
    }
}

/// "This policy never errors", for one policy.
#[derive(Debug, Clone, Serialize)]
pub struct NeverErrors {
    pub policy: String,
    pub proved: bool,
    /// A request on which it errors (one per request environment where it can).
    pub counterexamples: Vec<Counterexample>,
}

/// "The set only narrows the baseline".
#[derive(Debug, Clone, Serialize)]
pub struct Narrowing {
    pub proved: bool,
    /// Requests the set allows and the baseline denies (at most one per request environment).
    pub counterexamples: Vec<Counterexample>,
}

/// A request (and entity store) the solver found that breaks a property.
#[derive(Debug, Clone, Serialize)]
pub struct Counterexample {
    /// `Agent` or `User`: which question it is about.
    pub principal_type: String,
    pub principal: String,
    pub action: String,
    pub resource: String,
    /// The Cedar context, as JSON.
    pub context: serde_json::Value,
    /// The solver's entity store, as Cedar entity JSON.
    pub entities: serde_json::Value,
    /// The same request as `check` asks it; absent when it cannot be written as one.
    pub question: Option<Question>,
    /// Whether `check` on the policy directories answers as the property predicts (allowed
    /// by the set and denied by the baseline; or an evaluation error).
    pub reproduced: bool,
}

/// Runs the checks on `engine`'s set in force (and, with a baseline, the narrowing check).
pub async fn analyze(
    engine: &PolicyEngine,
    baseline: Option<&PolicyEngine>,
) -> Result<AnalysisReport, AnalyzeError> {
    let current = engine.current.load();
    let snapshot = &current.snapshot;
    let schema = &snapshot.schema;
    let policies = all_policies(snapshot)?;
    let set = policy_set(&policies)?;
    let base_set = baseline
        .map(|b| policy_set(&all_policies(&b.current.load().snapshot)?))
        .transpose()?;

    let mut compiler = compiler()?;
    let envs: Vec<RequestEnv> = schema.request_envs().collect();
    let mut never_errors = Vec::new();
    for policy in &policies {
        let id = policy.id().to_string();
        let mut counterexamples = Vec::new();
        for env in &envs {
            let compiled = CompiledPolicy::compile(policy, env, schema)
                .map_err(|e| failed(format!("compiling policy {id:?} for {}", env_name(env)), e))?;
            let found = compiler
                .check_never_errors_with_counterexample_opt(&compiled)
                .await
                .map_err(|e| failed(format!("never-errors for {id:?} on {}", env_name(env)), e))?;
            if let Some(found) = found {
                let mut cex = counterexample(&found);
                cex.reproduced = cex.question.as_ref().is_some_and(|q| {
                    super::check(engine, q, false).is_ok_and(|a| {
                        question_of(&a, &cex.principal_type).is_some_and(|o| !o.errors.is_empty())
                    })
                });
                counterexamples.push(cex);
            }
        }
        sort(&mut counterexamples);
        never_errors.push(NeverErrors {
            policy: id,
            proved: counterexamples.is_empty(),
            counterexamples,
        });
    }

    let narrows = match (baseline, &base_set) {
        (Some(baseline), Some(base_set)) => Some(
            narrowing(
                &mut compiler,
                engine,
                baseline,
                &set,
                base_set,
                schema,
                &envs,
            )
            .await?,
        ),
        _ => None,
    };
    Ok(AnalysisReport {
        request_envs: envs.len(),
        never_errors,
        narrows,
    })
}

async fn narrowing(
    compiler: &mut CedarSymCompiler<LocalSolver>,
    engine: &PolicyEngine,
    baseline: &PolicyEngine,
    set: &PolicySet,
    base_set: &PolicySet,
    schema: &Schema,
    envs: &[RequestEnv],
) -> Result<Narrowing, AnalyzeError> {
    let mut counterexamples = Vec::new();
    for env in envs {
        let what = |step: &str| format!("{step} for {}", env_name(env));
        let candidate = CompiledPolicySet::compile(set, env, schema)
            .map_err(|e| failed(what("compiling the policy set"), e))?;
        let base = CompiledPolicySet::compile(base_set, env, schema)
            .map_err(|e| failed(what("compiling the baseline"), e))?;
        // implies(candidate, base): every request the candidate allows, the baseline allows.
        let found = compiler
            .check_implies_with_counterexample_opt(&candidate, &base)
            .await
            .map_err(|e| failed(what("narrowing"), e))?;
        if let Some(found) = found {
            let mut cex = counterexample(&found);
            cex.reproduced = cex.question.as_ref().is_some_and(|q| {
                let allowed = |e: &PolicyEngine| {
                    super::check(e, q, false)
                        .ok()
                        .and_then(|a| question_of(&a, &cex.principal_type).map(|o| o.allowed))
                };
                allowed(engine) == Some(true) && allowed(baseline) == Some(false)
            });
            counterexamples.push(cex);
        }
    }
    sort(&mut counterexamples);
    Ok(Narrowing {
        proved: counterexamples.is_empty(),
        counterexamples,
    })
}

/// The schema's request environments come in no fixed order: sort what is printed.
fn sort(counterexamples: &mut [Counterexample]) {
    counterexamples.sort_by(|a, b| {
        (&a.principal_type, &a.action, &a.resource).cmp(&(
            &b.principal_type,
            &b.action,
            &b.resource,
        ))
    });
}

/// Every policy of `snapshot`, parsed (the index keeps most as text until a request needs
/// them).
fn all_policies(snapshot: &crate::PolicySnapshot) -> Result<Vec<Policy>, AnalyzeError> {
    snapshot
        .index
        .policies()
        .map_err(|reason| AnalyzeError::Failed {
            what: "parsing the policies".into(),
            reason,
        })
}

fn policy_set(policies: &[Policy]) -> Result<PolicySet, AnalyzeError> {
    PolicySet::from_policies(policies.iter().cloned())
        .map_err(|e| failed("building the policy set".into(), e))
}

/// The solver session every query of one run shares (symcc resets it between queries).
fn compiler() -> Result<CedarSymCompiler<LocalSolver>, AnalyzeError> {
    let command = std::env::var("CVC5").unwrap_or_else(|_| "cvc5".to_owned());
    let solver = LocalSolver::cvc5_with_args([format!("--tlimit={SOLVER_TIME_LIMIT_MS}")])
        .map_err(|e| AnalyzeError::SolverMissing {
            command: command.clone(),
            reason: error_chain(&e),
        })?;
    CedarSymCompiler::new(solver).map_err(|e| failed("starting the symbolic compiler".into(), e))
}

fn failed(what: String, error: impl std::error::Error) -> AnalyzeError {
    AnalyzeError::Failed {
        what,
        reason: error_chain(&error),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

fn env_name(env: &RequestEnv) -> String {
    format!(
        "principal {}, action {}, resource {}",
        env.principal(),
        env.action(),
        env.resource()
    )
}

fn question_of<'a>(answer: &'a super::Answer, principal_type: &str) -> Option<&'a super::Outcome> {
    match principal_type {
        "User" => answer.user.as_ref(),
        _ => Some(&answer.agent),
    }
}

fn counterexample(env: &Env) -> Counterexample {
    let request = &env.request;
    let show = |uid: Option<&EntityUid>| uid.map(ToString::to_string).unwrap_or_default();
    let context = request
        .context()
        .and_then(|c| c.to_json_value().ok())
        .unwrap_or(serde_json::Value::Null);
    Counterexample {
        principal_type: request
            .principal()
            .map(|p| p.type_name().to_string())
            .unwrap_or_default(),
        principal: show(request.principal()),
        action: show(request.action()),
        resource: show(request.resource()),
        question: to_question(env, &context),
        context,
        entities: sorted_entities(env.entities.to_json_value().unwrap_or_default()),
        reproduced: false,
    }
}

/// The counterexample as `check` asks it: ids the proxy could never see (an agent that is
/// not a SPIFFE ID) are replaced by ones it could, which no policy can tell apart unless it
/// names them (and then the solver used the named one).
fn to_question(env: &Env, context: &serde_json::Value) -> Option<Question> {
    let request = &env.request;
    let principal = request.principal()?;
    let action = request.action()?.id().unescaped().to_owned();
    let resource = request.resource()?;
    let string_attr = |uid: &EntityUid, name: &str| match env.entities.get(uid)?.attr(name)? {
        Ok(EvalResult::String(s)) => Some(s),
        _ => None,
    };
    let context_str = |path: &[&str]| {
        path.iter()
            .try_fold(context, |v, key| v.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let valid_agent = |candidates: &[Option<String>]| {
        candidates
            .iter()
            .flatten()
            .find(|id| SpiffeId::parse(id).is_ok())
            .cloned()
            .unwrap_or_else(|| "spiffe://example.org/analyze/counterexample".to_owned())
    };

    let (agent, user) = match principal.type_name().to_string().as_str() {
        "Agent" => {
            let id = principal.id().unescaped().to_owned();
            let derived = string_attr(principal, "trust_domain")
                .zip(string_attr(principal, "path"))
                .map(|(td, path)| format!("spiffe://{td}{path}"));
            let user = context
                .get("user")
                .filter(|_| context.get("delegated").and_then(|d| d.as_bool()) == Some(true));
            let user = user.map(|u| UserSpec {
                sub: u
                    .get("sub")
                    .and_then(|v| v.as_str())
                    .unwrap_or("user")
                    .to_owned(),
                iss: u
                    .get("issuer")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                scope: None,
                scopes: string_set(u.get("scopes")),
                email: None,
                groups: Vec::new(),
            });
            (valid_agent(&[Some(id), derived]), user)
        }
        "User" => {
            let groups = env
                .entities
                .ancestors(principal)
                .map(|ancestors| {
                    ancestors
                        .filter(|a| a.type_name().to_string() == "Group")
                        .map(|a| a.id().unescaped().to_owned())
                        .collect::<BTreeSet<_>>()
                })
                .unwrap_or_default();
            // The proxy gives the token's scopes to both `principal.scopes` and
            // `context.user.scopes`; the solver may not have: take both.
            let mut scopes: BTreeSet<String> =
                string_set(context.get("user").and_then(|u| u.get("scopes")))
                    .into_iter()
                    .collect();
            if let Some(Ok(EvalResult::Set(set))) =
                env.entities.get(principal).and_then(|e| e.attr("scopes"))
            {
                scopes.extend(set.iter().filter_map(|v| match v {
                    EvalResult::String(s) => Some(s.clone()),
                    _ => None,
                }));
            }
            let scopes: Vec<String> = scopes.into_iter().collect();
            let user = UserSpec {
                sub: principal.id().unescaped().to_owned(),
                iss: string_attr(principal, "issuer").unwrap_or_default(),
                scope: None,
                scopes,
                email: string_attr(principal, "email"),
                groups: groups.into_iter().collect(),
            };
            (valid_agent(&[context_str(&["agent", "id"])]), Some(user))
        }
        _ => return None,
    };

    // The proxy names a route by its path.
    let resource_text = match resource.type_name().to_string().as_str() {
        "Route" => format!(
            "Route::{:?}",
            string_attr(resource, "path").unwrap_or_else(|| resource.id().unescaped().to_owned())
        ),
        _ => resource.to_string(),
    };
    // What the classifier sends: `model.name` and `tool.name` are the resource id, and
    // `tool.arguments` is the call's raw arguments, which the engine projects onto the
    // record declared for the tool (`context.tool.arguments.<tool>` in Cedar).
    let resource_id = resource.id().unescaped().to_owned();
    let mut protocol: serde_json::Map<String, serde_json::Value> = ["model", "mcp", "tool"]
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), context.get(key)?.clone())))
        .collect();
    if let Some(model) = protocol.get_mut("model").and_then(|m| m.as_object_mut()) {
        model.insert("name".into(), resource_id.clone().into());
    }
    if let Some(tool) = protocol.get_mut("tool").and_then(|t| t.as_object_mut()) {
        let arguments = tool
            .get("arguments")
            .and_then(|a| a.get(&resource_id))
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        tool.insert("name".into(), resource_id.clone().into());
        tool.insert("arguments".into(), arguments);
    }
    let host = match resource.type_name().to_string().as_str() {
        "Route" => string_attr(resource, "host"),
        _ => context_str(&["request", "host"]),
    }
    .filter(|h| !h.is_empty());
    Some(Question {
        agent,
        user,
        method: None,
        path: None,
        action: Some(action),
        resource: Some(resource_text),
        host,
        context: (!protocol.is_empty()).then_some(protocol),
        now: context.get("now").and_then(serde_json::Value::as_i64),
        client_address: None,
    })
}

/// Entity JSON sorted by uid (the store is a hash map).
fn sorted_entities(mut entities: serde_json::Value) -> serde_json::Value {
    if let Some(list) = entities.as_array_mut() {
        list.sort_by_key(|e| e.get("uid").map(ToString::to_string).unwrap_or_default());
    }
    entities
}

fn string_set(value: Option<&serde_json::Value>) -> Vec<String> {
    value
        .and_then(|v| v.as_array())
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
