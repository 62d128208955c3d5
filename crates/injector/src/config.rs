//! The webhook's own YAML configuration: raw serde structs → `validate()` collecting every
//! error with its YAML path → typed [`WebhookConfig`].
//!
//! Unknown keys are collected with `serde_ignored` rather than rejected with
//! `deny_unknown_fields`, because serde stops at the first unknown field and an operator
//! should see every mistake in one run.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis_core::TrustDomain;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// Validated configuration of `portcullis inject-webhook`.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// HTTPS listener the Kubernetes API server calls.
    pub listen: SocketAddr,
    /// The serving certificate, re-read when it changes on disk.
    pub tls: TlsFiles,
    /// What the injected sidecar looks like.
    pub injection: InjectionSettings,
    /// Where the namespace and ConfigMap reads go.
    pub kubernetes: ApiSettings,
}

/// How the webhook reaches the Kubernetes API (`kubernetes:` in its config). The defaults
/// are the in-cluster ones: the API Service and the mounted service-account token and CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// Host name the API server certificate is valid for.
    pub host: String,
    /// Its HTTPS port.
    pub port: u16,
    /// Bearer token, re-read for every call (projected tokens rotate).
    pub token_file: PathBuf,
    /// CA bundle (PEM) that signed the API server certificate.
    pub ca_file: PathBuf,
}

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            host: "kubernetes.default.svc".to_owned(),
            port: 443,
            token_file: Path::new(SERVICE_ACCOUNT_DIR).join("token"),
            ca_file: Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt"),
        }
    }
}

/// Serving certificate and key files (PEM), as mounted from a Secret.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are checked for a rotated certificate.
    pub reload_interval: Duration,
    /// CA certificates (PEM) that sign the API server's client certificate. When set, the
    /// admission paths answer only callers that presented a certificate verified against
    /// them; `None` lets anyone who reaches the port ask for reviews. Read once at start.
    pub client_ca: Option<PathBuf>,
}

/// Everything `mutate` needs to build the sidecar; defaults are the chart's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectionSettings {
    /// Image of the `portcullis` sidecar.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// `true`: init container with `restartPolicy: Always` (Kubernetes ≥ 1.29).
    /// `false`: a regular container, for older clusters.
    pub native_sidecar: bool,
    /// Trust domain used when the pod has no `portcullis.dev/trust-domain` annotation.
    pub trust_domain: TrustDomain,
    /// Policy ConfigMap (in the pod's namespace) used when the pod names none.
    pub policy_configmap: String,
    /// Policy mode used when the pod has no `portcullis.dev/policy-mode` annotation.
    pub policy_mode: PolicyMode,
    /// The sidecar's mTLS port.
    pub listen_port: u16,
    /// The sidecar's admin port (`/metrics`, `/healthz`, `/readyz`).
    pub admin_port: u16,
    /// UID and GID the sidecar runs as.
    pub run_as_user: i64,
    /// Resource requests of the sidecar container (`cpu`, `memory`).
    pub requests: BTreeMap<String, String>,
    /// Resource limits of the sidecar container.
    pub limits: BTreeMap<String, String>,
    /// Where the workload's X509-SVID comes from.
    pub svid: SvidSource,
}

impl Default for InjectionSettings {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
            native_sidecar: true,
            trust_domain: default_trust_domain(),
            policy_configmap: "portcullis-policies".to_owned(),
            policy_mode: PolicyMode::Enforce,
            listen_port: 8443,
            admin_port: 9901,
            run_as_user: 65532,
            requests: quantities(&[("cpu", "50m"), ("memory", "64Mi")]),
            limits: quantities(&[("cpu", "1"), ("memory", "256Mi")]),
            svid: SvidSource::CsiDriverSpiffe,
        }
    }
}

const DEFAULT_IMAGE: &str = "ghcr.io/portcullis-dev/portcullis:0.1.0";
const DEFAULT_SPIFFE_HELPER_IMAGE: &str = "ghcr.io/spiffe/spiffe-helper:0.10.0";
const DEFAULT_SPIRE_SOCKET: &str = "spire-agent.sock";

#[allow(clippy::expect_used)]
fn default_trust_domain() -> TrustDomain {
    // A constant known to be valid; covered by the config tests.
    TrustDomain::parse("cluster.local").expect("cluster.local is a valid trust domain")
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `policy.mode` of the rendered sidecar config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    /// Deny what policy denies.
    Enforce,
    /// Evaluate and record, never block.
    Shadow,
}

impl PolicyMode {
    /// Parse the config/annotation spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enforce" => Some(Self::Enforce),
            "shadow" => Some(Self::Shadow),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Shadow => "shadow",
        }
    }
}

/// Where the sidecar's SVID files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidSource {
    /// cert-manager csi-driver-spiffe (`spiffe.csi.cert-manager.io`): `tls.crt`, `tls.key`,
    /// `ca.crt` written straight into the volume.
    CsiDriverSpiffe,
    /// SPIRE CSI driver (`csi.spiffe.io`), which mounts only the Workload API socket; a
    /// spiffe-helper native sidecar writes the files into a shared in-memory volume.
    Spire {
        /// spiffe-helper image (snake_case config keys: v0.8 or later).
        helper_image: String,
        /// Socket file name inside the mounted agent socket directory.
        socket_file: String,
    },
}

/// One configuration error, with the YAML path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// YAML path such as `tls.cert`; the file name for errors about the whole file.
    pub path: String,
    /// What is wrong, lowercase.
    pub message: String,
}

/// Every error found in a configuration file; `Display` lists one per line as
/// `path: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The errors, in the order they were found.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    listen: Option<String>,
    tls: Option<RawTls>,
    injection: Option<RawInjection>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Default, Deserialize)]
struct RawKubernetes {
    host: Option<String>,
    port: Option<u16>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    reload_interval: Option<String>,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct RawInjection {
    image: Option<String>,
    image_pull_policy: Option<String>,
    native_sidecar: Option<bool>,
    trust_domain: Option<String>,
    policy_configmap: Option<String>,
    policy_mode: Option<String>,
    listen_port: Option<u16>,
    admin_port: Option<u16>,
    run_as_user: Option<i64>,
    resources: Option<RawResources>,
    svid: Option<RawSvid>,
}

#[derive(Debug, Default, Deserialize)]
struct RawResources {
    requests: Option<BTreeMap<String, String>>,
    limits: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawSvid {
    source: Option<String>,
    spiffe_helper_image: Option<String>,
    spire_socket_file: Option<String>,
}

struct Errors {
    base: PathBuf,
    list: Vec<ConfigError>,
}

impl Errors {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.list.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

impl WebhookConfig {
    /// Read, parse and validate the file; relative paths are relative to the file.
    pub fn load(path: &Path) -> Result<WebhookConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            errors: vec![ConfigError {
                path: path.display().to_string(),
                message: format!("cannot read file: {e}"),
            }],
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_yaml(&text, &base)
    }

    /// Parse and validate YAML text; `base` anchors relative paths.
    pub fn from_yaml(text: &str, base: &Path) -> Result<WebhookConfig, ConfigErrors> {
        let mut errors = Errors {
            base: base.to_path_buf(),
            list: Vec::new(),
        };
        let value: serde_yaml::Value = match serde_yaml::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let at = e
                    .location()
                    .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                    .unwrap_or_default();
                errors.push("config", format!("invalid yaml{at}: {e}"));
                return Err(ConfigErrors {
                    errors: errors.list,
                });
            }
        };
        let value = match value {
            serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
            v => v,
        };
        let mut unknown = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let raw: Option<RawConfig> = {
            // serde_ignored writes `?` for each Option layer; the YAML path has none.
            let mut record = |p: serde_ignored::Path<'_>| {
                let path = p.to_string();
                let segments: Vec<&str> = path.split('.').filter(|s| *s != "?").collect();
                unknown.push(segments.join("."));
            };
            let de = serde_ignored::Deserializer::new(value, &mut record);
            let de = serde_path_to_error::Deserializer::new(de, &mut track);
            match RawConfig::deserialize(de) {
                Ok(raw) => Some(raw),
                Err(e) => {
                    let path = track.path().to_string();
                    errors.push(&path, e.to_string());
                    None
                }
            }
        };
        for path in unknown {
            errors.push(&path, "unknown key");
        }
        let Some(raw) = raw else {
            return Err(ConfigErrors {
                errors: errors.list,
            });
        };
        let config = validate(raw, &mut errors);
        match config {
            Some(c) if errors.list.is_empty() => Ok(c),
            _ => Err(ConfigErrors {
                errors: errors.list,
            }),
        }
    }
}

fn validate(raw: RawConfig, errors: &mut Errors) -> Option<WebhookConfig> {
    let listen = match raw.listen.as_deref() {
        None => Some(SocketAddr::from(([0, 0, 0, 0], 8443))),
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push("listen", format!("not a socket address: {s:?}"));
                None
            }
        },
    };
    let tls = validate_tls(raw.tls.unwrap_or_default(), errors);
    let injection = validate_injection(raw.injection.unwrap_or_default(), errors);
    let kubernetes = validate_kubernetes(raw.kubernetes.unwrap_or_default(), errors);
    Some(WebhookConfig {
        listen: listen?,
        tls: tls?,
        injection: injection?,
        kubernetes: kubernetes?,
    })
}

/// The files are not checked here: the token is re-read on every call, and outside a pod
/// (`portcullis inject-webhook` on a laptop) they appear only once mounted.
fn validate_kubernetes(raw: RawKubernetes, errors: &mut Errors) -> Option<ApiSettings> {
    let defaults = ApiSettings::default();
    let host = raw.host.unwrap_or(defaults.host);
    let mut ok = true;
    if rustls_pki_types::ServerName::try_from(host.as_str()).is_err() {
        errors.push(
            "kubernetes.host",
            format!("not a host name or address: {host:?}"),
        );
        ok = false;
    }
    let port = raw.port.unwrap_or(defaults.port);
    if port == 0 {
        errors.push("kubernetes.port", "must be between 1 and 65535");
        ok = false;
    }
    let settings = ApiSettings {
        host,
        port,
        token_file: raw
            .token_file
            .map_or(defaults.token_file, |p| errors.resolve(&p)),
        ca_file: raw.ca_file.map_or(defaults.ca_file, |p| errors.resolve(&p)),
    };
    ok.then_some(settings)
}

fn validate_tls(raw: RawTls, errors: &mut Errors) -> Option<TlsFiles> {
    let cert = match raw.cert {
        None => {
            errors.push("tls.cert", "required");
            None
        }
        Some(p) => {
            let p = errors.resolve(&p);
            check_pem(&p, "tls.cert", errors, |bytes| {
                let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
                    .filter_map(Result::ok)
                    .collect();
                (!certs.is_empty())
                    .then_some(())
                    .ok_or("no certificate found")
            });
            Some(p)
        }
    };
    let key = match raw.key {
        None => {
            errors.push("tls.key", "required");
            None
        }
        Some(p) => {
            let p = errors.resolve(&p);
            check_pem(&p, "tls.key", errors, |bytes| {
                PrivateKeyDer::from_pem_slice(bytes)
                    .map(|_| ())
                    .map_err(|_| "no private key found")
            });
            Some(p)
        }
    };
    let reload_interval = match raw.reload_interval.as_deref() {
        None => Some(Duration::from_secs(60)),
        Some(s) => match parse_duration(s) {
            Some(d) if !d.is_zero() => Some(d),
            _ => {
                errors.push(
                    "tls.reload_interval",
                    format!("not a positive duration such as 60s: {s:?}"),
                );
                None
            }
        },
    };
    let client_ca = raw.client_ca.map(|p| {
        let p = errors.resolve(&p);
        check_pem(&p, "tls.client_ca", errors, |bytes| {
            let certs = CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "invalid PEM")?;
            if certs.is_empty() {
                return Err("no certificate found");
            }
            let mut roots = rustls::RootCertStore::empty();
            match roots.add_parsable_certificates(certs) {
                (_, 0) => Ok(()),
                _ => Err("unparsable certificate"),
            }
        });
        p
    });
    Some(TlsFiles {
        cert: cert?,
        key: key?,
        reload_interval: reload_interval?,
        client_ca,
    })
}

fn check_pem(
    path: &Path,
    yaml_path: &str,
    errors: &mut Errors,
    parse: impl Fn(&[u8]) -> Result<(), &'static str>,
) {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            errors.push(yaml_path, format!("file not found: {}", path.display()));
        }
        Err(e) => errors.push(yaml_path, format!("cannot read {}: {e}", path.display())),
        Ok(bytes) => {
            if let Err(m) = parse(&bytes) {
                errors.push(yaml_path, format!("{m} in {}", path.display()));
            }
        }
    }
}

fn validate_injection(raw: RawInjection, errors: &mut Errors) -> Option<InjectionSettings> {
    let defaults = InjectionSettings::default();
    let mut ok = true;

    let image = raw.image.unwrap_or(defaults.image);
    if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
        errors.push("injection.image", "must be a non-empty image reference");
        ok = false;
    }
    let image_pull_policy = raw.image_pull_policy.unwrap_or(defaults.image_pull_policy);
    if !matches!(
        image_pull_policy.as_str(),
        "Always" | "IfNotPresent" | "Never"
    ) {
        errors.push(
            "injection.image_pull_policy",
            format!("must be Always, IfNotPresent or Never, not {image_pull_policy:?}"),
        );
        ok = false;
    }
    let trust_domain = match raw.trust_domain {
        None => Some(defaults.trust_domain),
        Some(s) => match TrustDomain::parse(&s) {
            Ok(td) => Some(td),
            Err(e) => {
                errors.push("injection.trust_domain", format!("{s:?}: {e}"));
                None
            }
        },
    };
    let policy_configmap = raw.policy_configmap.unwrap_or(defaults.policy_configmap);
    if !is_dns_subdomain(&policy_configmap) {
        errors.push(
            "injection.policy_configmap",
            format!("not a valid ConfigMap name: {policy_configmap:?}"),
        );
        ok = false;
    }
    let policy_mode = match raw.policy_mode.as_deref() {
        None => Some(defaults.policy_mode),
        Some(s) => {
            let m = PolicyMode::parse(s);
            if m.is_none() {
                errors.push(
                    "injection.policy_mode",
                    format!("must be enforce or shadow, not {s:?}"),
                );
            }
            m
        }
    };
    let listen_port = raw.listen_port.unwrap_or(defaults.listen_port);
    let admin_port = raw.admin_port.unwrap_or(defaults.admin_port);
    for (path, port) in [
        ("injection.listen_port", listen_port),
        ("injection.admin_port", admin_port),
    ] {
        if port == 0 {
            errors.push(path, "must be between 1 and 65535");
            ok = false;
        }
    }
    if listen_port == admin_port {
        errors.push(
            "injection.admin_port",
            format!("must differ from injection.listen_port ({listen_port})"),
        );
        ok = false;
    }
    let run_as_user = raw.run_as_user.unwrap_or(defaults.run_as_user);
    if run_as_user <= 0 {
        errors.push(
            "injection.run_as_user",
            "must be a non-root uid (greater than 0)",
        );
        ok = false;
    }
    let resources = raw.resources.unwrap_or_default();
    let requests = resources.requests.unwrap_or(defaults.requests);
    let limits = resources.limits.unwrap_or(defaults.limits);
    for (section, map) in [("requests", &requests), ("limits", &limits)] {
        for (name, q) in map {
            let path = format!("injection.resources.{section}.{name}");
            if !matches!(name.as_str(), "cpu" | "memory" | "ephemeral-storage") {
                errors.push(&path, "unknown resource (cpu, memory or ephemeral-storage)");
                ok = false;
            } else if !is_quantity(q) {
                errors.push(&path, format!("not a Kubernetes quantity: {q:?}"));
                ok = false;
            }
        }
    }
    let svid_raw = raw.svid.unwrap_or_default();
    let svid = match svid_raw.source.as_deref() {
        None | Some("csi-driver-spiffe") => {
            for (key, set) in [
                (
                    "spiffe_helper_image",
                    svid_raw.spiffe_helper_image.is_some(),
                ),
                ("spire_socket_file", svid_raw.spire_socket_file.is_some()),
            ] {
                if set {
                    errors.push(
                        &format!("injection.svid.{key}"),
                        "only used with source: spire",
                    );
                    ok = false;
                }
            }
            Some(SvidSource::CsiDriverSpiffe)
        }
        Some("spire") => {
            let helper_image = svid_raw
                .spiffe_helper_image
                .unwrap_or_else(|| DEFAULT_SPIFFE_HELPER_IMAGE.to_owned());
            let socket_file = svid_raw
                .spire_socket_file
                .unwrap_or_else(|| DEFAULT_SPIRE_SOCKET.to_owned());
            if helper_image.trim().is_empty() {
                errors.push("injection.svid.spiffe_helper_image", "must not be empty");
                ok = false;
            }
            if socket_file.is_empty() || socket_file.contains('/') {
                errors.push(
                    "injection.svid.spire_socket_file",
                    "must be a file name without '/'",
                );
                ok = false;
            }
            Some(SvidSource::Spire {
                helper_image,
                socket_file,
            })
        }
        Some(other) => {
            errors.push(
                "injection.svid.source",
                format!("must be csi-driver-spiffe or spire, not {other:?}"),
            );
            None
        }
    };
    let settings = InjectionSettings {
        image,
        image_pull_policy,
        native_sidecar: raw.native_sidecar.unwrap_or(defaults.native_sidecar),
        trust_domain: trust_domain?,
        policy_configmap,
        policy_mode: policy_mode?,
        listen_port,
        admin_port,
        run_as_user,
        requests,
        limits,
        svid: svid?,
    };
    ok.then_some(settings)
}

/// `500ms`, `60s`, `5m`, `1h`.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// RFC 1123 DNS subdomain, as Kubernetes requires of ConfigMap names.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A Kubernetes resource quantity in its common forms: a decimal number with an optional
/// SI or binary suffix (`50m`, `0.5`, `64Mi`, `1G`, `1e3`).
pub(crate) fn is_quantity(s: &str) -> bool {
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    let num_ok = !num.is_empty()
        && num.chars().filter(|c| *c == '.').count() <= 1
        && num.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .is_some_and(|exp| !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit()));
    num_ok && suffix_ok
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
