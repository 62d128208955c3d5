//! `portcullis suggest`: least-privilege permits, one per agent, from audit files.

use std::path::PathBuf;
use std::process::ExitCode;

use super::read_audit;

#[derive(Debug, clap::Args)]
pub struct SuggestArgs {
    /// Audit files, oldest first.
    #[arg(required = true, value_name = "AUDIT")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: SuggestArgs) -> ExitCode {
    let records = match read_audit(&args.files) {
        Ok(records) => records,
        Err(code) => return code,
    };
    print!(
        "{}",
        portcullis_policy::tools::suggest(records.iter().map(|(_, r)| r))
    );
    ExitCode::SUCCESS
}
