//! OpenAI-style inference body classification.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_proxy::Protocol;
use portcullis_proxy::protocol::classify_body;

fuzz_target!(|body: &[u8]| {
    let _ = classify_body(Protocol::OpenAi, body, "/v1/chat/completions");
});
