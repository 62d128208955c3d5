//! AdmissionReview (admission.k8s.io/v1) in, AdmissionReview out: the glue between the HTTP
//! handler and [`mutate`](crate::mutate()), with the two cluster reads it needs around it
//! (the pod's namespace before, the config ConfigMap after) and the config validation.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::{InjectionSettings, is_dns_subdomain};
use crate::kube::{Cluster, NamespaceInfo};
use crate::mutate::{
    ANNOTATION_INJECT, ConfigSource, Mutation, Refusal, Scope, SkipReason, mutate,
};

/// Checks a sidecar config as `portcullis run` would load it: the ConfigMap's keys (its
/// `config.yaml` and the files it names) and what the injection decided (the webhook's
/// overrides, whether a Secret is mounted at [`SECRET_DIR`](crate::SECRET_DIR)) in, every error
/// as `path: message` out. The `portcullis` binary supplies the real config loader, so the
/// webhook and the sidecar cannot disagree about what is valid.
pub type ConfigValidator =
    Arc<dyn Fn(&BTreeMap<String, String>, &ConfigSource) -> Result<(), Vec<String>> + Send + Sync>;

/// What a review needs besides the request: the settings, the cluster, the validator.
#[derive(Clone)]
pub struct Admission {
    /// What the injected sidecar looks like.
    pub settings: InjectionSettings,
    /// Namespace and ConfigMap reads.
    pub cluster: Arc<dyn Cluster>,
    /// The sidecar's own config validation.
    pub validate: ConfigValidator,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("settings", &self.settings)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// How one review ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Admitted with the sidecar.
    Injected,
    /// Admitted unchanged.
    Skipped(SkipReason),
    /// Not a pod CREATE: admitted unchanged without looking.
    Ignored,
    /// Refused: the pod asked for injection and cannot get it.
    Refused(Refusal),
    /// The review itself was malformed.
    Malformed(String),
}

impl Verdict {
    /// Stable metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped(_) | Self::Ignored => "skipped",
            Self::Refused(_) => "refused",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// The answer to one review.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The AdmissionReview to send back.
    pub review: Value,
    /// What was decided.
    pub verdict: Verdict,
    /// `namespace/name` (or `namespace/generateName*`) of the pod, for logs.
    pub subject: String,
}

/// Answer one AdmissionReview body. Always returns an AdmissionReview, even for a body that
/// is not one (then with an empty uid, which the API server treats as a failed call, so
/// `failurePolicy: Fail` refuses the pod).
pub async fn review(body: &[u8], scope: Scope, admission: &Admission) -> Answer {
    let (review, verdict, subject) = answer(body, scope, admission).await;
    Answer {
        review,
        verdict,
        subject,
    }
}

async fn answer(body: &[u8], scope: Scope, admission: &Admission) -> (Value, Verdict, String) {
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return malformed("", format!("body is not json: {e}")),
    };
    let Some(request) = parsed.get("request").filter(|r| r.is_object()) else {
        return malformed("", "admission review has no request".to_owned());
    };
    let uid = request.get("uid").and_then(Value::as_str).unwrap_or("");
    if parsed.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1")
        || parsed.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return malformed(
            uid,
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview".to_owned(),
        );
    }
    if uid.is_empty() {
        return malformed(uid, "admission request has no uid".to_owned());
    }

    let is_pod = request.pointer("/kind/group").and_then(Value::as_str) == Some("")
        && request.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod");
    let is_create = request.get("operation").and_then(Value::as_str) == Some("CREATE");
    let has_subresource = request
        .get("subResource")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if !is_pod || !is_create || has_subresource {
        return (allowed(uid, None), Verdict::Ignored, subject(request));
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return malformed(uid, "pod CREATE request has no object".to_owned());
    };

    let subject = subject(request);
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| pod.pointer("/metadata/namespace").and_then(Value::as_str))
        .unwrap_or("");
    if !is_dns_subdomain(namespace) {
        return malformed(
            uid,
            "pod CREATE request names no valid namespace".to_owned(),
        );
    }
    match decide(pod, namespace, scope, admission).await {
        Ok(Mutation::Skip(reason)) => (allowed(uid, None), Verdict::Skipped(reason), subject),
        Ok(Mutation::Patch(injection)) => {
            let patch = serde_json::to_vec(&Value::Array(injection.patch)).unwrap_or_default();
            (allowed(uid, Some(&patch)), Verdict::Injected, subject)
        }
        Err(refusal) => (
            denied(uid, 400, "BadRequest", &refusal.to_string()),
            Verdict::Refused(refusal),
            subject,
        ),
    }
}

/// Namespace read (only when injection may be wanted), [`mutate`], then the config ConfigMap
/// read and validation (only when one is named).
async fn decide(
    pod: &Value,
    namespace: &str,
    scope: Scope,
    admission: &Admission,
) -> Result<Mutation, Refusal> {
    let asks = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION_INJECT))
        .or_else(|| {
            pod.pointer("/metadata/labels")
                .and_then(|l| l.get(ANNOTATION_INJECT))
        })
        .and_then(Value::as_str)
        == Some("true");
    // A pod outside enabled namespaces that does not ask needs no read at all.
    let info = if scope == Scope::Namespace || asks {
        match admission.cluster.namespace(namespace).await {
            Ok(info) => info.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(%namespace, error = %e, "cannot read the pod's namespace");
                return Err(Refusal::ClusterUnavailable("pod's namespace"));
            }
        }
    } else {
        NamespaceInfo::default()
    };
    let mutation = mutate(pod, scope, &info, &admission.settings)?;
    if let Mutation::Patch(injection) = &mutation
        && let Some(config) = &injection.config
    {
        check_config(namespace, config, admission).await?;
    }
    Ok(mutation)
}

/// The ConfigMap must exist and its `config.yaml`, with the overrides, must load.
async fn check_config(
    namespace: &str,
    config: &ConfigSource,
    admission: &Admission,
) -> Result<(), Refusal> {
    let data = match admission
        .cluster
        .configmap(namespace, &config.configmap)
        .await
    {
        Ok(Some(data)) => data,
        Ok(None) => return Err(Refusal::ConfigMapMissing(config.configmap.clone())),
        Err(e) => {
            tracing::warn!(%namespace, configmap = %config.configmap, error = %e, "cannot read the config ConfigMap");
            return Err(Refusal::ClusterUnavailable("config ConfigMap"));
        }
    };
    let errors = if data.contains_key("config.yaml") {
        match (admission.validate)(&data, config) {
            Ok(()) => return Ok(()),
            Err(errors) => errors,
        }
    } else {
        vec!["config.yaml: key missing from the ConfigMap".to_owned()]
    };
    Err(Refusal::ConfigInvalid {
        configmap: config.configmap.clone(),
        errors,
    })
}

fn envelope(response: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

fn allowed(uid: &str, patch: Option<&[u8]>) -> Value {
    let mut response = json!({ "uid": uid, "allowed": true });
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64(patch));
    }
    envelope(response)
}

fn denied(uid: &str, code: u16, reason: &str, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {
            "code": code,
            "reason": reason,
            "message": format!("portcullis-injector: {message}"),
        },
    }))
}

fn malformed(uid: &str, message: String) -> (Value, Verdict, String) {
    (
        denied(uid, 400, "BadRequest", &message),
        Verdict::Malformed(message),
        String::new(),
    )
}

fn subject(request: &Value) -> String {
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = request
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            request
                .pointer("/object/metadata/generateName")
                .and_then(Value::as_str)
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    format!("{namespace}/{name}")
}

/// Standard base64 with padding (RFC 4648 §4), as AdmissionResponse.patch requires.
pub(crate) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    fn admission() -> Admission {
        Admission {
            settings: InjectionSettings::default(),
            cluster: Arc::new(crate::kube::StaticCluster::default()),
            validate: Arc::new(|_, _| Ok(())),
        }
    }

    #[tokio::test]
    async fn garbage_still_gets_an_admission_review() {
        let Answer {
            review: out,
            verdict,
            ..
        } = review(b"not json", Scope::Pod, &admission()).await;
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(out["response"]["allowed"], false);
        assert!(matches!(verdict, Verdict::Malformed(_)));
    }

    #[tokio::test]
    async fn non_pod_requests_are_admitted_unchanged() {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "operation": "UPDATE",
                "object": { "spec": {} },
            },
        });
        let Answer {
            review: out,
            verdict,
            ..
        } = review(body.to_string().as_bytes(), Scope::Namespace, &admission()).await;
        assert_eq!(out["response"]["uid"], "u1");
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("patch").is_none());
        assert_eq!(verdict, Verdict::Ignored);
    }
}
