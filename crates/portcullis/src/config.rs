//! The configuration file: YAML → raw serde structs → [`Config::load`], which checks every
//! value, loads every referenced file (certificates, bundles, policies) and reports *all*
//! problems at once, each with its YAML path. `portcullis validate` and `portcullis run` go
//! through the same code, so a file that validates is a file that starts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use portcullis_core::TrustDomain;
use portcullis_identity::serving::{self, ServingFile};
use portcullis_identity::user_token::{
    JwksSource, UserTokenSettings, UserTokenVerifier, parse_algorithm,
};
use portcullis_identity::workload_api::{self, Endpoint};
use portcullis_identity::{
    IdentityFeed, IdentityFiles, IdentitySnapshot, ServerIdentity, ServerIdentityError,
    TrustBundles,
};
use portcullis_policy::{Mode, PolicyEngine};
use portcullis_proxy::{AuditSink, Limits, PathMatch, Protocol, RouteRule};
use serde::Deserialize;

mod consequential;
pub use consequential::ApprovalConfig;

/// One configuration problem: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---- the file, as written --------------------------------------------------------------
//
// Leaves that need parsing (addresses, durations, URLs) are strings here, so that a bad value
// becomes a collected error with its path instead of stopping deserialization.

#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    upstream: Option<String>,
    tls: Option<RawTls>,
    user_token: Option<RawUserToken>,
    policy: Option<RawPolicy>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    audit: Option<RawAudit>,
    limits: Option<RawLimits>,
    /// On SIGTERM, how long in-flight requests may take to finish (default `20s`).
    shutdown_grace: Option<String>,
    telemetry: Option<RawTelemetry>,
    reject_standing_credentials: Option<bool>,
    /// Grants for `@approval("required")` calls.
    approval: Option<consequential::RawApproval>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    #[serde(default)]
    trust_bundles: BTreeMap<String, String>,
    /// How often the files are checked for a rotated certificate or bundle.
    reload_interval: Option<String>,
    /// `unix:///…`: take the SVID and every bundle from the SPIFFE Workload API instead.
    workload_api: Option<String>,
    /// How long startup waits for the Workload API's first usable SVID.
    workload_api_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawUserToken {
    header: Option<String>,
    jwks_file: Option<String>,
    jwks_url: Option<String>,
    jwks_ca_file: Option<String>,
    jwks_refresh_interval: Option<String>,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
    algorithms: Option<Vec<String>>,
    max_lifetime: Option<String>,
    clock_skew: Option<String>,
    groups_claim: Option<String>,
    require_actor_binding: Option<bool>,
    max_token_bytes: Option<usize>,
    max_actor_depth: Option<usize>,
    /// Accepted `typ` header values (default `[JWT, at+jwt]`); a token without `typ` passes.
    allowed_types: Option<Vec<String>>,
    /// How long a key set that cannot be refreshed is still trusted (default 1h).
    jwks_max_stale: Option<String>,
    /// Issuers with a key set of their own, besides `issuers` (which share `jwks_file` /
    /// `jwks_url`): a key from one set verifies tokens of its own issuer only.
    #[serde(default)]
    issuer_keys: Vec<RawIssuerKeys>,
}

#[derive(Debug, Default, Deserialize)]
struct RawIssuerKeys {
    issuer: Option<String>,
    jwks_file: Option<String>,
    jwks_url: Option<String>,
    jwks_ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPolicy {
    dir: Option<String>,
    /// A candidate set decided beside `dir` on every request, never enforced.
    shadow_dir: Option<String>,
    mode: Option<String>,
    reload_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRoute {
    path: Option<String>,
    path_prefix: Option<String>,
    protocol: Option<String>,
    #[serde(default)]
    forward_user_token: bool,
    /// Bytes of a protocol route's body read for inspection (default: limits.body_prefix_bytes).
    body_limit: Option<usize>,
    /// `sensitive` (default) or `insensitive`.
    match_case: Option<String>,
    /// What the sidecar attaches upstream after a permit.
    credential: Option<consequential::RawCredential>,
}

#[derive(Debug, Default, Deserialize)]
struct RawAudit {
    sink: Option<String>,
    /// Rotate the audit file when it would exceed this many bytes.
    max_file_bytes: Option<u64>,
    /// Rotated files kept (`audit.jsonl.1` … `.N`).
    max_files: Option<usize>,
    /// Ed25519 key (PKCS#8 PEM) that signs checkpoints.
    signing_key: Option<String>,
    /// How often a signed checkpoint is written while records come (default 60s).
    checkpoint_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTelemetry {
    max_agent_labels: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLimits {
    max_header_bytes: Option<usize>,
    body_prefix_bytes: Option<usize>,
    header_read_timeout: Option<String>,
    request_timeout: Option<String>,
    body_timeout: Option<String>,
    response_body_timeout: Option<String>,
    idle_timeout: Option<String>,
    handshake_timeout: Option<String>,
    connect_timeout: Option<String>,
    drain_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_agent: Option<usize>,
    max_pending_handshakes: Option<usize>,
    max_h2_streams: Option<u32>,
    max_inflight: Option<usize>,
    max_inflight_per_agent: Option<usize>,
    inspect_memory_bytes: Option<usize>,
    inspect_timeout: Option<String>,
    max_batch: Option<usize>,
    /// Token buckets per agent, user or tool.
    #[serde(default)]
    rate: Vec<consequential::RawRate>,
}

// ---- the checked result -------------------------------------------------------------------

/// The two producers of the live identity.
#[derive(Debug)]
pub enum IdentitySource {
    /// Files, loaded and checked, with the watcher that keeps them current.
    Files(IdentityFeed),
    /// The SPIFFE Workload API, connected to when the proxy's options are built.
    WorkloadApi {
        endpoint: Endpoint,
        timeout: Duration,
    },
}

impl IdentitySource {
    /// The feed the proxy consumes; for the Workload API, once its first usable SVID arrived.
    async fn into_feed(self) -> Result<IdentityFeed, ConfigErrors> {
        match self {
            IdentitySource::Files(feed) => Ok(feed),
            IdentitySource::WorkloadApi { endpoint, timeout } => {
                workload_api::feed(endpoint, timeout).await.map_err(|e| {
                    ConfigErrors(vec![ConfigError {
                        path: "tls.workload_api".to_owned(),
                        message: e.to_string(),
                    }])
                })
            }
        }
    }
}

/// A configuration that passed every check, with its files loaded.
#[derive(Debug)]
pub struct Config {
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: Authority,
    /// Where the serving SVID and bundles come from.
    pub identity: IdentitySource,
    pub user_token: Option<UserTokenConfig>,
    pub policy: Arc<PolicyEngine>,
    /// `policy.shadow_dir`, loaded.
    pub shadow_policy: Option<Arc<PolicyEngine>>,
    pub policy_reload_interval: Duration,
    pub routes: Vec<RouteRule>,
    pub audit: AuditSink,
    /// `audit.signing_key` and `audit.checkpoint_interval`.
    pub audit_checkpoints: Option<portcullis_proxy::audit::Checkpoints>,
    pub limits: Limits,
    /// `shutdown_grace` (or its older name `limits.drain_timeout`): how long in-flight
    /// requests may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    pub reject_standing_credentials: bool,
    pub max_agent_labels: usize,
    pub approval: Option<ApprovalConfig>,
    /// `limits.rate`.
    pub rate: Vec<portcullis_proxy::rate::RateRule>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&text, base, path)
    }

    /// `portcullis run [--config FILE] --override YAML`: the injected sidecar's form. The
    /// override is a YAML mapping laid over the file (see [`overlay`]); without a file it is
    /// the whole config. Relative paths resolve against the file's directory.
    pub fn load_with_override(path: Option<&Path>, overrides: &str) -> Result<Self, ConfigErrors> {
        let text = match path {
            None => String::new(),
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    path: path.display().to_string(),
                    message: format!("cannot read: {e}"),
                }])
            })?,
        };
        let merged = overlay(&text, overrides)?;
        let source = path.unwrap_or(Path::new("--override"));
        let base = path.and_then(Path::parent).unwrap_or(Path::new("/"));
        Self::from_yaml(&merged, base, source)
    }

    /// Parses and checks `text`; relative paths are resolved against `base`.
    pub fn from_yaml(text: &str, base: &Path, source: &Path) -> Result<Self, ConfigErrors> {
        let base = Base {
            dir: base,
            confinement: None,
        };
        match checked(text, base, source) {
            (Some(config), errors) if errors.0.is_empty() => Ok(config),
            (_, errors) => Err(ConfigErrors(errors.0)),
        }
    }

    /// Checks `text` away from where it will run (the injection webhook checking a pod's
    /// config ConfigMap): as [`Config::from_yaml`], but every file or directory the config
    /// names is first put to `confinement`, from its path alone, before any filesystem call.
    /// Nothing outside `dir` is ever opened. The pieces whose files exist only where the
    /// config runs are not built, so there is no [`Config`] to return: only the errors.
    pub fn check_confined(
        text: &str,
        dir: &Path,
        confinement: &Confinement<'_>,
    ) -> Result<(), ConfigErrors> {
        let base = Base {
            dir,
            confinement: Some(confinement),
        };
        match checked(text, base, dir) {
            (_, errors) if errors.0.is_empty() => Ok(()),
            (_, errors) => Err(ConfigErrors(errors.0)),
        }
    }

    /// The options the proxy runs with. Async because a `jwks_url` is fetched here: a key
    /// set that cannot be loaded is a configuration error, reported like the others.
    pub async fn into_options(self) -> Result<portcullis_proxy::ProxyOptions, ConfigErrors> {
        let identity = self.identity.into_feed().await?;
        let user_token = match self.user_token {
            None => None,
            Some(config) => {
                let source_path = match &config.settings.jwks {
                    JwksSource::File(_) => "user_token.jwks_file",
                    JwksSource::Url { .. } => "user_token.jwks_url",
                };
                let verifier = UserTokenVerifier::new(config.settings).await.map_err(|e| {
                    ConfigErrors(vec![ConfigError {
                        path: source_path.to_owned(),
                        message: e.to_string(),
                    }])
                })?;
                let mut by_issuer = Vec::new();
                for (index, settings) in config.issuer_settings.into_iter().enumerate() {
                    let issuer = settings.issuers.first().cloned().unwrap_or_default();
                    let own = UserTokenVerifier::new(settings).await.map_err(|e| {
                        ConfigErrors(vec![ConfigError {
                            path: format!("user_token.issuer_keys[{index}]"),
                            message: e.to_string(),
                        }])
                    })?;
                    by_issuer.push((issuer, own));
                }
                Some(portcullis_proxy::UserTokens {
                    verifier,
                    by_issuer,
                    header: config.header,
                })
            }
        };
        let approval = match self.approval {
            None => None,
            Some(config) => {
                // `aud` of a grant is this sidecar: a grant for another sidecar's call is
                // useless here even if the digest matched.
                let mut settings = config.settings;
                settings.audiences = vec![identity.current.borrow().serving.id.to_string()];
                let clock_skew = settings.clock_skew;
                let max_lifetime = settings.max_lifetime;
                let verifier = UserTokenVerifier::new(settings).await.map_err(|e| {
                    ConfigErrors(vec![ConfigError {
                        path: "approval.jwks_file".to_owned(),
                        message: e.to_string(),
                    }])
                })?;
                Some(portcullis_proxy::approval::ApprovalOptions {
                    verifier,
                    max_lifetime,
                    clock_skew,
                    max_tracked_grants: config.max_tracked_grants,
                })
            }
        };
        Ok(portcullis_proxy::ProxyOptions {
            listen: self.listen,
            admin_listen: self.admin_listen,
            identity,
            policy: self.policy,
            shadow_policy: self.shadow_policy,
            policy_reload_interval: self.policy_reload_interval,
            upstream: self.upstream,
            routes: self.routes,
            limits: self.limits,
            audit: self.audit,
            audit_checkpoints: self.audit_checkpoints,
            user_token,
            reject_standing_credentials: self.reject_standing_credentials,
            max_agent_labels: self.max_agent_labels,
            approval,
            rate: self.rate,
        })
    }
}

/// `user_token`, checked; the verifier is built from it by [`Config::into_options`].
#[derive(Debug, Clone)]
pub struct UserTokenConfig {
    pub header: http::HeaderName,
    pub settings: UserTokenSettings,
    /// `user_token.issuer_keys`: one settings per issuer, with its own key set and only that
    /// issuer accepted (the other knobs as in `settings`).
    pub issuer_settings: Vec<UserTokenSettings>,
}

#[derive(Debug, Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// How the loader uses a path a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileUse {
    /// Reads the file, or the directory (`policy.dir`, `policy.shadow_dir`).
    Read,
    /// Writes the file (a file `audit.sink`).
    Write,
}

/// A path a config names, put to a [`Confinement`].
#[derive(Debug, Clone, Copy)]
pub struct FileRef<'a> {
    /// Its YAML path (`routes[0].credential.file`).
    pub key: &'a str,
    /// The value as written.
    pub value: &'a str,
    /// As it is where the config runs: resolved against [`Confinement::config_dir`] and
    /// normalised lexically (`.` and `..` folded, no filesystem call).
    pub resolved: &'a Path,
    pub usage: FileUse,
}

/// What a [`Confinement`] answers for a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A file of the config directory: looked for in the loader's directory, which stands for
    /// [`Confinement::config_dir`]. Only for paths under it.
    Here,
    /// Exists only where the config runs: not looked for, no error, and the piece that needs
    /// it is not built.
    Elsewhere,
    /// Refused, without being looked for, with this message (at the value's YAML path).
    Refused(String),
}

/// The file-access rule of a config checked away from where it runs
/// ([`Config::check_confined`]). `portcullis run`, `validate` and the rest have none: a path
/// is whatever the file system there has.
pub struct Confinement<'a> {
    /// The config directory where the config runs (`/etc/portcullis/config` in a pod).
    pub config_dir: &'a Path,
    /// Decides for each path, before any filesystem call.
    pub rule: &'a dyn Fn(FileRef<'_>) -> Access,
}

impl fmt::Debug for Confinement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confinement")
            .field("config_dir", &self.config_dir)
            .finish_non_exhaustive()
    }
}

/// `path` with `.` and `..` folded without touching the file system (`..` of the root is the
/// root): `/etc/portcullis/config/../secret/k` is `/etc/portcullis/secret/k`.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The directory a config's relative paths resolve against, and its [`Confinement`] if any.
#[derive(Clone, Copy)]
struct Base<'a> {
    dir: &'a Path,
    confinement: Option<&'a Confinement<'a>>,
}

impl Base<'_> {
    /// Where to look for `value` (at YAML path `key`), or `None`: refused (the error added)
    /// or left to where the config runs (no error). Unconfined: `dir` joined with `value`.
    fn resolve(
        &self,
        key: &str,
        value: &str,
        usage: FileUse,
        errors: &mut Errors,
    ) -> Option<PathBuf> {
        let Some(confinement) = self.confinement else {
            return Some(self.dir.join(value));
        };
        let resolved = normalize(&confinement.config_dir.join(value));
        let access = (confinement.rule)(FileRef {
            key,
            value,
            resolved: &resolved,
            usage,
        });
        match access {
            Access::Here => match resolved.strip_prefix(confinement.config_dir) {
                Ok(relative) => Some(self.dir.join(relative)),
                // A rule answering `Here` for a path elsewhere: never opened.
                Err(_) => {
                    errors.add(
                        key,
                        format!("{value:?} is not in {}", confinement.config_dir.display()),
                    );
                    None
                }
            },
            Access::Elsewhere => None,
            Access::Refused(message) => {
                errors.add(key, message);
                None
            }
        }
    }
}

/// Parses `text` and checks it; the config when every piece was built.
fn checked(text: &str, base: Base<'_>, source: &Path) -> (Option<Config>, Errors) {
    let mut errors = Errors::default();
    // A file that does not parse has no values to check: reporting them all `required`
    // too would bury the one true error under untrue ones.
    let Some(raw) = parse(text, &mut errors) else {
        return (None, errors);
    };
    let config = check(raw, base, source, &mut errors);
    (config, errors)
}

/// YAML → raw structs. Unknown keys are all collected (not just the first), each with its
/// path; a value of the wrong shape stops parsing with its path.
fn parse(text: &str, errors: &mut Errors) -> Option<RawConfig> {
    let value: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            // The position goes in front, once; serde_yaml repeats it inside its message.
            let mut message = e.to_string();
            let at = match e.location() {
                Some(l) => {
                    message = message
                        .replace(&format!(" at line {} column {}", l.line(), l.column()), "");
                    format!("line {} column {}", l.line(), l.column())
                }
                None => "(document)".to_owned(),
            };
            errors.add(at, format!("not valid YAML: {message}"));
            return None;
        }
    };
    if value.is_null() {
        errors.add("(document)", "the configuration is empty");
        return None;
    }
    let mut unknown = Vec::new();
    let mut record_unknown =
        |path: serde_ignored::Path<'_>| unknown.push(yaml_path(&path.to_string()));
    let deserializer = serde_ignored::Deserializer::new(value, &mut record_unknown);
    let parsed: Result<RawConfig, _> = serde_path_to_error::deserialize(deserializer);
    for path in unknown {
        errors.add(path, "unknown field");
    }
    match parsed {
        Ok(raw) => Some(raw),
        Err(e) => {
            let path = e.path().to_string();
            errors.add(
                if path == "." {
                    "(document)".to_owned()
                } else {
                    path
                },
                e.into_inner().to_string(),
            );
            None
        }
    }
}

/// serde_ignored's `limits.?.key` / `routes.0.key` as the YAML path a person writes:
/// `limits.key`, `routes[0].key`.
fn yaml_path(ignored: &str) -> String {
    let mut out = String::new();
    for segment in ignored.split('.').filter(|s| *s != "?") {
        if segment.chars().all(|c| c.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

fn check(raw: RawConfig, base: Base<'_>, source: &Path, errors: &mut Errors) -> Option<Config> {
    let listen = socket_addr("listen", raw.listen.as_deref(), errors);
    let admin_listen = socket_addr("admin_listen", raw.admin_listen.as_deref(), errors);
    if let (Some(a), Some(b)) = (listen, admin_listen)
        && a == b
        && a.port() != 0
    {
        errors.add("admin_listen", "must differ from listen");
    }
    let upstream = upstream(raw.upstream.as_deref(), errors);
    let old_drain = raw
        .limits
        .as_ref()
        .is_some_and(|l| l.drain_timeout.is_some());
    let shutdown_grace = duration("shutdown_grace", raw.shutdown_grace.as_deref(), errors);
    if shutdown_grace.is_some() && old_drain {
        errors.add(
            "shutdown_grace",
            "set either shutdown_grace or limits.drain_timeout (its older name), not both",
        );
    }
    let mut raw_limits = raw.limits.unwrap_or_default();
    let rate = consequential::rates(std::mem::take(&mut raw_limits.rate), errors);
    let limits = limits(raw_limits, errors);
    let approval = raw
        .approval
        .and_then(|raw| consequential::approval(raw, base, errors));
    let identity = tls(raw.tls, base, errors);
    let before = errors.0.len();
    let user_token = raw.user_token.map(|raw| user_token(raw, base, errors));
    // Set, but not built and no error: its key set is a file only where the config runs.
    let user_token_elsewhere = matches!(user_token, Some(None)) && errors.0.len() == before;
    let user_token = user_token.flatten();
    let shadow_policy = shadow_policy(raw.policy.as_ref(), base, errors);
    let (policy, policy_reload_interval) = policy(raw.policy, base, errors);
    let routes = routes(raw.routes, base, errors);
    let audit_checkpoints = checkpoints(raw.audit.as_ref(), base, errors);
    if user_token.is_none() && !user_token_elsewhere {
        // An exchange's subject is the user's token: without tokens there is nothing to
        // exchange, and every call on the route would fail.
        for (index, route) in routes.iter().flatten().enumerate() {
            if matches!(
                route.credential,
                Some(portcullis_proxy::credential::CredentialSpec::TokenExchange(
                    _
                ))
            ) {
                errors.add(
                    format!("routes[{index}].credential.token_exchange"),
                    "needs user_token: the user's token is what is exchanged",
                );
            }
        }
    }
    let audit = audit(raw.audit, base, errors);
    let (limits, drain_timeout) = limits?;
    let drain_timeout = shutdown_grace.unwrap_or(drain_timeout);
    Some(Config {
        source: source.to_owned(),
        listen: listen?,
        admin_listen: admin_listen?,
        upstream: upstream?,
        identity: identity?,
        user_token,
        policy: Arc::new(policy?),
        shadow_policy,
        policy_reload_interval,
        routes: routes?,
        audit: audit?,
        audit_checkpoints: audit_checkpoints?,
        limits,
        drain_timeout,
        reject_standing_credentials: raw.reject_standing_credentials.unwrap_or(false),
        max_agent_labels: raw
            .telemetry
            .and_then(|t| t.max_agent_labels)
            .unwrap_or(100),
        approval,
        rate,
    })
}

fn required<'a>(path: &str, value: Option<&'a str>, errors: &mut Errors) -> Option<&'a str> {
    match value {
        Some(value) if !value.trim().is_empty() => Some(value),
        _ => {
            errors.add(path, "required");
            None
        }
    }
}

fn socket_addr(path: &str, value: Option<&str>, errors: &mut Errors) -> Option<SocketAddr> {
    let value = required(path, value, errors)?;
    match value.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.add(
                path,
                format!("{value:?} is not an address like 0.0.0.0:8443"),
            );
            None
        }
    }
}

/// The longest `max_lifetime` a user token may be allowed: tokens are short-lived (DESIGN),
/// and one stolen lives as long as this.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The largest `clock_skew`: an expired token is accepted for this long.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// An error at `path` when `value` is longer than `max`.
fn check_short(errors: &mut Errors, path: &str, value: Option<Duration>, max: Duration) {
    if let Some(value) = value
        && value > max
    {
        errors.add(
            path,
            format!(
                "at most {}s ({}s here): a longer one keeps a stolen or expired token usable that long",
                max.as_secs(),
                value.as_secs()
            ),
        );
    }
}

/// `http://host:port` of the application in the pod. Plain HTTP only: the hop is inside the
/// pod's network namespace, so the host is a loopback address (the request carries the
/// verified identities, and a credential or user token when a route adds one, in cleartext;
/// an application reachable on another address could be called past the sidecar with
/// identity headers of the caller's own making).
fn upstream(value: Option<&str>, errors: &mut Errors) -> Option<Authority> {
    let value = required("upstream", value, errors)?;
    let uri: http::Uri = match value.parse() {
        Ok(uri) => uri,
        Err(_) => {
            errors.add("upstream", format!("{value:?} is not a URL"));
            return None;
        }
    };
    if uri.scheme_str() != Some("http") {
        errors.add(
            "upstream",
            "must be an http:// URL (the application in the pod)",
        );
        return None;
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        errors.add("upstream", "must not have a path or query");
        return None;
    }
    let loopback = |host: &str| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    match uri.authority() {
        Some(authority) if authority.port_u16().is_some() && !authority.as_str().contains('@') => {
            if !loopback(authority.host()) {
                errors.add(
                    "upstream",
                    format!(
                        "{value:?} is not a loopback address: the application must listen on localhost (127.0.0.1, ::1), where only the sidecar reaches it"
                    ),
                );
                return None;
            }
            Some(authority.clone())
        }
        _ => {
            errors.add(
                "upstream",
                "must name a host and port, e.g. http://127.0.0.1:8080",
            );
            None
        }
    }
}

fn file(base: Base<'_>, path: &str, value: Option<&str>, errors: &mut Errors) -> Option<PathBuf> {
    let value = required(path, value, errors)?;
    let resolved = base.resolve(path, value, FileUse::Read, errors)?;
    if resolved.is_file() {
        Some(resolved)
    } else {
        errors.add(path, format!("file not found: {}", resolved.display()));
        None
    }
}

/// `tls`: either the Workload API, or files: every file loads, and the serving identity is
/// one agents will accept (a valid X509-SVID, its key, chaining to its own trust domain's
/// bundle), each problem reported at the YAML path of the file it is about.
fn tls(raw: Option<RawTls>, base: Base<'_>, errors: &mut Errors) -> Option<IdentitySource> {
    let Some(raw) = raw else {
        errors.add("tls", "required");
        return None;
    };
    match raw.workload_api.as_deref() {
        Some(endpoint) => tls_workload_api(endpoint, &raw, errors),
        None => tls_files(raw, base, errors).map(IdentitySource::Files),
    }
}

fn tls_workload_api(endpoint: &str, raw: &RawTls, errors: &mut Errors) -> Option<IdentitySource> {
    // One source of identity: files beside the Workload API would be a second, silent one.
    for (key, set) in [
        ("tls.cert", raw.cert.is_some()),
        ("tls.key", raw.key.is_some()),
        ("tls.trust_bundles", !raw.trust_bundles.is_empty()),
        ("tls.reload_interval", raw.reload_interval.is_some()),
    ] {
        if set {
            errors.add(key, "cannot be combined with tls.workload_api");
        }
    }
    let timeout = duration(
        "tls.workload_api_timeout",
        raw.workload_api_timeout.as_deref(),
        errors,
    )
    .unwrap_or(Duration::from_secs(30));
    match Endpoint::parse(endpoint) {
        Ok(endpoint) => Some(IdentitySource::WorkloadApi { endpoint, timeout }),
        Err(e) => {
            errors.add("tls.workload_api", e.to_string());
            None
        }
    }
}

fn tls_files(raw: RawTls, base: Base<'_>, errors: &mut Errors) -> Option<IdentityFeed> {
    if raw.workload_api_timeout.is_some() {
        errors.add(
            "tls.workload_api_timeout",
            "only applies with tls.workload_api",
        );
    }
    let before = errors.0.len();
    let cert = file(base, "tls.cert", raw.cert.as_deref(), errors);
    let key = file(base, "tls.key", raw.key.as_deref(), errors);
    let reload_interval = duration(
        "tls.reload_interval",
        raw.reload_interval.as_deref(),
        errors,
    )
    .unwrap_or(Duration::from_secs(5));
    let mut bundles = TrustBundles::new();
    let mut bundle_files = Vec::new();
    if raw.trust_bundles.is_empty() {
        errors.add("tls.trust_bundles", "at least one trust domain is required");
    }
    for (domain, bundle_path) in &raw.trust_bundles {
        let path = format!("tls.trust_bundles.{domain}");
        let domain = match TrustDomain::parse(domain) {
            Ok(domain) => domain,
            Err(e) => {
                errors.add(&path, format!("not a valid trust domain: {e}"));
                continue;
            }
        };
        let Some(file) = file(base, &path, Some(bundle_path), errors) else {
            continue;
        };
        match portcullis_identity::bundle::read_bundle(&file, SystemTime::now()) {
            Ok(bundle) => {
                bundles.insert(domain.clone(), bundle);
                bundle_files.push((domain, file));
            }
            Err(e) => errors.add(&path, e.to_string()),
        }
    }
    let (Some(cert), Some(key)) = (cert, key) else {
        return None;
    };
    let identity = match ServerIdentity::load(&cert, &key) {
        Ok(identity) => identity,
        Err(e @ ServerIdentityError::Key { .. }) => {
            errors.add("tls.key", e.to_string());
            return None;
        }
        Err(e) => {
            errors.add("tls.cert", e.to_string());
            return None;
        }
    };
    if let Err(problems) = serving::check_serving(&identity, &bundles, SystemTime::now()) {
        for problem in problems {
            match problem.file() {
                ServingFile::Cert => errors.add("tls.cert", problem.to_string()),
                ServingFile::Key => errors.add(
                    "tls.key",
                    format!(
                        "{problem} (key {}, certificate {})",
                        key.display(),
                        cert.display()
                    ),
                ),
                ServingFile::Bundles => errors.add("tls.trust_bundles", problem.to_string()),
            }
        }
    }
    if errors.0.len() != before {
        return None;
    }
    let files = IdentityFiles {
        cert,
        key,
        bundles: bundle_files,
    };
    match files.feed(IdentitySnapshot { identity, bundles }, reload_interval) {
        Ok(feed) => Some(feed),
        Err(e) => {
            errors.add("tls", e.to_string());
            None
        }
    }
}

/// `jwks_file` or `jwks_url` (with `jwks_ca_file`) under `path`.
fn jwks_source(
    path: &str,
    jwks_file: Option<&str>,
    jwks_url: Option<&str>,
    jwks_ca_file: Option<&str>,
    base: Base<'_>,
    errors: &mut Errors,
) -> Option<JwksSource> {
    match (jwks_file, jwks_url) {
        (Some(_), Some(_)) => {
            errors.add(path, "set one of jwks_file and jwks_url, not both");
            None
        }
        (None, None) => {
            errors.add(path, "one of jwks_file or jwks_url is required");
            None
        }
        (Some(file_path), None) => {
            file(base, &format!("{path}.jwks_file"), Some(file_path), errors).map(JwksSource::File)
        }
        (None, Some(url)) => {
            let ca_file = jwks_ca_file
                .and_then(|ca| file(base, &format!("{path}.jwks_ca_file"), Some(ca), errors));
            Some(JwksSource::Url {
                url: url.to_owned(),
                ca_file,
            })
        }
    }
}

fn user_token(raw: RawUserToken, base: Base<'_>, errors: &mut Errors) -> Option<UserTokenConfig> {
    let before = errors.0.len();
    let header_name = raw.header.as_deref().unwrap_or("x-portcullis-user-token");
    let header = match http::HeaderName::from_bytes(header_name.as_bytes()) {
        Ok(header) => Some(header),
        Err(_) => {
            errors.add(
                "user_token.header",
                format!("{header_name:?} is not a header name"),
            );
            None
        }
    };
    let jwks = jwks_source(
        "user_token",
        raw.jwks_file.as_deref(),
        raw.jwks_url.as_deref(),
        raw.jwks_ca_file.as_deref(),
        base,
        errors,
    );
    if raw.issuers.is_empty() {
        errors.add("user_token.issuers", "at least one issuer is required");
    }
    if raw.audiences.is_empty() {
        errors.add("user_token.audiences", "at least one audience is required");
    }
    let mut algorithms = Vec::new();
    for (index, name) in raw.algorithms.unwrap_or_default().iter().enumerate() {
        match parse_algorithm(name) {
            Ok(alg) => algorithms.push(alg),
            Err(e) => errors.add(format!("user_token.algorithms[{index}]"), e.to_string()),
        }
    }
    let max_lifetime = match raw.max_lifetime.as_deref() {
        None => {
            errors.add(
                "user_token.max_lifetime",
                "required: tokens must be short-lived",
            );
            None
        }
        lifetime => duration("user_token.max_lifetime", lifetime, errors),
    };
    let clock_skew = duration("user_token.clock_skew", raw.clock_skew.as_deref(), errors);
    check_short(
        errors,
        "user_token.max_lifetime",
        max_lifetime,
        MAX_TOKEN_LIFETIME,
    );
    check_short(errors, "user_token.clock_skew", clock_skew, MAX_CLOCK_SKEW);
    let refresh = duration(
        "user_token.jwks_refresh_interval",
        raw.jwks_refresh_interval.as_deref(),
        errors,
    );
    let max_stale = duration(
        "user_token.jwks_max_stale",
        raw.jwks_max_stale.as_deref(),
        errors,
    );
    // A key set refreshed on time is `jwks_refresh_interval` plus one fetch old when the next
    // refresh lands: a bound no longer than that would refuse every token for part of each
    // period although no refresh failed. Checked on the values in force, defaults included;
    // a fetch is a URL's timeout, or a second for files (a read, and the timer's slack).
    let in_force_refresh = refresh.unwrap_or(UserTokenSettings::DEFAULT_JWKS_REFRESH_INTERVAL);
    let in_force_stale = max_stale.unwrap_or(UserTokenSettings::DEFAULT_JWKS_MAX_STALE);
    let fetch = if raw.jwks_url.is_some() || raw.issuer_keys.iter().any(|k| k.jwks_url.is_some()) {
        UserTokenSettings::DEFAULT_JWKS_FETCH_TIMEOUT
    } else {
        Duration::from_secs(1)
    };
    if in_force_stale <= in_force_refresh + fetch {
        let (path, subject) = if raw.jwks_max_stale.is_some() {
            ("user_token.jwks_max_stale", "must be")
        } else {
            (
                "user_token.jwks_refresh_interval",
                "too long for jwks_max_stale's default (1h), which must be",
            )
        };
        errors.add(
            path,
            format!(
                "{subject} longer than jwks_refresh_interval plus a fetch ({}s + {}s): a key set refreshed on time would read as stale",
                in_force_refresh.as_secs(),
                fetch.as_secs()
            ),
        );
    }
    if raw
        .allowed_types
        .as_ref()
        .is_some_and(|types| types.is_empty() || types.iter().any(|t| t.trim().is_empty()))
    {
        errors.add(
            "user_token.allowed_types",
            "list at least one type, none of them empty",
        );
    }
    let mut issuer_sources: Vec<(String, JwksSource)> = Vec::new();
    for (index, keys) in raw.issuer_keys.iter().enumerate() {
        let path = format!("user_token.issuer_keys[{index}]");
        let issuer = keys.issuer.clone().filter(|i| !i.is_empty());
        match &issuer {
            None => errors.add(format!("{path}.issuer"), "required"),
            Some(issuer)
                if raw.issuers.contains(issuer)
                    || issuer_sources.iter().any(|(i, _)| i == issuer) =>
            {
                errors.add(
                    format!("{path}.issuer"),
                    format!("{issuer:?} already has a key set: each issuer has exactly one"),
                );
            }
            Some(_) => {}
        }
        let jwks = jwks_source(
            &path,
            keys.jwks_file.as_deref(),
            keys.jwks_url.as_deref(),
            keys.jwks_ca_file.as_deref(),
            base,
            errors,
        );
        if let (Some(issuer), Some(jwks)) = (issuer, jwks) {
            issuer_sources.push((issuer, jwks));
        }
    }
    if errors.0.len() != before {
        return None;
    }
    let mut settings = UserTokenSettings::new(jwks?, raw.issuers, raw.audiences, max_lifetime?);
    if !algorithms.is_empty() {
        settings.algorithms = algorithms;
    }
    if let Some(skew) = clock_skew {
        settings.clock_skew = skew;
    }
    if let Some(refresh) = refresh {
        settings.jwks_refresh_interval = refresh;
    }
    if let Some(claim) = raw.groups_claim {
        settings.groups_claim = claim;
    }
    if let Some(required) = raw.require_actor_binding {
        settings.require_actor_binding = required;
    }
    if let Some(bytes) = raw.max_token_bytes {
        settings.max_token_bytes = bytes;
    }
    if let Some(depth) = raw.max_actor_depth {
        settings.max_actor_depth = depth;
    }
    if let Some(stale) = max_stale {
        settings.jwks_max_stale = stale;
    }
    if let Some(types) = raw.allowed_types {
        settings.allowed_types = types;
    }
    let issuer_settings = issuer_sources
        .into_iter()
        .map(|(issuer, jwks)| {
            let mut own = settings.clone();
            own.jwks = jwks;
            own.issuers = vec![issuer];
            own
        })
        .collect();
    Some(UserTokenConfig {
        header: header?,
        settings,
        issuer_settings,
    })
}

fn policy(
    raw: Option<RawPolicy>,
    base: Base<'_>,
    errors: &mut Errors,
) -> (Option<PolicyEngine>, Duration) {
    let Some(raw) = raw else {
        errors.add("policy", "required");
        return (None, Duration::ZERO);
    };
    let mode = match raw.mode.as_deref() {
        None | Some("enforce") => Some(Mode::Enforce),
        Some("shadow") => Some(Mode::Shadow),
        Some(other) => {
            errors.add(
                "policy.mode",
                format!("{other:?} is not one of: enforce, shadow"),
            );
            None
        }
    };
    let interval = duration(
        "policy.reload_interval",
        raw.reload_interval.as_deref(),
        errors,
    )
    .unwrap_or(Duration::from_secs(5));
    let dir = required("policy.dir", raw.dir.as_deref(), errors)
        .and_then(|dir| base.resolve("policy.dir", dir, FileUse::Read, errors));
    let Some(dir) = dir else {
        return (None, interval);
    };
    if !dir.is_dir() {
        errors.add(
            "policy.dir",
            format!("directory not found: {}", dir.display()),
        );
        return (None, interval);
    }
    match load_apart(&dir, mode.unwrap_or(Mode::Enforce)) {
        Ok(engine) => (mode.map(|_| engine), interval),
        Err(load_errors) => {
            for error in load_errors {
                errors.add(format!("policy.dir: {}", error.file), error.message);
            }
            (None, interval)
        }
    }
}

/// Loads a policy directory on a thread of its own. glibc gives that thread an arena of its
/// own, so the temporaries of parsing and indexing thousands of policies are freed there,
/// not in the arena of the main thread, which serves requests when the sidecar has one
/// core: that arena's free lists stay short and a request's chunks close together (at
/// 1,000 policies, ~0.5 µs less CPU per request; glibc's bin walks, `unlink_chunk`, 1.4%
/// to 0.5% of the profile). Reloads run on the blocking pool's threads already.
fn load_apart(dir: &Path, mode: Mode) -> Result<PolicyEngine, Vec<portcullis_policy::LoadError>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| PolicyEngine::load(dir, mode))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `policy.shadow_dir`: loaded like `policy.dir`, every error reported at its own path.
fn shadow_policy(
    raw: Option<&RawPolicy>,
    base: Base<'_>,
    errors: &mut Errors,
) -> Option<Arc<PolicyEngine>> {
    let value = raw?.shadow_dir.as_deref()?;
    let dir = base.resolve("policy.shadow_dir", value, FileUse::Read, errors)?;
    if !dir.is_dir() {
        errors.add(
            "policy.shadow_dir",
            format!("directory not found: {}", dir.display()),
        );
        return None;
    }
    // Evaluated as `enforce` would: the candidate's own verdict, compared with the enforced one.
    match load_apart(&dir, Mode::Enforce) {
        Ok(engine) => Some(Arc::new(engine)),
        Err(load_errors) => {
            for error in load_errors {
                errors.add(format!("policy.shadow_dir: {}", error.file), error.message);
            }
            None
        }
    }
}

fn routes(raw: Vec<RawRoute>, base: Base<'_>, errors: &mut Errors) -> Option<Vec<RouteRule>> {
    let mut routes = Vec::new();
    let before = errors.0.len();
    for (index, route) in raw.into_iter().enumerate() {
        let path = format!("routes[{index}]");
        let matcher = match (route.path, route.path_prefix) {
            (Some(exact), None) if exact.starts_with('/') => PathMatch::Exact(exact),
            (None, Some(prefix)) if prefix.starts_with('/') => PathMatch::Prefix(prefix),
            (Some(_), Some(_)) => {
                errors.add(&path, "set one of path and path_prefix, not both");
                continue;
            }
            (None, None) => {
                errors.add(&path, "one of path or path_prefix is required");
                continue;
            }
            _ => {
                errors.add(&path, "paths start with '/'");
                continue;
            }
        };
        let protocol = match route.protocol.as_deref() {
            None | Some("http") => Protocol::Http,
            Some("openai") => Protocol::OpenAi,
            Some("mcp") => Protocol::Mcp,
            Some(other) => {
                errors.add(
                    format!("{path}.protocol"),
                    format!("{other:?} is not one of: http, openai, mcp"),
                );
                continue;
            }
        };
        match (route.body_limit, protocol) {
            (Some(0), _) => {
                errors.add(format!("{path}.body_limit"), "must be greater than 0");
                continue;
            }
            (Some(_), Protocol::Http) => {
                // Generic routes stream bodies uninspected: a limit there would mean nothing.
                errors.add(
                    format!("{path}.body_limit"),
                    "applies only to protocol routes (openai, mcp)",
                );
                continue;
            }
            _ => {}
        }
        let case_insensitive = match route.match_case.as_deref() {
            None | Some("sensitive") => false,
            Some("insensitive") => true,
            Some(other) => {
                errors.add(
                    format!("{path}.match_case"),
                    format!("{other:?} is not one of: sensitive, insensitive"),
                );
                continue;
            }
        };
        let credential = match route.credential {
            None => None,
            Some(raw) => {
                let credential_path = format!("{path}.credential");
                match consequential::credential(raw, &credential_path, base, errors) {
                    Some(credential) => Some(credential),
                    None => continue,
                }
            }
        };
        routes.push(RouteRule {
            matcher,
            protocol,
            forward_user_token: route.forward_user_token,
            body_limit: route.body_limit,
            case_insensitive,
            credential,
        });
    }
    (errors.0.len() == before).then_some(routes)
}

/// `audit.signing_key` and `audit.checkpoint_interval`: `Some(None)` without a key.
fn checkpoints(
    raw: Option<&RawAudit>,
    base: Base<'_>,
    errors: &mut Errors,
) -> Option<Option<portcullis_proxy::audit::Checkpoints>> {
    let interval = match raw.and_then(|r| r.checkpoint_interval.as_deref()) {
        None => Some(Duration::from_secs(60)),
        Some(value) => match duration("audit.checkpoint_interval", Some(value), errors) {
            Some(d) if d.is_zero() => {
                errors.add("audit.checkpoint_interval", "must be greater than 0");
                None
            }
            other => other,
        },
    };
    let Some(key) = raw.and_then(|r| r.signing_key.as_deref()) else {
        return interval.map(|_| None);
    };
    let path = file(base, "audit.signing_key", Some(key), errors)?;
    let key = match portcullis_proxy::audit::SigningKey::from_pem_file(&path) {
        Ok(key) => key,
        Err(error) => {
            errors.add("audit.signing_key", error.to_string());
            return None;
        }
    };
    Some(Some(portcullis_proxy::audit::Checkpoints {
        key: Arc::new(key),
        interval: interval?,
    }))
}

fn audit(raw: Option<RawAudit>, base: Base<'_>, errors: &mut Errors) -> Option<AuditSink> {
    let raw = raw.unwrap_or_default();
    let sink = raw.sink.unwrap_or_else(|| "stdout".to_owned());
    if sink == "stdout" {
        if raw.max_file_bytes.is_some() || raw.max_files.is_some() {
            errors.add(
                "audit",
                "max_file_bytes and max_files apply to a file sink only",
            );
            return None;
        }
        return Some(AuditSink::Stdout);
    }
    if raw.max_file_bytes == Some(0) {
        errors.add("audit.max_file_bytes", "must be greater than 0");
        return None;
    }
    if raw.max_files == Some(0) {
        errors.add("audit.max_files", "must be at least 1");
        return None;
    }
    let path = base.resolve("audit.sink", &sink, FileUse::Write, errors)?;
    match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() || parent.is_dir() => Some(AuditSink::File {
            path,
            rotate_bytes: raw.max_file_bytes,
            keep: raw.max_files.unwrap_or(10),
        }),
        _ => {
            errors.add(
                "audit.sink",
                format!("directory of {} does not exist", path.display()),
            );
            None
        }
    }
}

fn limits(raw: RawLimits, errors: &mut Errors) -> Option<(Limits, Duration)> {
    let defaults = Limits::default();
    let before = errors.0.len();
    let mut d = |name: &str, value: Option<&str>, default: Duration| {
        duration(&format!("limits.{name}"), value, errors).unwrap_or(default)
    };
    let limits = Limits {
        header_read_timeout: d(
            "header_read_timeout",
            raw.header_read_timeout.as_deref(),
            defaults.header_read_timeout,
        ),
        request_timeout: d(
            "request_timeout",
            raw.request_timeout.as_deref(),
            defaults.request_timeout,
        ),
        body_timeout: d(
            "body_timeout",
            raw.body_timeout.as_deref(),
            defaults.body_timeout,
        ),
        response_body_timeout: d(
            "response_body_timeout",
            raw.response_body_timeout.as_deref(),
            defaults.response_body_timeout,
        ),
        idle_timeout: d(
            "idle_timeout",
            raw.idle_timeout.as_deref(),
            defaults.idle_timeout,
        ),
        handshake_timeout: d(
            "handshake_timeout",
            raw.handshake_timeout.as_deref(),
            defaults.handshake_timeout,
        ),
        connect_timeout: d(
            "connect_timeout",
            raw.connect_timeout.as_deref(),
            defaults.connect_timeout,
        ),
        max_header_bytes: raw.max_header_bytes.unwrap_or(defaults.max_header_bytes),
        body_prefix_bytes: raw.body_prefix_bytes.unwrap_or(defaults.body_prefix_bytes),
        max_connections: raw.max_connections.unwrap_or(defaults.max_connections),
        // Unset: the default, or all of max_connections when that is set lower.
        max_connections_per_agent: raw.max_connections_per_agent.unwrap_or_else(|| {
            defaults
                .max_connections_per_agent
                .min(raw.max_connections.unwrap_or(defaults.max_connections))
        }),
        max_pending_handshakes: raw
            .max_pending_handshakes
            .unwrap_or(defaults.max_pending_handshakes),
        max_h2_streams: raw.max_h2_streams.unwrap_or(defaults.max_h2_streams),
        max_inflight: raw.max_inflight.unwrap_or(defaults.max_inflight),
        max_inflight_per_agent: raw
            .max_inflight_per_agent
            .unwrap_or(defaults.max_inflight_per_agent),
        inspect_memory_bytes: raw
            .inspect_memory_bytes
            .unwrap_or(defaults.inspect_memory_bytes),
        inspect_timeout: d(
            "inspect_timeout",
            raw.inspect_timeout.as_deref(),
            defaults.inspect_timeout,
        ),
        max_batch: raw.max_batch.unwrap_or(defaults.max_batch),
    };
    let drain = d(
        "drain_timeout",
        raw.drain_timeout.as_deref(),
        Duration::from_secs(20),
    );
    let positive = [
        ("limits.max_header_bytes", limits.max_header_bytes),
        ("limits.body_prefix_bytes", limits.body_prefix_bytes),
        ("limits.max_connections", limits.max_connections),
        (
            "limits.max_connections_per_agent",
            limits.max_connections_per_agent,
        ),
        (
            "limits.max_pending_handshakes",
            limits.max_pending_handshakes,
        ),
        ("limits.max_h2_streams", limits.max_h2_streams as usize),
        ("limits.max_inflight", limits.max_inflight),
        (
            "limits.max_inflight_per_agent",
            limits.max_inflight_per_agent,
        ),
        ("limits.inspect_memory_bytes", limits.inspect_memory_bytes),
        ("limits.max_batch", limits.max_batch),
    ];
    for (path, value) in positive {
        if value == 0 {
            errors.add(path, "must be greater than 0");
        }
    }
    if limits.max_connections_per_agent > limits.max_connections {
        errors.add(
            "limits.max_connections_per_agent",
            format!(
                "must not exceed limits.max_connections ({}): one agent could hold every place",
                limits.max_connections
            ),
        );
    }
    if limits.max_inflight_per_agent > limits.max_inflight {
        errors.add(
            "limits.max_inflight_per_agent",
            format!(
                "must not exceed limits.max_inflight ({}): one agent could hold every place",
                limits.max_inflight
            ),
        );
    }
    if limits.inspect_memory_bytes < limits.body_prefix_bytes {
        errors.add(
            "limits.inspect_memory_bytes",
            format!(
                "must be at least limits.body_prefix_bytes ({}): no body that size could be inspected",
                limits.body_prefix_bytes
            ),
        );
    }
    (errors.0.len() == before).then_some((limits, drain))
}

/// `500ms`, `60s`, `5m`, `1h`. Zero is refused: a zero timeout would fire at once or never,
/// depending on who reads it.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{value:?} needs a unit: ms, s, m or h"))?;
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 500ms, 60s, 5m or 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => return Err(format!("{value:?} has an unknown unit; use ms, s, m or h")),
    };
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    // Every duration is added to the clock somewhere (a deadline, a timer): far enough
    // beyond this the addition overflows, which would panic on the request path. A century
    // is longer than anything here needs to wait.
    if duration > MAX_DURATION {
        return Err(format!(
            "{value:?} is longer than a century; the most is 876000h"
        ));
    }
    Ok(duration)
}

/// The longest duration the config takes: 100 years of 365 days (876000h).
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

fn duration(path: &str, value: Option<&str>, errors: &mut Errors) -> Option<Duration> {
    match parse_duration(value?) {
        Ok(duration) => Some(duration),
        Err(message) => {
            errors.add(path, message);
            None
        }
    }
}

/// `overrides` (a YAML mapping) laid over the YAML document `text`: mappings merge key by key,
/// anything else in `overrides` replaces what `text` had. The Kubernetes injector uses it to
/// fix the listeners, certificate paths and policy source of a config a ConfigMap provides.
pub fn overlay(text: &str, overrides: &str) -> Result<String, ConfigErrors> {
    fn yaml(text: &str, what: &str) -> Result<serde_yaml::Value, ConfigErrors> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: what.to_owned(),
                message: format!("not valid YAML: {e}"),
            }])
        })?;
        match value {
            serde_yaml::Value::Null => Ok(serde_yaml::Value::Mapping(Default::default())),
            v @ serde_yaml::Value::Mapping(_) => Ok(v),
            _ => Err(ConfigErrors(vec![ConfigError {
                path: what.to_owned(),
                message: "must be a mapping".to_owned(),
            }])),
        }
    }
    fn merge(base: &mut serde_yaml::Value, top: serde_yaml::Value) {
        match (base, top) {
            (serde_yaml::Value::Mapping(base), serde_yaml::Value::Mapping(top)) => {
                for (key, value) in top {
                    match base.get_mut(&key) {
                        Some(existing) => merge(existing, value),
                        None => {
                            base.insert(key, value);
                        }
                    }
                }
            }
            (base, top) => *base = top,
        }
    }
    let mut merged = yaml(text, "(document)")?;
    merge(&mut merged, yaml(overrides, "--override")?);
    Ok(serde_yaml::to_string(&merged).unwrap_or_default())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
