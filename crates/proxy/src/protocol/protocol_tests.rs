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
