//! Table-driven decisions over the shipped policies, and the failure rules: errors deny,
//! invalid sets never load, a failed reload keeps the last good set.

use std::path::PathBuf;

use portcullis_core::{Action, Decision, Resource, SpiffeId, UserClaims};

use super::*;

const TRIAGE: &str = "spiffe://prod.example.org/ns/support/sa/triage-agent";
const BILLING: &str = "spiffe://prod.example.org/ns/billing/sa/report-agent";

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn route(path: &str, method: &str) -> Resource {
    Resource::Route {
        path: path.into(),
        host: "orders.internal".into(),
        method: method.to_owned().into(),
    }
}

fn decide(engine: &PolicyEngine, agent: &str, method: &str, path: &str) -> Evaluation {
    decide_as(engine, agent, None, method, path)
}

fn decide_as(
    engine: &PolicyEngine,
    agent: &str,
    user: Option<&UserClaims>,
    method: &str,
    path: &str,
) -> Evaluation {
    let agent = SpiffeId::parse(agent).unwrap();
    let resource = route(path, method);
    engine.evaluate(&AuthzInput {
        agent: &agent,
        user,
        action: Action::for_method(method).unwrap(),
        resource: &resource,
        request: RequestInfo {
            method,
            path,
            host: "orders.internal",
            client_address: "127.0.0.1",
        },
        protocol_context: Vec::new(),
        now: 1_700_000_000,
    })
}

#[test]
fn shipped_policies_decide_as_documented() {
    let engine = PolicyEngine::load(&shipped(), Mode::Enforce).unwrap();
    let cases = [
        (
            TRIAGE,
            "GET",
            "/api/orders/17",
            Decision::Allow,
            "support-agents-read",
        ),
        (
            TRIAGE,
            "POST",
            "/api/tickets/9/comments",
            Decision::Allow,
            "support-agents-write-tickets",
        ),
        (TRIAGE, "DELETE", "/api/orders/17", Decision::Deny, ""),
        (
            TRIAGE,
            "GET",
            "/admin/users",
            Decision::Deny,
            "no-agent-admin",
        ),
        (BILLING, "GET", "/api/orders/17", Decision::Deny, ""),
        (
            BILLING,
            "GET",
            "/health",
            Decision::Allow,
            "health-any-prod-workload",
        ),
        (
            "spiffe://staging.example.org/ns/support/sa/triage-agent",
            "GET",
            "/health",
            Decision::Deny,
            "",
        ),
    ];
    for (agent, method, path, want, policy) in cases {
        let evaluation = decide(&engine, agent, method, path);
        assert_eq!(
            evaluation.decision, want,
            "{agent} {method} {path}: {evaluation:?}"
        );
        assert!(evaluation.agent.errors.is_empty(), "{evaluation:?}");
        if !policy.is_empty() {
            assert_eq!(
                evaluation.agent.determining.to_vec(),
                vec![policy.to_owned()]
            );
        }
    }
}

#[test]
fn permit_exists_only_when_the_request_may_pass() {
    let engine = PolicyEngine::load(&shipped(), Mode::Enforce).unwrap();
    assert!(
        decide(&engine, TRIAGE, "GET", "/api/orders/1")
            .take_permit()
            .is_some()
    );
    assert!(
        decide(&engine, BILLING, "GET", "/api/orders/1")
            .take_permit()
            .is_none()
    );
}

#[test]
fn shadow_mode_records_the_denial_but_forwards() {
    let engine = PolicyEngine::load(&shipped(), Mode::Shadow).unwrap();
    let mut evaluation = decide(&engine, BILLING, "GET", "/api/orders/1");
    assert_eq!(evaluation.decision, Decision::ShadowDeny);
    assert!(!evaluation.agent.allowed);
    assert!(evaluation.take_permit().is_some());
}

fn policy_dir(policies: &str, entities: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(shipped().join(SCHEMA_FILE), dir.path().join(SCHEMA_FILE)).unwrap();
    std::fs::write(dir.path().join("test.cedar"), policies).unwrap();
    if let Some(entities) = entities {
        std::fs::write(dir.path().join(ENTITIES_FILE), entities).unwrap();
    }
    dir
}

#[test]
fn an_erroring_forbid_denies() {
    // Validation cannot see the overflow; Cedar would skip the erroring forbid and allow.
    let dir = policy_dir(
        r#"
        @id("allow-all") permit (principal, action, resource);
        @id("overflowing-forbid") forbid (principal, action, resource)
        when { context.now * 100000000000000 > 0 };
        "#,
        None,
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let evaluation = decide(&engine, TRIAGE, "GET", "/x");
    assert_eq!(evaluation.decision, Decision::Deny);
    assert_eq!(evaluation.agent.errors.len(), 1, "{evaluation:?}");
}

#[test]
fn invalid_sets_report_every_error_and_never_load() {
    let dir = policy_dir(
        r#"
        permit (principal, action, resource);
        @id("a") permit (principal, action, resource) when { principal.no_such_attr == 1 };
        @id("a") permit (principal, action, resource);
        "#,
        Some(r#"[{"uid": {"type": "Agent", "id": "spiffe://UPPER/x"}, "parents": []}]"#),
    );
    let errors = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let all = text.join("\n");
    assert!(all.contains("no @id"), "{all}");
    assert!(all.contains("duplicate policy id \"a\""), "{all}");
    assert!(all.contains("no_such_attr"), "{all}");
    assert!(all.contains("entities.json: entity 0"), "{all}");
    // The unknown attribute is reported once per principal type the policy applies to.
    assert_eq!(errors.len(), 5, "{all}");
}

#[test]
fn a_failed_reload_keeps_the_last_good_set() {
    let dir = policy_dir(
        r#"@id("allow-all") permit (principal, action, resource);"#,
        None,
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let good = engine.hash();
    assert!(matches!(engine.reload(), ReloadOutcome::Unchanged));

    std::fs::write(dir.path().join("test.cedar"), "permit (principal,").unwrap();
    assert!(matches!(engine.reload(), ReloadOutcome::Failed(_)));
    assert_eq!(engine.hash(), good);
    assert_eq!(
        decide(&engine, TRIAGE, "GET", "/x").decision,
        Decision::Allow
    );

    std::fs::write(
        dir.path().join("test.cedar"),
        r#"@id("deny-all") forbid (principal, action, resource);"#,
    )
    .unwrap();
    assert!(matches!(engine.reload(), ReloadOutcome::Reloaded(_)));
    assert_ne!(engine.hash(), good);
    assert_eq!(
        decide(&engine, TRIAGE, "GET", "/x").decision,
        Decision::Deny
    );
}

#[test]
fn approval_annotation_refuses_without_an_approval_channel() {
    let dir = policy_dir(
        r#"@id("refunds") @approval("required") permit (principal, action == Action::"POST", resource);"#,
        None,
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let mut evaluation = decide(&engine, TRIAGE, "POST", "/refunds");
    assert_eq!(evaluation.decision, Decision::ApprovalRequired);
    assert!(evaluation.take_permit().is_none());
}

#[test]
fn user_question_caps_the_agent() {
    let dir = policy_dir(
        r#"
        @id("agents") permit (principal is Agent, action, resource);
        @id("leads-write") permit (principal in Group::"leads", action in Action::"write", resource);
        @id("users-read") permit (principal is User, action in Action::"read", resource);
        @id("delegated-only") forbid (principal is Agent, action == Action::"DELETE", resource)
        unless { context.delegated };
        "#,
        Some(
            r#"[{"uid": {"type": "Group", "id": "leads"}, "parents": [{"type": "Group", "id": "staff"}]}]"#,
        ),
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let user = |groups: &[&str]| UserClaims {
        subject: "alice".to_owned(),
        issuer: "https://idp.example.org".to_owned(),
        scopes: vec!["orders.read".to_owned()],
        email: None,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        actor_chain: vec![TRIAGE.to_owned()],
        expires_at: 0,
    };
    let reader = user(&[]);
    let lead = user(&["leads"]);
    assert_eq!(
        decide_as(&engine, TRIAGE, Some(&reader), "GET", "/o").decision,
        Decision::Allow
    );
    assert_eq!(
        decide_as(&engine, TRIAGE, Some(&reader), "POST", "/o").decision,
        Decision::Deny
    );
    let evaluation = decide_as(&engine, TRIAGE, Some(&lead), "POST", "/o");
    assert_eq!(evaluation.decision, Decision::Allow);
    assert_eq!(
        evaluation.user.unwrap().determining.to_vec(),
        vec!["leads-write".to_owned()]
    );
    // Autonomous DELETE is forbidden; delegated by a lead it passes both questions.
    assert_eq!(
        decide(&engine, TRIAGE, "DELETE", "/o").decision,
        Decision::Deny
    );
    assert_eq!(
        decide_as(&engine, TRIAGE, Some(&lead), "DELETE", "/o").decision,
        Decision::Allow
    );
}

#[test]
fn a_context_the_schema_does_not_declare_denies() {
    let engine = PolicyEngine::load(&shipped(), Mode::Enforce).unwrap();
    let agent = SpiffeId::parse(TRIAGE).unwrap();
    let resource = route("/api/orders/1", "GET");
    let mut evaluation = engine.evaluate(&AuthzInput {
        agent: &agent,
        user: None,
        action: Action::Get,
        resource: &resource,
        request: RequestInfo {
            method: "GET",
            path: "/api/orders/1",
            host: "orders.internal",
            client_address: "127.0.0.1",
        },
        // HttpContext has no `model`: the request fails schema validation, which denies.
        protocol_context: vec![("model", serde_json::json!({ "name": "gpt" }))],
        now: 1_700_000_000,
    });
    assert_eq!(evaluation.decision, Decision::Deny);
    assert!(evaluation.take_permit().is_none());
    assert!(
        evaluation.agent.errors[0].contains("request"),
        "{evaluation:?}"
    );
}

#[test]
fn a_prepared_agent_decides_as_evaluate_and_follows_reloads() {
    let member = r#"[{"uid": {"type": "AgentGroup", "id": "support-agents"}, "parents": []},
        {"uid": {"type": "Agent", "id": "spiffe://prod.example.org/ns/support/sa/triage-agent"},
         "parents": [{"type": "AgentGroup", "id": "support-agents"}]}]"#;
    let dir = policy_dir(
        r#"@id("support") permit (principal in AgentGroup::"support-agents", action, resource)
        when { context.agent.id == "spiffe://prod.example.org/ns/support/sa/triage-agent" };"#,
        Some(r#"[{"uid": {"type": "AgentGroup", "id": "support-agents"}, "parents": []}]"#),
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let agent = SpiffeId::parse(TRIAGE).unwrap();
    let prepared = engine.prepare_agent(&agent);
    assert_eq!(prepared.agent(), &agent);
    let resource = route("/x", "GET");
    let input = |agent| get_x(agent, &resource, None, "127.0.0.1", 1_700_000_000);
    assert_eq!(
        engine.evaluate_prepared(&prepared, &input(&agent)).decision,
        Decision::Deny
    );

    // entities.json now puts the agent in the group: the prepared agent must not keep the
    // parents it was built with.
    std::fs::write(dir.path().join(ENTITIES_FILE), member).unwrap();
    assert!(matches!(engine.reload(), ReloadOutcome::Reloaded(_)));
    let evaluation = engine.evaluate_prepared(&prepared, &input(&agent));
    assert_eq!(evaluation.decision, Decision::Allow, "{evaluation:?}");
    assert_eq!(
        evaluation.agent.determining.to_vec(),
        vec!["support".to_owned()]
    );
    assert_eq!(engine.evaluate(&input(&agent)).decision, Decision::Allow);

    // Prepared for another agent: ignored, the request's own agent is decided.
    let other = SpiffeId::parse(BILLING).unwrap();
    assert_eq!(
        engine.evaluate_prepared(&prepared, &input(&other)).decision,
        Decision::Deny
    );
    let billing = engine.prepare_agent(&other);
    assert_eq!(
        engine.evaluate_prepared(&billing, &input(&agent)).decision,
        Decision::Allow
    );
}

/// A prepared agent remembers the context of its last question; the context still follows
/// every input it was built from: the caller's address, the second, whether a user delegated.
#[test]
fn a_remembered_context_follows_what_it_was_built_from() {
    let dir = policy_dir(
        r#"@id("office-hours") permit (principal is Agent, action, resource)
        when { context.request.client_address == "10.0.0.1" && context.now < 1700000100
               && !context.delegated };
        @id("users") permit (principal is User, action, resource);"#,
        None,
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let agent = SpiffeId::parse(TRIAGE).unwrap();
    let prepared = engine.prepare_agent(&agent);
    let resource = route("/x", "GET");
    let alice = UserClaims {
        subject: "alice".to_owned(),
        issuer: "https://idp.example.org".to_owned(),
        scopes: Vec::new(),
        email: None,
        groups: Vec::new(),
        actor_chain: vec![TRIAGE.to_owned()],
        expires_at: 0,
    };
    let ask = |client_address: &str, now: i64, user: Option<&UserClaims>| {
        engine
            .evaluate_prepared(
                &prepared,
                &get_x(&agent, &resource, user, client_address, now),
            )
            .agent
            .allowed
    };
    let now = 1_700_000_000;
    assert!(ask("10.0.0.1", now, None));
    assert!(ask("10.0.0.1", now, None), "the same question again");
    assert!(!ask("10.0.0.2", now, None), "another address");
    assert!(ask("10.0.0.1", now, None));
    assert!(!ask("10.0.0.1", now + 100, None), "a later second");
    assert!(!ask("10.0.0.1", now, Some(&alice)), "delegated");
    assert!(ask("10.0.0.1", now, None));
}

/// A prepared agent remembers the answer to its last question too; the answer is given again
/// only for the very context it was given for: the same request line, host, address, second
/// and user, against the same policies.
#[test]
fn a_remembered_answer_is_given_only_for_the_same_question() {
    let dir = policy_dir(
        r#"@id("reads") permit (principal is Agent, action, resource)
        when { context.request.method == "GET" && context.request.path == "/x"
               && context.request.host == "orders.internal" };"#,
        None,
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let agent = SpiffeId::parse(TRIAGE).unwrap();
    let prepared = engine.prepare_agent(&agent);
    let resource = route("/x", "GET");
    let now = 1_700_000_000;
    let ask = |method: &'static str, path: &'static str, host: &'static str| {
        let mut input = get_x(&agent, &resource, None, "10.0.0.1", now);
        input.request = RequestInfo {
            method,
            path,
            host,
            client_address: "10.0.0.1",
        };
        engine.evaluate_prepared(&prepared, &input).agent
    };
    let first = ask("GET", "/x", "orders.internal");
    assert!(first.allowed, "{first:?}");
    assert_eq!(first.determining.to_vec(), vec!["reads".to_owned()]);
    assert_eq!(
        ask("GET", "/x", "orders.internal"),
        first,
        "the same question again"
    );
    assert!(
        !ask("POST", "/x", "orders.internal").allowed,
        "another method"
    );
    assert!(ask("GET", "/x", "orders.internal").allowed);
    assert!(!ask("GET", "/y", "orders.internal").allowed, "another path");
    assert!(ask("GET", "/x", "orders.internal").allowed);
    assert!(
        !ask("GET", "/x", "billing.internal").allowed,
        "another host"
    );
    assert!(ask("GET", "/x", "orders.internal").allowed);

    // The policy file changes: the same question, asked again, gets the new set's answer.
    std::fs::write(
        dir.path().join("test.cedar"),
        r#"@id("reads") permit (principal is Agent, action, resource) when { false };"#,
    )
    .unwrap();
    assert!(matches!(engine.reload(), ReloadOutcome::Reloaded(_)));
    let after = ask("GET", "/x", "orders.internal");
    assert!(!after.allowed, "{after:?}");
    assert!(after.determining.is_empty());
}

/// `GET /x` on `orders.internal`, as `agent` (for `user`) from `client_address` at `now`.
fn get_x<'a>(
    agent: &'a SpiffeId,
    resource: &'a Resource,
    user: Option<&'a UserClaims>,
    client_address: &'a str,
    now: i64,
) -> AuthzInput<'a> {
    AuthzInput {
        agent,
        user,
        action: Action::Get,
        resource,
        request: RequestInfo {
            method: "GET",
            path: "/x",
            host: "orders.internal",
            client_address,
        },
        protocol_context: Vec::new(),
        now,
    }
}

/// The one error of loading `dir`.
fn only_error(dir: &tempfile::TempDir) -> LoadError {
    let mut errors = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.remove(0)
}

#[test]
fn brackets_nested_too_deep_are_refused_before_cedar_parses_them() {
    // 100,000 levels: Cedar's parser would overflow any thread's stack and abort the process.
    let levels = 100_000;
    let deep = format!(
        r#"@id("deep") permit (principal, action, resource) when {{ {}true{} }};"#,
        "(".repeat(levels),
        ")".repeat(levels)
    );
    let error = only_error(&policy_dir(&deep, None));
    // `when {` is the first level, so the 32nd parenthesis is the first one too deep.
    let column = deep.find("{ (").unwrap() + 2 + 31 + 1;
    assert_eq!(error.file, format!("test.cedar:1:{column}"));
    assert!(
        error.message.contains("nest deeper than 32 levels"),
        "{error:?}"
    );

    // At the bound it loads, here on a test thread's 2 MiB stack in a debug build.
    let at_bound = format!(
        r#"@id("deep") permit (principal, action, resource) when {{ {}true{} }};"#,
        "(".repeat(31),
        ")".repeat(31)
    );
    let dir = policy_dir(&at_bound, None);
    assert!(PolicyEngine::load(dir.path(), Mode::Enforce).is_ok());

    // The schema is held to the same bounds (Cedar's schema parser recurses into records).
    let dir = policy_dir(r#"@id("a") permit (principal, action, resource);"#, None);
    let schema = format!(
        "entity A {{ x: {}Long{} }};",
        "{ a: ".repeat(levels),
        " }".repeat(levels)
    );
    std::fs::write(dir.path().join(SCHEMA_FILE), schema).unwrap();
    let error = only_error(&dir);
    assert!(error.file.starts_with("schema.cedarschema:1:"), "{error:?}");
}

#[test]
fn long_chains_of_conditionals_and_operators_are_refused_before_cedar_parses_them() {
    // Each of these aborted the process on a 2 MiB stack (release build) before the bounds.
    let nested_ifs = |count: usize| {
        format!(
            r#"@id("ifs") permit (principal, action, resource) when {{ {}true{} }};"#,
            "if true then ".repeat(count),
            " else false".repeat(count)
        )
    };
    let error = only_error(&policy_dir(&nested_ifs(3_000), None));
    assert!(
        error.message.contains("more than 100 `if` expressions"),
        "{error:?}"
    );
    let dir = policy_dir(&nested_ifs(100), None);
    assert!(PolicyEngine::load(dir.path(), Mode::Enforce).is_ok());

    let chained = format!(
        r#"@id("chain") permit (principal, action, resource) when {{ {} }};"#,
        vec!["1 < 2"; 100_000].join(" && ")
    );
    let error = only_error(&policy_dir(&chained, None));
    assert!(
        error.message.contains("more than 10000 operators"),
        "{error:?}"
    );
}

#[test]
fn shape_bounds_count_what_nests_and_chains_outside_strings_and_comments() {
    use crate::load::{OverBound, ShapeBounds, first_over_bounds};
    let bounds = |nesting, conditionals, operators| ShapeBounds {
        nesting,
        conditionals,
        operators,
    };
    let wide = bounds(usize::MAX, usize::MAX, usize::MAX);
    let nested =
        |levels: usize| format!("{}x{}", "([{".repeat(levels / 3), "}])".repeat(levels / 3));
    assert_eq!(first_over_bounds(&nested(30), bounds(30, 0, 0)), None);
    assert_eq!(
        first_over_bounds(&nested(33), bounds(30, 0, 0)),
        Some((30, OverBound::Nesting))
    );
    // Closing brackets with nothing open do not lend depth to what follows.
    assert_eq!(
        first_over_bounds(")))]]}}} ((", bounds(1, 0, 0)),
        Some((10, OverBound::Nesting))
    );

    // Brackets, keywords and operators in string literals (escaped quotes included) and in
    // comments are not structure.
    let quoted = format!(
        r#"when {{ resource.path like "\"{} if && == in" }}"#,
        "(".repeat(100)
    );
    assert_eq!(first_over_bounds(&quoted, bounds(1, 0, 1)), None);
    let commented = "// ((( if && == in\npermit (principal, action, resource);";
    assert_eq!(first_over_bounds(commented, bounds(1, 0, 0)), None);
    assert_eq!(
        first_over_bounds(commented, bounds(0, 0, 0)),
        Some((commented.rfind('(').unwrap(), OverBound::Nesting))
    );

    // Operators: two-byte ones count once, keyword ones count, a negation's `-` counts (an
    // upper bound), a lone `!` does not, and identifiers that merely contain a keyword do not.
    let policy = "when { !a && b == c || d in e && f has g && h like \"*\" && i is j && -1 <= 2 };";
    let count = 13;
    assert_eq!(first_over_bounds(policy, bounds(9, 0, count)), None);
    assert_eq!(
        first_over_bounds(policy, bounds(9, 0, count - 1)).map(|(_, which)| which),
        Some(OverBound::Operators)
    );
    assert_eq!(
        first_over_bounds("when { iffy && inside };", bounds(9, 0, 1)),
        None
    );
    // `if` expressions, and the count starting over with each policy.
    let two = "permit when { if a then b else c }; permit when { if a then b else c };";
    assert_eq!(first_over_bounds(two, bounds(9, 1, 0)), None);
    assert_eq!(
        first_over_bounds(
            "when { if a then if b then c else d else e };",
            bounds(9, 1, 0)
        ),
        Some((17, OverBound::Conditionals))
    );
    assert_eq!(first_over_bounds(&nested(3), wide), None);
}

/// A policy dir with the shipped schema, `edit` applied to it, and these policies and entities.
fn policy_dir_with_schema(
    edit: impl Fn(&str) -> String,
    policies: &str,
    entities: &str,
) -> tempfile::TempDir {
    let dir = policy_dir(policies, Some(entities));
    let schema = std::fs::read_to_string(shipped().join(SCHEMA_FILE)).unwrap();
    let edited = edit(&schema);
    assert_ne!(edited, schema, "the schema edit did not apply");
    std::fs::write(dir.path().join(SCHEMA_FILE), edited).unwrap();
    dir
}

fn call_tool(engine: &PolicyEngine, agent: &str, tool: &str) -> Evaluation {
    let agent = SpiffeId::parse(agent).unwrap();
    let resource = Resource::Tool(tool.to_owned());
    engine.evaluate(&AuthzInput {
        agent: &agent,
        user: None,
        action: Action::CallTool,
        resource: &resource,
        request: RequestInfo {
            method: "POST",
            path: "/mcp",
            host: "tools.internal",
            client_address: "127.0.0.1",
        },
        protocol_context: vec![
            ("mcp", serde_json::json!({ "method": "tools/call" })),
            ("tool", serde_json::json!({ "name": tool, "arguments": {} })),
        ],
        now: 1_700_000_000,
    })
}

#[test]
fn attributes_and_tags_entities_json_gives_a_resource_reach_cedar() {
    // A schema extension gives tools a risk and routes a sensitivity; forbids read them. Were
    // the declared attributes dropped, `has` would be false and both forbids would not apply.
    let dir = policy_dir_with_schema(
        |schema| {
            schema
                .replace(
                    "entity Tool in [ToolGroup];",
                    "entity Tool in [ToolGroup] { risk?: String } tags String;",
                )
                .replace(
                    "  method: String,\n};",
                    "  method: String,\n  sensitive?: Bool,\n};",
                )
        },
        r#"
        @id("tools") permit (principal, action == Action::"call_tool", resource);
        @id("routes") permit (principal, action == Action::"GET", resource);
        @id("no-risky-tools") forbid (principal, action == Action::"call_tool", resource)
        when { resource has risk && resource.risk == "high" };
        @id("no-owned-tools") forbid (principal, action == Action::"call_tool", resource)
        when { resource.hasTag("owner") && resource.getTag("owner") == "finance" };
        @id("no-sensitive-routes") forbid (principal, action == Action::"GET", resource)
        when { resource has sensitive && resource.sensitive };
        "#,
        r#"[
          { "uid": { "type": "ToolGroup", "id": "dangerous" }, "parents": [] },
          { "uid": { "type": "Tool", "id": "drop_db" }, "attrs": { "risk": "high" },
            "parents": [{ "type": "ToolGroup", "id": "dangerous" }] },
          { "uid": { "type": "Tool", "id": "ledger" }, "tags": { "owner": "finance" }, "parents": [] },
          { "uid": { "type": "Tool", "id": "search" }, "attrs": { "risk": "low" }, "parents": [] },
          { "uid": { "type": "Route", "id": "/payroll" }, "attrs": { "sensitive": true }, "parents": [] }
        ]"#,
    );
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    for (tool, decision, determining) in [
        ("drop_db", Decision::Deny, "no-risky-tools"),
        ("ledger", Decision::Deny, "no-owned-tools"),
        ("search", Decision::Allow, "tools"),
        ("undeclared", Decision::Allow, "tools"),
    ] {
        // Twice: the second answer comes from what the first built and remembered.
        for _ in 0..2 {
            let evaluation = call_tool(&engine, TRIAGE, tool);
            assert_eq!(evaluation.decision, decision, "{tool}: {evaluation:?}");
            assert_eq!(*evaluation.agent.determining, [determining], "{tool}");
            assert!(evaluation.agent.errors.is_empty(), "{tool}: {evaluation:?}");
        }
    }
    // The route's path, host and method are still the request's, beside the declared attribute.
    for (path, decision) in [("/payroll", Decision::Deny), ("/orders", Decision::Allow)] {
        let evaluation = decide(&engine, TRIAGE, "GET", path);
        assert_eq!(evaluation.decision, decision, "{path}: {evaluation:?}");
    }
}

#[test]
fn entities_json_cannot_set_what_the_request_decides() {
    let schema_edit = |schema: &str| {
        schema.replace(
            "  method: String,\n};",
            "  method: String,\n  sensitive?: Bool,\n};",
        )
    };
    let policies = r#"@id("routes") permit (principal, action == Action::"GET", resource);"#;
    for (entities, expected) in [
        (
            r#"[{ "uid": { "type": "Route", "id": "/payroll" }, "attrs": { "path": "/elsewhere" }, "parents": [] }]"#,
            "path, host and method of a Route come from the request",
        ),
        (
            r#"[{ "uid": { "type": "Route", "id": "/payroll" }, "tags": { "owner": "x" }, "parents": [] }]"#,
            "a Route is built from the request, it cannot carry tags",
        ),
        (
            r#"[{ "uid": { "type": "User", "id": "alice" }, "tags": { "owner": "x" }, "parents": [] }]"#,
            "a User is built from the request, it cannot carry tags",
        ),
    ] {
        let dir = policy_dir_with_schema(schema_edit, policies, entities);
        let error = only_error(&dir);
        assert!(error.message.contains(expected), "{error:?}");
    }
    // Declaring only what the file may (a route's other attributes) loads.
    let dir = policy_dir_with_schema(
        schema_edit,
        policies,
        r#"[{ "uid": { "type": "Route", "id": "/payroll" }, "attrs": { "sensitive": true }, "parents": [] }]"#,
    );
    PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
}

#[test]
fn a_set_read_while_the_directory_changed_is_not_swapped_in() {
    // v1: legacy agents may read. v2: the permit is gone and triage joins `legacy`. A read
    // torn between them (v1's policy, v2's memberships) lets triage read, which neither does.
    let v1_policy = r#"@id("legacy-read") permit (principal in AgentGroup::"legacy", action == Action::"GET", resource);"#;
    let v2_policy = r#"@id("nothing") forbid (principal, action, resource) when { false };"#;
    let v2_entities = format!(
        r#"[{{ "uid": {{ "type": "AgentGroup", "id": "legacy" }}, "parents": [] }},
            {{ "uid": {{ "type": "Agent", "id": "{TRIAGE}" }}, "parents": [{{ "type": "AgentGroup", "id": "legacy" }}] }}]"#
    );
    let dir = policy_dir(v1_policy, Some("[]"));
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let v1_hash = engine.hash();
    // Start the update: the entities of v2 land...
    std::fs::write(dir.path().join(ENTITIES_FILE), &v2_entities).unwrap();
    // ...and are read together with v1's policy, after which v2's policy lands.
    let outcome = engine.reload_with(|path| {
        let torn = PolicySnapshot::load(path);
        std::fs::write(path.join("test.cedar"), v2_policy).unwrap();
        torn
    });
    assert!(matches!(outcome, ReloadOutcome::Unchanged), "{outcome:?}");
    assert_eq!(engine.hash(), v1_hash);
    assert_eq!(
        decide(&engine, TRIAGE, "GET", "/x").decision,
        Decision::Deny
    );
    // The next poll reads the whole of v2.
    assert!(matches!(engine.reload(), ReloadOutcome::Reloaded(_)));
    assert_ne!(engine.hash(), v1_hash);
    assert_eq!(
        decide(&engine, TRIAGE, "GET", "/x").decision,
        Decision::Deny
    );
    // A read that fails because the files changed under it is not reported as a failure.
    std::fs::write(dir.path().join("test.cedar"), v1_policy).unwrap();
    let outcome = engine.reload_with(|path| {
        std::fs::write(path.join("test.cedar"), v2_policy).unwrap();
        Err(vec![LoadError {
            file: "test.cedar".to_owned(),
            message: "read half-written".to_owned(),
        }])
    });
    assert!(matches!(outcome, ReloadOutcome::Unchanged), "{outcome:?}");
}

#[test]
fn every_policy_is_listed_with_its_file_by_file_then_id_and_follows_reloads() {
    let dir = policy_dir(
        r#"@id("zeta") permit (principal, action == Action::"read", resource);
@id("alpha") permit (principal, action == Action::"read", resource);"#,
        None,
    );
    std::fs::write(
        dir.path().join("another.cedar"),
        r#"@id("omega") forbid (principal, action == Action::"write", resource);"#,
    )
    .unwrap();
    let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
    let listed = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(id, file)| ((*id).to_owned(), (*file).to_owned()))
            .collect()
    };
    assert_eq!(
        engine.policy_files(),
        listed(&[
            ("omega", "another.cedar"),
            ("alpha", "test.cedar"),
            ("zeta", "test.cedar")
        ])
    );

    std::fs::remove_file(dir.path().join("another.cedar")).unwrap();
    assert!(matches!(engine.reload(), ReloadOutcome::Reloaded(_)));
    assert_eq!(
        engine.policy_files(),
        listed(&[("alpha", "test.cedar"), ("zeta", "test.cedar")])
    );
}
