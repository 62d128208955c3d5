//! SPIFFE ID parsing: never panics; whatever parses re-parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_core::SpiffeId;

fuzz_target!(|input: &str| {
    if let Ok(id) = SpiffeId::parse(input) {
        let again = SpiffeId::parse(id.as_str());
        assert_eq!(again.as_ref().map(SpiffeId::as_str), Ok(id.as_str()));
        let _ = id.kubernetes_service_account();
    }
});
