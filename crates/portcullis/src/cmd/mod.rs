//! One file per subcommand that is more than a few lines.

pub mod analyze;
pub mod check;
pub mod dev_certs;
pub mod replay;
pub mod suggest;
pub mod test;
pub mod validate;

use std::path::Path;
use std::process::ExitCode;

use portcullis_policy::{Mode, PolicyEngine, SchemaSource};

/// `1 error`, `2 errors`.
pub fn count(n: usize, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("{n} {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        (_, None) => format!("{n} {noun}s"),
    }
}

/// Loads a policy directory for a tool; on failure prints every error and gives exit 64.
/// Notes the built-in schema on stderr when the directory has none.
pub fn load_policies(dir: &Path) -> Result<PolicyEngine, ExitCode> {
    match PolicyEngine::load(dir, Mode::Enforce) {
        Ok(engine) => {
            if engine.schema_source() == SchemaSource::BuiltIn {
                eprintln!(
                    "note: {} has no {}: using the schema built into portcullis (the shipped one)",
                    dir.display(),
                    portcullis_policy::SCHEMA_FILE
                );
            }
            Ok(engine)
        }
        Err(errors) => {
            eprintln!(
                "{}: invalid policies ({}):",
                dir.display(),
                count(errors.len(), "error")
            );
            for error in errors {
                eprintln!("  {error}");
            }
            Err(ExitCode::from(crate::EXIT_CONFIG))
        }
    }
}

/// Audit records of `files`, with `file:line` labels; exit 64 on an unreadable file or a
/// line that is not JSON.
pub fn read_audit(
    files: &[std::path::PathBuf],
) -> Result<Vec<(String, serde_json::Value)>, ExitCode> {
    let mut records = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|error| {
            eprintln!("error: {}: {error}", file.display());
            ExitCode::from(crate::EXIT_CONFIG)
        })?;
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", file.display(), index + 1);
            match serde_json::from_str(line) {
                Ok(record) => records.push((at, record)),
                Err(error) => {
                    eprintln!("error: {at}: not JSON: {error}");
                    return Err(ExitCode::from(crate::EXIT_CONFIG));
                }
            }
        }
    }
    Ok(records)
}
