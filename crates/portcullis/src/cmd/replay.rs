//! `portcullis replay`: decide recorded requests again against a candidate policy set and
//! list exactly the decisions that change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use portcullis_policy::tools;

use super::check::Output;
use super::{count, load_policies, read_audit};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The candidate policy directory to decide the recorded requests with.
    #[arg(long)]
    pub policies: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Audit files, oldest first.
    #[arg(required = true, value_name = "AUDIT")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: ReplayArgs) -> ExitCode {
    let engine = match load_policies(&args.policies) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let records = match read_audit(&args.files) {
        Ok(records) => records,
        Err(code) => return code,
    };
    let report = tools::replay(&engine, records.iter().map(|(at, r)| (at.clone(), r)));
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Output::Text => {
            for line in &report.unreplayable {
                eprintln!("skipped: {line}");
            }
            println!(
                "replayed {} against {}: {} changed",
                count(report.replayed, "decision"),
                args.policies.display(),
                report.changed.len()
            );
            // The table: changes by agent and action.
            let mut table: BTreeMap<(&str, &str, &str, &str), usize> = BTreeMap::new();
            for change in &report.changed {
                *table
                    .entry((&change.agent, &change.action, &change.before, &change.after))
                    .or_default() += 1;
            }
            if !table.is_empty() {
                println!(
                    "\n  {:<60} {:<16} {:<22} count",
                    "agent", "action", "change"
                );
                for ((agent, action, before, after), n) in &table {
                    println!(
                        "  {agent:<60} {action:<16} {:<22} {n}",
                        format!("{before} -> {after}")
                    );
                }
                println!();
                for change in &report.changed {
                    println!(
                        "  {} {} {} {} {}: {} -> {}{}",
                        change.record,
                        change.request_id,
                        change.agent,
                        change.action,
                        change.resource,
                        change.before,
                        change.after,
                        if change.determining.is_empty() {
                            String::new()
                        } else {
                            format!(" by [{}]", change.determining.join(", "))
                        }
                    );
                }
            }
        }
    }
    ExitCode::SUCCESS
}
