//! The policy tooling (`check`, `test`, `validate --policies`, `replay`, `suggest`) and the
//! shadow set, against the real proxy: the tools must say what the proxy does.

use std::collections::BTreeSet;
use std::path::Path;

use bytes::Bytes;
use portcullis_test_support::client::{HttpVersion, request};
use serde_json::{Value, json};

use crate::harness::{
    HOST, Harness, ISSUER, REPORT, TRIAGE, portcullis, read_audit, repo_root, sample, write,
};

const ASSISTANT: &str = "spiffe://prod.example.org/ns/orders/sa/orders-assistant";
const ANALYST: &str = "spiffe://prod.example.org/ns/research/sa/analyst";
const FRONTEND: &str = "spiffe://prod.example.org/ns/web/sa/frontend";

/// One request of the comparison table, as the proxy receives it and as `check` is asked.
struct Row {
    agent: &'static str,
    /// (sub, groups, scope) of a delegated call.
    user: Option<(&'static str, &'static [&'static str])>,
    method: &'static str,
    path: &'static str,
    /// An OpenAI-style body: the model and the extra fields.
    model: Option<(&'static str, Value)>,
}

fn route(agent: &'static str, method: &'static str, path: &'static str) -> Row {
    Row {
        agent,
        user: None,
        method,
        path,
        model: None,
    }
}

/// Sends each row to the proxy and asks `portcullis check` the same question; the decision
/// and the determining policy ids must be the same. Returns how many rows were compared.
async fn compare(h: &Harness, policies: &Path, rows: &[Row]) -> usize {
    let scratch = tempfile::tempdir().unwrap();
    for (index, row) in rows.iter().enumerate() {
        let before = read_audit(&h.audit_path()).len();
        let mut req = match &row.model {
            None => request(row.method, HOST, row.path, Bytes::new()),
            Some((model, extra)) => {
                let mut body =
                    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
                for (k, v) in extra.as_object().unwrap() {
                    body[k] = v.clone();
                }
                let mut req = request(row.method, HOST, row.path, Bytes::from(body.to_string()));
                req.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                req
            }
        };
        if let Some((sub, groups)) = row.user {
            let token = h.token(sub, groups, row.agent);
            req.headers_mut()
                .insert("x-portcullis-user-token", token.parse().unwrap());
        }
        let (status, _) = h.send(row.agent, HttpVersion::Http1, req).await;
        let mut records = read_audit(&h.audit_path());
        for _ in 0..500 {
            if records.len() > before {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            records = read_audit(&h.audit_path());
        }
        let record = records.last().unwrap();
        assert_eq!(records.len(), before + 1, "row {index}: one record");

        let mut args: Vec<String> = vec![
            "check".into(),
            "--policies".into(),
            policies.display().to_string(),
            "--agent".into(),
            row.agent.into(),
            "--host".into(),
            HOST.into(),
            "--output".into(),
            "json".into(),
        ];
        match &row.model {
            None => args.extend([
                "--method".into(),
                row.method.into(),
                "--path".into(),
                row.path.into(),
            ]),
            Some((model, extra)) => {
                let mut call = json!({"stream": false, "tools": []});
                for (k, v) in extra.as_object().unwrap() {
                    call[k] = v.clone();
                }
                args.extend([
                    "--action".into(),
                    "invoke_model".into(),
                    "--resource".into(),
                    format!("Model::\"{model}\""),
                    "--context".into(),
                    json!({ "model": call }).to_string(),
                ]);
            }
        }
        if let Some((sub, groups)) = row.user {
            let file = scratch.path().join(format!("user-{index}.json"));
            let claims = json!({"sub": sub, "iss": ISSUER, "scope": "orders", "groups": groups});
            std::fs::write(&file, claims.to_string()).unwrap();
            args.extend(["--user".into(), file.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = portcullis(&args);
        let answer: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("row {index}: {e}: {stdout} {stderr}"));
        let proxy_decision = record["decision"].as_str().unwrap();
        assert_eq!(
            answer["decision"], proxy_decision,
            "row {index} {} {} {}: check said {answer}, proxy recorded {record}",
            row.agent, row.method, row.path
        );
        assert_eq!(
            code,
            if proxy_decision == "allow" { 0 } else { 1 },
            "row {index}"
        );
        // Determining policies are a set (Cedar reports them in no particular order).
        let ids = |v: &Value| -> Option<BTreeSet<String>> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        };
        assert_eq!(
            ids(&answer["agent"]["determining"]),
            ids(&record["policies"]["agent"]),
            "row {index}: agent question"
        );
        assert!(ids(&record["policies"]["agent"]).is_some(), "row {index}");
        let user_determining = answer["user"]
            .get("determining")
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(
            ids(&user_determining),
            ids(&record["policies"]["user"]),
            "row {index}: user question"
        );
        assert_eq!(
            user_determining.is_null(),
            row.user.is_none(),
            "row {index}"
        );
        assert_eq!(
            status,
            match proxy_decision {
                "allow" => 200,
                _ => 403,
            },
            "row {index}"
        );
    }
    rows.len()
}

#[tokio::test]
async fn check_answers_like_the_running_proxy() {
    let mut compared = 0;

    // The shipped policies: generic routes.
    let h = Harness::start().await;
    let shipped = vec![
        route(TRIAGE, "GET", "/api/orders/1"),
        route(TRIAGE, "HEAD", "/api/orders/1"),
        route(TRIAGE, "PATCH", "/api/tickets/7"),
        route(TRIAGE, "POST", "/api/tickets"),
        route(TRIAGE, "DELETE", "/api/orders/1"),
        route(TRIAGE, "POST", "/api/tickets/1/comments"),
        route(TRIAGE, "GET", "/admin/users"),
        route(TRIAGE, "POST", "/admin/tickets"),
        route(TRIAGE, "GET", "/health"),
        route(REPORT, "GET", "/health"),
        route(REPORT, "GET", "/api/orders/1"),
        route(REPORT, "POST", "/api/tickets"),
        route(REPORT, "OPTIONS", "/api/orders"),
    ];
    compared += compare(&h, &repo_root().join("policies"), &shipped).await;
    drop(h);

    // The delegated-agent example: user tokens, both questions.
    let example = repo_root().join("examples/delegated-agent/policies");
    let h = Harness::builder()
        .policy_dir(example.clone())
        .user_tokens()
        .start()
        .await;
    let user = |sub, groups: &'static [&'static str], method, path| Row {
        user: Some((sub, groups)),
        ..route(ASSISTANT, method, path)
    };
    let delegated = vec![
        user("alice", &["customers"], "GET", "/api/orders/42"),
        user("alice", &["customers"], "POST", "/api/refunds"),
        user("bob", &["support-leads"], "POST", "/api/refunds"),
        user("bob", &["support-leads"], "DELETE", "/api/orders/42"),
        user("bob", &["support-leads"], "POST", "/api/orders/42"),
        user("carol", &[], "GET", "/api/orders/42"),
        route(ASSISTANT, "POST", "/api/refunds"),
        route(ASSISTANT, "GET", "/api/orders/1"),
        user("bob", &["support-leads"], "GET", "/api/customers/1"),
    ];
    compared += compare(&h, &example, &delegated).await;
    drop(h);

    // The model-endpoint example: the model comes from the body.
    let example = repo_root().join("examples/model-endpoint/policies");
    let h = Harness::builder()
        .policy_dir(example.clone())
        .yaml("routes:\n  - path_prefix: /v1/chat\n    protocol: openai\n")
        .start()
        .await;
    let model = |agent, name, extra: Value| Row {
        model: Some((name, extra)),
        ..route(agent, "POST", "/v1/chat/completions")
    };
    let models = vec![
        model(REPORT, "small-chat", json!({})),
        model(REPORT, "large-reasoning", json!({})),
        model(ANALYST, "large-reasoning", json!({})),
        model(
            ANALYST,
            "large-reasoning",
            json!({"stream": true, "max_tokens": 1500}),
        ),
        model(
            ANALYST,
            "large-reasoning",
            json!({"stream": true, "max_tokens": 4000}),
        ),
        model(ANALYST, "small-chat", json!({"stream": true})),
        model(
            FRONTEND,
            "small-chat",
            json!({"stream": true, "max_tokens": 100}),
        ),
        model(TRIAGE, "unknown-model", json!({})),
        route(REPORT, "GET", "/v1/models"),
        route(REPORT, "GET", "/v1/other"),
    ];
    compared += compare(&h, &example, &models).await;
    assert!(compared >= 30, "{compared} requests compared");
}

#[tokio::test]
async fn the_shadow_set_counts_exactly_its_disagreements() {
    // The candidate narrows reads of /api/orders/1* and opens /api/reports* to the report agent.
    let shipped = std::fs::read_to_string(repo_root().join("policies/agents.cedar")).unwrap()
        + &std::fs::read_to_string(repo_root().join("policies/guardrails.cedar")).unwrap();
    let candidate = shipped.replace(
        "  action in Action::\"read\",\n  resource\n);",
        "  action in Action::\"read\",\n  resource\n)\nunless { resource.path like \"/api/orders/1*\" };",
    ) + r#"
@id("reports-for-the-report-agent")
permit (principal == Agent::"spiffe://prod.example.org/ns/billing/sa/report-agent", action == Action::"GET", resource)
when { resource.path like "/api/reports/0*" || resource.path like "/api/reports/1" || resource.path like "/api/reports/2" || resource.path like "/api/reports/3" || resource.path like "/api/reports/4" };
"#;
    assert_ne!(candidate, shipped + "");
    let h = Harness::builder().shadow_policies(&candidate).start().await;
    let mut statuses = Vec::new();
    for i in 0..80 {
        statuses.push(h.get(TRIAGE, &format!("/api/orders/{i}")).await.0);
    }
    for j in 0..20 {
        statuses.push(h.get(REPORT, &format!("/api/reports/{j}")).await.0);
    }
    // The candidate is never enforced.
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 80);
    assert_eq!(statuses.iter().filter(|s| **s == 403).count(), 20);
    // would_deny: /api/orders/1 and /api/orders/10..19 (11); would_allow: /api/reports/0..4 (5).
    let metrics = h.metrics().await;
    let would_deny = sample(
        &metrics,
        r#"portcullis_shadow_disagreements_total{action="GET",kind="would_deny"}"#,
    );
    let would_allow = sample(
        &metrics,
        r#"portcullis_shadow_disagreements_total{action="GET",kind="would_allow"}"#,
    );
    assert_eq!((would_deny, would_allow), (11.0, 5.0), "{metrics}");
    // The records are written just after the replies: wait for all of them.
    let path = h.audit_path();
    let mut records = Vec::new();
    for _ in 0..500 {
        records = read_audit(&path);
        if records.iter().filter(|r| r["shadow"].is_object()).count() == 100 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let decided: Vec<&Value> = records.iter().filter(|r| r["shadow"].is_object()).collect();
    assert_eq!(decided.len(), 100);
    let disagreements: Vec<&Value> = decided
        .iter()
        .copied()
        .filter(|r| !r["shadow"]["disagreement"].is_null())
        .collect();
    assert_eq!(disagreements.len(), 16);
    let denied: BTreeSet<&str> = disagreements
        .iter()
        .filter(|r| r["shadow"]["disagreement"] == "would_deny")
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    let mut expected: BTreeSet<String> = (10..20).map(|i| format!("/api/orders/{i}")).collect();
    expected.insert("/api/orders/1".into());
    assert_eq!(
        denied,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    assert!(
        disagreements
            .iter()
            .filter(|r| r["shadow"]["disagreement"] == "would_allow")
            .all(|r| r["shadow"]["policies"]["agent"] == json!(["reports-for-the-report-agent"]))
    );
}

/// Traffic of the delegated-agent example through a real proxy, its audit file, and what
/// `replay` and `suggest` make of it.
#[tokio::test]
async fn replay_reports_exactly_the_changed_decisions_and_suggest_round_trips() {
    let example = repo_root().join("examples/delegated-agent/policies");
    let h = Harness::builder()
        .policy_dir(example.clone())
        .user_tokens()
        .start()
        .await;
    let alice = h.token("alice", &["customers"], ASSISTANT);
    let bob = h.token("bob", &["support-leads"], ASSISTANT);
    let calls: Vec<(Option<&str>, &str, &str)> = vec![
        (Some(&alice), "GET", "/api/orders/1"),
        (Some(&alice), "GET", "/api/orders/2"),
        (Some(&alice), "GET", "/api/orders/3"),
        (Some(&alice), "POST", "/api/refunds"),
        (Some(&bob), "POST", "/api/refunds"),
        (Some(&bob), "POST", "/api/refunds"),
        (Some(&bob), "DELETE", "/api/orders/3"),
        (Some(&bob), "GET", "/api/orders/9"),
        (None, "POST", "/api/refunds"),
        (None, "GET", "/api/orders/1"),
        (None, "GET", "/api/orders/5"),
    ];
    let mut statuses = Vec::new();
    for (token, method, path) in &calls {
        statuses.push(h.call_as(ASSISTANT, *token, method, path).await.0);
    }
    assert_eq!(
        statuses,
        vec![200, 200, 200, 403, 200, 200, 403, 200, 403, 200, 200]
    );
    let mut records = Vec::new();
    for _ in 0..500 {
        records = read_audit(&h.audit_path());
        if records.iter().filter(|r| r["decision"].is_string()).count() == calls.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let decided: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"].is_string())
        .collect();
    assert_eq!(decided.len(), calls.len());
    let audit = h.audit_path();

    // The candidate: customers no longer read order 3, leads no longer create refunds.
    let candidate = tempfile::tempdir().unwrap();
    for name in ["schema.cedarschema", "entities.json"] {
        std::fs::copy(example.join(name), candidate.path().join(name)).unwrap();
    }
    let source = std::fs::read_to_string(example.join("delegation.cedar")).unwrap();
    let changed = source
        .replace(
            "permit (principal in Group::\"customers\", action in Action::\"read\", resource)\nwhen { resource.path like \"/api/orders*\" };",
            "permit (principal in Group::\"customers\", action in Action::\"read\", resource)\nwhen { resource.path like \"/api/orders*\" && resource.path != \"/api/orders/3\" };",
        )
        .replace(
            "@id(\"leads-create-refunds\")\npermit",
            "@id(\"leads-create-refunds\")\nforbid",
        );
    assert_ne!(changed, source);
    write(candidate.path(), "delegation.cedar", &changed);
    let (code, stdout, stderr) = portcullis(&[
        "replay",
        "--policies",
        candidate.path().to_str().unwrap(),
        "--output",
        "json",
        audit.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["replayed"], calls.len());
    let changes: Vec<(String, String, String)> = report["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["request_id"].as_str().unwrap().to_owned(),
                c["before"].as_str().unwrap().to_owned(),
                c["after"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // Exactly: alice's GET of order 3, and bob's two refunds.
    let id = |i: usize| decided[i]["request_id"].as_str().unwrap().to_owned();
    assert_eq!(
        changes,
        vec![
            (id(2), "allow".into(), "deny".into()),
            (id(4), "allow".into(), "deny".into()),
            (id(5), "allow".into(), "deny".into()),
        ],
        "{stdout}"
    );
    let (code, text, _) = portcullis(&[
        "replay",
        "--policies",
        candidate.path().to_str().unwrap(),
        audit.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(text.contains("replayed 11 decisions"), "{text}");
    assert!(text.contains("3 changed"), "{text}");
    assert!(text.contains("allow -> deny"), "{text}");

    // suggest: its output validates (with the built-in schema) and, replayed, allows every
    // observed allow and nothing else of this traffic.
    let (code, suggested, stderr) = portcullis(&["suggest", audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "suggested.cedar", &suggested);
    let (code, out, err) = portcullis(&[
        "validate",
        "--policies",
        dir.path().to_str().unwrap(),
        "--strict",
    ]);
    assert_eq!(code, 0, "{suggested}\n{out}\n{err}");
    assert!(err.contains("built into portcullis"), "{err}");
    let (code, stdout, stderr) = portcullis(&[
        "replay",
        "--policies",
        dir.path().to_str().unwrap(),
        "--output",
        "json",
        audit.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["replayed"], calls.len());
    assert_eq!(report["changed"], json!([]), "{suggested}\n{stdout}");
    assert_eq!(suggested.matches("@id(").count(), 1, "one policy per agent");
}

/// A JSON-RPC batch is decided whole; its record's `input` is one message's, so `replay` must
/// ask every message again.
#[tokio::test]
async fn replay_decides_a_batch_as_the_proxy_did_whole() {
    use crate::protocols::{POLICIES, post, tool_call};
    let h = crate::protocols::builder().start().await;
    // Both messages allowed: the record's own input is the last one's (the search).
    let batch = format!(
        "[{},{}]",
        tool_call(1, "refund", json!({"amount": 5})),
        tool_call(2, "search_tickets", json!({}))
    );
    assert_eq!(post(&h, TRIAGE, "/mcp", &batch).await.0, 200);
    assert_eq!(
        post(
            &h,
            TRIAGE,
            "/mcp",
            &tool_call(3, "search_tickets", json!({}))
        )
        .await
        .0,
        200
    );
    let records = h.audit(2).await;
    assert_eq!(records[1]["input"]["resource"], r#"Tool::"search_tickets""#);
    let calls = records[1]["calls"].as_array().unwrap();
    assert_eq!(calls[0]["input"]["resource"], r#"Tool::"refund""#);
    assert_eq!(
        calls[0]["input"]["context"]["tool"]["name"], "refund",
        "{}",
        records[1]
    );

    // The candidate forbids refunds: the batch (and only it) would now be denied.
    let candidate = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_root().join("policies/schema.cedarschema"),
        candidate.path().join("schema.cedarschema"),
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("policies/entities.json"),
        candidate.path().join("entities.json"),
    )
    .unwrap();
    let forbid = r#"@id("no-refunds") forbid (principal, action == Action::"call_tool", resource == Tool::"refund");"#;
    write(
        candidate.path(),
        "candidate.cedar",
        &format!("{POLICIES}\n{forbid}\n"),
    );
    let (code, stdout, stderr) = portcullis(&[
        "replay",
        "--policies",
        candidate.path().to_str().unwrap(),
        "--output",
        "json",
        h.audit_path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["replayed"], 2, "{stdout}");
    assert_eq!(report["unreplayable"], json!([]), "{stdout}");
    let changed = report["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{stdout}");
    assert_eq!(changed[0]["request_id"], records[1]["request_id"]);
    assert_eq!(changed[0]["resource"], r#"Tool::"refund""#);
    assert_eq!(
        (changed[0]["before"].as_str(), changed[0]["after"].as_str()),
        (Some("allow"), Some("deny"))
    );
    assert_eq!(changed[0]["determining"], json!(["no-refunds"]));
}

#[test]
fn test_passes_on_the_shipped_tests_and_fails_with_a_diff() {
    for file in [
        "policies/tests.yaml",
        "examples/delegated-agent/policies/tests.yaml",
        "examples/mcp-tools/policies/tests.yaml",
        "examples/model-endpoint/policies/tests.yaml",
    ] {
        let path = repo_root().join(file);
        let (code, stdout, stderr) =
            portcullis(&["test", "--min-coverage", "100", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{file}:\n{stdout}\n{stderr}");
        assert!(stdout.contains("coverage: 100%"), "{stdout}");
        assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    }

    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "wrong.yaml",
        &format!(
            "cases:\n  - name: reads are closed (wrong)\n    agent: {TRIAGE}\n    method: GET\n    path: /api/orders/1\n    expect: deny\n  - name: admin is closed\n    agent: {TRIAGE}\n    method: GET\n    path: /admin\n    expect: deny\n    determining: [support-agents-read]\n"
        ),
    );
    let (code, stdout, _) = portcullis(&[
        "test",
        "--policies",
        repo_root().join("policies").to_str().unwrap(),
        dir.path().join("wrong.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("FAIL  reads are closed (wrong)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  - decision: deny\n  + decision: allow"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("  - determining: [support-agents-read]\n  + determining: [no-agent-admin]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("agent: allow by [support-agents-read]"),
        "{stdout}"
    );
    // Coverage: three of five shipped policies decided none of these cases.
    assert!(stdout.contains("coverage: 40% of 5 policies"), "{stdout}");
    assert!(
        stdout.contains("health-any-prod-workload (agents.cedar)"),
        "{stdout}"
    );
    assert!(stdout.contains("0 passed, 2 failed"), "{stdout}");
    let (code, stdout, _) = portcullis(&[
        "test",
        "--min-coverage",
        "90",
        "--policies",
        repo_root().join("policies").to_str().unwrap(),
        dir.path().join("wrong.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stdout.contains("below --min-coverage 90%"), "{stdout}");
}

#[test]
fn check_explains_which_permit_almost_matched() {
    let policies = repo_root().join("policies");
    let (code, stdout, _) = portcullis(&[
        "check",
        "--policies",
        policies.to_str().unwrap(),
        "--agent",
        TRIAGE,
        "--method",
        "DELETE",
        "--path",
        "/api/orders/1",
        "--explain",
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("decision: deny"), "{stdout}");
    assert!(
        stdout.contains("almost: support-agents-write-tickets (scope matched, condition false)"),
        "{stdout}"
    );
    let (code, stdout, _) = portcullis(&[
        "check",
        "--policies",
        policies.to_str().unwrap(),
        "--agent",
        TRIAGE,
        "--action",
        "GET",
        "--resource",
        "Route::\"/api/orders/1\"",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("determining: support-agents-read"),
        "{stdout}"
    );
    let (code, _, stderr) = portcullis(&[
        "check",
        "--policies",
        policies.to_str().unwrap(),
        "--agent",
        "not-a-spiffe-id",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn validate_policies_needs_no_certificates_and_prints_warnings() {
    let dir = tempfile::tempdir().unwrap();
    // Never matches: GET applies to routes, not tools.
    write(
        dir.path(),
        "never.cedar",
        "@id(\"never\")\npermit (principal, action == Action::\"GET\", resource == Tool::\"refund\");\n@id(\"fine\")\npermit (principal, action == Action::\"GET\", resource);\n",
    );
    let path = dir.path().to_str().unwrap();
    let (code, stdout, stderr) = portcullis(&["validate", "--policies", path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: never.cedar:1:1: policy \"never\""),
        "{stderr}"
    );
    assert!(stderr.contains("policy is impossible"), "{stderr}");
    assert!(!stderr.contains("\"fine\""), "{stderr}");
    assert!(stdout.contains("ok (2 policies"), "{stdout}");
    assert!(stdout.contains("2 warnings)"), "{stdout}");
    let (code, _, stderr) = portcullis(&["validate", "--policies", path, "--strict"]);
    assert_eq!(code, 64, "{stderr}");

    // A parse error carries its line and column.
    write(
        dir.path(),
        "never.cedar",
        "@id(\"a\")\npermit (principal, action, resource);\n\n@id(\"b\")\npermit (principal, action, resource) when { principal. };\n",
    );
    let (code, _, stderr) = portcullis(&["validate", "--policies", path]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("never.cedar:5:"), "{stderr}");
    assert!(stderr.contains("(1 error)"), "{stderr}");

    // An empty directory says that everything will be denied.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, stderr) = portcullis(&["validate", "--policies", empty.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("every request will be denied"), "{stderr}");
    let (code, _, _) = portcullis(&[
        "validate",
        "--policies",
        empty.path().to_str().unwrap(),
        "--strict",
    ]);
    assert_eq!(code, 64);
}

#[test]
fn config_errors_do_not_cascade() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "c.yaml",
        "listen: 127.0.0.1:8443\ntls:\n  reload_interval: 5\n",
    );
    let (code, _, stderr) = portcullis(&[
        "validate",
        "--config",
        dir.path().join("c.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 64);
    assert!(
        stderr.starts_with("invalid configuration (1 error):\n"),
        "{stderr}"
    );
    assert!(stderr.contains("tls.reload_interval"), "{stderr}");
    assert!(!stderr.contains("required"), "{stderr}");
    write(dir.path(), "c.yaml", "listen: [\n");
    let (code, _, stderr) = portcullis(&[
        "validate",
        "--config",
        dir.path().join("c.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 64);
    assert!(stderr.contains("(1 error)"), "{stderr}");
    assert_eq!(stderr.matches("line ").count(), 1, "{stderr}");
    // Colour codes only at a terminal: here stderr is a pipe.
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}

#[test]
fn every_flag_has_help_text() {
    for command in [
        "run",
        "validate",
        "check",
        "test",
        "replay",
        "suggest",
        "demo",
        "dev-certs",
        "inject-webhook",
        "inventory",
    ] {
        let (code, stdout, _) = portcullis(&[command, "--help"]);
        assert_eq!(code, 0, "{command}");
        let options = stdout.split("Options:").nth(1).unwrap_or_default();
        for line in options.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('-') {
                // `--flag <VALUE>  help` on one line, or the help on the next.
                let has_inline = trimmed.split("  ").filter(|s| !s.trim().is_empty()).count() > 1;
                let next = options
                    .lines()
                    .skip_while(|l| *l != line)
                    .nth(1)
                    .unwrap_or_default();
                assert!(
                    has_inline || (!next.trim().is_empty() && !next.trim_start().starts_with('-')),
                    "{command}: {line:?} has no help text\n{stdout}"
                );
            }
        }
    }
}
