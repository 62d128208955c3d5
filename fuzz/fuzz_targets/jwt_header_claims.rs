//! JOSE header and JWT claims checks on an untrusted compact token.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|token: &str| {
    portcullis_identity::user_token::fuzz_header_and_claims(token);
});
