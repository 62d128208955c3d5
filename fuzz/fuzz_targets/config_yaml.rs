//! Sidecar configuration parsing and validation (every error with its YAML path). Files
//! named by the input are resolved under an empty directory, so nothing outside is read.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;

fuzz_target!(|text: &str| {
    let base = Path::new("/nonexistent/portcullis-fuzz");
    let _ = Config::from_yaml(text, base, &base.join("config.yaml"));
});
