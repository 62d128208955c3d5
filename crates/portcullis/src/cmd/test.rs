//! `portcullis test`: run policy test files; exit 1 on a failure or coverage below
//! `--min-coverage`, 64 on a file that cannot be read.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use portcullis_policy::tools;

use super::{count, load_policies};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Policy directory to test (default: the directory of each test file).
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Fail when fewer than this percent of policies determine at least one case.
    #[arg(long, value_name = "PERCENT")]
    pub min_coverage: Option<f64>,
    /// Test files: YAML with a top-level `cases:` list.
    #[arg(required = true, value_name = "FILE.yaml")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: TestArgs) -> ExitCode {
    let mut failed = false;
    for file in &args.files {
        let dir = args.policies.clone().unwrap_or_else(|| {
            file.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        });
        match run_file(file, &dir, args.min_coverage) {
            Ok(passed) => failed |= !passed,
            Err(code) => return code,
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one file; `Ok(false)` when a case failed or coverage is too low.
fn run_file(file: &Path, dir: &Path, min_coverage: Option<f64>) -> Result<bool, ExitCode> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        eprintln!("error: {}: {e}", file.display());
        ExitCode::from(crate::EXIT_CONFIG)
    })?;
    let cases = tools::parse_cases(&text).map_err(|errors| {
        eprintln!(
            "{}: invalid test file ({}):",
            file.display(),
            count(errors.len(), "error")
        );
        for error in errors {
            eprintln!("  {error}");
        }
        ExitCode::from(crate::EXIT_CONFIG)
    })?;
    let engine = load_policies(dir)?;
    let report = tools::run_tests(&engine, &cases);
    println!(
        "{} against {} ({} cases)",
        file.display(),
        dir.display(),
        cases.len()
    );
    for result in &report.results {
        match &result.failure {
            None => println!("  ok    {}", result.name),
            Some(diff) => println!("  FAIL  {}\n{diff}", result.name),
        }
    }
    let coverage = report.coverage();
    println!(
        "coverage: {coverage:.0}% of {} determine at least one case",
        count(report.policies, "policy")
    );
    if !report.uncovered.is_empty() {
        println!("  never determining:");
        for (id, file) in &report.uncovered {
            println!("    {id} ({file})");
        }
    }
    let failed = report.failed();
    println!(
        "{} passed, {} failed",
        report.results.len() - failed,
        failed
    );
    let too_low = min_coverage.is_some_and(|min| coverage + 1e-9 < min);
    if too_low {
        println!(
            "coverage {coverage:.0}% is below --min-coverage {}%",
            min_coverage.unwrap_or_default()
        );
    }
    Ok(failed == 0 && !too_low)
}
