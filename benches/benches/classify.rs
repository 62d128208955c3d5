//! Classification of typical protocol bodies: an OpenAI chat completion (with tools) and an
//! MCP `tools/call`, from bytes to the Cedar calls they stand for (strict JSON parse
//! included), plus a 10-message JSON-RPC batch.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "bench set-up fails loudly"
)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis_proxy::Protocol;
use portcullis_proxy::protocol::classify_body;

const CHAT: &str = r#"{"model":"small-chat","stream":true,"max_completion_tokens":512,
"messages":[{"role":"system","content":"You are a support triage assistant."},
{"role":"user","content":"My printer shows error 0x42 after the last firmware update; what should I try?"}],
"tools":[{"type":"function","function":{"name":"search_tickets","parameters":{"type":"object","properties":{"query":{"type":"string"}}}}},
{"type":"function","function":{"name":"refund","parameters":{"type":"object","properties":{"amount":{"type":"integer"}}}}}]}"#;

const TOOL_CALL: &str = r#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"refund","arguments":{"amount":50,"currency":"EUR","ticket_id":"T-1234","note":"customer waited two weeks"},"_meta":{"progressToken":7}}}"#;

fn bench(c: &mut Criterion) {
    // Distinct ids: a batch repeating an id is refused.
    let batch = (0..10)
        .map(|i| TOOL_CALL.replace("\"id\":42", &format!("\"id\":{i}")))
        .collect::<Vec<_>>()
        .join(",");
    let batch = format!("[{batch}]");
    assert_eq!(
        classify_body(Protocol::Mcp, batch.as_bytes(), "/mcp")
            .unwrap()
            .len(),
        10
    );
    assert_eq!(
        classify_body(Protocol::OpenAi, CHAT.as_bytes(), "/v1")
            .unwrap()
            .len(),
        1
    );
    let mut group = c.benchmark_group("classify");
    for (name, protocol, body) in [
        ("openai_chat_completion", Protocol::OpenAi, CHAT.to_owned()),
        ("mcp_tools_call", Protocol::Mcp, TOOL_CALL.to_owned()),
        ("mcp_batch_of_10", Protocol::Mcp, batch),
    ] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| classify_body(protocol, std::hint::black_box(body.as_bytes()), "/mcp"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
