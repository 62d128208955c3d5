//! `portcullis`: tracing, arguments, configuration, run, drain. See `portcullis --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use portcullis::config::Config;
use portcullis::{EXIT_CONFIG, EXIT_RUNTIME};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Zero Trust sidecar for AI workloads: mTLS identity, Cedar authorization, audit"
)]
struct Cli {
    /// Operational log format (stderr). Audit records have their own sink.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "PORTCULLIS_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar.
    Run(ConfigArgs),
    /// Check a configuration and its policies, certificates and bundles, or (with --policies)
    /// a policy directory alone; exit 0 or 64.
    Validate(ValidateArgs),
    /// Would this request be allowed, and why? No certificates or running proxy needed.
    /// Exit 0 allow, 1 deny or approval required, 64 bad input.
    Check(portcullis::cmd::check::CheckArgs),
    /// Run policy test files (YAML `cases:`), report coverage; exit 1 on a failure.
    Test(portcullis::cmd::test::TestArgs),
    /// Decide the requests of audit files again against a candidate policy set and list the
    /// decisions that change.
    Replay(portcullis::cmd::replay::ReplayArgs),
    /// Print least-privilege permit policies (one per agent) that allow exactly what audit
    /// files show was allowed.
    Suggest(portcullis::cmd::suggest::SuggestArgs),
    /// Prove with Cedar's symbolic compiler and cvc5 that each policy never errors and (with
    /// --baseline) that the set only narrows the baseline; counterexamples as `check` commands.
    /// Exit 0 proved, 1 a property fails, 64 bad input, 69 no solver.
    Analyze(portcullis::cmd::analyze::AnalyzeArgs),
    /// Run a self-contained demonstration on loopback: ephemeral CA and SVIDs, a streaming
    /// upstream, the example policies, scripted calls, and a table of what was decided.
    Demo(portcullis::demo::DemoArgs),
    /// Mint a local CA, a serving SVID and agent SVIDs for trying Portcullis out (never for
    /// production: use SPIRE or cert-manager csi-driver-spiffe there).
    DevCerts(portcullis::cmd::dev_certs::DevCertsArgs),
    /// Run the Kubernetes sidecar injection webhook (AdmissionReview over HTTPS).
    InjectWebhook {
        /// The webhook's YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Work with audit trails.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print the inventory of agent identities (as `GET /inventory` does) built from audit files.
    Inventory {
        /// Audit files, oldest first (e.g. audit.jsonl.2 audit.jsonl.1 audit.jsonl).
        #[arg(long = "audit", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
}

/// Where the config comes from.
#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// The YAML configuration file.
    #[arg(long, short, required_unless_present = "overrides")]
    config: Option<PathBuf>,
    /// A YAML mapping laid over the config file (mappings merge, other values replace), or the
    /// whole config without --config. The Kubernetes injector sets it in the container spec,
    /// which cannot change after the pod is created.
    #[arg(long = "override", value_name = "YAML")]
    overrides: Option<String>,
}

/// `validate`: a whole configuration, or a policy directory alone.
#[derive(Debug, clap::Args)]
struct ValidateArgs {
    /// The YAML configuration file.
    #[arg(long, short, required_unless_present_any = ["overrides", "policies"], conflicts_with = "policies")]
    config: Option<PathBuf>,
    /// A YAML mapping laid over the config file (as for `run`).
    #[arg(long = "override", value_name = "YAML", conflicts_with = "policies")]
    overrides: Option<String>,
    /// Validate this policy directory alone (schema, policies, entities.json): no config or
    /// certificates needed. Cedar validator warnings are printed.
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// With --policies: treat warnings as errors (exit 64).
    #[arg(long, requires = "policies")]
    strict: bool,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, portcullis::config::ConfigErrors> {
        match (&self.config, &self.overrides) {
            (config, Some(overrides)) => Config::load_with_override(config.as_deref(), overrides),
            (Some(config), None) => Config::load(config),
            // clap requires one of the two.
            (None, None) => Config::load_with_override(None, ""),
        }
    }
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain; report the first break (file, line, expected and found hash),
    /// and torn lines (a crash mid-write) that the next process start continues from.
    Verify {
        /// Audit files, oldest first; rotated files continue the chain of the one before.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The checkpoint verifying key (SPKI PEM `PUBLIC KEY`): checks every checkpoint's
        /// signature and reports, per process run, how many lines follow its last one (the
        /// unsigned tail).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Write a new Ed25519 checkpoint key pair: the private key for `audit.signing_key`, the
    /// public key for `audit verify --key`.
    Keygen {
        /// Where the private key goes (PKCS#8 PEM, created with mode 0600).
        #[arg(long)]
        private: PathBuf,
        /// Where the public key goes (SPKI PEM).
        #[arg(long)]
        public: PathBuf,
    },
}

/// `portcullis audit verify`: exit 0 for an intact trail, 1 for a break, 64 for bad input.
fn audit_verify(files: &[PathBuf], key: Option<PathBuf>) -> ExitCode {
    use portcullis_proxy::audit::{VerifyingKey, verify_trail};
    let key = match key.as_deref().map(VerifyingKey::from_pem_file).transpose() {
        Ok(key) => key,
        Err(error) => {
            eprintln!("error: --key: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match verify_trail(files, key.as_ref()) {
        Err(error) => {
            eprintln!("error: cannot read the audit files: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
        Ok(Err(broken)) => {
            eprintln!("{broken}");
            ExitCode::from(1)
        }
        Ok(Ok(summary)) => {
            let begins = if summary.mid_chain {
                "starts mid-chain (older files pruned; its first line is taken on trust)"
            } else {
                "starts at genesis"
            };
            println!(
                "ok: {} records in an unbroken chain ({} process starts), {begins}",
                summary.records, summary.starts
            );
            for tear in &summary.tears {
                println!("{tear}");
            }
            let started = |run: &portcullis_proxy::audit::RunSummary| match &run.started {
                Some(time) => format!("started {time}"),
                None => "started before the first line given".to_owned(),
            };
            if summary.stdout {
                println!(
                    "{} runs written to stdout, each chained within itself only (a run missing whole is for the log pipeline to detect):",
                    summary.runs.len()
                );
                for (index, run) in summary.runs.iter().enumerate() {
                    println!(
                        "  run {} {}: {} records",
                        index + 1,
                        started(run),
                        run.records
                    );
                }
            }
            match key {
                Some(_) => {
                    // The last run's tail is the summary's; an earlier run's is what it left
                    // unsealed (it stopped without its final checkpoint), which no later
                    // run's checkpoint covers.
                    let earlier = summary.runs.len().saturating_sub(1);
                    for (index, run) in summary.runs[..earlier].iter().enumerate() {
                        if run.unsigned > 0 {
                            println!(
                                "run {} ({}): {} lines after its last checkpoint, unsigned (it stopped without its final checkpoint)",
                                index + 1,
                                started(run),
                                run.unsigned
                            );
                        }
                    }
                    println!(
                        "{} signed checkpoints verified; unsigned tail: {} lines after the last checkpoint of the last run",
                        summary.checkpoints, summary.unsigned_tail
                    );
                    // Every line of such a trail could have been written by anyone with the
                    // files: the key vouches for none of it.
                    if summary.checkpoints == 0 && summary.records > 0 {
                        eprintln!(
                            "not vouched for: no checkpoint signed by this key anywhere in the trail (one made up from scratch has none; a trail younger than audit.checkpoint_interval has none yet)"
                        );
                        return ExitCode::from(1);
                    }
                }
                None => println!(
                    "{} checkpoints not verified (no --key); unsigned tail: {} lines (all)",
                    summary.checkpoints, summary.unsigned_tail
                ),
            }
            ExitCode::SUCCESS
        }
    }
}

/// `portcullis audit keygen`.
fn audit_keygen(private: &std::path::Path, public: &std::path::Path) -> ExitCode {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (private_pem, public_pem) = match portcullis_proxy::audit::SigningKey::generate() {
        Ok(pair) => pair,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(private)
        .and_then(|mut file| file.write_all(private_pem.as_bytes()))
        .and_then(|()| std::fs::write(public, public_pem));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => {
                let config = match args.load() {
                    Ok(config) => config,
                    Err(errors) => return config_failure(&errors),
                };
                let drain = config.drain_timeout;
                let options = match config.into_options().await {
                    Ok(options) => options,
                    Err(errors) => return config_failure(&errors),
                };
                log_start(&options);
                match portcullis::run(options, drain).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        tracing::error!(%error, "cannot start");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            }
            Command::Validate(ValidateArgs { policies: Some(dir), strict, .. }) => {
                portcullis::cmd::validate::run(&dir, strict)
            }
            Command::Check(args) => portcullis::cmd::check::run(args),
            Command::Test(args) => portcullis::cmd::test::run(args),
            Command::Replay(args) => portcullis::cmd::replay::run(args),
            Command::Suggest(args) => portcullis::cmd::suggest::run(args),
            Command::Analyze(args) => portcullis::cmd::analyze::run(args).await,
            Command::Validate(ValidateArgs { config, overrides, .. }) => {
                let args = ConfigArgs { config, overrides };
                let config = match args.load() {
                    Ok(config) => config,
                    Err(errors) => return config_failure(&errors),
                };
                let source = config.source.clone();
                // Builds the token verifier and connects to a Workload API too, so an unusable
                // key set or identity source fails validation.
                match config.into_options().await {
                    Ok(options) => {
                        let identity = options.identity.current.borrow().clone();
                        println!(
                            "{}: ok (serving {}; {} policies, hash {}; trust domains: {}; {} routes; user tokens: {}; mode {})",
                            source.display(),
                            identity.serving.id,
                            options.policy.policy_count(),
                            &options.policy.hash()[..12],
                            identity.trust_domains.join(", "),
                            options.routes.len(),
                            if options.user_token.is_some() { "verified" } else { "not configured" },
                            options.policy.mode().name(),
                        );
                        ExitCode::SUCCESS
                    }
                    Err(errors) => config_failure(&errors),
                }
            }
            Command::Demo(args) => portcullis::demo::run(args).await,
            Command::DevCerts(args) => portcullis::cmd::dev_certs::run(args),
            Command::Audit(AuditCommand::Verify { files, key }) => audit_verify(&files, key),
            Command::Audit(AuditCommand::Keygen { private, public }) => {
                audit_keygen(&private, &public)
            }
            Command::Inventory { files } => {
                let inventory = portcullis_proxy::inventory::Inventory::new();
                for file in &files {
                    let text = match std::fs::read_to_string(file) {
                        Ok(text) => text,
                        Err(error) => {
                            eprintln!("error: {}: {error}", file.display());
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    };
                    for (index, line) in text.lines().enumerate() {
                        match serde_json::from_str::<serde_json::Value>(line) {
                            Ok(record) => inventory.observe_audit_line(&record),
                            Err(error) => {
                                eprintln!("error: {}:{}: not JSON: {error}", file.display(), index + 1);
                                return ExitCode::from(EXIT_CONFIG);
                            }
                        }
                    }
                }
                println!("{}", serde_json::to_string_pretty(&inventory.to_json()).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Command::InjectWebhook { config } => {
                let config = match portcullis_injector::WebhookConfig::load(&config) {
                    Ok(config) => config,
                    Err(errors) => {
                        eprintln!("{}: invalid configuration:\n{errors}", config.display());
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                let validate = portcullis::webhook::validator();
                match portcullis_injector::serve(config, validate, portcullis::shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        tracing::error!(%error, "injection webhook failed");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            }
        }
    })
}

/// The async runtime, sized to the CPU this process may use. `available_parallelism` follows
/// both the CPU affinity mask and the cgroup quota (`cpu.max`, rounded down, at least 1), and
/// a sidecar usually gets one core or less: then one thread runs everything, with no
/// hand-offs between worker threads (a cross-thread wake-up costs more than the work of a
/// small request, and on one core a worker that is not running delays whatever it was woken
/// for).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(cores);
        builder
    };
    builder.enable_all().build()
}

fn config_failure(errors: &portcullis::config::ConfigErrors) -> ExitCode {
    eprintln!(
        "invalid configuration ({}):",
        portcullis::cmd::count(errors.0.len(), "error")
    );
    for error in &errors.0 {
        eprintln!("  {error}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// What an operator checks first in the logs of a starting sidecar: which policies, which
/// trust domains, which routes, which mode.
fn log_start(options: &portcullis_proxy::ProxyOptions) {
    let identity = options.identity.current.borrow().clone();
    let routes: Vec<String> = options
        .routes
        .iter()
        .map(|route| match &route.matcher {
            portcullis_proxy::PathMatch::Exact(path) => format!("{path} {:?}", route.protocol),
            portcullis_proxy::PathMatch::Prefix(path) => format!("{path}* {:?}", route.protocol),
        })
        .collect();
    tracing::info!(
        policy_hash = %options.policy.hash(),
        policies = options.policy.policy_count(),
        schema = match options.policy.schema_source() {
            portcullis_policy::SchemaSource::File => "file",
            portcullis_policy::SchemaSource::BuiltIn => "built-in",
        },
        shadow_policy_hash = %options
            .shadow_policy
            .as_ref()
            .map_or_else(|| "none".to_owned(), |s| s.hash().to_string()),
        trust_domains = %identity.trust_domains.join(","),
        routes = %routes.join(", "),
        mode = options.policy.mode().name(),
        "starting"
    );
    for warning in options.policy.warnings() {
        tracing::warn!(%warning, "policy warning");
    }
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never in a file or a log pipeline.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
