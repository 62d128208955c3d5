//! AdmissionReview decoding and answering: always an AdmissionReview back, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_injector::{InjectionSettings, Scope, review};

fuzz_target!(|body: &[u8]| {
    let settings = InjectionSettings::default();
    let _ = review(body, Scope::Namespace, &settings);
    let _ = review(body, Scope::Pod, &settings);
});
