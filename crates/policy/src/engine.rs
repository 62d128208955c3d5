//! Asking Cedar the agent question and, for delegated calls, the user question.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityUid, Request,
    RestrictedExpression,
};
use portcullis_core::{Action, Decision, Resource, SpiffeId, UserClaims};

use crate::load::{PolicySnapshot, entity_uid};
use crate::{Mode, Permit};

/// Everything a decision is made from. Built by the proxy from the connection's identity,
/// the verified token and the classified request.
#[derive(Debug)]
pub struct AuthzInput<'a> {
    pub agent: &'a SpiffeId,
    pub user: Option<&'a UserClaims>,
    pub action: Action,
    pub resource: &'a Resource,
    pub request: RequestInfo<'a>,
    /// Protocol fields for AI actions, merged into the Cedar context under their key
    /// (`"model"`, `"mcp"`, `"tool"`). A `"tool"` value carries the raw `arguments` JSON the
    /// caller sent (absent while filtering `tools/list`); they are projected onto the schema's
    /// `ToolArguments` record for that tool (see `arguments`).
    pub protocol_context: Vec<(&'static str, serde_json::Value)>,
    /// Unix seconds.
    pub now: i64,
}

#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub client_address: &'a str,
}

/// The answer to one Cedar question.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryOutcome {
    pub allowed: bool,
    /// `@id`s of the policies that determined the answer.
    pub determining: Vec<String>,
    /// Evaluation errors. Any error denies: Cedar skips an erroring policy, which would let an
    /// erroring `forbid` open the door.
    pub errors: Vec<String>,
}

/// The decision on one request, with what audit needs to explain it.
#[derive(Debug)]
pub struct Evaluation {
    pub decision: Decision,
    pub agent: QueryOutcome,
    /// `None` for an autonomous call (no user token).
    pub user: Option<QueryOutcome>,
    pub policy_hash: Arc<str>,
    pub mode: Mode,
    permit: Option<Permit>,
}

impl Evaluation {
    /// The permit to forward, present exactly when the decision lets the request through.
    pub fn take_permit(&mut self) -> Option<Permit> {
        self.permit.take()
    }
}

impl PolicySnapshot {
    pub(crate) fn evaluate(
        &self,
        input: &AuthzInput<'_>,
        mode: Mode,
        hash: Arc<str>,
    ) -> Evaluation {
        let agent = self.ask_agent(input);
        let user = input.user.map(|user| self.ask_user(input, user));
        let allowed = agent.allowed && user.as_ref().is_none_or(|u| u.allowed);
        let needs_approval = allowed
            && agent
                .determining
                .iter()
                .chain(user.iter().flat_map(|u| u.determining.iter()))
                .any(|id| self.approval_required.contains(id));
        let verdict = match (allowed, needs_approval) {
            (true, false) => Decision::Allow,
            // No approval channel exists yet, so a consequential action is refused (428)
            // rather than silently treated as an ordinary allow.
            (true, true) => Decision::ApprovalRequired,
            (false, _) => Decision::Deny,
        };
        let decision = match (mode, verdict) {
            (_, Decision::Allow) => Decision::Allow,
            (Mode::Shadow, _) => Decision::ShadowDeny,
            (Mode::Enforce, other) => other,
        };
        Evaluation {
            decision,
            agent,
            user,
            policy_hash: hash,
            mode,
            permit: decision.forwards().then_some(Permit { _sealed: () }),
        }
    }

    fn ask_agent(&self, input: &AuthzInput<'_>) -> QueryOutcome {
        let principal = match self.agent_entity(input.agent) {
            Ok(entity) => entity,
            Err(e) => return failed(format!("agent entity: {e}")),
        };
        self.ask(principal, input)
    }

    fn ask_user(&self, input: &AuthzInput<'_>, user: &UserClaims) -> QueryOutcome {
        let principal = match self.user_entity(user) {
            Ok(entity) => entity,
            Err(e) => return failed(format!("user entity: {e}")),
        };
        self.ask(principal, input)
    }

    fn ask(&self, principal: (Entity, HashSet<EntityUid>), input: &AuthzInput<'_>) -> QueryOutcome {
        match self.try_ask(principal, input) {
            Ok(outcome) => outcome,
            Err(e) => failed(e),
        }
    }

    fn try_ask(
        &self,
        (principal, principal_ancestors): (Entity, HashSet<EntityUid>),
        input: &AuthzInput<'_>,
    ) -> Result<QueryOutcome, String> {
        let action = entity_uid("Action", input.action.name())?;
        let (resource, resource_ancestors) = self.resource_entity(input.resource)?;
        // Built from Cedar values directly (parsing JSON against the schema costs several
        // times the whole evaluation); `Request::new` below validates it against the schema.
        let context = Context::from_pairs(context_pairs(input, &self.tool_arguments)?)
            .map_err(|e| format!("context: {e}"))?;
        let request = Request::new(
            principal.uid(),
            action.clone(),
            resource.uid(),
            context,
            Some(&self.schema),
        )
        .map_err(|e| format!("request: {e}"))?;
        let ancestors = principal_ancestors.union(&resource_ancestors);
        let entities = self.request_entities(principal, resource, &action, ancestors)?;
        let response = Authorizer::new().is_authorized(&request, &self.policies, &entities);
        let diagnostics = response.diagnostics();
        let errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
        Ok(QueryOutcome {
            allowed: response.decision() == CedarDecision::Allow && errors.is_empty(),
            determining: diagnostics.reason().map(ToString::to_string).collect(),
            errors,
        })
    }

    fn agent_entity(&self, id: &SpiffeId) -> Result<(Entity, HashSet<EntityUid>), String> {
        let uid = entity_uid("Agent", id.as_str())?;
        let mut attrs = HashMap::from([
            ("trust_domain".to_owned(), string(id.trust_domain_name())),
            ("path".to_owned(), string(id.path())),
        ]);
        if let Some((namespace, service_account)) = id.kubernetes_service_account() {
            attrs.insert("namespace".to_owned(), string(namespace));
            attrs.insert("service_account".to_owned(), string(service_account));
        }
        let parents = self.declared_ancestors(&uid);
        with_ancestors(Entity::new(uid, attrs, parents.clone()), parents)
    }

    fn user_entity(&self, user: &UserClaims) -> Result<(Entity, HashSet<EntityUid>), String> {
        let uid = entity_uid("User", &user.subject)?;
        let mut attrs = HashMap::from([
            ("issuer".to_owned(), string(&user.issuer)),
            (
                "scopes".to_owned(),
                RestrictedExpression::new_set(user.scopes.iter().map(|s| string(s))),
            ),
        ]);
        if let Some(email) = &user.email {
            attrs.insert("email".to_owned(), string(email));
        }
        let mut parents = self.declared_ancestors(&uid);
        for group in &user.groups {
            let group = entity_uid("Group", group)?;
            // A group from the token may itself be nested in entities.json.
            parents.extend(self.declared_ancestors(&group));
            parents.insert(group);
        }
        with_ancestors(Entity::new(uid, attrs, parents.clone()), parents)
    }

    fn resource_entity(&self, resource: &Resource) -> Result<(Entity, HashSet<EntityUid>), String> {
        let uid = entity_uid(resource.entity_type(), resource.id())?;
        let parents = self.declared_ancestors(&uid);
        match resource {
            Resource::Route { path, host, method } => {
                let attrs = HashMap::from([
                    ("path".to_owned(), string(path)),
                    ("host".to_owned(), string(host)),
                    ("method".to_owned(), string(method)),
                ]);
                with_ancestors(Entity::new(uid, attrs, parents.clone()), parents)
            }
            Resource::Model(_)
            | Resource::Tool(_)
            | Resource::McpResource(_)
            | Resource::Prompt(_) => Ok((Entity::new_no_attrs(uid, parents.clone()), parents)),
        }
    }

    /// Ancestors declared in entities.json (already transitively closed at load).
    fn declared_ancestors(&self, uid: &EntityUid) -> HashSet<EntityUid> {
        self.entities
            .ancestors(uid)
            .map(|ancestors| ancestors.cloned().collect())
            .unwrap_or_default()
    }

    /// The entities one request needs: its principal and resource, the declared groups above
    /// them, and the action hierarchy. Built small per request rather than cloning the whole
    /// entities.json store, so the cost does not grow with the number of declared entities.
    fn request_entities<'u>(
        &self,
        principal: Entity,
        resource: Entity,
        action: &EntityUid,
        ancestors: impl Iterator<Item = &'u EntityUid>,
    ) -> Result<Entities, String> {
        let lineage = self
            .action_lineage
            .get(action)
            .map_or(&[][..], Vec::as_slice);
        let mut list = Vec::with_capacity(lineage.len() + 4);
        list.extend(ancestors.filter_map(|uid| self.entities.get(uid)).cloned());
        list.push(principal);
        list.push(resource);
        list.extend(lineage.iter().cloned());
        Entities::from_entities(list, None).map_err(|e| e.to_string())
    }
}

fn with_ancestors(
    entity: Result<Entity, cedar_policy::EntityAttrEvaluationError>,
    ancestors: HashSet<EntityUid>,
) -> Result<(Entity, HashSet<EntityUid>), String> {
    entity.map(|e| (e, ancestors)).map_err(|e| e.to_string())
}

/// The Cedar context of the shipped schema (`HttpContext`, `ModelContext`, `McpContext`).
fn context_pairs(
    input: &AuthzInput<'_>,
    tool_arguments: &crate::arguments::ToolArgumentShapes,
) -> Result<Vec<(String, RestrictedExpression)>, String> {
    let record = |pairs: Vec<(&str, RestrictedExpression)>| {
        RestrictedExpression::new_record(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)))
            .map_err(|e| e.to_string())
    };
    let mut pairs = vec![
        (
            "request".to_owned(),
            record(vec![
                ("method", string(input.request.method)),
                ("path", string(input.request.path)),
                ("host", string(input.request.host)),
                ("client_address", string(input.request.client_address)),
            ])?,
        ),
        (
            "agent".to_owned(),
            record(vec![
                ("id", string(input.agent.as_str())),
                ("trust_domain", string(input.agent.trust_domain_name())),
            ])?,
        ),
        (
            "delegated".to_owned(),
            RestrictedExpression::new_bool(input.user.is_some()),
        ),
        ("now".to_owned(), RestrictedExpression::new_long(input.now)),
    ];
    if let Some(user) = input.user {
        pairs.push((
            "user".to_owned(),
            record(vec![
                ("sub", string(&user.subject)),
                ("issuer", string(&user.issuer)),
                (
                    "scopes",
                    RestrictedExpression::new_set(user.scopes.iter().map(|s| string(s))),
                ),
            ])?,
        ));
    }
    for (key, value) in &input.protocol_context {
        if *key == "tool" {
            // Only the argument attributes the schema declares for this tool are visible.
            let mut tool = value.clone();
            tool_arguments.project_into(&mut tool);
            pairs.push(((*key).to_owned(), from_json(&tool)?));
        } else {
            pairs.push(((*key).to_owned(), from_json(value)?));
        }
    }
    Ok(pairs)
}

/// A JSON value as a Cedar value: arrays become sets, objects records. `null` and fractional
/// numbers have no Cedar counterpart; they are an error, which denies.
pub(crate) fn from_json(value: &serde_json::Value) -> Result<RestrictedExpression, String> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => return Err("null has no Cedar value".to_owned()),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => RestrictedExpression::new_long(
            n.as_i64()
                .ok_or_else(|| format!("{n} is not a Cedar Long (a 64-bit integer)"))?,
        ),
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Array(items) => RestrictedExpression::new_set(
            items.iter().map(from_json).collect::<Result<Vec<_>, _>>()?,
        ),
        Value::Object(map) => RestrictedExpression::new_record(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), from_json(v)?)))
                .collect::<Result<Vec<_>, String>>()?,
        )
        .map_err(|e| e.to_string())?,
    })
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn failed(error: String) -> QueryOutcome {
    QueryOutcome {
        allowed: false,
        determining: Vec::new(),
        errors: vec![error],
    }
}
