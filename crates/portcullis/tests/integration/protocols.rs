//! AI protocol routes through the running proxy over real mTLS: OpenAI-style model calls and
//! MCP JSON-RPC (tool calls by name and argument, batches, `tools/list` filtering, session
//! calls), bounded inspection (400/413/415), native denials, and memory under a flood of
//! oversized bodies.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use portcullis_test_support::client::{HttpVersion, request};
use portcullis_test_support::upstream::SsePacing;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::harness::{Builder, HOST, Harness, REPORT, TRIAGE, repo_root};

pub const POLICIES: &str = r#"
@id("cheap-model-for-all") permit (principal, action == Action::"invoke_model", resource == Model::"cheap-model");
@id("no-long-streams") forbid (principal, action == Action::"invoke_model", resource)
when { context.model.stream && context.model has max_tokens && context.model.max_tokens > 1000 };
@id("mcp-lifecycle") permit (principal, action in [Action::"mcp_initialize", Action::"mcp_ping", Action::"mcp_notification", Action::"mcp_session", Action::"list_tools"], resource);
@id("search-for-support") permit (principal in AgentGroup::"support-agents", action == Action::"call_tool", resource == Tool::"search_tickets");
@id("refund-for-support") permit (principal in AgentGroup::"support-agents", action == Action::"call_tool", resource == Tool::"refund");
@id("refund-under-100") forbid (principal, action == Action::"call_tool", resource == Tool::"refund")
when { context.tool.arguments has refund && context.tool.arguments.refund.amount >= 100 };
@id("uploads") permit (principal, action == Action::"POST", resource == Route::"/upload");
"#;

pub const ROUTES: &str = "routes:\n  - path: /mcp\n    protocol: mcp\n  - path: /mcp-sse\n    protocol: mcp\n  - path: /small\n    protocol: mcp\n    body_limit: 64\n  - path_prefix: /v1\n    protocol: openai\n";

pub fn builder() -> Builder {
    Harness::builder().policies(POLICIES).yaml(ROUTES)
}

fn json_request(path: &str, body: impl Into<Bytes>) -> http::Request<http_body_util::Full<Bytes>> {
    let mut req = request("POST", HOST, path, body);
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    req
}

pub async fn post(h: &Harness, agent: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, body) = h
        .send(
            agent,
            HttpVersion::Http1,
            json_request(path, body.to_owned()),
        )
        .await;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, value)
}

pub fn tool_call(id: u64, name: &str, arguments: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}).to_string()
}

#[tokio::test]
async fn an_allowed_tool_call_reaches_the_server_byte_identical() {
    let h = builder().start().await;
    // Unusual spacing and key order: the server must get exactly these bytes.
    let body = "{ \"params\":{\"arguments\":{\"query\":\"printer\" ,\"extra\":[1,2]},\"name\":\"search_tickets\"},\n\"id\":\"a-1\",\"method\":\"tools/call\",\"jsonrpc\":\"2.0\"}";
    let (status, reply) = post(&h, TRIAGE, "/mcp", body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["id"], "a-1");
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, Bytes::from(body));
    let records = h.audit(1).await;
    assert_eq!(records[1]["action"], "call_tool");
    assert_eq!(records[1]["resource"]["id"], "search_tickets");
}

#[tokio::test]
async fn a_denied_tool_is_a_json_rpc_error_and_the_server_sees_nothing() {
    let h = builder().start().await;
    let (status, reply) = post(
        &h,
        TRIAGE,
        "/mcp",
        &tool_call(7, "delete_everything", json!({})),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(reply["jsonrpc"], "2.0");
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["error"]["code"], -32001);
    assert_eq!(reply["error"]["data"]["reason"], "policy_denied");
    // An agent outside support-agents may not call even the search tool.
    let (status, _) = post(
        &h,
        REPORT,
        "/mcp",
        &tool_call(8, "search_tickets", json!({})),
    )
    .await;
    assert_eq!(status, 403);
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(2).await;
    assert_eq!(records[1]["action"], "call_tool");
    assert_eq!(records[1]["resource"]["type"], "Tool");
    assert_eq!(records[1]["resource"]["id"], "delete_everything");
    assert_eq!(records[1]["decision"], "deny");
    assert_eq!(records[1]["status"], 403);
}

#[tokio::test]
async fn a_tool_is_decided_with_the_attributes_entities_json_declares_for_it() {
    // A security team's schema gives tools a risk, entities.json sets it, a forbid reads it.
    let source = tempfile::tempdir().unwrap();
    let shipped = repo_root().join("policies");
    let schema = std::fs::read_to_string(shipped.join("schema.cedarschema")).unwrap();
    let extended = schema.replace(
        "entity Tool in [ToolGroup];",
        "entity Tool in [ToolGroup] { risk?: String };",
    );
    assert_ne!(extended, schema);
    std::fs::write(source.path().join("schema.cedarschema"), extended).unwrap();
    let mut entities: Vec<Value> =
        serde_json::from_slice(&std::fs::read(shipped.join("entities.json")).unwrap()).unwrap();
    entities.push(json!({"uid": {"type": "Tool", "id": "drop_tables"}, "attrs": {"risk": "high"}, "parents": []}));
    entities.push(json!({"uid": {"type": "Tool", "id": "search_tickets"}, "attrs": {"risk": "low"}, "parents": []}));
    std::fs::write(
        source.path().join("entities.json"),
        serde_json::to_vec(&entities).unwrap(),
    )
    .unwrap();
    let policies = r#"
@id("support-tools") permit (principal in AgentGroup::"support-agents", action == Action::"call_tool", resource);
@id("no-high-risk-tools") forbid (principal, action == Action::"call_tool", resource)
when { resource has risk && resource.risk == "high" };
"#;
    let h = Harness::builder()
        .policy_dir(source.path().to_path_buf())
        .policies(policies)
        .yaml(ROUTES)
        .start()
        .await;
    let (status, reply) = post(&h, TRIAGE, "/mcp", &tool_call(1, "drop_tables", json!({}))).await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["error"]["data"]["reason"], "policy_denied");
    let (status, reply) = post(
        &h,
        TRIAGE,
        "/mcp",
        &tool_call(2, "search_tickets", json!({})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1, "only the low-risk call reaches the server");
    let records = h.audit(2).await;
    assert_eq!(records[1]["resource"]["id"], "drop_tables");
    assert_eq!(records[1]["decision"], "deny");
    assert_eq!(
        records[1]["policies"]["agent"],
        json!(["no-high-risk-tools"])
    );
    assert_eq!(records[2]["decision"], "allow");
}

#[tokio::test]
async fn the_mcp_route_with_a_trailing_slash_is_the_mcp_route() {
    // Express and Starlette serve `/mcp/` as `/mcp`: it must be inspected and decided per tool.
    let h = builder().start().await;
    let (status, reply) = post(
        &h,
        TRIAGE,
        "/mcp/",
        &tool_call(1, "search_tickets", json!({})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = post(
        &h,
        TRIAGE,
        "/mcp/",
        &tool_call(2, "delete_everything", json!({})),
    )
    .await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["error"]["code"], -32001, "a JSON-RPC denial: {reply}");
    assert_eq!(h.upstream.requests().len(), 1);
    let records = h.audit(2).await;
    assert_eq!(records[1]["action"], "call_tool");
    assert_eq!(records[2]["resource"]["id"], "delete_everything");
}

#[tokio::test]
async fn tool_arguments_decide_by_value_and_by_declared_type() {
    let h = builder().start().await;
    let call =
        |amount: Value| tool_call(1, "refund", json!({"amount": amount, "note": "undeclared"}));
    assert_eq!(post(&h, TRIAGE, "/mcp", &call(json!(50))).await.0, 200);
    let (status, reply) = post(&h, TRIAGE, "/mcp", &call(json!(150))).await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["error"]["code"], -32001);
    // A declared argument of the wrong type denies, as does a missing required one.
    assert_eq!(post(&h, TRIAGE, "/mcp", &call(json!("50"))).await.0, 403);
    assert_eq!(
        post(&h, TRIAGE, "/mcp", &tool_call(2, "refund", json!({})))
            .await
            .0,
        403
    );
    assert_eq!(h.upstream.requests().len(), 1);
    let records = h.audit(4).await;
    assert_eq!(records[2]["policies"]["agent"][0], "refund-under-100");
    assert!(
        !records[3]["errors"].as_array().unwrap().is_empty(),
        "{}",
        records[3]
    );
}

#[tokio::test]
async fn a_batch_is_denied_whole_if_any_element_is() {
    let h = builder().start().await;
    let batch = format!(
        "[{},{},{}]",
        tool_call(1, "search_tickets", json!({})),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        tool_call(2, "delete_everything", json!({}))
    );
    let (status, reply) = post(&h, TRIAGE, "/mcp", &batch).await;
    assert_eq!(status, 403);
    let ids: Vec<&Value> = reply.as_array().unwrap().iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!(2)]);
    assert!(h.upstream.requests().is_empty());
    let allowed = format!(
        "[{},{}]",
        tool_call(1, "search_tickets", json!({})),
        r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#
    );
    assert_eq!(post(&h, TRIAGE, "/mcp", &allowed).await.0, 200);
    assert_eq!(h.upstream.requests().len(), 1);
}

#[tokio::test]
async fn tools_list_shows_only_callable_tools_in_json_and_sse() {
    let h = builder().start().await;
    let list = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
    let names = |reply: &Value| -> Vec<String> {
        reply["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, reply) = post(&h, TRIAGE, "/mcp", list).await;
    assert_eq!(status, 200);
    assert_eq!(names(&reply), ["search_tickets", "refund"]);
    let (_, reply) = post(&h, REPORT, "/mcp", list).await;
    assert_eq!(names(&reply), Vec::<String>::new());

    let (status, body) = h
        .send(TRIAGE, HttpVersion::Http2, json_request("/mcp-sse", list))
        .await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].contains("notifications/progress"), "{text}");
    assert!(
        events[1].starts_with("id: 7\nevent: message\ndata: "),
        "{text}"
    );
    let data: Value = serde_json::from_str(events[1].rsplit("data: ").next().unwrap()).unwrap();
    assert_eq!(names(&data), ["search_tickets", "refund"]);
}

#[tokio::test]
async fn names_a_case_insensitive_server_would_read_as_one_are_refused() {
    // Go's encoding/json fills `Method` into `method` (last one wins, case folded): these
    // bodies would be decided as one message and run as another.
    let h = builder().start().await;
    let bodies = [
        (
            "/mcp",
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"refund","arguments":{"amount":5000}}}"#.to_owned(),
        ),
        (
            "/mcp",
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"search_tickets","Name":"refund"}}"#.to_owned(),
        ),
        (
            "/mcp",
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"refund","arguments":{"amount":5,"AMOUNT":5000}}}"#.to_owned(),
        ),
        // U+017F folds to `s`: `paramſ` is `params` to Go.
        (
            "/mcp",
            "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"tools/call\",\"params\":{\"name\":\"search_tickets\"},\"param\u{17f}\":{\"name\":\"refund\"}}".to_owned(),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"cheap-model","Model":"big-model","messages":[]}"#.to_owned(),
        ),
    ];
    for (path, body) in &bodies {
        let (status, reply) = post(&h, TRIAGE, path, body).await;
        assert_eq!(status, 400, "{body}: {reply}");
    }
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(bodies.len()).await;
    for record in &records[1..] {
        assert_eq!(record["reason"], "malformed_body", "{record}");
        assert_eq!(record["status"], 400, "{record}");
    }
    // The same members in one case are a call like any other.
    let (status, reply) = post(
        &h,
        TRIAGE,
        "/mcp",
        &tool_call(
            5,
            "search_tickets",
            json!({"query": "Printer", "Query2": 1}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
}

#[tokio::test]
async fn ids_a_server_could_not_echo_exactly_are_refused() {
    // The filter finds a listing by the id it was asked with; a server reading numbers as
    // doubles would answer 2^53 + 1 as 2^53, and the listing would go through unfiltered.
    let h = builder().start().await;
    for id in [
        "9007199254740993",
        "-9007199254740993",
        "18446744073709551615",
        "1.0",
        "1e3",
    ] {
        let list = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        let (status, reply) = post(&h, TRIAGE, "/mcp", &list).await;
        assert_eq!(status, 400, "{id}: {reply}");
    }
    assert!(h.upstream.requests().is_empty());
    for id in [
        "9007199254740991",
        "-9007199254740991",
        "\"big-9007199254740993\"",
    ] {
        let list = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        let (status, reply) = post(&h, TRIAGE, "/mcp", &list).await;
        assert_eq!(status, 200, "{id}: {reply}");
    }
}

#[tokio::test]
async fn a_tools_list_result_is_charged_to_the_inspection_budget() {
    // The listing is read whole to be filtered: that memory counts like a request body's.
    let h = Harness::builder()
        .policies(POLICIES)
        .yaml(&format!(
            "{ROUTES}limits:\n  body_prefix_bytes: 64\n  inspect_memory_bytes: 100\n"
        ))
        .start()
        .await;
    let list = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
    let (status, reply) = post(&h, TRIAGE, "/mcp", list).await;
    assert_eq!(status, 503, "{reply}");
    let records = h.audit(1).await;
    assert_eq!(
        records[1]["reason"], "inspect_memory_limit",
        "{}",
        records[1]
    );
    // In an event stream, what is held until an event ends is charged: past the budget the
    // stream is cut off there (HTTP/1.1: the connection closed; this upstream sends its
    // progress event and the listing in one write, so nothing of it goes out).
    let raw = format!(
        "POST /mcp-sse HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{list}",
        list.len()
    );
    let reply = h
        .raw(TRIAGE, raw.as_bytes(), std::time::Duration::from_secs(30))
        .await;
    assert!(!reply.contains("search_tickets"), "{reply}");
    assert!(!reply.ends_with("\r\n0\r\n\r\n"), "{reply}");
    let records = h.audit(2).await;
    let record = records.last().unwrap();
    assert_eq!(record["path"], "/mcp-sse", "{record}");
    assert_eq!(record["completed"], false, "{record}");
    assert_eq!(
        record["errors"],
        json!([
            "response body failed mid-stream: tools/list response would pass limits.inspect_memory_bytes"
        ]),
        "{record}"
    );
    // With room for it, the same listing is filtered and answered.
    let roomy = builder().start().await;
    assert_eq!(post(&roomy, TRIAGE, "/mcp", list).await.0, 200);
}

#[tokio::test]
async fn malformed_oversized_and_mistyped_bodies_are_refused_and_audited() {
    let h = builder().start().await;
    let (status, reply) = post(&h, TRIAGE, "/mcp", "{not json").await;
    assert_eq!(
        (status, reply["error"]["code"].clone()),
        (400, json!(-32700))
    );
    assert_eq!(reply["id"], Value::Null);
    // Duplicate keys could be read differently by the server: refused.
    let dup = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_tickets","name":"delete_everything"}}"#;
    assert_eq!(post(&h, TRIAGE, "/mcp", dup).await.0, 400);
    // A tools/call without an id is not a notification.
    let no_id = r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"search_tickets"}}"#;
    assert_eq!(post(&h, TRIAGE, "/mcp", no_id).await.0, 400);
    // Over the route's 64-byte limit.
    let (status, reply) = post(
        &h,
        TRIAGE,
        "/small",
        &tool_call(1, "search_tickets", json!({"query": "x".repeat(100)})),
    )
    .await;
    assert_eq!(status, 413, "{reply}");
    // Wrong content type.
    let mut req = request(
        "POST",
        HOST,
        "/mcp",
        tool_call(1, "search_tickets", json!({})),
    );
    req.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    assert_eq!(h.send(TRIAGE, HttpVersion::Http1, req).await.0, 415);
    // An unknown method is denied unless a policy names it.
    let unknown = r#"{"jsonrpc":"2.0","id":1,"method":"resources/list"}"#;
    assert_eq!(post(&h, TRIAGE, "/mcp", unknown).await.0, 403);
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(7).await;
    let reasons: Vec<&str> = records[1..]
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        reasons,
        [
            "malformed_body",
            "malformed_body",
            "invalid_message",
            "body_too_large",
            "unsupported_media_type",
            "policy_denied"
        ]
    );
}

#[tokio::test]
async fn session_calls_are_authorized() {
    let h = builder().start().await;
    assert_eq!(h.get(TRIAGE, "/mcp").await.0, 200);
    assert_eq!(h.call_as(TRIAGE, None, "DELETE", "/mcp").await.0, 200);
    assert_eq!(h.call_as(TRIAGE, None, "PUT", "/mcp").await.0, 405);
    let records = h.audit(3).await;
    assert_eq!(records[1]["action"], "mcp_session");
}

#[tokio::test]
async fn models_are_decided_with_openai_shaped_errors() {
    let h = builder().start().await;
    let chat = |model: &str, extra: &str| {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello there"}}]{extra}}}"#
        )
    };
    let (status, reply) = post(&h, TRIAGE, "/v1/chat/completions", &chat("cheap-model", "")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "hello there");
    let (status, reply) = post(
        &h,
        TRIAGE,
        "/v1/chat/completions",
        &chat("expensive-model", ""),
    )
    .await;
    assert_eq!(status, 403);
    let error = reply["error"].as_object().unwrap();
    for key in ["message", "type", "param", "code"] {
        assert!(error.contains_key(key), "{reply}");
    }
    assert_eq!(reply["error"]["code"], "policy_denied");
    assert_eq!(reply["error"]["param"], "model");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expensive-model")
    );
    let (status, _) = post(
        &h,
        TRIAGE,
        "/v1/chat/completions",
        &chat(
            "cheap-model",
            r#","stream":true,"max_completion_tokens":5000"#,
        ),
    )
    .await;
    assert_eq!(status, 403);
    let (status, reply) = post(&h, TRIAGE, "/v1/chat/completions", r#"{"messages":[]}"#).await;
    assert_eq!(
        (status, reply["error"]["code"].clone()),
        (400, json!("invalid_message"))
    );
    assert_eq!(h.upstream.requests().len(), 1);
    let records = h.audit(4).await;
    assert_eq!(records[2]["action"], "invoke_model");
    assert_eq!(records[2]["resource"]["type"], "Model");
    assert_eq!(records[2]["resource"]["id"], "expensive-model");
}

#[tokio::test]
async fn a_streamed_completion_crosses_chunk_by_chunk() {
    let gate = Arc::new(Semaphore::new(0));
    let h = builder()
        .pacing(SsePacing::Gate(gate.clone()))
        .start()
        .await;
    let body = r#"{"model":"cheap-model","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"one two three"}]}"#;
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http2);
    let response = caller
        .call(h.addr, json_request("/v1/chat/completions", body))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut next_event = async || loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Some(data) = frame.data_ref() {
            return String::from_utf8_lossy(data).into_owned();
        }
    };
    for word in ["one", "two", "three"] {
        assert!(
            next_event()
                .await
                .contains(&format!("\"content\":\"{word}\""))
        );
        gate.add_permits(1);
    }
    assert!(next_event().await.contains("[DONE]"));
}

/// Peak resident set of this process (kB), and a reset of it (Linux `clear_refs` value 5).
fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[tokio::test]
async fn large_bodies_stream_on_generic_routes_and_are_refused_early_on_inspected_ones() {
    let h = builder().start().await;
    // 100 oversized (2 MiB) MCP bodies in flight at once: each is refused with 413 before
    // the upstream sees anything. The proxy runs in this process; its peak RSS growth is
    // bounded by far less than the 200 MiB the bodies add up to.
    let two_mib = Bytes::from(vec![b' '; 2 * 1024 * 1024]);
    reset_hwm();
    let before = vm_hwm_kb();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http2);
        let addr = h.addr;
        let body = two_mib.clone();
        tasks.push(tokio::spawn(async move {
            let response = caller.call(addr, json_request("/mcp", body)).await.unwrap();
            response.status().as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 413);
    }
    let growth_mib = vm_hwm_kb().saturating_sub(before) / 1024;
    println!(
        "peak RSS growth with 100 x 2 MiB refused in flight: {growth_mib} MiB (peak {} MiB)",
        vm_hwm_kb() / 1024
    );
    assert!(growth_mib < 150, "peak RSS grew by {growth_mib} MiB");
    assert!(h.upstream.requests().is_empty());

    // A 50 MiB upload on a generic route streams through whole.
    let fifty = Bytes::from(vec![b'x'; 50 * 1024 * 1024]);
    let (status, reply) = h
        .send(
            TRIAGE,
            HttpVersion::Http2,
            request("POST", HOST, "/upload", fifty),
        )
        .await;
    assert_eq!(status, 200);
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["body_bytes"], 50 * 1024 * 1024);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_while_read() {
    let h = builder().start().await;
    // No Content-Length: the limit is enforced while reading.
    let chunk = "x".repeat(100);
    let raw = format!(
        "POST /small HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n64\r\n{chunk}\r\n0\r\n\r\n"
    );
    let reply = h
        .raw(TRIAGE, raw.as_bytes(), std::time::Duration::from_secs(2))
        .await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(h.upstream.requests().is_empty());
}
