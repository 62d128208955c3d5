//! Boundary hardening over real mTLS (issue 11): headers and paths an application reads
//! differently from the policy, content encodings and media types an inspecting filter must
//! not be fooled by (one test per ToolHive-class bypass), JSON-RPC batches in the audit
//! record, MCP 2026-07-28 header/body agreement, model endpoints, and user identity that is
//! never silently lost. Each test shows what the upstream saw (nothing forbidden, or nothing).

use bytes::Bytes;
use portcullis_test_support::client::{HttpVersion, request};
use portcullis_test_support::upstream::{Recorded, Reply};
use serde_json::{Value, json};

use crate::harness::{HOST, Harness, TRIAGE};
use crate::protocols;

const OPEN_BUT_ADMIN: &str = r#"
@id("everything") permit (principal, action, resource);
@id("no-admin") forbid (principal, action, resource is Route) when { resource.path like "/admin*" };
"#;

/// The request's header names as an application that reads `_` as `-` sees them.
fn folded_names(seen: &Recorded) -> Vec<String> {
    seen.headers
        .keys()
        .map(|name| name.as_str().replace('_', "-"))
        .collect()
}

#[tokio::test]
async fn underscore_identity_headers_never_reach_the_application() {
    let h = Harness::builder().policies(OPEN_BUT_ADMIN).start().await;
    let mut req = request("GET", HOST, "/api/orders", Bytes::new());
    for (name, value) in [
        ("x_portcullis_user", "admin"),
        (
            "x_portcullis_agent",
            "spiffe://prod.example.org/ns/x/sa/root",
        ),
        ("x_forwarded_client_cert", "By=spiffe://evil"),
    ] {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (status, _) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 200);
    let seen = &h.upstream.requests()[0];
    let names = folded_names(seen);
    // An autonomous call: no user header at all, under any spelling.
    assert!(
        !names.contains(&"x-portcullis-user".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"x-forwarded-client-cert".to_owned()),
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| *n == "x-portcullis-agent").count(),
        1
    );
    assert_eq!(seen.headers["x-portcullis-agent"], TRIAGE);
}

#[tokio::test]
async fn method_overrides_are_removed_and_forwarding_headers_are_the_proxys() {
    let h = Harness::builder().policies(OPEN_BUT_ADMIN).start().await;
    let mut req = request("POST", HOST, "/api/orders", Bytes::from_static(b"{}"));
    for (name, value) in [
        ("x-http-method-override", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x_http_method_override", "DELETE"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x_forwarded_for", "1.2.3.4"),
        ("forwarded", "for=1.2.3.4;proto=http"),
        ("x-forwarded-host", "admin.internal"),
        ("x-forwarded-proto", "http"),
        ("x-real-ip", "1.2.3.4"),
    ] {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (status, _) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 200);
    let seen = &h.upstream.requests()[0];
    assert_eq!(seen.method, "POST");
    let names = folded_names(seen);
    for gone in [
        "x-http-method-override",
        "x-method-override",
        "x-http-method",
        "forwarded",
        "x-forwarded-host",
        "x-real-ip",
    ] {
        assert!(!names.contains(&gone.to_owned()), "{gone} in {names:?}");
    }
    let all = |name: &str| -> Vec<String> {
        seen.headers
            .iter()
            .filter(|(n, _)| n.as_str().replace('_', "-") == name)
            .map(|(_, v)| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(all("x-forwarded-proto"), ["https"]);
}

#[tokio::test]
async fn paths_servers_resolve_differently_are_refused_or_decided_as_the_app_reads_them() {
    let h = Harness::builder()
        .policies(OPEN_BUT_ADMIN)
        .yaml("routes:\n  - path_prefix: /\n    match_case: insensitive\n")
        .start()
        .await;
    for path in [
        "/api/..;/admin",
        "/api/.;/admin",
        "/api/..;x=1/admin",
        "/api/%00x",
        "/api/x%0d%0aSet-Cookie:%20a",
        "/api/%7f",
        // Tomcat and Spring serve /admin/users for these; a policy on /admin/* sees neither.
        "/admin;/users",
        "/admin;x=1",
    ] {
        let (status, body) = h.get(TRIAGE, path).await;
        assert_eq!(status, 400, "{path}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "ambiguous_path", "{path}");
    }
    // A different case meets the guardrail on /admin*.
    for path in ["/ADMIN", "/Admin/users"] {
        assert_eq!(h.get(TRIAGE, path).await.0, 403, "{path}");
    }
    assert!(h.upstream.requests().is_empty());
    assert_eq!(h.get(TRIAGE, "/API/Orders").await.0, 200);
    // The application gets the path as sent; the policy decided on the folded id.
    assert_eq!(h.upstream.requests()[0].uri, "/API/Orders");
    let records = h.audit(11).await;
    let last = records.last().unwrap();
    assert_eq!(last["resource"]["id"], "/api/orders");
}

fn mcp_request(path: &str, body: &str) -> http::Request<http_body_util::Full<Bytes>> {
    let mut req = request("POST", HOST, path, body.to_owned());
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    req
}

const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

fn listing(id: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": {"tools": [
        {"name": "search_tickets", "inputSchema": {"type": "object"}},
        {"name": "delete_everything", "inputSchema": {"type": "object"}},
    ]}})
    .to_string()
}

fn scripted() -> crate::harness::Builder {
    protocols::builder().yaml("  - path: /scripted\n    protocol: mcp\n")
}

/// Runs one scripted `tools/list` reply through the proxy: status and what the caller
/// received (up to a cut, if the stream was cut).
async fn list_through(h: &Harness, reply: Reply) -> (u16, Bytes) {
    h.upstream.script(reply);
    let (status, body, _) = receive(h, mcp_request("/scripted", LIST)).await;
    (status, body)
}

/// Sends `req` as TRIAGE; the status, every byte received, and whether the body ended in an
/// error (a cut stream) rather than cleanly.
async fn receive(
    h: &Harness,
    req: http::Request<http_body_util::Full<Bytes>>,
) -> (u16, Bytes, bool) {
    use http_body_util::BodyExt;
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    // An SSE stream whose first event cannot be read is cut before its head: no response.
    let Ok(response) = caller.call(h.addr, req).await else {
        return (0, Bytes::new(), true);
    };
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received.extend_from_slice(data);
                }
            }
            Err(_) => return (status, Bytes::from(received), true),
        }
    }
    (status, Bytes::from(received), false)
}

fn reply(status: u16, headers: &[(&'static str, &str)], body: impl Into<Bytes>) -> Reply {
    Reply {
        status,
        headers: headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
        body: body.into(),
    }
}

fn leaks(body: &[u8]) -> bool {
    String::from_utf8_lossy(body).contains("delete_everything")
}

#[tokio::test]
async fn compressed_request_bodies_are_refused_on_inspected_routes() {
    let h = protocols::builder().start().await;
    let mut req = mcp_request("/mcp", &protocols_tool_call("delete_everything"));
    req.headers_mut()
        .insert("content-encoding", "gzip".parse().unwrap());
    let (status, _) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 415);
    assert!(h.upstream.requests().is_empty());
}

fn protocols_tool_call(name: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": name}}).to_string()
}

#[tokio::test]
async fn tools_list_asks_for_plaintext_and_anything_unreadable_is_502() {
    let h = scripted().start().await;
    let mut req = mcp_request("/mcp", LIST);
    req.headers_mut()
        .insert("accept-encoding", "gzip, br".parse().unwrap());
    let (status, body) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 200);
    assert!(!leaks(&body));
    assert_eq!(
        h.upstream.requests()[0].headers["accept-encoding"],
        "identity"
    );

    // Compression middleware that ignores accept-encoding.
    let (status, body) = list_through(
        &h,
        reply(
            200,
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            listing(json!(1)),
        ),
    )
    .await;
    assert_eq!(status, 502);
    assert!(!leaks(&body));
    // Not JSON at all, whatever it claims to be.
    let html = format!("<html>{}</html>", listing(json!(1)));
    let (status, body) = list_through(&h, reply(200, &[("content-type", "text/html")], html)).await;
    assert_eq!(status, 502);
    assert!(!leaks(&body));
    // Duplicate keys: one client reads the first result, another the last.
    let twice = format!(
        r#"{{"jsonrpc":"2.0","id":1,"result":{{"tools":[]}},"result":{}}}"#,
        json!({"tools": [{"name": "delete_everything"}]})
    );
    let (status, body) = list_through(
        &h,
        reply(200, &[("content-type", "application/json")], twice),
    )
    .await;
    assert_eq!(status, 502);
    assert!(!leaks(&body));
    // `tools` that is not an array.
    let odd =
        json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": {"name": "delete_everything"}}});
    let (status, _) = list_through(
        &h,
        reply(
            200,
            &[("content-type", "application/json")],
            odd.to_string(),
        ),
    )
    .await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn media_type_status_and_bom_do_not_bypass_the_filter() {
    let h = scripted().start().await;
    for (status, content_type, body) in [
        (200, "text/plain", listing(json!(1))),
        (200, "application/json-rpc", listing(json!(1))),
        (500, "application/json", listing(json!(1))),
        (404, "text/plain", listing(json!(1))),
        (
            200,
            "application/json",
            format!("\u{feff}{}", listing(json!(1))),
        ),
        (200, "application/json", format!("[{}]", listing(json!(1)))),
    ] {
        let (got, answer) =
            list_through(&h, reply(status, &[("content-type", content_type)], body)).await;
        assert_eq!(got, status, "{content_type}");
        assert!(!leaks(&answer), "{content_type}: {answer:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("search_tickets"), "{text}");
        assert!(!text.starts_with('\u{feff}'), "{text}");
    }
}

#[tokio::test]
async fn sse_is_filtered_per_event_and_undecodable_events_are_never_relayed() {
    let h = scripted().start().await;
    let sse = [("content-type", "text/event-stream")];
    // The result split over data lines (and a CR-only blank line), after a BOM.
    let listing = listing(json!(1));
    // Split between two members, where a line break is JSON whitespace.
    let (head, tail) = listing.split_at(listing.find("\"result\"").unwrap());
    let split = format!(
        "\u{feff}event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{}}}}\n\rid: 1\ndata: {head}\ndata: {tail}\n\n"
    );
    let (status, body) = list_through(&h, reply(200, &sse, split)).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("search_tickets") && !leaks(&body), "{text}");
    assert!(!text.starts_with('\u{feff}'), "{text}");

    // An undecodable line inside the listing event: the stream is cut before it.
    let mut broken =
        b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\ndata: ".to_vec();
    broken.extend_from_slice(listing.as_bytes());
    broken.extend_from_slice(b"\ndata: \xff\xfe\n\n");
    h.upstream.script(reply(200, &sse, broken));
    let (_, received, failed) = receive(&h, mcp_request("/scripted", LIST)).await;
    assert!(failed, "the stream must end in an error, not cleanly");
    assert!(!leaks(&received), "{}", String::from_utf8_lossy(&received));
    // Non-JSON data in an event: cut too.
    let garbage = format!("data: not json {listing}\n\n");
    h.upstream.script(reply(200, &sse, garbage));
    let (_, body, failed) = receive(&h, mcp_request("/scripted", LIST)).await;
    assert!(failed && !leaks(&body));
}

#[tokio::test]
async fn a_resumed_get_stream_is_filtered_too() {
    let h = scripted().start().await;
    h.upstream.script(reply(
        200,
        &[("content-type", "text/event-stream")],
        format!("id: 9\ndata: {}\n\n", listing(json!("earlier-request"))),
    ));
    let mut req = request("GET", HOST, "/scripted", Bytes::new());
    req.headers_mut()
        .insert("last-event-id", "8".parse().unwrap());
    req.headers_mut()
        .insert("accept", "text/event-stream".parse().unwrap());
    let (status, body) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 200);
    assert!(!leaks(&body), "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("search_tickets"));
    assert_eq!(
        h.upstream.requests()[0].headers["accept-encoding"],
        "identity"
    );
}

#[tokio::test]
async fn unknown_methods_non_json_posts_and_nested_names_do_not_skip_authorization() {
    let h = protocols::builder().start().await;
    // An MCP method no policy names.
    let unknown = r#"{"jsonrpc":"2.0","id":1,"method":"tools/execute","params":{"name":"delete_everything"}}"#;
    let (status, _) = h
        .send(TRIAGE, HttpVersion::Http1, mcp_request("/mcp", unknown))
        .await;
    assert_eq!(status, 403);
    // A JSON-RPC body that is not declared JSON, or declared nothing.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = request(
            "POST",
            HOST,
            "/mcp",
            protocols_tool_call("delete_everything"),
        );
        if let Some(content_type) = content_type {
            req.headers_mut()
                .insert("content-type", content_type.parse().unwrap());
        }
        assert_eq!(h.send(TRIAGE, HttpVersion::Http1, req).await.0, 415);
    }
    // The tool name nested where a lenient parser might look for it.
    for body in [
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": {"tool_name": "search_tickets"}}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"tool_name": "search_tickets"}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"arguments": {"name": "search_tickets"}}}),
    ] {
        let (status, _) = h
            .send(
                TRIAGE,
                HttpVersion::Http1,
                mcp_request("/mcp", &body.to_string()),
            )
            .await;
        assert_eq!(status, 400, "{body}");
    }
    assert!(h.upstream.requests().is_empty());
}

#[tokio::test]
async fn every_message_of_a_batch_is_in_the_audit_record() {
    let h = protocols::builder().start().await;
    let batch = format!(
        "[{},{},{}]",
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_tickets"}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_everything"}}),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
    );
    let (status, _) = h
        .send(TRIAGE, HttpVersion::Http1, mcp_request("/mcp", &batch))
        .await;
    assert_eq!(status, 403);
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(1).await;
    let record = &records[1];
    assert_eq!(record["resource"]["id"], "delete_everything", "{record}");
    let calls = record["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 3, "{record}");
    assert_eq!(calls[0]["resource"]["id"], "search_tickets");
    assert_eq!(calls[0]["decision"], "allow");
    assert_eq!(calls[0]["policies"]["agent"][0], "search-for-support");
    assert_eq!(calls[1]["decision"], "deny");
    assert_eq!(calls[2]["action"], "list_tools");
    assert_eq!(calls[2]["decision"], "allow");
    assert_eq!(calls[2]["policies"]["agent"][0], "mcp-lifecycle");
}

fn modern(
    method: &str,
    name: Option<&str>,
    body: &Value,
) -> http::Request<http_body_util::Full<Bytes>> {
    let mut req = mcp_request("/mcp", &body.to_string());
    req.headers_mut()
        .insert("mcp-protocol-version", "2026-07-28".parse().unwrap());
    req.headers_mut()
        .insert("mcp-method", method.parse().unwrap());
    if let Some(name) = name {
        req.headers_mut().insert("mcp-name", name.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn mcp_2026_headers_must_match_the_body() {
    let h = scripted().start().await;
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_tickets"}});
    let (status, _) = h
        .send(
            TRIAGE,
            HttpVersion::Http1,
            modern("tools/call", Some("search_tickets"), &call),
        )
        .await;
    assert_eq!(status, 200);
    // The sentinel form of the same name.
    let (status, _) = h
        .send(
            TRIAGE,
            HttpVersion::Http1,
            modern("tools/call", Some("=?base64?c2VhcmNoX3RpY2tldHM=?="), &call),
        )
        .await;
    assert_eq!(status, 200);
    let before = h.upstream.requests().len();
    for req in [
        // A gateway routing by header sees a harmless tool; the server would run another.
        modern("tools/call", Some("delete_everything"), &call),
        modern("tools/list", Some("search_tickets"), &call),
        // 2026-07-28 requires both headers for a named method.
        modern("tools/call", None, &call),
    ] {
        let (status, body) = h.send(TRIAGE, HttpVersion::Http1, req).await;
        assert_eq!(status, 400);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], -32020, "{body}");
        assert_eq!(body["error"]["data"]["reason"], "mcp_header_mismatch");
    }
    // Under the older version a header that is sent must still agree.
    let mut older = mcp_request("/mcp", &call.to_string());
    older
        .headers_mut()
        .insert("mcp-name", "delete_everything".parse().unwrap());
    assert_eq!(h.send(TRIAGE, HttpVersion::Http1, older).await.0, 400);
    assert_eq!(h.upstream.requests().len(), before);

    // server/discover is a listing: its tools are filtered like tools/list.
    let discover = json!({"jsonrpc": "2.0", "id": 5, "method": "server/discover"});
    h.upstream.script(reply(
        200,
        &[("content-type", "application/json")],
        json!({"jsonrpc": "2.0", "id": 5, "result": {"serverInfo": {"name": "s"}, "tools": [
            {"name": "search_tickets"}, {"name": "delete_everything"}]}})
        .to_string(),
    ));
    let mut req = modern("server/discover", None, &discover);
    *req.uri_mut() = "/scripted".parse().unwrap();
    let (status, body) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 200);
    assert!(!leaks(&body), "{}", String::from_utf8_lossy(&body));
    let records = h.audit(7).await;
    assert_eq!(records.last().unwrap()["action"], "list_tools");
}

async fn model_call(h: &Harness, path: &str, body: Value) -> (u16, Value) {
    let (status, body) = h
        .send(
            TRIAGE,
            HttpVersion::Http1,
            mcp_request(path, &body.to_string()),
        )
        .await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn model_endpoints_read_the_model_from_body_or_path() {
    let h = protocols::builder()
        .yaml("  - path_prefix: /openai\n    protocol: openai\n")
        .start()
        .await;
    for path in [
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/moderations",
        "/v1/messages",
        "/v1/responses",
    ] {
        let (status, body) = model_call(&h, path, json!({"model": "gpt-big", "input": "x"})).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["type"], "permission_error", "{path}");
        let (status, _) = model_call(&h, path, json!({"model": "cheap-model", "input": "x"})).await;
        assert_eq!(status, 200, "{path}");
    }
    let azure = "/openai/deployments/cheap-model/chat/completions?api-version=2024-10-21";
    assert_eq!(model_call(&h, azure, json!({"messages": []})).await.0, 200);
    let denied = "/openai/deployments/gpt-big/chat/completions";
    assert_eq!(model_call(&h, denied, json!({"messages": []})).await.0, 403);
    let (status, body) = model_call(&h, azure, json!({"model": "gpt-big", "messages": []})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "model_mismatch");
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 7);
    assert!(
        seen.iter()
            .all(|r| !String::from_utf8_lossy(&r.body).contains("gpt-big"))
    );
    let records = h.audit(15).await;
    let azure_record = records
        .iter()
        .find(|r| r["path"] == "/openai/deployments/cheap-model/chat/completions")
        .unwrap();
    assert_eq!(azure_record["resource"]["type"], "Model");
    assert_eq!(azure_record["resource"]["id"], "cheap-model");
}

#[tokio::test]
async fn a_delegated_user_is_never_lost_and_tokens_forward_under_any_header_name() {
    let h = Harness::builder()
        .user_tokens()
        .policies(OPEN_BUT_ADMIN)
        .yaml("routes:\n  - path_prefix: /with-token\n    forward_user_token: true\n")
        .start()
        .await;
    // `josé` is no valid header value as it is: it arrives percent-encoded, not dropped.
    let token = h.token("josé", &[], TRIAGE);
    let (status, _) = h.call_as(TRIAGE, Some(&token), "GET", "/api/x").await;
    assert_eq!(status, 200);
    let (status, _) = h
        .call_as(TRIAGE, Some(&token), "GET", "/with-token/x")
        .await;
    assert_eq!(status, 200);
    let seen = h.upstream.requests();
    assert_eq!(seen[0].headers["x-portcullis-user"], "jos%C3%A9");
    assert!(!seen[0].headers.contains_key("x-portcullis-user-token"));
    // The default header name is an identity name, and still forwarded when asked.
    assert_eq!(seen[1].headers["x-portcullis-user-token"], token.as_str());
    assert_eq!(seen[1].headers["x-portcullis-user"], "jos%C3%A9");
    let records = h.audit(2).await;
    assert_eq!(records[1]["user"]["sub"], "josé");
}

/// The audit files of a trail, oldest first.
fn trail(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut numbered: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name()?.to_str()?.to_owned();
            let index = name.strip_prefix("audit.jsonl.")?.parse().ok()?;
            Some((index, path))
        })
        .collect();
    numbered.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    let mut files: Vec<_> = numbered.into_iter().map(|(_, p)| p).collect();
    files.push(dir.join("audit.jsonl"));
    files
}

fn verify(files: &[std::path::PathBuf], key: Option<&std::path::Path>) -> (i32, String, String) {
    let mut args: Vec<String> = vec!["audit".into(), "verify".into()];
    if let Some(key) = key {
        args.push("--key".into());
        args.push(key.display().to_string());
    }
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::harness::portcullis(&args)
}

/// Every line from `from` on gets the hash of the (rewritten) line before it, as someone
/// with write access but without the signing key would do after an edit.
fn rehash(lines: &mut [String], from: usize) {
    for index in from.max(1)..lines.len() {
        let prev = portcullis_proxy::audit::line_hash(lines[index - 1].as_bytes());
        let line = &mut lines[index];
        let at = line.rfind("\"prev_hash\":\"").unwrap() + "\"prev_hash\":\"".len();
        let end = at + line[at..].find('"').unwrap();
        line.replace_range(at..end, &prev);
    }
}

#[tokio::test]
async fn the_audit_trail_shows_deletion_reordering_and_rewriting() {
    use std::time::Duration;
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = (keys.path().join("sign.pem"), keys.path().join("verify.pem"));
    let (code, _, err) = crate::harness::portcullis(&[
        "audit",
        "keygen",
        "--private",
        private.to_str().unwrap(),
        "--public",
        public.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let mut h = Harness::builder()
        .policies(OPEN_BUT_ADMIN)
        .audit_yaml(&format!(
            "  sink: audit.jsonl\n  signing_key: {}\n  checkpoint_interval: 50ms\n  max_file_bytes: 4000\n  max_files: 20\n",
            private.display()
        ))
        .start()
        .await;
    // Two process runs on one file sink, with rotation and checkpoints in each.
    for round in 0..2 {
        let running = match h._running.take() {
            Some(running) => running,
            None => {
                let config =
                    portcullis::config::Config::load(&h.dir.path().join("config.yaml")).unwrap();
                portcullis_proxy::start(config.into_options().await.unwrap())
                    .await
                    .unwrap()
            }
        };
        let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
        for i in 0..12 {
            let path = format!("/api/orders/{round}-{i}");
            let response = caller
                .call(
                    running.local_addr(),
                    request("GET", HOST, &path, Bytes::new()),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            if i == 5 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        running.shutdown(Duration::from_secs(2)).await;
    }
    let files = trail(h.dir.path());
    assert!(files.len() >= 3, "{files:?}");
    let all: Vec<String> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let starts: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].contains("\"type\":\"start\""))
        .collect();
    assert_eq!(starts.len(), 2);
    assert!(all[starts[1]].contains(&portcullis_proxy::audit::line_hash(
        all[starts[1] - 1].as_bytes()
    )));
    assert!(all[0].ends_with("\"prev_hash\":\"genesis\"}"), "{}", all[0]);

    // A clean rotated set passes, fully sealed (the last checkpoint is written at shutdown).
    let (code, out, err) = verify(&files, Some(&public));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("starts at genesis"), "{out}");
    assert!(out.contains("unsigned tail: 0 lines"), "{out}");
    // The oldest file pruned: reported, not a break.
    let (code, out, err) = verify(&files[1..], Some(&public));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("starts mid-chain"), "{out}");
    // A missing file is named.
    let mut with_missing = files.clone();
    let gone = h.dir.path().join("audit.jsonl.99");
    with_missing.insert(1, gone.clone());
    let (code, _, err) = verify(&with_missing, Some(&public));
    assert_eq!(code, 1);
    assert!(
        err.contains(&gone.display().to_string()) && err.contains("missing"),
        "{err}"
    );
    // Files out of order, or one left out of the middle.
    let mut swapped = files.clone();
    swapped.swap(0, 1);
    assert_eq!(verify(&swapped, None).0, 1);
    let mut gap = files.clone();
    gap.remove(1);
    assert_eq!(verify(&gap, None).0, 1);

    let copy = keys.path().join("trail.jsonl");
    let write = |lines: &[String]| {
        std::fs::write(&copy, lines.join("\n") + "\n").unwrap();
        vec![copy.clone()]
    };
    assert_eq!(verify(&write(&all), Some(&public)).0, 0);
    // Everything from a record of the first run up to the next process start deleted.
    let mut cut = all.clone();
    cut.drain(3..starts[1]);
    let (code, _, err) = verify(&write(&cut), None);
    assert_eq!(code, 1, "{err}");
    // ... and the start line replaced by a fabricated one that begins a new chain.
    let mut fabricated = cut.clone();
    fabricated[3] = fabricated[3].replace(
        &fabricated[3][fabricated[3].rfind("\"prev_hash\":\"").unwrap()..],
        "\"prev_hash\":\"genesis\"}",
    );
    rehash(&mut fabricated, 4);
    let (code, _, err) = verify(&write(&fabricated), None);
    assert_eq!(code, 1);
    assert!(err.contains("genesis"), "{err}");
    // A record edited before a checkpoint and every later hash recomputed: the chain alone
    // cannot tell, the checkpoint signature can.
    let record = all
        .iter()
        .position(|l| l.contains("\"decision\":\"allow\""))
        .unwrap();
    assert!(
        all[record..]
            .iter()
            .any(|l| l.contains("\"type\":\"checkpoint\""))
    );
    let mut edited = all.clone();
    edited[record] = edited[record].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
    rehash(&mut edited, record + 1);
    assert_eq!(verify(&write(&edited), None).0, 0);
    let (code, _, err) = verify(&write(&edited), Some(&public));
    assert_eq!(code, 1);
    assert!(err.contains("checkpoint signature"), "{err}");
    // Truncation after the last checkpoint is the one loss not shown: it is reported as the
    // unsigned tail, and cutting the final checkpoint makes the tail visible.
    let mut truncated = all.clone();
    truncated.pop();
    let (code, out, _) = verify(&write(&truncated), Some(&public));
    assert_eq!(code, 0);
    assert!(!out.contains("unsigned tail: 0 lines"), "{out}");
}

#[tokio::test]
async fn an_mcp_session_belongs_to_the_agent_it_was_issued_to() {
    let h = scripted().start().await;
    h.upstream.script(reply(
        200,
        &[
            ("content-type", "application/json"),
            ("mcp-session-id", "sess-7"),
        ],
        json!({"jsonrpc": "2.0", "id": 1, "result": {"protocolVersion": "2025-06-18"}}).to_string(),
    ));
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}});
    let (status, _) = h
        .send(
            TRIAGE,
            HttpVersion::Http1,
            mcp_request("/scripted", &init.to_string()),
        )
        .await;
    assert_eq!(status, 200);
    let ping = |session: &str| {
        let mut req = mcp_request(
            "/scripted",
            &json!({"jsonrpc": "2.0", "id": 2, "method": "ping"}).to_string(),
        );
        req.headers_mut()
            .insert("mcp-session-id", session.parse().unwrap());
        req
    };
    assert_eq!(
        h.send(TRIAGE, HttpVersion::Http1, ping("sess-7")).await.0,
        200
    );
    let before = h.upstream.requests().len();
    // Another agent presenting the first agent's session, or an id never issued.
    let (status, body) = h
        .send(crate::harness::REPORT, HttpVersion::Http1, ping("sess-7"))
        .await;
    assert_eq!(status, 404, "{body:?}");
    assert_eq!(
        h.send(TRIAGE, HttpVersion::Http1, ping("sess-unknown"))
            .await
            .0,
        404
    );
    assert_eq!(h.upstream.requests().len(), before);
    let records = h.audit(4).await;
    let refused = records
        .iter()
        .find(|r| r["agent"] == crate::harness::REPORT)
        .unwrap();
    assert_eq!(refused["reason"], "session_not_found");
    assert_eq!(refused["status"], 404);
}

#[tokio::test]
async fn a_key_set_that_cannot_be_refreshed_stops_being_trusted() {
    use std::time::Duration;
    let h = Harness::builder()
        .user_tokens()
        .policies(OPEN_BUT_ADMIN)
        .user_token_yaml("  jwks_max_stale: 1500ms\n")
        .start()
        .await;
    let token = h.token("lee", &[], TRIAGE);
    assert_eq!(
        h.call_as(TRIAGE, Some(&token), "GET", "/api/x").await.0,
        200
    );
    let jwks = h.dir.path().join("jwks.json");
    let saved = std::fs::read_to_string(&jwks).unwrap();
    std::fs::remove_file(&jwks).unwrap();
    let refused = crate::harness::eventually_for(Duration::from_secs(15), async || {
        h.call_as(TRIAGE, Some(&token), "GET", "/api/x").await.0 == 401
    })
    .await;
    assert!(
        refused,
        "a key set past jwks_max_stale must not verify tokens"
    );
    let (status, body) = crate::harness::admin_get(h.admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("jwks_max_stale"),
        "{body:?}"
    );
    // The refused request's record (written as its response ends) names the reason.
    let recorded = crate::harness::eventually(async || {
        crate::harness::read_audit(&h.audit_path()).iter().any(|r| {
            r["status"] == 401
                && r["errors"][0]
                    .as_str()
                    .is_some_and(|e| e.contains("jwks_max_stale"))
        })
    })
    .await;
    assert!(recorded);
    // An autonomous call is not a user-token question: it still goes through.
    assert_eq!(h.call_as(TRIAGE, None, "GET", "/api/x").await.0, 200);
    std::fs::write(&jwks, saved).unwrap();
    let back = crate::harness::eventually_for(Duration::from_secs(15), async || {
        h.call_as(TRIAGE, Some(&token), "GET", "/api/x").await.0 == 200
    })
    .await;
    assert!(back);
    assert_eq!(crate::harness::admin_get(h.admin, "/readyz").await.0, 200);
    assert!(h.upstream.requests().iter().all(|r| {
        r.headers
            .get("x-portcullis-user")
            .is_none_or(|u| u == "lee")
    }));
}

const PARTNER: &str = "https://partner.example.com";

/// User tokens from the harness's IdP, and from `PARTNER` with a key set of its own
/// (`user_token.issuer_keys`); the partner's key, and the directory its JWKS is in.
async fn with_partner_keys() -> (
    Harness,
    portcullis_test_support::jwt::SigningKey,
    tempfile::TempDir,
) {
    use portcullis_test_support::jwt;
    let dir = tempfile::tempdir().unwrap();
    let partner = jwt::SigningKey::es256("partner-1");
    let jwks = dir.path().join("partner.json");
    std::fs::write(&jwks, jwt::jwks(&[&partner])).unwrap();
    let h = Harness::builder()
        .user_tokens()
        .policies(OPEN_BUT_ADMIN)
        .user_token_yaml(&format!(
            "  issuer_keys:\n    - issuer: {PARTNER}\n      jwks_file: {}\n",
            jwks.display()
        ))
        .start()
        .await;
    (h, partner, dir)
}

#[tokio::test]
async fn keys_verify_tokens_of_the_issuer_that_published_them_only() {
    use portcullis_test_support::jwt;
    let (h, partner, _partner_dir) = with_partner_keys().await;
    let claims =
        |issuer: &str| jwt::claims(issuer, crate::harness::AUDIENCE, "kim", TRIAGE, jwt::now());
    let idp = h.idp.as_ref().unwrap();
    for (token, expected) in [
        (partner.token(&claims(PARTNER)), 200),
        (idp.token(&claims(crate::harness::ISSUER)), 200),
        // The main IdP's key cannot speak for the partner, nor the partner's for the IdP.
        (idp.token(&claims(PARTNER)), 401),
        (partner.token(&claims(crate::harness::ISSUER)), 401),
    ] {
        assert_eq!(
            h.call_as(TRIAGE, Some(&token), "GET", "/api/x").await.0,
            expected
        );
    }
    assert_eq!(h.upstream.requests().len(), 2);
    // A token whose typ says it is something else than an access token.
    let mut header = partner.header();
    header["typ"] = "dpop+jwt".into();
    let dpop = partner.sign(&header, &claims(PARTNER));
    let (status, body) = h.call_as(TRIAGE, Some(&dpop), "GET", "/api/x").await;
    assert_eq!(status, 401);
    assert!(
        String::from_utf8_lossy(&body).contains("wrong_type"),
        "{body:?}"
    );
    header["typ"] = "at+jwt".into();
    let access = partner.sign(&header, &claims(PARTNER));
    assert_eq!(
        h.call_as(TRIAGE, Some(&access), "GET", "/api/x").await.0,
        200
    );
}

#[tokio::test]
async fn one_connection_keeps_each_issuers_tokens_to_its_own_keys() {
    use portcullis_test_support::jwt;
    let (h, partner, _partner_dir) = with_partner_keys().await;
    let claims = |issuer: &str, subject: &str| {
        jwt::claims(
            issuer,
            crate::harness::AUDIENCE,
            subject,
            TRIAGE,
            jwt::now(),
        )
    };
    let idp = h.idp.as_ref().unwrap();
    let partner_kim = partner.token(&claims(PARTNER, "kim"));
    let idp_lee = idp.token(&claims(crate::harness::ISSUER, "lee"));
    // Each key speaking for the other's issuer.
    let idp_as_partner = idp.token(&claims(PARTNER, "eve"));
    let partner_as_idp = partner.token(&claims(crate::harness::ISSUER, "eve"));
    // Pipelined on one connection, which remembers its last verified token: a repeat goes
    // to the verifier that took it, and a different token (another issuer's, or one whose
    // key is not its issuer's) to the one its issuer names.
    let sent = [
        (&partner_kim, "200", Some("kim")),
        (&partner_kim, "200", Some("kim")),
        (&idp_lee, "200", Some("lee")),
        (&idp_lee, "200", Some("lee")),
        (&partner_as_idp, "401", None),
        (&partner_kim, "200", Some("kim")),
        (&idp_as_partner, "401", None),
        (&partner_kim, "200", Some("kim")),
        (&idp_lee, "200", Some("lee")),
    ];
    let tokens: Vec<&str> = sent.iter().map(|(token, _, _)| token.as_str()).collect();
    let (statuses, reply) = h.pipelined_tokens(TRIAGE, "/api/x/", &tokens).await;
    let expected: Vec<&str> = sent.iter().map(|(_, status, _)| *status).collect();
    assert_eq!(statuses, expected, "{reply}");
    let records = h.audit(sent.len()).await;
    for (i, (_, _, user)) in sent.iter().enumerate() {
        let record = records
            .iter()
            .find(|r| r["path"] == format!("/api/x/{i}"))
            .unwrap_or_else(|| panic!("no record of /api/x/{i}"));
        match user {
            Some(user) => assert_eq!(record["user"]["sub"], *user, "request {i}"),
            None => {
                assert_eq!(record["reason"], "invalid_user_token", "request {i}");
                assert_eq!(record["user"], Value::Null, "request {i}");
            }
        }
    }
    // Each good token's signature was checked once, by its own issuer's verifier.
    let partner_verifier = &h.issuer_verifiers[0];
    assert_eq!(partner_verifier.0, PARTNER);
    assert_eq!(partner_verifier.1.signature_verifications(), 1);
    assert_eq!(h.verifier.as_ref().unwrap().signature_verifications(), 1);
}

#[tokio::test]
async fn forward_user_token_works_with_any_configured_header() {
    for (header, value) in [
        ("authorization", "Bearer {token}"),
        ("x-user-jwt", "{token}"),
    ] {
        let h = Harness::builder()
            .user_tokens()
            .policies(OPEN_BUT_ADMIN)
            .user_token_yaml(&format!("  header: {header}\n"))
            .yaml("routes:\n  - path_prefix: /with-token\n    forward_user_token: true\n")
            .start()
            .await;
        let token = h.token("lee", &[], TRIAGE);
        let value = value.replace("{token}", &token);
        for path in ["/with-token/x", "/api/x"] {
            let mut req = request("GET", HOST, path, Bytes::new());
            req.headers_mut().insert(
                http::HeaderName::from_static(header),
                value.parse().unwrap(),
            );
            assert_eq!(
                h.send(TRIAGE, HttpVersion::Http1, req).await.0,
                200,
                "{header}"
            );
        }
        let seen = h.upstream.requests();
        assert_eq!(seen[0].headers[header], value.as_str(), "{header}");
        assert!(!seen[1].headers.contains_key(header), "{header}");
        assert!(seen.iter().all(|r| r.headers["x-portcullis-user"] == "lee"));
    }
}
