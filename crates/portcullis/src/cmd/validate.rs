//! `portcullis validate --policies DIR`: the schema, the policies and entities.json alone,
//! without a config or certificates (what a policy repository's CI runs).

use std::path::Path;
use std::process::ExitCode;

use super::{count, load_policies};

pub fn run(dir: &Path, strict: bool) -> ExitCode {
    let engine = match load_policies(dir) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let warnings = engine.warnings();
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if strict && !warnings.is_empty() {
        eprintln!(
            "{}: {} (--strict makes warnings errors)",
            dir.display(),
            count(warnings.len(), "warning")
        );
        return ExitCode::from(crate::EXIT_CONFIG);
    }
    println!(
        "{}: ok ({}, hash {}{})",
        dir.display(),
        count(engine.policy_count(), "policy"),
        &engine.hash()[..12],
        if warnings.is_empty() {
            String::new()
        } else {
            format!("; {}", count(warnings.len(), "warning"))
        }
    );
    ExitCode::SUCCESS
}
