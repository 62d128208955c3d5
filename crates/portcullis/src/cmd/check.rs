//! `portcullis check`: would this request be allowed, and why? Exit 0 allow, 1 deny or
//! approval required, 64 bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use portcullis_policy::tools::{self, Question, UserSpec};

use super::load_policies;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy directory (*.cedar, schema.cedarschema, entities.json).
    #[arg(long)]
    pub policies: PathBuf,
    /// The calling agent's SPIFFE ID.
    #[arg(long)]
    pub agent: String,
    /// A JSON file of the user's token claims (sub, iss, scope, groups, email) for a
    /// delegated call; without it the call is autonomous.
    #[arg(long, value_name = "FILE.json")]
    pub user: Option<PathBuf>,
    /// HTTP method of a generic route request (with --path).
    #[arg(long, requires = "path", conflicts_with_all = ["action", "resource"])]
    pub method: Option<String>,
    /// Request path of a generic route request (with --method).
    #[arg(long, requires = "method")]
    pub path: Option<String>,
    /// Cedar action (invoke_model, call_tool, GET, ...), with --resource.
    #[arg(long, requires = "resource", required_unless_present = "method")]
    pub action: Option<String>,
    /// Cedar resource, e.g. 'Tool::"refund"', with --action.
    #[arg(long, requires = "action")]
    pub resource: Option<String>,
    /// Protocol fields as JSON: {"model": {...}, "mcp": {...}, "tool": {...}}.
    #[arg(long, value_name = "JSON")]
    pub context: Option<String>,
    /// The request's Host (default localhost).
    #[arg(long)]
    pub host: Option<String>,
    /// Unix seconds of the decision (context.now; default: now).
    #[arg(long, value_name = "UNIX_SECONDS", allow_hyphen_values = true)]
    pub now: Option<i64>,
    /// For a deny: name the permits whose scope matched but whose condition was false.
    #[arg(long)]
    pub explain: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

pub fn run(args: CheckArgs) -> ExitCode {
    let bad = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(crate::EXIT_CONFIG)
    };
    let user = match &args.user {
        None => None,
        Some(file) => match std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<UserSpec>(&text).map_err(|e| e.to_string()))
        {
            Ok(user) => Some(user),
            Err(e) => return bad(format!("--user {}: {e}", file.display())),
        },
    };
    let context = match &args.context {
        None => None,
        Some(text) => match serde_json::from_str(text) {
            Ok(context) => Some(context),
            Err(e) => return bad(format!("--context: not a JSON object: {e}")),
        },
    };
    let question = Question {
        agent: args.agent.clone(),
        user,
        method: args.method.clone(),
        path: args.path.clone(),
        action: args.action.clone(),
        resource: args.resource.clone(),
        host: args.host.clone(),
        context,
        now: args.now,
        client_address: None,
    };
    let engine = match load_policies(&args.policies) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let answer = match tools::check(&engine, &question, args.explain) {
        Ok(answer) => answer,
        Err(e) => return bad(e.to_string()),
    };
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        ),
        Output::Text => print!("{}", render(&answer)),
    }
    if answer.decision == "allow" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The answer as a person reads it.
pub fn render(answer: &tools::Answer) -> String {
    let mut out = format!("decision: {}\n", answer.decision);
    let mut question = |name: &str, o: &tools::Outcome| {
        out.push_str(&format!(
            "{name} question: {}\n",
            if o.allowed { "allow" } else { "deny" }
        ));
        if o.determining.is_empty() {
            if !o.allowed {
                out.push_str("  no permit applies\n");
            }
        } else {
            out.push_str(&format!("  determining: {}\n", o.determining.join(", ")));
        }
        for error in &o.errors {
            out.push_str(&format!("  error: {error}\n"));
        }
        match &o.near_misses {
            Some(near) if near.is_empty() => {
                out.push_str("  no permit's scope matched this principal, action and resource\n");
            }
            Some(near) => out.push_str(&format!(
                "  almost: {} (scope matched, condition false)\n",
                near.join(", ")
            )),
            None => {}
        }
    };
    question("agent", &answer.agent);
    match &answer.user {
        Some(user) => question("user", user),
        None => out.push_str("user question: none (autonomous call)\n"),
    }
    out.push_str(&format!("policy hash: {}\n", &answer.policy_hash[..12]));
    out
}
