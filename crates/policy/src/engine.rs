//! Asking Cedar the agent question and, for delegated calls, the user question.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use arc_swap::ArcSwapOption;
use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityUid, PolicySet,
    Request, RestrictedExpression,
};
use portcullis_core::{Action, Decision, Resource, SpiffeId, UserClaims};

use crate::index::{ScopeRequest, Target};
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
    /// `@id`s of the policies that determined the answer. Shared: a remembered answer is
    /// handed out, and its ids moved into the audit record, without copying them.
    pub determining: Arc<[String]>,
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
    /// What the determining permits' `@scope` annotations allow (see `scopes`).
    pub scopes: crate::GrantedScopes,
    permit: Option<Permit>,
}

impl Evaluation {
    /// The permit to forward, present exactly when the decision lets the request through.
    pub fn take_permit(&mut self) -> Option<Permit> {
        self.permit.take()
    }

    /// Turns an approval-required decision into [`Decision::Approved`] with its permit. Only
    /// for the caller that verified a grant for exactly this call (the proxy's approval
    /// step); any other decision is left as it is. Whether the permits applied is Cedar's
    /// answer, unchanged: a grant never opens what the policies deny.
    pub fn approve(&mut self) -> bool {
        if self.decision != Decision::ApprovalRequired {
            return false;
        }
        self.decision = Decision::Approved;
        self.permit = Some(Permit { _sealed: () });
        true
    }
}

/// Which policies a query hands to Cedar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// Those whose scope matches the request (the index): what the proxy uses.
    Indexed,
    /// The whole set, as Cedar alone would: the reference the differential test compares
    /// the index against.
    #[cfg(test)]
    Everything,
}

/// What evaluation needs about the calling agent, built against one snapshot (its parents
/// come from that snapshot's entities.json).
#[derive(Debug)]
pub(crate) struct AgentParts {
    generation: u64,
    principal: Entity,
    ancestors: HashSet<EntityUid>,
    /// `context.agent`, the same in the agent and the user question.
    context: RestrictedExpression,
}

/// One agent, prepared once for all its requests (identity is fixed per connection, DESIGN:
/// "Identity is computed once per connection"; the proxy shares it between the agent's
/// connections): its Cedar entity, its
/// parents from entities.json and its `context.agent` record. After a policy reload it
/// rebuilds itself on the next request, so it never carries parents of a set no longer in
/// force. Get one from [`crate::PolicyEngine::prepare_agent`].
#[derive(Debug)]
pub struct PreparedAgent {
    id: SpiffeId,
    parts: ArcSwapOption<AgentParts>,
    entities: EntityCache,
}

impl PreparedAgent {
    pub(crate) fn new(id: SpiffeId, snapshot: &PolicySnapshot) -> Self {
        let prepared = Self {
            id,
            parts: ArcSwapOption::empty(),
            entities: EntityCache::default(),
        };
        // A failure here is reported by the first evaluation, which retries.
        let _ = prepared.parts_for(snapshot);
        prepared
    }

    pub fn agent(&self) -> &SpiffeId {
        &self.id
    }

    /// The parts for `snapshot`: cached, or rebuilt when the set in force changed.
    fn parts_for(&self, snapshot: &PolicySnapshot) -> Result<Arc<AgentParts>, String> {
        if let Some(parts) = self.parts.load_full()
            && parts.generation == snapshot.generation
        {
            return Ok(parts);
        }
        let parts = Arc::new(snapshot.agent_parts(&self.id)?);
        self.parts.store(Some(parts.clone()));
        Ok(parts)
    }
}

/// The request entities of the last few distinct questions one agent asked (which
/// action, on which resource, for the agent or for which user). Building them runs Cedar's
/// transitive closure over the principal, resource and action hierarchy: a quarter of a
/// decision, and the same every time an agent repeats a call. An entry built against another
/// snapshot is never used; the capacity bounds what an agent holds.
#[derive(Debug, Default)]
struct EntityCache(Mutex<VecDeque<Arc<RequestEntities>>>);

/// Distinct questions an agent remembers entities for.
const ENTITY_CACHE_ENTRIES: usize = 8;

impl EntityCache {
    fn get(
        &self,
        generation: u64,
        user: Option<&UserClaims>,
        input: &AuthzInput<'_>,
    ) -> Option<Arc<RequestEntities>> {
        let entries = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .iter()
            .find(|e| {
                e.generation == generation
                    && e.action == input.action
                    && e.resource == *input.resource
                    && e.user.as_ref() == user
            })
            .cloned()
    }

    fn insert(&self, built: Arc<RequestEntities>) {
        let mut entries = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|e| e.generation == built.generation);
        if entries.len() == ENTITY_CACHE_ENTRIES {
            entries.pop_front();
        }
        entries.push_back(built);
    }
}

/// What one question evaluates against, with what it was built from.
#[derive(Debug)]
struct RequestEntities {
    generation: u64,
    /// `None` for the agent question.
    user: Option<UserClaims>,
    action: Action,
    resource: Resource,
    entities: Entities,
    principal: EntityUid,
    action_uid: EntityUid,
    resource_uid: EntityUid,
    /// The index's policies for this principal, action and resource, once selected: the
    /// selection depends on nothing else, so an agent repeating a call reuses it.
    selected: OnceLock<Arc<PolicySet>>,
    /// The Cedar context of the last question asked with these entities.
    last_context: LastContext,
}

/// The Cedar context last built for one question, with everything it was built from besides
/// the question itself (the entry's action, resource, asker and snapshot): the request line
/// and host, the caller's address, the user, the second. An agent repeating a call within the
/// same second builds no new context; turning the context record into Cedar values is a sixth
/// of a decision and 40 of its allocations. A context with protocol fields (read from a body)
/// is built every time and never remembered.
///
/// With it, the answer the index's policies gave for that context. Cedar's evaluation is a
/// function of the policies, the entities, the request and the context alone (no clock, no
/// randomness, no I/O), and the entry fixes the first three: the same context gets the same
/// answer, determining policies and errors included. Evaluating is most of what is left of a
/// decision (rebuilding each policy's condition, 40 allocations); an agent repeating a call
/// within the same second is answered without it. A new second, another path, address or
/// user, or another snapshot (another entry) asks Cedar again.
#[derive(Debug, Default)]
struct LastContext(Mutex<Option<LastQuestion>>);

#[derive(Debug)]
struct LastQuestion {
    key: ContextKey,
    context: Context,
    /// Set once the index's policies answered this context.
    answer: Option<QueryOutcome>,
}

#[derive(Debug, Default)]
struct ContextKey {
    now: i64,
    method: String,
    path: String,
    host: String,
    client_address: String,
    user: Option<UserClaims>,
}

impl ContextKey {
    /// Now `input`'s, reusing the strings' buffers (a new second allocates nothing).
    fn update(&mut self, input: &AuthzInput<'_>) {
        self.now = input.now;
        for (field, value) in [
            (&mut self.method, input.request.method),
            (&mut self.path, input.request.path),
            (&mut self.host, input.request.host),
            (&mut self.client_address, input.request.client_address),
        ] {
            field.clear();
            field.push_str(value);
        }
        if self.user.as_ref() != input.user {
            self.user = input.user.cloned();
        }
    }

    fn matches(&self, input: &AuthzInput<'_>) -> bool {
        self.now == input.now
            && self.method == input.request.method
            && self.path == input.request.path
            && self.host == input.request.host
            && self.client_address == input.request.client_address
            && self.user.as_ref() == input.user
    }
}

/// What [`LastContext`] holds for a question.
enum Remembered {
    /// The index's answer for exactly this context.
    Answer(QueryOutcome),
    /// The context, still to be evaluated.
    Context(Context),
}

impl LastContext {
    /// The remembered answer or context for `input`, or the context built now (and
    /// remembered, without an answer, unless it has protocol fields).
    fn get_or_build(
        &self,
        input: &AuthzInput<'_>,
        build: impl FnOnce() -> Result<Context, String>,
    ) -> Result<Remembered, String> {
        if !input.protocol_context.is_empty() {
            return build().map(Remembered::Context);
        }
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = last.as_ref()
            && last.key.matches(input)
        {
            return Ok(match &last.answer {
                Some(answer) => Remembered::Answer(answer.clone()),
                None => Remembered::Context(last.context.clone()),
            });
        }
        let context = build()?;
        let kept = last.get_or_insert_with(|| LastQuestion {
            key: ContextKey::default(),
            context: context.clone(),
            answer: None,
        });
        kept.key.update(input);
        kept.context = context.clone();
        kept.answer = None;
        Ok(Remembered::Context(context))
    }

    /// Remembers the index's answer for `input`'s context, if that is still the context
    /// remembered (another connection of the agent may have moved it on meanwhile).
    fn remember_answer(&self, input: &AuthzInput<'_>, answer: &QueryOutcome) {
        if !input.protocol_context.is_empty() {
            return;
        }
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = last.as_mut()
            && last.key.matches(input)
        {
            last.answer = Some(answer.clone());
        }
    }
}

/// Request shapes the schema already accepted. Validating a request against the schema checks
/// that the principal and resource types apply to the action and that the context has the
/// action's declared record type: a fifth of a decision. When the context holds only what the
/// proxy builds itself (strings, a bool, a long, a set of strings; no protocol fields from a
/// body), that outcome depends on the [`Shape`] alone, never on the values, so a shape that
/// validated once is not validated again for this snapshot. Requests with protocol fields,
/// whose types come from the caller's JSON, are validated every time. Bounded: a shape is a
/// combination of finitely many actions and resource types.
#[derive(Debug, Default)]
pub(crate) struct ValidatedShapes(RwLock<HashSet<Shape>>);

impl ValidatedShapes {
    fn contains(&self, shape: &Shape) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(shape)
    }

    fn insert(&self, shape: Shape) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(shape);
    }
}

/// What decides whether a context without protocol fields validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    action: Action,
    resource_type: &'static str,
    /// The principal is the user (else the agent).
    user_principal: bool,
    /// `context.user` present, and whether its `scopes` set is empty (an empty set conforms
    /// to any set type, a set of strings only to `Set<String>`).
    delegated: Option<bool>,
}

/// Who one question is asked about: the agent, or the user it acts for.
#[derive(Clone, Copy)]
enum Asker<'a> {
    Agent,
    User(&'a UserClaims),
}

impl PolicySnapshot {
    pub(crate) fn evaluate(
        &self,
        input: &AuthzInput<'_>,
        prepared: Option<&PreparedAgent>,
        mode: Mode,
        hash: Arc<str>,
        selection: Selection,
    ) -> Evaluation {
        // The prepared agent's cache serves only questions about that agent and its users.
        let cache = prepared
            .filter(|prepared| prepared.id == *input.agent)
            .map(|prepared| &prepared.entities);
        let (agent, user) = match self.agent_for(input.agent, prepared) {
            Ok(parts) => (
                self.ask(Asker::Agent, &parts, input, selection, cache),
                input
                    .user
                    .map(|user| self.ask(Asker::User(user), &parts, input, selection, cache)),
            ),
            // Cannot happen for a parsed SPIFFE ID; if it did, no question can be asked.
            Err(e) => {
                let outcome = failed(format!("agent entity: {e}"));
                (outcome.clone(), input.user.map(|_| outcome))
            }
        };
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
        let scopes = self.granted_scopes(&agent, user.as_ref());
        Evaluation {
            decision,
            agent,
            user,
            policy_hash: hash,
            mode,
            scopes,
            permit: decision.forwards().then_some(Permit { _sealed: () }),
        }
    }

    /// The prepared agent's parts when it names this request's agent, else built now.
    fn agent_for(
        &self,
        agent: &SpiffeId,
        prepared: Option<&PreparedAgent>,
    ) -> Result<Arc<AgentParts>, String> {
        match prepared {
            Some(prepared) if prepared.id == *agent => prepared.parts_for(self),
            _ => self.agent_parts(agent).map(Arc::new),
        }
    }

    fn ask(
        &self,
        asker: Asker<'_>,
        agent: &AgentParts,
        input: &AuthzInput<'_>,
        selection: Selection,
        cache: Option<&EntityCache>,
    ) -> QueryOutcome {
        match self.try_ask(asker, agent, input, selection, cache) {
            Ok(outcome) => outcome,
            Err(e) => failed(e),
        }
    }

    fn try_ask(
        &self,
        asker: Asker<'_>,
        agent: &AgentParts,
        input: &AuthzInput<'_>,
        selection: Selection,
        cache: Option<&EntityCache>,
    ) -> Result<QueryOutcome, String> {
        let user = match asker {
            Asker::Agent => None,
            Asker::User(user) => Some(user),
        };
        let built = match cache.and_then(|c| c.get(self.generation, user, input)) {
            Some(built) => built,
            None => {
                let built = Arc::new(self.request_entities(asker, agent, input)?);
                if let Some(cache) = cache {
                    cache.insert(built.clone());
                }
                built
            }
        };
        // Built from Cedar values directly (parsing JSON against the schema costs several
        // times the whole evaluation).
        let build = || {
            Context::from_pairs(context_pairs(
                input,
                agent.context.clone(),
                &self.tool_arguments,
            )?)
            .map_err(|e| format!("context: {e}"))
        };
        // Context and answer are remembered only with entities that are (a question asked
        // once gains nothing), and only for the index's questions (the reference side of the
        // differential test builds and evaluates everything, every time).
        let remembers = cache.is_some() && selection == Selection::Indexed;
        let context = if remembers {
            match built.last_context.get_or_build(input, build)? {
                Remembered::Answer(answer) => return Ok(answer),
                Remembered::Context(context) => context,
            }
        } else {
            build()?
        };
        let request = self.request(&built, user.is_some(), context, input, selection)?;
        let selected: Arc<PolicySet>;
        let policies = match selection {
            Selection::Indexed => {
                selected = self.select(&built)?;
                &*selected
            }
            #[cfg(test)]
            Selection::Everything => &self.index.all,
        };
        let response = Authorizer::new().is_authorized(&request, policies, &built.entities);
        let diagnostics = response.diagnostics();
        let errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
        let outcome = QueryOutcome {
            allowed: response.decision() == CedarDecision::Allow && errors.is_empty(),
            determining: diagnostics.reason().map(ToString::to_string).collect(),
            errors,
        };
        if remembers {
            built.last_context.remember_answer(input, &outcome);
        }
        Ok(outcome)
    }

    /// The policies whose scope matches the question (the index).
    fn select(&self, built: &RequestEntities) -> Result<Arc<PolicySet>, String> {
        if let Some(selected) = built.selected.get() {
            return Ok(selected.clone());
        }
        let target = |uid| Target {
            uid,
            entities: &built.entities,
        };
        let selected = self.index.select(ScopeRequest {
            principal: target(&built.principal),
            action: target(&built.action_uid),
            resource: target(&built.resource_uid),
        })?;
        Ok(built.selected.get_or_init(|| selected).clone())
    }

    /// For each question, the `permit` policies whose scope (principal, action, resource)
    /// matches the request: those whose conditions decide whether it is allowed. What
    /// `portcullis check --explain` names for a deny. Errors are the evaluation's own.
    pub(crate) fn scope_matched_permits(
        &self,
        input: &AuthzInput<'_>,
    ) -> Result<(Vec<String>, Option<Vec<String>>), String> {
        let agent = self.agent_parts(input.agent)?;
        let permits = |asker| -> Result<Vec<String>, String> {
            let built = self.request_entities(asker, &agent, input)?;
            Ok(self
                .select(&built)?
                .policies()
                .filter(|p| p.effect() == cedar_policy::Effect::Permit)
                .map(|p| p.id().to_string())
                .collect())
        };
        let agent_permits = permits(Asker::Agent)?;
        let user_permits = input
            .user
            .map(|user| permits(Asker::User(user)))
            .transpose()?;
        Ok((agent_permits, user_permits))
    }

    /// The Cedar request, validated against the schema unless its shape already was (see
    /// [`ValidatedShapes`]).
    fn request(
        &self,
        built: &RequestEntities,
        user_principal: bool,
        context: Context,
        input: &AuthzInput<'_>,
        selection: Selection,
    ) -> Result<Request, String> {
        // The reference side of the differential test validates every request.
        let shape =
            (input.protocol_context.is_empty() && selection == Selection::Indexed).then(|| Shape {
                action: input.action,
                resource_type: input.resource.entity_type(),
                user_principal,
                delegated: input.user.map(|user| user.scopes.is_empty()),
            });
        let known = shape.is_some_and(|shape| self.validated_shapes.contains(&shape));
        let request = Request::new(
            built.principal.clone(),
            built.action_uid.clone(),
            built.resource_uid.clone(),
            context,
            (!known).then_some(&self.schema),
        )
        .map_err(|e| format!("request: {e}"))?;
        if let Some(shape) = shape
            && !known
        {
            self.validated_shapes.insert(shape);
        }
        Ok(request)
    }

    /// The entities one question needs: its principal and resource, the declared groups
    /// above them, and the action hierarchy. Built small per request rather than cloning the
    /// whole entities.json store, so the cost does not grow with the number of declared
    /// entities.
    fn request_entities(
        &self,
        asker: Asker<'_>,
        agent: &AgentParts,
        input: &AuthzInput<'_>,
    ) -> Result<RequestEntities, String> {
        let action = self.action_uid(input.action)?;
        let (resource, resource_ancestors) = self.resource_entity(input.resource)?;
        let user_entity;
        let (principal, principal_ancestors) = match asker {
            Asker::Agent => (agent.principal.clone(), &agent.ancestors),
            Asker::User(user) => {
                user_entity = self
                    .user_entity(user)
                    .map_err(|e| format!("user entity: {e}"))?;
                (user_entity.0, &user_entity.1)
            }
        };
        let lineage = self
            .action_lineage
            .get(action.id().unescaped())
            .map_or(&[][..], |(_, lineage)| lineage.as_slice());
        let (principal_uid, resource_uid) = (principal.uid(), resource.uid());
        let mut list = Vec::with_capacity(lineage.len() + 4);
        list.extend(
            principal_ancestors
                .union(&resource_ancestors)
                .filter_map(|uid| self.entities.get(uid))
                .cloned(),
        );
        list.push(principal);
        list.push(resource);
        list.extend(lineage.iter().cloned());
        let entities = Entities::from_entities(list, None).map_err(|e| e.to_string())?;
        Ok(RequestEntities {
            generation: self.generation,
            user: match asker {
                Asker::Agent => None,
                Asker::User(user) => Some(user.clone()),
            },
            action: input.action,
            resource: input.resource.clone(),
            entities,
            principal: principal_uid,
            action_uid: action,
            resource_uid,
            selected: OnceLock::new(),
            last_context: LastContext::default(),
        })
    }

    fn action_uid(&self, action: Action) -> Result<EntityUid, String> {
        match self.action_lineage.get(action.name()) {
            Some((uid, _)) => Ok(uid.clone()),
            // Not in the schema: `Request::new` reports it, as for any undeclared action.
            None => entity_uid("Action", action.name()),
        }
    }

    pub(crate) fn agent_parts(&self, id: &SpiffeId) -> Result<AgentParts, String> {
        let uid = entity_uid("Agent", id.as_str())?;
        let mut attrs = HashMap::from([
            ("trust_domain".to_owned(), string(id.trust_domain_name())),
            ("path".to_owned(), string(id.path())),
        ]);
        if let Some((namespace, service_account)) = id.kubernetes_service_account() {
            attrs.insert("namespace".to_owned(), string(namespace));
            attrs.insert("service_account".to_owned(), string(service_account));
        }
        let ancestors = self.declared_ancestors(&uid);
        let principal = Entity::new(uid, attrs, ancestors.clone()).map_err(|e| e.to_string())?;
        let context = record(vec![
            ("id", string(id.as_str())),
            ("trust_domain", string(id.trust_domain_name())),
        ])?;
        Ok(AgentParts {
            generation: self.generation,
            principal,
            ancestors,
            context,
        })
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

    /// The resource as Cedar sees it: the entity entities.json declares for it (attributes and
    /// tags a schema extension gives it, and its groups), or one with its groups only. A
    /// route's `path`, `host` and `method` are the request's (the loader refuses them in the
    /// file); a declared route keeps its other attributes.
    fn resource_entity(&self, resource: &Resource) -> Result<(Entity, HashSet<EntityUid>), String> {
        let uid = entity_uid(resource.entity_type(), resource.id())?;
        let declared = self.entities.get(&uid);
        let parents = self.declared_ancestors(&uid);
        match resource {
            Resource::Route { path, host, method } => {
                let mut attrs = match declared {
                    Some(entity) => entity.clone().into_inner().1,
                    None => HashMap::with_capacity(3),
                };
                attrs.insert("path".to_owned(), string(path));
                attrs.insert("host".to_owned(), string(host));
                attrs.insert("method".to_owned(), string(method));
                with_ancestors(Entity::new(uid, attrs, parents.clone()), parents)
            }
            Resource::Model(_)
            | Resource::Tool(_)
            | Resource::McpResource(_)
            | Resource::Prompt(_) => match declared {
                Some(entity) => Ok((entity.clone(), parents)),
                None => Ok((Entity::new_no_attrs(uid, parents.clone()), parents)),
            },
        }
    }

    /// Ancestors declared in entities.json (already transitively closed at load).
    fn declared_ancestors(&self, uid: &EntityUid) -> HashSet<EntityUid> {
        self.entities
            .ancestors(uid)
            .map(|ancestors| ancestors.cloned().collect())
            .unwrap_or_default()
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
    agent: RestrictedExpression,
    tool_arguments: &crate::arguments::ToolArgumentShapes,
) -> Result<Vec<(String, RestrictedExpression)>, String> {
    let mut pairs = Vec::with_capacity(5 + input.protocol_context.len());
    pairs.extend([
        (
            "request".to_owned(),
            record(vec![
                ("method", string(input.request.method)),
                ("path", string(input.request.path)),
                ("host", string(input.request.host)),
                ("client_address", string(input.request.client_address)),
            ])?,
        ),
        ("agent".to_owned(), agent),
        (
            "delegated".to_owned(),
            RestrictedExpression::new_bool(input.user.is_some()),
        ),
        ("now".to_owned(), RestrictedExpression::new_long(input.now)),
    ]);
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

fn record(pairs: Vec<(&str, RestrictedExpression)>) -> Result<RestrictedExpression, String> {
    RestrictedExpression::new_record(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)))
        .map_err(|e| e.to_string())
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
        determining: Arc::default(),
        errors: vec![error],
    }
}
