//! `tools/list` result filtering over JSON bodies and SSE events.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    portcullis_proxy::protocol::fuzz_tools_list(body);
});
