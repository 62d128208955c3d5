//! `portcullis analyze`: formal checks with Cedar's symbolic compiler and cvc5. Each policy
//! never errors; with `--baseline`, the set only narrows the baseline. Counterexamples are
//! printed as `check` commands. Exit 0 proved, 1 a property fails, 64 bad input, 69 no
//! solver, 70 the solver failed (timeout, unknown).

use std::path::PathBuf;
use std::process::ExitCode;

use portcullis_policy::tools::{self, AnalyzeError, Counterexample, Question};

use super::check::Output;
use super::{count, load_policies};

/// sysexits `EX_UNAVAILABLE`: the solver the analysis needs is not there.
pub const EXIT_NO_SOLVER: u8 = 69;

#[derive(Debug, clap::Args)]
pub struct AnalyzeArgs {
    /// Policy directory to analyse (the candidate, with --baseline).
    #[arg(long)]
    pub policies: PathBuf,
    /// The policy directory in force: prove that --policies allows nothing it denies.
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

pub async fn run(args: AnalyzeArgs) -> ExitCode {
    let engine = match load_policies(&args.policies) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let baseline = match &args.baseline {
        None => None,
        Some(dir) => match load_policies(dir) {
            Ok(engine) => Some(engine),
            Err(code) => return code,
        },
    };
    let report = match tools::analyze(&engine, baseline.as_ref()).await {
        Ok(report) => report,
        Err(error @ AnalyzeError::SolverMissing { .. }) => {
            eprintln!("error: {error}");
            eprintln!(
                "  analyze needs the cvc5 SMT solver (1.3 or later): set CVC5 to its path or put \
                 `cvc5` on PATH. Without a cvc5 executable, `pip install cvc5` and point CVC5 at \
                 .ci/cvc5-smt.py run by that Python (what `bash .ci/cvc5 --print-env` sets up)."
            );
            return ExitCode::from(EXIT_NO_SOLVER);
        }
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(crate::EXIT_RUNTIME);
        }
    };
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Output::Text => print!("{}", render(&report, &args)),
    }
    if report.proved() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn render(report: &tools::AnalysisReport, args: &AnalyzeArgs) -> String {
    let dir = args.policies.display();
    let mut out = format!(
        "{dir}: {} over {} (principal type, action, resource type)\n",
        count(report.never_errors.len(), "policy"),
        count(report.request_envs, "request environment")
    );
    for policy in &report.never_errors {
        if policy.proved {
            out.push_str(&format!("  proved: {} never errors\n", policy.policy));
        } else {
            out.push_str(&format!(
                "  FAILS: {} can error ({})\n",
                policy.policy,
                count(policy.counterexamples.len(), "counterexample")
            ));
            for cex in &policy.counterexamples {
                out.push_str(&counterexample(cex, &args.policies.display().to_string()));
            }
        }
    }
    if let (Some(narrows), Some(baseline)) = (&report.narrows, &args.baseline) {
        let baseline = baseline.display();
        if narrows.proved {
            out.push_str(&format!(
                "  proved: {dir} only narrows {baseline} (allows nothing {baseline} denies)\n"
            ));
        } else {
            out.push_str(&format!(
                "  FAILS: {dir} allows requests {baseline} denies ({})\n",
                count(narrows.counterexamples.len(), "counterexample")
            ));
            for cex in &narrows.counterexamples {
                out.push_str(&counterexample(cex, &format!("{dir}")));
            }
        }
    }
    out.push_str(if report.proved() {
        "all properties proved\n"
    } else {
        "some properties do not hold\n"
    });
    out
}

fn counterexample(cex: &Counterexample, dir: &str) -> String {
    let mut out = format!(
        "    {} {} {} ({} question)\n",
        cex.principal, cex.action, cex.resource, cex.principal_type
    );
    match &cex.question {
        Some(question) => {
            out.push_str(&format!("      {}\n", check_command(dir, question)));
            if !cex.reproduced {
                out.push_str(
                    "      (not reproduced by check: the solver's entity store, below, differs \
                     from entities.json or from what the proxy builds)\n",
                );
                out.push_str(&format!("      entities: {}\n", entities(&cex.entities)));
            }
        }
        None => out.push_str(&format!(
            "      context: {}\n      entities: {}\n",
            cex.context,
            entities(&cex.entities)
        )),
    }
    out
}

/// The solver's entities without the schema's actions (every store has those); the JSON
/// output keeps them all.
fn entities(all: &serde_json::Value) -> serde_json::Value {
    let kept: Vec<&serde_json::Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["uid"]["type"] != "Action")
        .collect();
    serde_json::json!(kept)
}

/// `question` as a `portcullis check` command line (bash quoting).
pub fn check_command(dir: &str, question: &Question) -> String {
    let mut words = vec![
        "portcullis check".to_owned(),
        format!("--policies {}", quote(dir)),
        format!("--agent {}", quote(&question.agent)),
    ];
    if let Some(user) = &question.user {
        let json = serde_json::to_string(user).unwrap_or_default();
        words.push(format!("--user <(echo {})", quote(&json)));
    }
    if let Some(action) = &question.action {
        words.push(format!("--action {}", quote(action)));
    }
    if let Some(resource) = &question.resource {
        words.push(format!("--resource {}", quote(resource)));
    }
    if let Some(host) = &question.host {
        words.push(format!("--host {}", quote(host)));
    }
    if let Some(now) = question.now {
        words.push(format!("--now={now}"));
    }
    if let Some(context) = &question.context {
        let json = serde_json::to_string(context).unwrap_or_default();
        words.push(format!("--context {}", quote(&json)));
    }
    words.join(" ")
}

fn quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}
