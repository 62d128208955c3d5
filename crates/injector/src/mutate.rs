//! The pure part of the webhook: a pod (JSON) and the settings in, a decision out.
//!
//! Nothing here does I/O, so every case (opt-in routes, opt-out, idempotence, refusals) is a
//! plain function call in the tests.

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{InjectionSettings, PolicyMode, SvidSource, is_dns_subdomain};
use portcullis_core::TrustDomain;

/// Pod annotation (or label) asking for (`"true"`) or refusing (`"false"`) injection.
pub const ANNOTATION_INJECT: &str = "portcullis.dev/inject";
/// Port (number or container port name) of the application the sidecar forwards to.
pub const ANNOTATION_UPSTREAM_PORT: &str = "portcullis.dev/upstream-port";
/// ConfigMap in the pod's namespace holding `*.cedar`, `schema.cedarschema`, `entities.json`.
pub const ANNOTATION_POLICY_CONFIGMAP: &str = "portcullis.dev/policy-configmap";
/// Accepted SPIFFE trust domain of callers.
pub const ANNOTATION_TRUST_DOMAIN: &str = "portcullis.dev/trust-domain";
/// `enforce` or `shadow`.
pub const ANNOTATION_POLICY_MODE: &str = "portcullis.dev/policy-mode";
/// Set by the webhook: the sidecar's config file, projected by a downward API volume.
pub const ANNOTATION_RENDERED_CONFIG: &str = "portcullis.dev/rendered-config";
/// Set by the webhook in SPIRE mode: spiffe-helper's config file.
pub const ANNOTATION_RENDERED_HELPER_CONFIG: &str = "portcullis.dev/rendered-spiffe-helper-config";
/// Label set by the webhook on injected pods (selects them for a PodMonitor).
pub const LABEL_INJECTED: &str = "portcullis.dev/injected";

/// Name of the sidecar container; its presence marks a pod as already injected.
pub const SIDECAR_NAME: &str = "portcullis";
/// Name of the spiffe-helper container in SPIRE mode.
pub const HELPER_NAME: &str = "portcullis-spiffe-helper";
/// Named container port of the mTLS listener: the application's Service targets it.
pub const MTLS_PORT_NAME: &str = "portcullis-mtls";
/// Named container port of the admin listener (probes, metrics).
pub const ADMIN_PORT_NAME: &str = "pc-admin";

const VOLUME_CONFIG: &str = "portcullis-config";
const VOLUME_POLICIES: &str = "portcullis-policies";
const VOLUME_SVID: &str = "portcullis-svid";
const VOLUME_SPIRE_SOCKET: &str = "portcullis-spire-agent";

const CONFIG_DIR: &str = "/etc/portcullis/injected";
const POLICY_DIR: &str = "/etc/portcullis/policies";
const SVID_DIR: &str = "/run/spiffe";
const SPIRE_SOCKET_DIR: &str = "/run/spire/agent-sockets";

/// Which webhook entry of the MutatingWebhookConfiguration sent the pod, i.e. which opt-in
/// route could have matched. The API server's selectors see labels only, so the handler
/// must still read the pod's annotations itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The namespace carries `portcullis.dev/inject=enabled`: every pod is injected unless
    /// it opts out.
    Namespace,
    /// Any other namespace: only pods that opt in themselves are injected.
    Pod,
}

/// What the webhook does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Admit unchanged.
    Skip(SkipReason),
    /// Admit with this RFC 6902 JSON patch.
    Patch(Vec<Value>),
}

/// Why a pod is admitted unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither the namespace nor the pod asked for injection.
    NotRequested,
    /// The pod says `portcullis.dev/inject: "false"`.
    OptedOut,
    /// The pod already has a `portcullis` container.
    AlreadyInjected,
}

impl SkipReason {
    /// Short, stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotRequested => "not_requested",
            Self::OptedOut => "opted_out",
            Self::AlreadyInjected => "already_injected",
        }
    }
}

/// A pod that asked for injection but cannot get it: it is refused, never admitted
/// unprotected. The message goes back to whoever created the pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The opt-in value is neither `"true"` nor `"false"`.
    #[error("{ANNOTATION_INJECT} must be \"true\" or \"false\", not {0:?}")]
    BadInjectValue(String),
    /// No upstream port annotation.
    #[error(
        "portcullis injection was requested but the pod has no {ANNOTATION_UPSTREAM_PORT} annotation naming the application's port"
    )]
    MissingUpstreamPort,
    /// The upstream port is neither a valid number nor a container port name of the pod.
    #[error(
        "{ANNOTATION_UPSTREAM_PORT} {0:?} is neither a port number (1-65535) nor a named port of the pod's containers"
    )]
    BadUpstreamPort(String),
    /// The upstream port is one of the sidecar's own ports.
    #[error(
        "{ANNOTATION_UPSTREAM_PORT} {0} collides with a port the portcullis sidecar listens on ({1})"
    )]
    UpstreamIsSidecarPort(u16, &'static str),
    /// A container of the pod already uses one of the sidecar's ports.
    #[error(
        "container {container:?} declares port {port}, which the portcullis sidecar needs for its {purpose} listener"
    )]
    PortConflict {
        /// The container that declares the port.
        container: String,
        /// The port.
        port: u16,
        /// `mtls` or `admin`.
        purpose: &'static str,
    },
    /// A volume with one of the names the sidecar uses already exists.
    #[error("the pod already has a volume named {0:?}, which the portcullis sidecar needs")]
    VolumeConflict(String),
    /// Bad trust domain annotation.
    #[error("{ANNOTATION_TRUST_DOMAIN} {0:?} is not a valid SPIFFE trust domain")]
    BadTrustDomain(String),
    /// Bad policy ConfigMap name.
    #[error("{ANNOTATION_POLICY_CONFIGMAP} {0:?} is not a valid ConfigMap name")]
    BadPolicyConfigMap(String),
    /// Bad policy mode.
    #[error("{ANNOTATION_POLICY_MODE} must be \"enforce\" or \"shadow\", not {0:?}")]
    BadPolicyMode(String),
    /// The pod shares the node's network namespace.
    #[error(
        "pods with hostNetwork: true cannot get the portcullis sidecar: its ports would be opened on the node"
    )]
    HostNetwork,
    /// The object is not shaped like a pod.
    #[error("the object is not a pod: {0}")]
    NotAPod(&'static str),
}

/// Decide what to do with `pod` (the `request.object` of an AdmissionReview).
pub fn mutate(
    pod: &Value,
    scope: Scope,
    settings: &InjectionSettings,
) -> Result<Mutation, Refusal> {
    let spec = pod
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or(Refusal::NotAPod("no spec"))?;
    let annotations = pod.pointer("/metadata/annotations");
    let labels = pod.pointer("/metadata/labels");
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);

    // The pod's own word wins over the namespace: "false" opts out even in an enabled
    // namespace. The annotation is checked first; a label is accepted too because only labels
    // can be matched by the webhook's objectSelector.
    let pod_says = annotation(ANNOTATION_INJECT).or_else(|| label(ANNOTATION_INJECT));
    let requested = match pod_says {
        Some("false") => return Ok(Mutation::Skip(SkipReason::OptedOut)),
        Some("true") => true,
        Some(other) => return Err(Refusal::BadInjectValue(other.to_owned())),
        None => scope == Scope::Namespace,
    };
    if !requested {
        return Ok(Mutation::Skip(SkipReason::NotRequested));
    }

    let init_containers = containers(spec, "initContainers");
    let app_containers = containers(spec, "containers");
    if init_containers
        .iter()
        .chain(&app_containers)
        .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME))
    {
        return Ok(Mutation::Skip(SkipReason::AlreadyInjected));
    }

    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(Refusal::HostNetwork);
    }

    let upstream_port = match annotation(ANNOTATION_UPSTREAM_PORT) {
        None => return Err(Refusal::MissingUpstreamPort),
        Some(p) => resolve_port(p, &app_containers)?,
    };
    for (port, purpose) in [
        (settings.listen_port, "mtls"),
        (settings.admin_port, "admin"),
    ] {
        if upstream_port == port {
            return Err(Refusal::UpstreamIsSidecarPort(upstream_port, purpose));
        }
        for c in init_containers.iter().chain(&app_containers) {
            if declared_ports(c).any(|(_, p)| p == port) {
                return Err(Refusal::PortConflict {
                    container: c
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    port,
                    purpose,
                });
            }
        }
    }

    let our_volumes: &[&str] = match settings.svid {
        SvidSource::CsiDriverSpiffe => &[VOLUME_CONFIG, VOLUME_POLICIES, VOLUME_SVID],
        SvidSource::Spire { .. } => &[
            VOLUME_CONFIG,
            VOLUME_POLICIES,
            VOLUME_SVID,
            VOLUME_SPIRE_SOCKET,
        ],
    };
    if let Some(existing) = spec.get("volumes").and_then(Value::as_array) {
        for v in existing {
            if let Some(name) = v.get("name").and_then(Value::as_str)
                && our_volumes.contains(&name)
            {
                return Err(Refusal::VolumeConflict(name.to_owned()));
            }
        }
    }

    let trust_domain = match annotation(ANNOTATION_TRUST_DOMAIN) {
        None => settings.trust_domain.clone(),
        Some(s) => TrustDomain::parse(s).map_err(|_| Refusal::BadTrustDomain(s.to_owned()))?,
    };
    let policy_configmap = match annotation(ANNOTATION_POLICY_CONFIGMAP) {
        None => settings.policy_configmap.clone(),
        Some(s) if is_dns_subdomain(s) => s.to_owned(),
        Some(s) => return Err(Refusal::BadPolicyConfigMap(s.to_owned())),
    };
    let policy_mode = match annotation(ANNOTATION_POLICY_MODE) {
        None => settings.policy_mode,
        Some(s) => PolicyMode::parse(s).ok_or_else(|| Refusal::BadPolicyMode(s.to_owned()))?,
    };

    let rendered = render_config(settings, upstream_port, trust_domain.as_str(), policy_mode);
    Ok(Mutation::Patch(build_patch(
        pod,
        spec,
        settings,
        &rendered,
        &policy_configmap,
    )))
}

fn containers<'a>(spec: &'a Value, key: &str) -> Vec<&'a Value> {
    spec.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn declared_ports(container: &Value) -> impl Iterator<Item = (Option<&str>, u16)> {
    container
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())?;
            Some((p.get("name").and_then(Value::as_str), port))
        })
}

fn resolve_port(value: &str, app_containers: &[&Value]) -> Result<u16, Refusal> {
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return match value.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Refusal::BadUpstreamPort(value.to_owned())),
        };
    }
    app_containers
        .iter()
        .flat_map(|c| declared_ports(c))
        .find(|(name, _)| *name == Some(value))
        .map(|(_, p)| p)
        .ok_or_else(|| Refusal::BadUpstreamPort(value.to_owned()))
}

/// The sidecar config, keys exactly as the `portcullis run` contract names them.
#[derive(Serialize)]
struct SidecarConfig<'a> {
    listen: String,
    admin_listen: String,
    upstream: String,
    tls: SidecarTls<'a>,
    policy: SidecarPolicy,
    audit: SidecarAudit,
}

#[derive(Serialize)]
struct SidecarTls<'a> {
    cert: String,
    key: String,
    trust_bundles: std::collections::BTreeMap<&'a str, String>,
}

#[derive(Serialize)]
struct SidecarPolicy {
    dir: &'static str,
    mode: &'static str,
}

#[derive(Serialize)]
struct SidecarAudit {
    sink: &'static str,
}

/// File names the SVID volume holds, per source.
fn svid_files(svid: &SvidSource) -> (&'static str, &'static str, &'static str) {
    match svid {
        SvidSource::CsiDriverSpiffe => ("tls.crt", "tls.key", "ca.crt"),
        SvidSource::Spire { .. } => ("svid.pem", "svid_key.pem", "bundle.pem"),
    }
}

/// Render the sidecar's `config.yaml`.
pub fn render_config(
    settings: &InjectionSettings,
    upstream_port: u16,
    trust_domain: &str,
    mode: PolicyMode,
) -> String {
    let (cert, key, bundle) = svid_files(&settings.svid);
    let config = SidecarConfig {
        // In a pod both listeners bind every interface: agents reach the mTLS port through
        // the Service, and the kubelet's probes come from the node, not from localhost.
        listen: format!("0.0.0.0:{}", settings.listen_port),
        admin_listen: format!("0.0.0.0:{}", settings.admin_port),
        upstream: format!("http://127.0.0.1:{upstream_port}"),
        tls: SidecarTls {
            cert: format!("{SVID_DIR}/{cert}"),
            key: format!("{SVID_DIR}/{key}"),
            trust_bundles: [(trust_domain, format!("{SVID_DIR}/{bundle}"))]
                .into_iter()
                .collect(),
        },
        policy: SidecarPolicy {
            dir: POLICY_DIR,
            mode: mode.as_str(),
        },
        audit: SidecarAudit { sink: "stdout" },
    };
    // Serialising plain strings and maps cannot fail; an empty config would fail loudly
    // at sidecar start rather than pass silently.
    serde_yaml::to_string(&config).unwrap_or_default()
}

fn render_helper_config(socket_file: &str) -> String {
    // spiffe-helper v0.8+ (snake_case keys). No `cmd`: it only keeps the files fresh, and
    // portcullis re-reads them itself (content checked every `tls.reload_interval`).
    format!(
        "agent_address = \"{SPIRE_SOCKET_DIR}/{socket_file}\"\n\
         cert_dir = \"{SVID_DIR}\"\n\
         svid_file_name = \"svid.pem\"\n\
         svid_key_file_name = \"svid_key.pem\"\n\
         svid_bundle_file_name = \"bundle.pem\"\n\
         daemon_mode = true\n"
    )
}

/// RFC 6901: `~` → `~0`, `/` → `~1`.
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn security_context(settings: &InjectionSettings) -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "capabilities": { "drop": ["ALL"] },
        "privileged": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

fn sidecar_container(settings: &InjectionSettings) -> Value {
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": ADMIN_PORT_NAME, "scheme": "HTTP" },
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let mut c = json!({
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["run", "--config", format!("{CONFIG_DIR}/config.yaml")],
        "ports": [
            { "name": MTLS_PORT_NAME, "containerPort": settings.listen_port, "protocol": "TCP" },
            { "name": ADMIN_PORT_NAME, "containerPort": settings.admin_port, "protocol": "TCP" },
        ],
        // A native sidecar's startup probe holds back the application containers until the
        // proxy answers, so no request reaches the pod before it is protected.
        "startupProbe": probe("/healthz", 1, 60),
        "livenessProbe": probe("/healthz", 10, 3),
        "readinessProbe": probe("/readyz", 5, 3),
        "resources": { "requests": settings.requests, "limits": settings.limits },
        "securityContext": security_context(settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            { "name": VOLUME_CONFIG, "mountPath": CONFIG_DIR, "readOnly": true },
            { "name": VOLUME_POLICIES, "mountPath": POLICY_DIR, "readOnly": true },
            { "name": VOLUME_SVID, "mountPath": SVID_DIR, "readOnly": true },
        ],
    });
    if settings.native_sidecar {
        c["restartPolicy"] = json!("Always");
    }
    c
}

fn helper_container(settings: &InjectionSettings, image: &str) -> Value {
    let mut c = json!({
        "name": HELPER_NAME,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["-config", format!("{CONFIG_DIR}/spiffe-helper.conf")],
        "resources": {
            "requests": { "cpu": "10m", "memory": "32Mi" },
            "limits": { "memory": "64Mi" },
        },
        "securityContext": security_context(settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            { "name": VOLUME_CONFIG, "mountPath": CONFIG_DIR, "readOnly": true },
            { "name": VOLUME_SPIRE_SOCKET, "mountPath": SPIRE_SOCKET_DIR, "readOnly": true },
            { "name": VOLUME_SVID, "mountPath": SVID_DIR },
        ],
    });
    if settings.native_sidecar {
        c["restartPolicy"] = json!("Always");
    }
    c
}

fn volumes(settings: &InjectionSettings, policy_configmap: &str) -> Vec<Value> {
    let mut items = vec![json!({
        "path": "config.yaml",
        "fieldRef": { "fieldPath": format!("metadata.annotations['{ANNOTATION_RENDERED_CONFIG}']") },
    })];
    let svid = match &settings.svid {
        SvidSource::CsiDriverSpiffe => json!({
            "name": VOLUME_SVID,
            "csi": {
                "driver": "spiffe.csi.cert-manager.io",
                "readOnly": true,
                // The driver writes the key readable by this group only; the sidecar runs
                // with it as its primary group.
                "volumeAttributes": {
                    "spiffe.csi.cert-manager.io/fs-group": settings.run_as_user.to_string(),
                },
            },
        }),
        SvidSource::Spire { .. } => {
            items.push(json!({
                "path": "spiffe-helper.conf",
                "fieldRef": {
                    "fieldPath": format!("metadata.annotations['{ANNOTATION_RENDERED_HELPER_CONFIG}']"),
                },
            }));
            json!({ "name": VOLUME_SVID, "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } })
        }
    };
    let mut out = vec![
        json!({ "name": VOLUME_CONFIG, "downwardAPI": { "defaultMode": 0o444, "items": items } }),
        json!({
            "name": VOLUME_POLICIES,
            "configMap": { "name": policy_configmap, "defaultMode": 0o444 },
        }),
        svid,
    ];
    if matches!(settings.svid, SvidSource::Spire { .. }) {
        out.push(json!({
            "name": VOLUME_SPIRE_SOCKET,
            "csi": { "driver": "csi.spiffe.io", "readOnly": true },
        }));
    }
    out
}

/// Append `values` to the array at `path`, creating it when the pod has none.
fn append(ops: &mut Vec<Value>, spec: &Value, key: &str, values: Vec<Value>) {
    let path = format!("/spec/{key}");
    if spec.get(key).and_then(Value::as_array).is_some() {
        for v in values {
            ops.push(json!({ "op": "add", "path": format!("{path}/-"), "value": v }));
        }
    } else {
        ops.push(json!({ "op": "add", "path": path, "value": values }));
    }
}

/// Add `entries` to the string map at `/metadata/<key>`, creating it when absent.
fn add_to_map(ops: &mut Vec<Value>, pod: &Value, key: &str, entries: Vec<(&str, String)>) {
    if pod
        .pointer(&format!("/metadata/{key}"))
        .is_some_and(Value::is_object)
    {
        for (k, v) in entries {
            ops.push(json!({
                "op": "add",
                "path": format!("/metadata/{key}/{}", escape_pointer(k)),
                "value": v,
            }));
        }
    } else {
        let map: serde_json::Map<String, Value> = entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        ops.push(json!({ "op": "add", "path": format!("/metadata/{key}"), "value": map }));
    }
}

fn build_patch(
    pod: &Value,
    spec: &Value,
    settings: &InjectionSettings,
    rendered: &str,
    policy_configmap: &str,
) -> Vec<Value> {
    let mut ops = Vec::new();
    if pod.get("metadata").is_none_or(|m| !m.is_object()) {
        ops.push(json!({ "op": "add", "path": "/metadata", "value": {} }));
    }
    let mut annotations = vec![(ANNOTATION_RENDERED_CONFIG, rendered.to_owned())];
    if let SvidSource::Spire { socket_file, .. } = &settings.svid {
        annotations.push((
            ANNOTATION_RENDERED_HELPER_CONFIG,
            render_helper_config(socket_file),
        ));
    }
    add_to_map(&mut ops, pod, "annotations", annotations);
    add_to_map(
        &mut ops,
        pod,
        "labels",
        vec![(LABEL_INJECTED, "true".to_owned())],
    );
    append(
        &mut ops,
        spec,
        "volumes",
        volumes(settings, policy_configmap),
    );

    let mut ours = Vec::new();
    if let SvidSource::Spire { helper_image, .. } = &settings.svid {
        // Before the proxy: native sidecars start in order, so the SVID files exist (or are
        // about to) when portcullis starts.
        ours.push(helper_container(settings, helper_image));
    }
    ours.push(sidecar_container(settings));
    // Native: after the pod's own init containers (their semantics stay as they were), and
    // before every application container. Legacy: next to the application.
    let key = if settings.native_sidecar {
        "initContainers"
    } else {
        "containers"
    };
    append(&mut ops, spec, key, ours);
    ops
}

#[cfg(test)]
#[path = "mutate_tests.rs"]
mod tests;
