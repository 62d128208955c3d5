//! Classification of protocol bodies on the borrowed parse: what is refused, and as what.

use portcullis_core::Action;
use serde_json::json;

use super::{DEFAULT_MAX_BATCH, Protocol, classify_body};
use crate::error::Refusal;

fn mcp(body: &str) -> Result<Vec<Action>, Refusal> {
    classify_body(Protocol::Mcp, body.as_bytes(), "/mcp")
        .map(|calls| calls.into_iter().map(|(action, _, _)| action).collect())
}

fn openai(body: &str) -> Result<String, Refusal> {
    classify_body(Protocol::OpenAi, body.as_bytes(), "/v1/chat/completions")
        .map(|calls| calls[0].1.id().to_owned())
}

#[test]
fn mcp_bodies_are_classified_or_refused_as_before() {
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"refund","arguments":{"amount":5}}}"#;
    assert_eq!(mcp(call), Ok(vec![Action::CallTool]));
    let cases: [(&str, Refusal); 10] = [
        ("{", Refusal::MalformedBody),
        (
            r#"{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}"#,
            Refusal::MalformedBody,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":{"y":1,"y":2}}}}"#,
            Refusal::MalformedBody,
        ),
        (
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            Refusal::InvalidMessage,
        ),
        (
            r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#,
            Refusal::InvalidMessage,
        ),
        (
            r#"{"jsonrpc":"2.0","id":null,"method":"notifications/x"}"#,
            Refusal::InvalidMessage,
        ),
        (
            r#"{"jsonrpc":"2.1","id":1,"method":"ping"}"#,
            Refusal::InvalidMessage,
        ),
        (r#"[]"#, Refusal::InvalidMessage),
        (r#"[1]"#, Refusal::InvalidMessage),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":[1]}}"#,
            Refusal::InvalidMessage,
        ),
    ];
    for (body, refusal) in cases {
        assert_eq!(mcp(body), Err(refusal), "{body}");
    }
    // An escaped "2.0" is the same string.
    assert_eq!(
        mcp(r#"{"jsonrpc":"\u0032.0","id":"a","method":"ping"}"#),
        Ok(vec![Action::McpPing])
    );
}

#[test]
fn a_batch_over_the_cap_is_refused_before_its_messages_are_read() {
    let message = |i: usize| json!({"jsonrpc": "2.0", "id": i, "method": "ping"});
    let within: Vec<_> = (0..DEFAULT_MAX_BATCH).map(message).collect();
    assert_eq!(
        mcp(&serde_json::Value::Array(within).to_string()).map(|c| c.len()),
        Ok(DEFAULT_MAX_BATCH)
    );
    let over: Vec<_> = (0..=DEFAULT_MAX_BATCH).map(message).collect();
    assert_eq!(
        mcp(&serde_json::Value::Array(over).to_string()),
        Err(Refusal::BatchTooLarge)
    );
    // A flood of zeros is a batch too: refused at its 65th element.
    let zeros = format!("[{}0]", "0,".repeat(500_000));
    assert_eq!(mcp(&zeros), Err(Refusal::BatchTooLarge));
}

#[test]
fn tool_arguments_are_bounded_in_values() {
    let many = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a","arguments":{{"x":[{}0]}}}}}}"#,
        "0,".repeat(super::mcp::MAX_ARGUMENT_VALUES)
    );
    assert_eq!(mcp(&many), Err(Refusal::BodyTooLarge));
}

#[test]
fn openai_bodies_are_classified_or_refused_as_before() {
    assert_eq!(
        openai(
            r#"{"model":"m","messages":[0,0,0],"tools":[{"type":"function","function":{"name":"f"}},{"type":"web_search"}]}"#
        ),
        Ok("m".to_owned())
    );
    let cases: [(&str, Refusal); 8] = [
        ("[]", Refusal::InvalidMessage),
        (r#"["m"]"#, Refusal::InvalidMessage),
        (r#"{"model":""}"#, Refusal::InvalidMessage),
        (r#"{"model":"m","stream":"yes"}"#, Refusal::InvalidMessage),
        (r#"{"model":"m","max_tokens":-1}"#, Refusal::InvalidMessage),
        (r#"{"model":"m","tools":[0]}"#, Refusal::InvalidMessage),
        (r#"{"model":"m","tools":{}}"#, Refusal::InvalidMessage),
        (r#"{"model":"a","model":"b"}"#, Refusal::MalformedBody),
    ];
    for (body, refusal) in cases {
        assert_eq!(openai(body), Err(refusal), "{body}");
    }
}

#[test]
fn model_endpoints_and_azure_paths() {
    use super::openai::{is_inference_endpoint, path_model};
    for path in [
        "/v1/chat/completions",
        "/v1/embeddings/",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/moderations",
        "/v1/messages",
        "/openai/deployments/gpt-4o/chat/completions",
    ] {
        assert!(is_inference_endpoint(path), "{path}");
    }
    for path in [
        "/v1/models",
        "/v1/images",
        "/v1/images/",
        "/v1/files/x",
        "/openai/deployments/x",
    ] {
        assert!(!is_inference_endpoint(path), "{path}");
    }
    assert_eq!(
        path_model("/openai/deployments/gpt-4o/embeddings"),
        Some("gpt-4o")
    );
    let azure = |path: &str, body: &str| {
        classify_body(Protocol::OpenAi, body.as_bytes(), path).map(|c| c[0].1.id().to_owned())
    };
    let path = "/openai/deployments/gpt-4o/chat/completions";
    assert_eq!(azure(path, r#"{"messages":[]}"#), Ok("gpt-4o".to_owned()));
    assert_eq!(
        azure(path, r#"{"model":"gpt-4o"}"#),
        Ok("gpt-4o".to_owned())
    );
    assert_eq!(
        azure(path, r#"{"model":"o3"}"#),
        Err(Refusal::ModelMismatch)
    );
    assert_eq!(azure(path, r#"{"model":7}"#), Err(Refusal::InvalidMessage));
    assert_eq!(openai(r#"{"messages":[]}"#), Err(Refusal::InvalidMessage));
}

#[test]
fn mcp_headers_must_agree_with_the_body() {
    use super::mcp::{check_headers, classify};
    let endpoint = portcullis_core::Resource::Route {
        path: "/mcp".into(),
        host: "".into(),
        method: "POST".into(),
    };
    let parsed = |body: &str| classify(body.as_bytes(), &endpoint, 8).unwrap();
    let headers = |pairs: &[(&'static str, &str)]| {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    };
    let call = parsed(
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}}"#,
    );
    let modern = ("mcp-protocol-version", "2026-07-28");
    assert_eq!(
        check_headers(
            &headers(&[
                modern,
                ("mcp-method", "resources/read"),
                ("mcp-name", "file:///a")
            ]),
            &call
        ),
        Ok(())
    );
    // Older versions: no headers is fine, a disagreeing one is not.
    assert_eq!(check_headers(&headers(&[]), &call), Ok(()));
    assert_eq!(
        check_headers(&headers(&[("mcp-name", "file:///b")]), &call),
        Err(Refusal::HeaderMismatch)
    );
    assert_eq!(
        check_headers(&headers(&[modern, ("mcp-method", "resources/read")]), &call),
        Err(Refusal::HeaderMismatch)
    );
    assert_eq!(
        check_headers(
            &headers(&[("mcp-method", "resources/read"), ("mcp-method", "ping")]),
            &call
        ),
        Err(Refusal::HeaderMismatch)
    );
    // A notification has a method and no name; a response has neither.
    let note = parsed(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    assert_eq!(
        check_headers(
            &headers(&[modern, ("mcp-method", "notifications/initialized")]),
            &note
        ),
        Ok(())
    );
    let response = parsed(r#"{"jsonrpc":"2.0","id":4,"result":{}}"#);
    assert_eq!(check_headers(&headers(&[modern]), &response), Ok(()));
    // A batch cannot be described by one header.
    let batch = parsed(
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
    );
    assert_eq!(check_headers(&headers(&[]), &batch), Ok(()));
    assert_eq!(
        check_headers(&headers(&[modern, ("mcp-method", "ping")]), &batch),
        Err(Refusal::HeaderMismatch)
    );
    let discover = parsed(r#"{"jsonrpc":"2.0","id":1,"method":"server/discover"}"#);
    assert_eq!(discover.tools_list_ids, vec![json!(1)]);
}
