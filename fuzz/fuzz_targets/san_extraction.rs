//! The caller's SPIFFE ID from a leaf certificate (DER): never panics on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|der: &[u8]| {
    let _ = portcullis_identity::caller_spiffe_id(der);
    let _ = portcullis_identity::svid::check_leaf(der);
});
