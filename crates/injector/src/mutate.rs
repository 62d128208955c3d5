//! The pure part of the webhook: a pod (JSON) and the settings in, a decision out.
//!
//! Nothing here does I/O, so every case (opt-in routes, opt-out, idempotence, refusals) is a
//! plain function call in the tests. What the webhook must read from the cluster (the pod's
//! namespace) is an argument; the ConfigMap a pod names is fetched and validated by
//! [`review`](crate::review()) after this step says which one.
//!
//! Nothing the sidecar runs with comes from a pod annotation at run time: annotations can be
//! patched by anyone with `pods/patch` and a downward API volume would follow them. The
//! webhook reads the pod's annotations once, at CREATE, and writes what it decided into the
//! container's `args`, which cannot change after creation.

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{InjectionSettings, PolicyMode, SvidSource, is_dns_subdomain};
use crate::kube::NamespaceInfo;
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
/// ConfigMap (pod or namespace annotation) whose `config.yaml` is the sidecar's config.
pub const ANNOTATION_CONFIG: &str = "portcullis.dev/config";
/// Secret (pod or namespace annotation) mounted into the sidecar only, at [`SECRET_DIR`]:
/// upstream API keys (`routes[].credential.file`), the audit `signing_key`.
pub const ANNOTATION_SECRET: &str = "portcullis.dev/secret";
/// Namespace label or annotation: `"true"` lets pods opt out or ask for shadow mode.
pub const ANNOTATION_ALLOW_OPT_OUT: &str = "portcullis.dev/allow-opt-out";
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
const VOLUME_SECRET: &str = "portcullis-secret";
const VOLUME_HELPER_CONFIG: &str = "portcullis-helper-config";
const VOLUME_POLICIES: &str = "portcullis-policies";
const VOLUME_SVID: &str = "portcullis-svid";
const VOLUME_SPIRE_SOCKET: &str = "portcullis-spire-agent";

/// Where the config ConfigMap is mounted: every key, so `jwks_file: jwks.json` in its
/// `config.yaml` resolves to the ConfigMap's own `jwks.json`.
pub const CONFIG_DIR: &str = "/etc/portcullis/config";
/// Where the Secret named by [`ANNOTATION_SECRET`] is mounted (read-only, the sidecar only):
/// a config names its keys as `/etc/portcullis/secret/<key>`.
pub const SECRET_DIR: &str = "/etc/portcullis/secret";
const HELPER_CONFIG_DIR: &str = "/etc/portcullis/spiffe-helper";
const POLICY_DIR: &str = "/etc/portcullis/policies";
const SVID_DIR: &str = "/run/spiffe";
/// cert-manager csi-driver-spiffe: writes `tls.crt`, `tls.key`, `ca.crt` into the volume.
pub const CSI_DRIVER_SPIFFE: &str = "spiffe.csi.cert-manager.io";
/// SPIFFE CSI driver (SPIRE): mounts the Workload API socket directory.
pub const CSI_DRIVER_SPIRE: &str = "csi.spiffe.io";
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
    /// Admit with this patch, once the named config (if any) validates.
    Patch(Injection),
}

/// The sidecar added to a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// RFC 6902 JSON patch.
    pub patch: Vec<Value>,
    /// The config ConfigMap the sidecar will load, which must exist and validate.
    pub config: Option<ConfigSource>,
}

/// A sidecar config taken from a ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    /// ConfigMap in the pod's namespace; its `config.yaml` is the base config.
    pub configmap: String,
    /// What the sidecar lays over it (`portcullis run --override`): listeners, upstream,
    /// the injected certificate paths, the policy mount and mode.
    pub overrides: String,
    /// The Secret mounted at [`SECRET_DIR`], if the pod or its namespace names one. The
    /// webhook cannot read it (no RBAC on Secrets): files the config names under
    /// [`SECRET_DIR`] are checked by the sidecar at start, not at admission.
    pub secret: Option<String>,
}

/// Why a pod is admitted unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither the namespace nor the pod asked for injection.
    NotRequested,
    /// The pod says `portcullis.dev/inject: "false"`.
    OptedOut,
    /// The pod already has exactly the sidecar this webhook would add (a reinvocation).
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
    /// A container of the pod's own mounts one of the sidecar's volumes.
    #[error("a container of the pod mounts {0:?}, a volume only the portcullis sidecar may use")]
    VolumeMounted(String),
    /// Bad trust domain annotation.
    #[error("{ANNOTATION_TRUST_DOMAIN} {0:?} is not a valid SPIFFE trust domain")]
    BadTrustDomain(String),
    /// Bad policy ConfigMap name.
    #[error("{ANNOTATION_POLICY_CONFIGMAP} {0:?} is not a valid ConfigMap name")]
    BadPolicyConfigMap(String),
    /// Bad policy mode.
    #[error("{ANNOTATION_POLICY_MODE} must be \"enforce\" or \"shadow\", not {0:?}")]
    BadPolicyMode(String),
    /// The application's port is published on the node.
    #[error(
        "the application's port {0} has a hostPort: it would be reachable on the node past the portcullis sidecar"
    )]
    UpstreamOnHostPort(u16),
    /// The pod shares the node's network namespace.
    #[error(
        "pods with hostNetwork: true cannot get the portcullis sidecar: its ports would be opened on the node"
    )]
    HostNetwork,
    /// The pod shares a process namespace (`shareProcessNamespace` among its containers,
    /// `hostPID` with the node): a process running as the sidecar's UID there reads the
    /// sidecar's files through `/proc/<pid>/root` (the SVID key, the Secret) and its memory.
    #[error(
        "pods with {0}: true cannot get the portcullis sidecar: a process sharing its process namespace could read its keys through /proc"
    )]
    ProcessNamespaceShared(&'static str),
    /// The object is not shaped like a pod.
    #[error("the object is not a pod: {0}")]
    NotAPod(&'static str),
    /// The pod opts out in a namespace that does not allow it.
    #[error(
        "{ANNOTATION_INJECT}: \"false\" is not allowed in this namespace (it needs {ANNOTATION_ALLOW_OPT_OUT}: \"true\")"
    )]
    OptOutNotAllowed,
    /// The pod names another policy ConfigMap, config ConfigMap or Secret than the one its
    /// namespace sets (the variant's name predates the Secret).
    #[error(
        "{annotation}: {pod:?} is not allowed in this namespace, which sets {annotation}: {namespace:?} for its pods"
    )]
    NamespaceChoosesConfigMap {
        annotation: &'static str,
        pod: String,
        namespace: String,
    },
    /// The pod asks for shadow mode in a namespace that does not allow it.
    #[error(
        "{ANNOTATION_POLICY_MODE}: shadow is not allowed in this namespace (it needs {ANNOTATION_ALLOW_OPT_OUT}: \"true\")"
    )]
    ShadowNotAllowed,
    /// A container named `portcullis` that is not the one this webhook would add.
    #[error(
        "the pod already has a container named {SIDECAR_NAME:?} that the portcullis injector did not create; remove it and let the webhook add the sidecar"
    )]
    ForeignSidecar,
    /// Bad config ConfigMap name.
    #[error("{ANNOTATION_CONFIG} {0:?} is not a valid ConfigMap name")]
    BadConfigMapName(String),
    /// Bad Secret name.
    #[error(
        "{ANNOTATION_SECRET} {0:?} is not a valid Secret name (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters)"
    )]
    BadSecretName(String),
    /// The named config ConfigMap does not exist.
    #[error("{ANNOTATION_CONFIG}: ConfigMap {0:?} not found in the pod's namespace")]
    ConfigMapMissing(String),
    /// The named config ConfigMap holds an invalid config.
    #[error("{ANNOTATION_CONFIG}: ConfigMap {configmap:?} is not a valid sidecar config:\n{}", .errors.join("\n"))]
    ConfigInvalid {
        /// The ConfigMap.
        configmap: String,
        /// Every error, `path: message`.
        errors: Vec<String>,
    },
    /// The namespace or ConfigMap could not be read (details in the webhook's log only).
    #[error(
        "the portcullis injector could not read the {0} from the Kubernetes API; try again, or see the injector's log"
    )]
    ClusterUnavailable(&'static str),
}

/// Decide what to do with `pod` (the `request.object` of an AdmissionReview).
pub fn mutate(
    pod: &Value,
    scope: Scope,
    namespace: &NamespaceInfo,
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

    // In an enabled namespace the namespace decides: a pod may opt out only where the
    // namespace allows it (the pod author is not the one who asked for protection). The
    // annotation is checked first; a label is accepted too because only labels can be
    // matched by the webhook's objectSelector.
    let allows_opt_out = namespace_allows_opt_out(namespace);
    let pod_says = annotation(ANNOTATION_INJECT).or_else(|| label(ANNOTATION_INJECT));
    let requested = match pod_says {
        Some("false") if scope == Scope::Namespace && !allows_opt_out => {
            return Err(Refusal::OptOutNotAllowed);
        }
        Some("false") => return Ok(Mutation::Skip(SkipReason::OptedOut)),
        Some("true") => true,
        Some(other) => return Err(Refusal::BadInjectValue(other.to_owned())),
        None => scope == Scope::Namespace,
    };
    if !requested {
        return Ok(Mutation::Skip(SkipReason::NotRequested));
    }

    if has_sidecar(spec) {
        return already_injected(pod, namespace, settings);
    }
    let plan = plan(pod, spec, namespace, settings)?;
    Ok(Mutation::Patch(Injection {
        patch: build_patch(pod, spec, settings, &plan),
        config: plan.config,
    }))
}

/// `portcullis.dev/allow-opt-out: "true"` as a namespace label or annotation.
fn namespace_allows_opt_out(namespace: &NamespaceInfo) -> bool {
    [&namespace.annotations, &namespace.labels]
        .iter()
        .any(|m| m.get(ANNOTATION_ALLOW_OPT_OUT).map(String::as_str) == Some("true"))
}

fn has_sidecar(spec: &Value) -> bool {
    containers(spec, "initContainers")
        .iter()
        .chain(&containers(spec, "containers"))
        .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME))
}

/// A pod that already has a `portcullis` container is admitted unchanged only if that
/// container, its helper and their volumes are exactly what this webhook would add to the pod
/// without them (a reinvocation after a later webhook changed the pod, or a re-created copy of
/// an injected pod). Anything else is a sidecar someone wrote by hand, perhaps with another
/// config, image or policy source, and is refused.
fn already_injected(
    pod: &Value,
    namespace: &NamespaceInfo,
    settings: &InjectionSettings,
) -> Result<Mutation, Refusal> {
    let mut bare = pod.clone();
    let ours = |v: &Value| {
        v.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| n == SIDECAR_NAME || n == HELPER_NAME || OUR_VOLUMES.contains(&n))
    };
    let mut existing = Vec::new();
    for key in ["initContainers", "containers", "volumes"] {
        if let Some(list) = bare["spec"].get_mut(key).and_then(Value::as_array_mut) {
            existing.extend(list.iter().filter(|v| ours(v)).map(|v| (key, v.clone())));
            list.retain(|v| !ours(v));
        }
    }
    let spec = &bare["spec"];
    let plan = plan(&bare, spec, namespace, settings)?;
    let container_key = if settings.native_sidecar {
        "initContainers"
    } else {
        "containers"
    };
    let expected: Vec<(&str, &Value)> = plan
        .containers
        .iter()
        .map(|c| (container_key, c))
        .chain(plan.volumes.iter().map(|v| ("volumes", v)))
        .collect();
    // The helper reads its config from this annotation (a downward-API file): a pod written
    // with its own value would run spiffe-helper with it (federated roots in the own trust
    // domain's bundle, rotation off), so it must be what this webhook renders.
    let helper_config = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION_RENDERED_HELPER_CONFIG))
        .and_then(Value::as_str);
    let same = expected.len() == existing.len()
        && helper_config == plan.helper_config.as_deref()
        && expected.iter().all(|(key, want)| {
            existing.iter().any(|(k, have)| {
                k == key && have.get("name") == want.get("name") && covers(want, have)
            })
        });
    if same {
        Ok(Mutation::Skip(SkipReason::AlreadyInjected))
    } else {
        Err(Refusal::ForeignSidecar)
    }
}

/// Fields the API server fills in with defaults after a webhook's patch; anything else that
/// the rendered sidecar does not have is a difference.
const DEFAULTED: &[&str] = &["terminationMessagePath", "successThreshold", "apiVersion"];

/// `actual` is `expected`, give or take API server defaults.
fn covers(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => {
            want.iter()
                .all(|(k, v)| have.get(k).is_some_and(|h| covers(v, h)))
                && have
                    .keys()
                    .all(|k| want.contains_key(k) || DEFAULTED.contains(&k.as_str()))
        }
        (Value::Array(want), Value::Array(have)) => {
            want.len() == have.len() && want.iter().zip(have).all(|(w, h)| covers(w, h))
        }
        (want, have) => want == have,
    }
}

/// Everything the patch adds, decided from the pod (without a sidecar) and its namespace.
struct Plan {
    containers: Vec<Value>,
    volumes: Vec<Value>,
    helper_config: Option<String>,
    config: Option<ConfigSource>,
}

const OUR_VOLUMES: &[&str] = &[
    VOLUME_CONFIG,
    VOLUME_SECRET,
    VOLUME_HELPER_CONFIG,
    VOLUME_POLICIES,
    VOLUME_SVID,
    VOLUME_SPIRE_SOCKET,
];

fn plan(
    pod: &Value,
    spec: &Value,
    namespace: &NamespaceInfo,
    settings: &InjectionSettings,
) -> Result<Plan, Refusal> {
    let annotations = pod.pointer("/metadata/annotations");
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
    let init_containers = containers(spec, "initContainers");
    let app_containers = containers(spec, "containers");

    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(Refusal::HostNetwork);
    }
    // Containers that share a PID namespace see each other's /proc/<pid>/root and
    // /proc/<pid>/mem; the same UID (65532 is distroless's "nonroot", common in application
    // images) or CAP_SYS_PTRACE is all it takes to read the sidecar's private key and Secret.
    for field in ["shareProcessNamespace", "hostPID"] {
        if spec.get(field).and_then(Value::as_bool) == Some(true) {
            return Err(Refusal::ProcessNamespaceShared(field));
        }
    }

    let upstream_port = match annotation(ANNOTATION_UPSTREAM_PORT) {
        None => return Err(Refusal::MissingUpstreamPort),
        Some(p) => resolve_port(p, &app_containers)?,
    };
    // A hostPort opens the application's port on the node, where anything reaching the node
    // calls it past the sidecar (with identity headers of its own making).
    let exposed = app_containers.iter().any(|c| {
        c.get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|p| {
                p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(upstream_port))
                    && p.get("hostPort")
                        .and_then(Value::as_u64)
                        .is_some_and(|h| h > 0)
            })
    });
    if exposed {
        return Err(Refusal::UpstreamOnHostPort(upstream_port));
    }
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

    if let Some(existing) = spec.get("volumes").and_then(Value::as_array) {
        for v in existing {
            if let Some(name) = v.get("name").and_then(Value::as_str)
                && OUR_VOLUMES.contains(&name)
            {
                return Err(Refusal::VolumeConflict(name.to_owned()));
            }
        }
    }
    // Nor may the pod's own containers mount them: the API server checks that a mount names a
    // volume only after the webhooks ran, so a mount of `portcullis-svid` without the volume
    // would be admitted onto the sidecar's (writable) SVID and bundle directory, and the app
    // could put its own CA in the bundle the proxy trusts.
    for key in ["initContainers", "containers", "ephemeralContainers"] {
        for container in containers(spec, key) {
            for field in ["volumeMounts", "volumeDevices"] {
                let mounts = container.get(field).and_then(Value::as_array);
                for mount in mounts.into_iter().flatten() {
                    if let Some(name) = mount.get("name").and_then(Value::as_str)
                        && OUR_VOLUMES.contains(&name)
                    {
                        return Err(Refusal::VolumeMounted(name.to_owned()));
                    }
                }
            }
        }
    }

    let trust_domain = match annotation(ANNOTATION_TRUST_DOMAIN) {
        None => settings.trust_domain.clone(),
        Some(s) => TrustDomain::parse(s).map_err(|_| Refusal::BadTrustDomain(s.to_owned()))?,
    };
    // Where the namespace names the policy or config ConfigMap (or the Secret), its pods get
    // that one: a pod author who may create ConfigMaps (but not update the namespace's, which
    // RBAC can hold by name) would otherwise point the sidecar at a permissive set, a config
    // without user tokens or limits, or credentials of their own choosing. Without a
    // namespace choice the pod's stands, as before.
    let chosen = |key: &'static str| -> Result<Option<&str>, Refusal> {
        let ours = namespace.annotations.get(key).map(String::as_str);
        match (annotation(key), ours) {
            (Some(pod), Some(ours)) if pod != ours => Err(Refusal::NamespaceChoosesConfigMap {
                annotation: key,
                pod: pod.to_owned(),
                namespace: ours.to_owned(),
            }),
            (pod, ours) => Ok(ours.or(pod)),
        }
    };
    let policy_configmap = match chosen(ANNOTATION_POLICY_CONFIGMAP)? {
        None => settings.policy_configmap.clone(),
        Some(s) if is_dns_subdomain(s) => s.to_owned(),
        Some(s) => return Err(Refusal::BadPolicyConfigMap(s.to_owned())),
    };
    let policy_mode = match annotation(ANNOTATION_POLICY_MODE) {
        None => settings.policy_mode,
        Some(s) => PolicyMode::parse(s).ok_or_else(|| Refusal::BadPolicyMode(s.to_owned()))?,
    };
    // Shadow never blocks: asking for it is opting out of enforcement.
    if policy_mode == PolicyMode::Shadow
        && settings.policy_mode != PolicyMode::Shadow
        && !namespace_allows_opt_out(namespace)
    {
        return Err(Refusal::ShadowNotAllowed);
    }
    let configmap = match chosen(ANNOTATION_CONFIG)? {
        None => None,
        Some(s) if is_dns_subdomain(s) => Some(s.to_owned()),
        Some(s) => return Err(Refusal::BadConfigMapName(s.to_owned())),
    };
    let secret = match chosen(ANNOTATION_SECRET)? {
        None => None,
        Some(s) if is_dns_subdomain(s) => Some(s.to_owned()),
        Some(s) => return Err(Refusal::BadSecretName(s.to_owned())),
    };

    let overrides = render_overrides(
        settings,
        upstream_port,
        trust_domain.as_str(),
        policy_mode,
        configmap.is_none(),
    );
    let config = configmap.map(|configmap| ConfigSource {
        configmap,
        overrides: overrides.clone(),
        secret: secret.clone(),
    });
    let mut containers = Vec::new();
    let helper_config = match &settings.svid {
        SvidSource::Spire {
            helper_image,
            socket_file,
        } => {
            // Before the proxy: native sidecars start in order, so the SVID files exist (or
            // are about to) when portcullis starts.
            containers.push(helper_container(settings, helper_image));
            Some(render_helper_config(socket_file))
        }
        SvidSource::CsiDriverSpiffe => None,
    };
    containers.push(sidecar_container(
        settings,
        &overrides,
        config.is_some(),
        secret.is_some(),
    ));
    Ok(Plan {
        containers,
        volumes: volumes(
            settings,
            &policy_configmap,
            config.as_ref(),
            secret.as_deref(),
        ),
        helper_config,
        config,
    })
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

/// What the webhook decides of the sidecar config, keys exactly as the `portcullis run`
/// contract names them. With a config ConfigMap this is laid over its `config.yaml`
/// (mappings merge, other values replace), so the ConfigMap cannot move the listeners, the
/// certificates, the policy source or the mode; without one it is the whole config.
#[derive(Serialize)]
struct SidecarConfig<'a> {
    listen: String,
    admin_listen: String,
    upstream: String,
    tls: SidecarTls<'a>,
    policy: SidecarPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit: Option<SidecarAudit>,
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

/// Render what the sidecar gets as `--override`: the whole config when `complete`, else the
/// part laid over a ConfigMap's `config.yaml`. One line of JSON (which is YAML), so it reads
/// well in `kubectl get pod -o yaml`.
pub fn render_overrides(
    settings: &InjectionSettings,
    upstream_port: u16,
    trust_domain: &str,
    mode: PolicyMode,
    complete: bool,
) -> String {
    let (cert, key, bundle) = svid_files(&settings.svid);
    let config = SidecarConfig {
        // In a pod both listeners bind every interface: agents reach the mTLS port through
        // the Service, and the kubelet's probes and Prometheus come from outside the pod. The
        // admin listener serves `/inventory` to loopback peers only (portcullis-proxy admin).
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
        // A ConfigMap may name its own sink; in the pod only stdout can work (nothing the
        // sidecar mounts is writable), and the webhook refuses a file sink at admission.
        audit: complete.then_some(SidecarAudit { sink: "stdout" }),
    };
    // Serialising plain strings and maps cannot fail; an empty override would make the
    // sidecar refuse to start rather than pass silently.
    serde_json::to_string(&config).unwrap_or_default()
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

fn sidecar_container(
    settings: &InjectionSettings,
    overrides: &str,
    from_configmap: bool,
    secret: bool,
) -> Value {
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
        "args": sidecar_args(overrides, from_configmap),
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
        "volumeMounts": sidecar_mounts(from_configmap, secret),
    });
    if settings.native_sidecar {
        c["restartPolicy"] = json!("Always");
    }
    c
}

/// `portcullis run` with the config ConfigMap's file (when there is one) and the webhook's
/// overrides, both fixed in the container spec at creation.
fn sidecar_args(overrides: &str, from_configmap: bool) -> Value {
    let mut args = vec!["run".to_owned()];
    if from_configmap {
        args.extend(["--config".to_owned(), format!("{CONFIG_DIR}/config.yaml")]);
    }
    args.extend(["--override".to_owned(), overrides.to_owned()]);
    json!(args)
}

fn sidecar_mounts(from_configmap: bool, secret: bool) -> Value {
    let mut mounts = Vec::new();
    if from_configmap {
        mounts.push(json!({ "name": VOLUME_CONFIG, "mountPath": CONFIG_DIR, "readOnly": true }));
    }
    // The portcullis container only: not the spiffe-helper, and no container of the pod's
    // own may mount it (OUR_VOLUMES).
    if secret {
        mounts.push(json!({ "name": VOLUME_SECRET, "mountPath": SECRET_DIR, "readOnly": true }));
    }
    mounts.push(json!({ "name": VOLUME_POLICIES, "mountPath": POLICY_DIR, "readOnly": true }));
    mounts.push(json!({ "name": VOLUME_SVID, "mountPath": SVID_DIR, "readOnly": true }));
    json!(mounts)
}

fn helper_container(settings: &InjectionSettings, image: &str) -> Value {
    let mut c = json!({
        "name": HELPER_NAME,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["-config", format!("{HELPER_CONFIG_DIR}/spiffe-helper.conf")],
        "resources": {
            "requests": { "cpu": "10m", "memory": "32Mi" },
            "limits": { "memory": "64Mi" },
        },
        "securityContext": security_context(settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            { "name": VOLUME_HELPER_CONFIG, "mountPath": HELPER_CONFIG_DIR, "readOnly": true },
            { "name": VOLUME_SPIRE_SOCKET, "mountPath": SPIRE_SOCKET_DIR, "readOnly": true },
            { "name": VOLUME_SVID, "mountPath": SVID_DIR },
        ],
    });
    if settings.native_sidecar {
        c["restartPolicy"] = json!("Always");
    }
    c
}

fn volumes(
    settings: &InjectionSettings,
    policy_configmap: &str,
    config: Option<&ConfigSource>,
    secret: Option<&str>,
) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(config) = config {
        out.push(json!({
            "name": VOLUME_CONFIG,
            "configMap": { "name": config.configmap, "defaultMode": 0o444 },
        }));
    }
    if let Some(secret) = secret {
        // 0444, not 0440: the pod has no fsGroup (the webhook sets none, and setting one would
        // re-own every volume of the pod and add a group to the application's containers), so
        // the kubelet writes the files as root:root, and 0440 would leave them unreadable to
        // the sidecar's UID/GID (`run_as_user`, 65532 by default). Who can read them is
        // decided by who mounts the volume: the portcullis container alone (not the
        // spiffe-helper; a container of the pod's own mounting it is refused).
        // `optional: false`: a missing Secret holds the pod in ContainerCreating rather than
        // starting a sidecar without its credentials.
        out.push(json!({
            "name": VOLUME_SECRET,
            "secret": { "secretName": secret, "defaultMode": 0o444, "optional": false },
        }));
    }
    out.push(json!({
        "name": VOLUME_POLICIES,
        "configMap": { "name": policy_configmap, "defaultMode": 0o444 },
    }));
    match &settings.svid {
        SvidSource::CsiDriverSpiffe => out.push(json!({
            "name": VOLUME_SVID,
            "csi": {
                "driver": CSI_DRIVER_SPIFFE,
                "readOnly": true,
                // The driver writes the key readable by this group only; the sidecar runs
                // with it as its primary group.
                "volumeAttributes": {
                    "spiffe.csi.cert-manager.io/fs-group": settings.run_as_user.to_string(),
                },
            },
        })),
        SvidSource::Spire { .. } => {
            out.push(json!({
                "name": VOLUME_SVID,
                "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" },
            }));
            out.push(json!({
                "name": VOLUME_SPIRE_SOCKET,
                "csi": { "driver": CSI_DRIVER_SPIRE, "readOnly": true },
            }));
            // spiffe-helper reads only a file; it names the agent socket and where the SVID
            // files go, nothing that decides what the proxy allows.
            out.push(json!({
                "name": VOLUME_HELPER_CONFIG,
                "downwardAPI": { "defaultMode": 0o444, "items": [{
                    "path": "spiffe-helper.conf",
                    "fieldRef": {
                        "fieldPath": format!("metadata.annotations['{ANNOTATION_RENDERED_HELPER_CONFIG}']"),
                    },
                }]},
            }));
        }
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

fn build_patch(pod: &Value, spec: &Value, settings: &InjectionSettings, plan: &Plan) -> Vec<Value> {
    let mut ops = Vec::new();
    if pod.get("metadata").is_none_or(|m| !m.is_object()) {
        ops.push(json!({ "op": "add", "path": "/metadata", "value": {} }));
    }
    if let Some(helper) = &plan.helper_config {
        add_to_map(
            &mut ops,
            pod,
            "annotations",
            vec![(ANNOTATION_RENDERED_HELPER_CONFIG, helper.clone())],
        );
    }
    add_to_map(
        &mut ops,
        pod,
        "labels",
        vec![(LABEL_INJECTED, "true".to_owned())],
    );
    append(&mut ops, spec, "volumes", plan.volumes.clone());
    // Native: after the pod's own init containers (their semantics stay as they were), and
    // before every application container. Legacy: next to the application.
    let key = if settings.native_sidecar {
        "initContainers"
    } else {
        "containers"
    };
    append(&mut ops, spec, key, plan.containers.clone());
    ops
}

#[cfg(test)]
#[path = "mutate_tests.rs"]
mod tests;
