//! Consequential actions over real mTLS: `@approval("required")` answers 428 with a digest of
//! the exact call; a grant signed for that digest lets that call through once; grants for
//! other calls, agents, audiences, times or policy sets do not. And `limits.rate`.

use bytes::Bytes;
use portcullis_test_support::client::{HttpVersion, request};
use portcullis_test_support::jwt;
use serde_json::{Value, json};

use crate::harness::{
    APPROVER_ISSUER, Builder, HOST, Harness, REPORT, SERVER_ID, TRIAGE, eventually, sample,
};

const POLICIES: &str = r#"
@id("mcp-lifecycle") permit (principal, action in [Action::"mcp_initialize", Action::"list_tools"], resource);
@id("search") permit (principal, action == Action::"call_tool", resource == Tool::"search_tickets");
@id("refunds-need-approval") @approval("required")
permit (principal, action == Action::"call_tool", resource == Tool::"refund");
"#;

const ROUTES: &str = "routes:\n  - path: /mcp\n    protocol: mcp\n";

fn builder() -> Builder {
    Harness::builder()
        .policies(POLICIES)
        .yaml(ROUTES)
        .approvals()
}

fn refund(amount: i64) -> String {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
           "params": {"name": "refund", "arguments": {"order": "o-1", "amount": amount}}})
    .to_string()
}

/// POST /mcp as `agent`, with `grant` in `x-portcullis-approval`.
async fn call(h: &Harness, agent: &str, body: &str, grant: Option<&str>) -> (u16, Value) {
    let mut req = request("POST", HOST, "/mcp", Bytes::from(body.to_owned()));
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(grant) = grant {
        req.headers_mut()
            .insert("x-portcullis-approval", grant.parse().unwrap());
    }
    let (status, body) = h.send(agent, HttpVersion::Http1, req).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The challenge digest of a 428 answer.
fn challenge_digest(reply: &Value) -> String {
    assert_eq!(reply["error"]["code"], "approval_required", "{reply}");
    let digest = reply["error"]["challenge"]["digest"].as_str().unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    digest.to_owned()
}

/// A grant as an approver signs it: `aud` the sidecar, for `digest`, five minutes.
fn grant_claims(digest: &str, jti: &str) -> Value {
    let now = jwt::now();
    json!({
        "iss": APPROVER_ISSUER,
        "sub": "alice@example.org",
        "aud": SERVER_ID,
        "iat": now,
        "exp": now + 300,
        "jti": jti,
        "digest": digest,
    })
}

fn sign(h: &Harness, claims: &Value) -> String {
    h.approver.as_ref().unwrap().token(claims)
}

#[tokio::test]
async fn a_grant_for_the_challenged_call_lets_it_through_exactly_once() {
    let h = builder().start().await;
    let (status, reply) = call(&h, TRIAGE, &refund(40), None).await;
    assert_eq!(status, 428, "{reply}");
    let digest = challenge_digest(&reply);
    assert_eq!(reply["error"]["challenge"]["action"], "call_tool");
    assert_eq!(reply["error"]["challenge"]["resource"], "Tool::\"refund\"");
    assert!(h.upstream.requests().is_empty());
    // Asking again without a grant gives the same digest: it names the call, not the attempt.
    let (_, again) = call(&h, TRIAGE, &refund(40), None).await;
    assert_eq!(challenge_digest(&again), digest);

    let grant = sign(&h, &grant_claims(&digest, "grant-1"));
    let (status, reply) = call(&h, TRIAGE, &refund(40), Some(&grant)).await;
    assert_eq!(status, 200, "{reply}");
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    // The grant is ours, not the application's.
    assert!(!seen[0].headers.contains_key("x-portcullis-approval"));

    let (status, reply) = call(&h, TRIAGE, &refund(40), Some(&grant)).await;
    assert_eq!(status, 401, "{reply}");
    assert_eq!(reply["error"]["data"]["reason"], "approval_replayed");
    assert_eq!(h.upstream.requests().len(), 1);

    let records = h.audit(4).await;
    let approved = records
        .iter()
        .find(|r| r["decision"] == "approved")
        .expect("an approved record");
    assert_eq!(approved["approval"]["approver"], "alice@example.org");
    assert_eq!(approved["approval"]["digest"], digest.as_str());
    assert_eq!(approved["status"], 200);
    let replayed = records
        .iter()
        .find(|r| r["reason"] == "approval_replayed")
        .expect("a replay record");
    assert_eq!(replayed["status"], 401);
    let challenged = &records[1];
    assert_eq!(challenged["decision"], "approval_required");
    assert_eq!(challenged["approval"]["digest"], digest.as_str());
    assert!(challenged["approval"].get("approver").is_none());

    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "portcullis_decisions_total{action=\"call_tool\",decision=\"approved\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "portcullis_approval_grants_total{result=\"replayed\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn grants_for_anything_but_this_call_now_are_refused() {
    let h = builder().start().await;
    let (_, reply) = call(&h, TRIAGE, &refund(40), None).await;
    let digest = challenge_digest(&reply);

    // Other arguments: another digest; the call stays challenged and the grant is not spent.
    let grant = sign(&h, &grant_claims(&digest, "for-40"));
    let (status, reply) = call(&h, TRIAGE, &refund(4000), Some(&grant)).await;
    assert_eq!(status, 428, "{reply}");
    assert_ne!(challenge_digest(&reply), digest);

    // Another agent presenting the grant: its call has another digest.
    let (status, _) = call(&h, REPORT, &refund(40), Some(&grant)).await;
    assert_eq!(status, 428);

    // Expired.
    let mut claims = grant_claims(&digest, "expired");
    claims["iat"] = (jwt::now() - 600).into();
    claims["exp"] = (jwt::now() - 300).into();
    let (status, reply) = call(&h, TRIAGE, &refund(40), Some(&sign(&h, &claims))).await;
    assert_eq!(status, 401, "{reply}");
    assert_eq!(reply["error"]["data"]["reason"], "invalid_approval");

    // For another sidecar.
    let mut claims = grant_claims(&digest, "other-aud");
    claims["aud"] = "spiffe://prod.example.org/ns/other/sa/other-api".into();
    let (status, _) = call(&h, TRIAGE, &refund(40), Some(&sign(&h, &claims))).await;
    assert_eq!(status, 401);

    // Longer-lived than approval.max_lifetime (5m).
    let mut claims = grant_claims(&digest, "too-long");
    claims["exp"] = (jwt::now() + 3600).into();
    let (status, _) = call(&h, TRIAGE, &refund(40), Some(&sign(&h, &claims))).await;
    assert_eq!(status, 401);

    // Signed by a key the sidecar does not trust.
    let stranger = jwt::SigningKey::es256("approver-1");
    let (status, _) = call(
        &h,
        TRIAGE,
        &refund(40),
        Some(&stranger.token(&grant_claims(&digest, "forged"))),
    )
    .await;
    assert_eq!(status, 401);
    assert!(h.upstream.requests().is_empty());

    // After a policy change the digest names another policy set: the old grant no longer fits.
    crate::harness::write(
        &h.dir.path().join("policies"),
        "test.cedar",
        &format!(
            "{POLICIES}\n@id(\"extra\") permit (principal, action == Action::\"GET\", resource == Route::\"/extra\");\n"
        ),
    );
    assert!(
        eventually(async || {
            let (_, reply) = call(&h, TRIAGE, &refund(40), None).await;
            reply["error"]["challenge"]["digest"] != digest.as_str()
        })
        .await,
        "policy reload did not change the digest"
    );
    let (status, _) = call(&h, TRIAGE, &refund(40), Some(&grant)).await;
    assert_eq!(status, 428);
    assert!(h.upstream.requests().is_empty());

    let records = h.audit(8).await;
    let invalid: Vec<_> = records
        .iter()
        .filter(|r| r["reason"] == "invalid_approval")
        .collect();
    assert_eq!(invalid.len(), 4, "{records:?}");
    assert!(invalid.iter().all(|r| {
        r["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("approval grant")
    }));
}

#[tokio::test]
async fn an_agent_over_its_rate_gets_429_and_another_agent_is_unaffected() {
    let h = Harness::builder()
        .yaml("limits:\n  rate:\n    - per: agent\n      requests_per_minute: 2\n      burst: 2\n")
        .start()
        .await;
    for _ in 0..2 {
        let (status, _) = h.get(TRIAGE, "/api/orders/1").await;
        assert_eq!(status, 200);
    }
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    let response = caller
        .call(h.addr, request("GET", HOST, "/api/orders/1", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Two a minute: the next token is at most 30 seconds away.
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    // Another agent has its own bucket (its request is decided as usual: 403 for this one).
    let (status, _) = h.get(REPORT, "/api/orders/1").await;
    assert_eq!(status, 403);
    let (status, _) = h.get(REPORT, "/health").await;
    assert_eq!(status, 200);
    assert_eq!(h.upstream.requests().len(), 3);

    let records = h.audit(5).await;
    let limited = records
        .iter()
        .find(|r| r["reason"] == "rate_limited")
        .expect("a rate-limited record");
    assert_eq!(limited["status"], 429);
    assert_eq!(limited["agent"], TRIAGE);
    let metrics = h.metrics().await;
    assert_eq!(
        sample(&metrics, "portcullis_rate_limited_total{per=\"agent\"}"),
        1.0
    );
}

/// `examples/approval/approver.py` (Python with `cryptography`) signs a grant the sidecar
/// accepts: the example's approver works against the real verifier.
#[tokio::test]
async fn the_example_approver_script_signs_a_grant_the_sidecar_accepts() {
    let script = crate::harness::repo_root().join("examples/approval/approver.py");
    let keys = tempfile::tempdir().unwrap();
    let (key, jwks) = (keys.path().join("key.pem"), keys.path().join("jwks.json"));
    let keygen = std::process::Command::new("python3")
        .arg(&script)
        .args(["keygen", "--key"])
        .arg(&key)
        .arg("--jwks")
        .arg(&jwks)
        .output();
    match keygen {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("NOTICE: skipping: python3 with `cryptography` unavailable ({other:?})");
            return;
        }
    }
    let h = Harness::builder()
        .policies(POLICIES)
        .yaml(ROUTES)
        .file(
            "approval-jwks.json",
            &std::fs::read_to_string(&jwks).unwrap(),
        )
        .yaml(&format!(
            "approval:\n  jwks_file: approval-jwks.json\n  issuers: [{APPROVER_ISSUER}]\n"
        ))
        .start()
        .await;
    let (status, reply) = call(&h, TRIAGE, &refund(40), None).await;
    assert_eq!(status, 428);
    let mut sign = std::process::Command::new("python3")
        .arg(&script)
        .args(["sign", "--key"])
        .arg(&key)
        .args(["--aud", SERVER_ID, "--iss", APPROVER_ISSUER, "--sub", "bob"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    sign.stdin
        .take()
        .unwrap()
        .write_all(reply.to_string().as_bytes())
        .unwrap();
    let out = sign.wait_with_output().unwrap();
    assert!(out.status.success());
    let grant = String::from_utf8(out.stdout).unwrap();
    let (status, reply) = call(&h, TRIAGE, &refund(40), Some(grant.trim())).await;
    assert_eq!(status, 200, "{reply}");
    let (status, _) = call(&h, TRIAGE, &refund(40), Some(grant.trim())).await;
    assert_eq!(status, 401);
}

/// "Only read-only tools run without approval", written once for every tool: the hints come
/// from the server's own `tools/list` result, per route, never from the agent.
const BY_ANNOTATION: &str = r#"
@id("mcp-lifecycle") permit (principal, action in [Action::"mcp_initialize", Action::"list_tools"], resource);
@id("read-only-tools") permit (principal, action == Action::"call_tool", resource)
when { context.tool has annotations.readOnlyHint && context.tool.annotations.readOnlyHint };
@id("other-tools-need-approval") @approval("required")
permit (principal, action == Action::"call_tool", resource)
unless { context.tool has annotations.readOnlyHint && context.tool.annotations.readOnlyHint };
"#;

fn tool_call(name: &str, extra_params: Value) -> String {
    let mut params = json!({"name": name, "arguments": {}});
    for (key, value) in extra_params.as_object().unwrap() {
        params[key] = value.clone();
    }
    json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params}).to_string()
}

async fn post(h: &Harness, path: &str, body: &str) -> (u16, Value) {
    let mut req = request("POST", HOST, path, Bytes::from(body.to_owned()));
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let (status, body) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn tool_annotations_from_the_servers_listing_reach_policies() {
    use portcullis_test_support::upstream::Reply;

    let h = Harness::builder()
        .policies(BY_ANNOTATION)
        .yaml(
            "routes:\n  - path: /mcp\n    protocol: mcp\n  - path: /scripted\n    protocol: mcp\n",
        )
        .approvals()
        .start()
        .await;
    let list = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
    let search = tool_call("search_tickets", json!({}));

    // Before the server listed anything the hints are unknown, and the policy fails safe.
    let (status, reply) = post(&h, "/mcp", &search).await;
    assert_eq!(status, 428, "{reply}");

    let (status, reply) = post(&h, "/mcp", list).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["result"]["tools"].as_array().unwrap().len(), 3);
    // The caller sees the server's annotations as sent (title included).
    assert_eq!(
        reply["result"]["tools"][0]["annotations"]["title"],
        "Search tickets"
    );

    let (status, reply) = post(&h, "/mcp", &search).await;
    assert_eq!(status, 200, "read-only once listed: {reply}");
    let (status, reply) = post(&h, "/mcp", &tool_call("delete_everything", json!({}))).await;
    assert_eq!(status, 428, "destructive: {reply}");
    // The agent cannot claim hints: annotations in its own call are not the server's.
    let (status, reply) = post(
        &h,
        "/mcp",
        &tool_call(
            "delete_everything",
            json!({"annotations": {"readOnlyHint": true}, "_meta": {"annotations": {"readOnlyHint": true}}}),
        ),
    )
    .await;
    assert_eq!(status, 428, "{reply}");
    assert_eq!(
        h.upstream
            .requests()
            .iter()
            .filter(|r| r.uri == "/mcp" && r.body.windows(9).any(|w| w == b"tools/cal"))
            .count(),
        1,
        "only the read-only call reached the server"
    );

    // The audit record keeps the hints the decision saw, so `replay` re-decides alike.
    let records = h.audit(6).await;
    let allowed = records
        .iter()
        .find(|r| r["decision"] == "allow" && r["resource"]["id"] == "search_tickets")
        .expect("the allowed call's record");
    assert_eq!(
        allowed["input"]["context"]["tool"]["annotations"],
        json!({"readOnlyHint": true, "openWorldHint": false}),
        "{allowed}"
    );

    // Hints are per route (each route may front another server), and a later listing that
    // says otherwise replaces them.
    let scripted = |tools: Value| Reply {
        status: 200,
        headers: vec![("content-type", "application/json".to_owned())],
        body: Bytes::from(
            json!({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}}).to_string(),
        ),
    };
    // The server lists `tools` on /scripted; then search_tickets is called there.
    let relist_then_search = async |tools: Value| {
        h.upstream.script(scripted(tools));
        assert_eq!(post(&h, "/scripted", list).await.0, 200);
        post(&h, "/scripted", &search).await
    };
    let (status, reply) = relist_then_search(
        json!([{"name": "search_tickets", "annotations": {"readOnlyHint": false}}]),
    )
    .await;
    assert_eq!(status, 428, "{reply}");
    let (status, reply) = post(&h, "/mcp", &search).await;
    assert_eq!(
        status, 200,
        "another route's listing changes nothing here: {reply}"
    );
    let (status, reply) = relist_then_search(
        json!([{"name": "search_tickets", "annotations": {"readOnlyHint": true}}]),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = relist_then_search(json!([{"name": "search_tickets"}])).await;
    assert_eq!(
        status, 428,
        "a listing without hints forgets the old ones: {reply}"
    );
}

/// `method target` with `body` (JSON) as TRIAGE, with `grant` when given.
async fn send_with(
    h: &Harness,
    method: &str,
    target: &str,
    body: &str,
    grant: Option<&str>,
) -> (u16, Value) {
    let mut req = request(method, HOST, target, Bytes::from(body.to_owned()));
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(grant) = grant {
        req.headers_mut()
            .insert("x-portcullis-approval", grant.parse().unwrap());
    }
    let (status, body) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_grant_covers_the_query_and_the_body_the_upstream_acts_on() {
    let h = Harness::builder()
        .policies(
            r#"
@id("refunds-need-approval") @approval("required")
permit (principal, action == Action::"POST", resource == Route::"/api/refunds");
@id("models-need-approval") @approval("required")
permit (principal, action == Action::"invoke_model", resource == Model::"big");
"#,
        )
        .yaml("routes:\n  - path_prefix: /v1\n    protocol: openai\n")
        .approvals()
        .start()
        .await;
    // A generic route: the body streams unless approval is needed; then it is part of the call.
    let (status, reply) = send_with(&h, "POST", "/api/refunds", r#"{"amount":1}"#, None).await;
    assert_eq!(status, 428, "{reply}");
    let digest = challenge_digest(&reply);
    let grant = |jti: &str| sign(&h, &grant_claims(&digest, jti));
    for (target, body) in [
        ("/api/refunds", r#"{"amount":99999}"#),
        ("/api/refunds?amount=99999", r#"{"amount":1}"#),
    ] {
        let (status, reply) = send_with(&h, "POST", target, body, Some(&grant(target))).await;
        assert_eq!(status, 428, "{target} {body}: {reply}");
        assert_ne!(challenge_digest(&reply), digest, "{target} {body}");
    }
    assert!(h.upstream.requests().is_empty());
    let (status, reply) = send_with(
        &h,
        "POST",
        "/api/refunds",
        r#"{"amount":1}"#,
        Some(&grant("exact")),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, Bytes::from_static(br#"{"amount":1}"#));

    // A model call: the whole body (the prompt too) and the endpoint; not the keys' order.
    let chat = |prompt: &str| {
        json!({"model": "big", "messages": [{"role": "user", "content": prompt}]}).to_string()
    };
    let (_, reply) = send_with(&h, "POST", "/v1/chat/completions", &chat("summarize"), None).await;
    let summarize = challenge_digest(&reply);
    let reordered = r#"{"messages":[{"content":"summarize","role":"user"}],"model":"big"}"#;
    let (_, reply) = send_with(&h, "POST", "/v1/chat/completions", reordered, None).await;
    assert_eq!(challenge_digest(&reply), summarize);
    let (_, reply) = send_with(&h, "POST", "/v1/chat/completions", &chat("wire $1M"), None).await;
    assert_ne!(challenge_digest(&reply), summarize);
    let (_, reply) = send_with(&h, "POST", "/v1/completions", &chat("summarize"), None).await;
    assert_ne!(challenge_digest(&reply), summarize);
}

#[tokio::test]
async fn a_grant_is_spent_only_by_a_call_that_goes_out() {
    let h = builder().start().await;
    let (status, reply) = call(&h, TRIAGE, &refund(40), None).await;
    assert_eq!(status, 428, "{reply}");
    let grant = sign(&h, &grant_claims(&challenge_digest(&reply), "grant-batch"));
    // The approved refund in a batch with a denied message: nothing goes out, and the grant
    // is not used up by it.
    let denied = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
                        "params": {"name": "delete_everything", "arguments": {}}});
    let batch = format!("[{},{denied}]", refund(40));
    let (status, reply) = call(&h, TRIAGE, &batch, Some(&grant)).await;
    assert_eq!(status, 403, "{reply}");
    assert!(h.upstream.requests().is_empty());
    // The refund alone, with the same grant: through, once.
    let (status, reply) = call(&h, TRIAGE, &refund(40), Some(&grant)).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = call(&h, TRIAGE, &refund(40), Some(&grant)).await;
    assert_eq!(status, 401, "{reply}");
    assert_eq!(reply["error"]["data"]["reason"], "approval_replayed");
    assert_eq!(h.upstream.requests().len(), 1);
}
