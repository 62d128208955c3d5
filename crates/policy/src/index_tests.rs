//! The index against Cedar alone: over generated policy sets, entity hierarchies and
//! requests, the indexed evaluation must give the same decision, the same determining
//! policies and the same errors (in the same order) as evaluating the whole set.
//!
//! A small seeded generator rather than a property-testing crate: the inputs are drawn from
//! a closed vocabulary (the shipped schema), every case is reproducible from its seed, and
//! the crate's test build stays light.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::str::FromStr;

use cedar_policy::{PolicySet, Schema, ValidationMode, Validator};
use portcullis_core::{Action, Resource, SpiffeId, UserClaims};
use serde_json::{Value, json};

use crate::engine::Selection;
use crate::index::{ScopeRequest, Target};
use crate::load::entity_uid;
use crate::{
    AuthzInput, ENTITIES_FILE, Evaluation, Mode, PolicySnapshot, PreparedAgent, RequestInfo,
    SCHEMA_FILE,
};

/// splitmix64: enough randomness for input generation, and reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A random subset, in order.
    fn subset<'a, T>(&mut self, items: &'a [T], percent: u64) -> Vec<&'a T> {
        items.iter().filter(|_| self.chance(percent)).collect()
    }
}

const AGENTS: [&str; 4] = [
    "spiffe://prod.example.org/ns/a/sa/x",
    "spiffe://prod.example.org/ns/b/sa/y",
    "spiffe://staging.example.org/ns/a/sa/x",
    // Never declared in entities.json.
    "spiffe://prod.example.org/svc/z",
];
const AGENT_GROUPS: [&str; 4] = ["g0", "g1", "g2", "g3"];
/// `u3` and `u9` are never declared; `ug4` and `ug5` come only from tokens.
const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u9"];
const USER_GROUPS: [&str; 6] = ["ug0", "ug1", "ug2", "ug3", "ug4", "ug5"];
const ROUTES: [&str; 3] = ["/a", "/admin/x", "/api/1"];
const MODELS: [&str; 3] = ["m0", "m1", "m2"];
const MODEL_GROUPS: [&str; 2] = ["mg0", "mg1"];
const TOOLS: [&str; 3] = ["refund", "search_tickets", "t2"];
const TOOL_GROUPS: [&str; 2] = ["tg0", "tg1"];
const ACTIONS: [Action; 8] = [
    Action::Get,
    Action::Head,
    Action::Post,
    Action::Delete,
    Action::InvokeModel,
    Action::CallTool,
    Action::ListTools,
    Action::ReadResource,
];

fn uid_json(kind: &str, id: &str) -> Value {
    json!({ "type": kind, "id": id })
}

/// entities.json: group hierarchies (a group's parents come from lower-numbered groups, so
/// there are no cycles), memberships of agents, users, models and tools.
fn entities(rng: &mut Rng) -> Value {
    let mut list = Vec::new();
    let mut groups = |rng: &mut Rng, kind: &str, names: &[&str], nested: bool| {
        for (i, name) in names.iter().enumerate() {
            let parents: Vec<Value> = if nested {
                rng.subset(&names[..i], 40)
                    .into_iter()
                    .map(|p| uid_json(kind, p))
                    .collect()
            } else {
                Vec::new()
            };
            list.push(json!({ "uid": uid_json(kind, name), "parents": parents }));
        }
    };
    groups(rng, "AgentGroup", &AGENT_GROUPS, true);
    groups(rng, "Group", &USER_GROUPS[..4], true);
    groups(rng, "ModelGroup", &MODEL_GROUPS, false);
    groups(rng, "ToolGroup", &TOOL_GROUPS, false);
    let mut members = |rng: &mut Rng, kind: &str, names: &[&str], of: &str, parents: &[&str]| {
        for name in names {
            let parents: Vec<Value> = rng
                .subset(parents, 40)
                .into_iter()
                .map(|p| uid_json(of, p))
                .collect();
            list.push(json!({ "uid": uid_json(kind, name), "parents": parents }));
        }
    };
    members(rng, "Agent", &AGENTS[..3], "AgentGroup", &AGENT_GROUPS);
    members(rng, "User", &USERS[..3], "Group", &USER_GROUPS[..4]);
    members(rng, "Model", &MODELS[..2], "ModelGroup", &MODEL_GROUPS);
    members(rng, "Tool", &TOOLS[..2], "ToolGroup", &TOOL_GROUPS);
    Value::Array(list)
}

fn principal_scope(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 | 1 => "principal".to_owned(),
        2 => format!("principal == Agent::\"{}\"", rng.pick(&AGENTS)),
        3 => format!("principal == User::\"{}\"", rng.pick(&USERS)),
        4 => format!("principal in AgentGroup::\"{}\"", rng.pick(&AGENT_GROUPS)),
        5 => format!("principal in Group::\"{}\"", rng.pick(&USER_GROUPS)),
        6 => "principal is Agent".to_owned(),
        7 => "principal is User".to_owned(),
        8 => format!(
            "principal is Agent in AgentGroup::\"{}\"",
            rng.pick(&AGENT_GROUPS)
        ),
        _ => format!("principal is User in Group::\"{}\"", rng.pick(&USER_GROUPS)),
    }
}

fn action_scope(rng: &mut Rng) -> String {
    match rng.below(7) {
        0 | 1 => "action".to_owned(),
        2 => format!("action == Action::\"{}\"", rng.pick(&ACTIONS).name()),
        3 => "action in Action::\"read\"".to_owned(),
        4 => "action in Action::\"write\"".to_owned(),
        5 => "action in [Action::\"GET\", Action::\"invoke_model\"]".to_owned(),
        _ => "action in [Action::\"call_tool\", Action::\"write\", Action::\"list_tools\"]"
            .to_owned(),
    }
}

fn resource_scope(rng: &mut Rng) -> String {
    match rng.below(11) {
        0 | 1 => "resource".to_owned(),
        2 => "resource is Route".to_owned(),
        3 => format!("resource == Route::\"{}\"", rng.pick(&ROUTES)),
        4 => "resource is Model".to_owned(),
        5 => format!("resource == Model::\"{}\"", rng.pick(&MODELS)),
        6 => format!("resource in ModelGroup::\"{}\"", rng.pick(&MODEL_GROUPS)),
        7 => format!(
            "resource is Model in ModelGroup::\"{}\"",
            rng.pick(&MODEL_GROUPS)
        ),
        8 => format!("resource == Tool::\"{}\"", rng.pick(&TOOLS)),
        9 => format!("resource in ToolGroup::\"{}\"", rng.pick(&TOOL_GROUPS)),
        _ => "resource is Tool".to_owned(),
    }
}

/// A condition, sometimes one that errors for some requests (an overflow that depends on
/// `context.now`), so that erroring permits and forbids are exercised.
fn condition(rng: &mut Rng) -> String {
    match rng.below(11) {
        0..=2 => String::new(),
        3 => "when { context.now > 1000 }".to_owned(),
        4 => "when { context.now * 10000000000 > 0 }".to_owned(),
        5 => "unless { context.now * 10000000000 < 0 }".to_owned(),
        6 => "when { context.delegated }".to_owned(),
        7 => "unless { context.delegated }".to_owned(),
        8 => "when { context.agent.trust_domain == \"prod.example.org\" }".to_owned(),
        9 => format!(
            "when {{ context has user && context.user.sub == \"{}\" }}",
            rng.pick(&USERS)
        ),
        _ => format!(
            "when {{ principal in AgentGroup::\"{}\" || principal in Group::\"{}\" }}",
            rng.pick(&AGENT_GROUPS),
            rng.pick(&USER_GROUPS)
        ),
    }
}

/// Up to `max` policies of random shapes, each kept only if it validates on its own (a
/// scope like `action == Action::"GET", resource is Model` never applies and is refused by
/// strict validation, as the loader would refuse it).
fn policies(rng: &mut Rng, schema: &Schema, max: usize) -> String {
    let validator = Validator::new(schema.clone());
    let mut out = String::new();
    let count = 1 + rng.below(max);
    for i in 0..count {
        let effect = if rng.chance(30) { "forbid" } else { "permit" };
        let approval = if effect == "permit" && rng.chance(10) {
            "@approval(\"required\") "
        } else {
            ""
        };
        let text = format!(
            "@id(\"p{i}\") {approval}{effect} ({}, {}, {}) {};\n",
            principal_scope(rng),
            action_scope(rng),
            resource_scope(rng),
            condition(rng)
        );
        let Ok(set) = PolicySet::from_str(&text) else {
            continue;
        };
        if validator
            .validate(&set, ValidationMode::Strict)
            .validation_passed()
        {
            out.push_str(&text);
        }
    }
    out
}

fn user(rng: &mut Rng) -> UserClaims {
    UserClaims {
        subject: (*rng.pick(&USERS)).to_owned(),
        issuer: "https://idp.example.org".to_owned(),
        scopes: vec!["orders.read".to_owned()],
        email: None,
        groups: rng
            .subset(&USER_GROUPS, 30)
            .into_iter()
            .map(|g| (*g).to_owned())
            .collect(),
        actor_chain: Vec::new(),
        expires_at: 0,
    }
}

/// The resource and protocol context a classified request of `action` would carry;
/// sometimes malformed, so request validation errors are compared too.
fn target(rng: &mut Rng, action: Action) -> (Resource, Vec<(&'static str, Value)>) {
    let route = |rng: &mut Rng| Resource::Route {
        path: (*rng.pick(&ROUTES)).into(),
        host: "orders.internal".into(),
        method: "GET".into(),
    };
    let broken = rng.chance(5);
    match action {
        Action::InvokeModel => {
            let model = *rng.pick(&MODELS);
            let mut call = json!({ "name": model, "stream": rng.chance(50), "tools": [] });
            if broken {
                call["stream"] = json!("yes");
            }
            (Resource::Model(model.to_owned()), vec![("model", call)])
        }
        Action::CallTool => {
            let tool = *rng.pick(&TOOLS);
            let amount = if broken { json!("50") } else { json!(5) };
            (
                Resource::Tool(tool.to_owned()),
                vec![
                    ("mcp", json!({ "method": "tools/call" })),
                    (
                        "tool",
                        json!({ "name": tool, "arguments": { "amount": amount, "query": "q" } }),
                    ),
                ],
            )
        }
        Action::ListTools => (route(rng), vec![("mcp", json!({ "method": "tools/list" }))]),
        Action::ReadResource => (
            Resource::McpResource("file:///r0".to_owned()),
            vec![("mcp", json!({ "method": "resources/read" }))],
        ),
        _ if broken => (route(rng), vec![("mcp", json!({ "method": "x" }))]),
        _ => (route(rng), Vec::new()),
    }
}

/// An outcome with the determining policies sorted: Cedar reports them from a hash set, so
/// their order carries no meaning in either evaluation. Errors keep their order.
fn normalized(evaluation: &Evaluation) -> String {
    let query = |q: &crate::QueryOutcome| {
        let determining: BTreeSet<&String> = q.determining.iter().collect();
        format!(
            "allowed={} determining={determining:?} errors={:?}",
            q.allowed, q.errors
        )
    };
    format!(
        "decision={:?} agent[{}] user[{}]",
        evaluation.decision,
        query(&evaluation.agent),
        evaluation.user.as_ref().map(query).unwrap_or_default()
    )
}

#[derive(Debug, Default)]
struct Tally {
    cases: usize,
    allowed: usize,
    errors: usize,
    forbidden: usize,
    delegated: usize,
}

impl Tally {
    fn count(&mut self, evaluation: &Evaluation, forbids: &BTreeSet<String>) {
        self.cases += 1;
        let queries = std::iter::once(&evaluation.agent).chain(evaluation.user.as_ref());
        for query in queries {
            self.allowed += usize::from(query.allowed);
            self.errors += usize::from(!query.errors.is_empty());
            self.forbidden += usize::from(
                !query.allowed && query.determining.iter().any(|id| forbids.contains(id)),
            );
        }
        self.delegated += usize::from(evaluation.user.is_some());
    }
}

fn shipped_schema() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    std::fs::read_to_string(root.join(SCHEMA_FILE)).unwrap()
}

fn snapshot(schema: &str, policies: &str, entities: &Value) -> PolicySnapshot {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(SCHEMA_FILE), schema).unwrap();
    std::fs::write(dir.path().join("generated.cedar"), policies).unwrap();
    std::fs::write(dir.path().join(ENTITIES_FILE), entities.to_string()).unwrap();
    PolicySnapshot::load(dir.path()).unwrap_or_else(|e| panic!("{e:?}\n{policies}"))
}

const SETS: u64 = 300;
const REQUESTS_PER_SET: usize = 30;

#[test]
fn differential() {
    let schema_src = shipped_schema();
    let schema = Schema::from_cedarschema_str(&schema_src).unwrap().0;
    let mut tally = Tally::default();
    for seed in 0..SETS {
        let mut rng = Rng(seed);
        let entities = entities(&mut rng);
        let policies = policies(&mut rng, &schema, 24);
        let forbids: BTreeSet<String> = PolicySet::from_str(&policies)
            .unwrap()
            .policies()
            .filter(|p| p.effect() == cedar_policy::Effect::Forbid)
            .filter_map(|p| p.annotation("id").map(str::to_owned))
            .collect();
        let snapshot = snapshot(&schema_src, &policies, &entities);
        // One prepared agent per agent for the whole set, as a connection keeps it: its
        // entity cache then serves repeated questions.
        let prepared_agents: Vec<PreparedAgent> = AGENTS
            .iter()
            .map(|a| PreparedAgent::new(SpiffeId::parse(a).unwrap(), &snapshot))
            .collect();
        for case in 0..REQUESTS_PER_SET {
            let agent: &&str = rng.pick(&AGENTS);
            let agent = SpiffeId::parse(agent).unwrap();
            let user = rng.chance(50).then(|| user(&mut rng));
            let action = *rng.pick(&ACTIONS);
            let (resource, protocol_context) = target(&mut rng, action);
            let input = AuthzInput {
                agent: &agent,
                user: user.as_ref(),
                action,
                resource: &resource,
                request: RequestInfo {
                    method: "GET",
                    path: resource.id(),
                    host: "orders.internal",
                    client_address: "10.0.0.7",
                },
                protocol_context,
                now: *rng.pick(&[1_700_000_000, 5, 0]),
            };
            // The indexed side sometimes goes through a prepared agent, as the proxy would,
            // and then asks twice: the second answer comes from its caches.
            let prepared = rng
                .chance(50)
                .then(|| prepared_agents.iter().find(|p| *p.agent() == agent))
                .flatten();
            let ask = || {
                snapshot.evaluate(
                    &input,
                    prepared,
                    Mode::Enforce,
                    "h".into(),
                    Selection::Indexed,
                )
            };
            let indexed = ask();
            let again = ask();
            let everything = snapshot.evaluate(
                &input,
                None,
                Mode::Enforce,
                "h".into(),
                Selection::Everything,
            );
            for indexed in [&indexed, &again] {
                assert_eq!(
                    normalized(indexed),
                    normalized(&everything),
                    "seed {seed} case {case}: {input:?}\npolicies:\n{policies}\nentities: {entities}"
                );
            }
            tally.count(&everything, &forbids);
        }
    }
    // The comparison means something only if the generated cases reach every outcome.
    let cases = tally.cases;
    assert_eq!(cases, SETS as usize * REQUESTS_PER_SET);
    for (what, n) in [
        ("allowed", tally.allowed),
        ("erroring", tally.errors),
        ("forbidden", tally.forbidden),
        ("delegated", tally.delegated),
    ] {
        assert!(
            n * 20 >= cases,
            "only {n} of {cases} cases {what}: {tally:?}"
        );
    }
}

/// Per-agent policies, the shape the index is for: a request evaluates its own agent's
/// policy and the unconstrained ones, not the whole set.
#[test]
fn selects_only_the_policies_whose_scope_matches() {
    let mut policies = String::new();
    for i in 0..200 {
        writeln!(
            policies,
            "@id(\"agent-{i}\") permit (principal == Agent::\"spiffe://prod.example.org/ns/n{i}/sa/a\", action in Action::\"read\", resource);"
        )
        .unwrap();
    }
    policies.push_str(
        "@id(\"global\") forbid (principal, action, resource) when { context.now < 0 };\n",
    );
    policies
        .push_str("@id(\"group\") permit (principal in AgentGroup::\"g1\", action, resource);\n");
    let entities = json!([
        { "uid": uid_json("AgentGroup", "g0"), "parents": [] },
        { "uid": uid_json("AgentGroup", "g1"), "parents": [uid_json("AgentGroup", "g0")] },
        { "uid": uid_json("Agent", "spiffe://prod.example.org/ns/n7/sa/a"), "parents": [uid_json("AgentGroup", "g1")] },
    ]);
    let snapshot = snapshot(&shipped_schema(), &policies, &entities);
    let principal = entity_uid("Agent", "spiffe://prod.example.org/ns/n7/sa/a").unwrap();
    let action = entity_uid("Action", "GET").unwrap();
    let resource = entity_uid("Route", "/x").unwrap();
    let store = cedar_policy::Entities::from_entities(
        [
            cedar_policy::Entity::new_no_attrs(
                principal.clone(),
                [entity_uid("AgentGroup", "g1").unwrap()].into(),
            ),
            cedar_policy::Entity::new_no_attrs(
                action.clone(),
                [entity_uid("Action", "read").unwrap()].into(),
            ),
        ],
        None,
    )
    .unwrap();
    let target = |uid| Target {
        uid,
        entities: &store,
    };
    // Loaded, the set is kept as text: nothing is parsed until a request needs it.
    assert_eq!(snapshot.index.parsed_policies(), 0);
    let selected = snapshot
        .index
        .select(ScopeRequest {
            principal: target(&principal),
            action: target(&action),
            resource: target(&resource),
        })
        .unwrap();
    let ids: BTreeSet<String> = selected.policies().map(|p| p.id().to_string()).collect();
    assert_eq!(
        ids,
        ["agent-7", "global", "group"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
    assert_eq!(snapshot.index.cached_sets(), 1);
    // Only the selected policies were parsed, each as written (annotations included).
    assert_eq!(snapshot.index.parsed_policies(), 3);
    let agent = selected
        .policy(&cedar_policy::PolicyId::new("agent-7"))
        .unwrap();
    assert_eq!(agent.annotation("id"), Some("agent-7"));
    assert_eq!(
        agent.principal_constraint(),
        cedar_policy::PrincipalConstraint::Eq(principal.clone())
    );
    // Every policy for `analyze`, the ones not parsed yet included, without keeping them.
    let all = snapshot.index.policies().unwrap();
    assert_eq!(all.len(), 202);
    assert_eq!(snapshot.index.parsed_policies(), 3);
}
