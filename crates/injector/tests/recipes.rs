#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The recipes in `examples/spire/` and `examples/csi-driver-spiffe/`: their own Deployment,
//! injected with the webhook config the chart renders from their own values, mounts exactly
//! what their SPIFFE driver provides, as the driver's values (in the same recipe) configure it.
//!
//! `.ci/k8s-checks` renders the chart with each recipe's `values.yaml` into
//! `$PORTCULLIS_RENDERED_WEBHOOK_CONFIGS/recipe-<name>/webhook-config.yaml` and runs this test.
//! Without the variable (a plain `cargo test`) there is nothing rendered to check; with
//! `CI=true` that is a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use portcullis_injector::{
    CSI_DRIVER_SPIFFE, CSI_DRIVER_SPIRE, HELPER_NAME, Injection, InjectionSettings, Mutation,
    NamespaceInfo, SIDECAR_NAME, Scope, WebhookConfig, mutate,
};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(path: &Path) -> Value {
    yaml_docs(path).remove(0)
}

/// The injection settings the chart renders from the recipe's values.
fn settings(recipe: &str) -> Option<InjectionSettings> {
    // `.ci/k8s-checks` renders the chart and runs this test with the variable set (and fails
    // when it fails); a plain `cargo test`, CI's included, runs before the chart is rendered.
    let Some(dir) = std::env::var_os("PORTCULLIS_RENDERED_WEBHOOK_CONFIGS") else {
        eprintln!("notice: PORTCULLIS_RENDERED_WEBHOOK_CONFIGS is not set; run .ci/k8s-checks");
        return None;
    };
    let file = Path::new(&dir).join(format!("recipe-{recipe}/webhook-config.yaml"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    // The serving certificate is irrelevant here; point it at a real pair.
    let tls = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["injector".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(tls.path().join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(tls.path().join("tls.key"), key.serialize_pem()).unwrap();
    let text = text.replace(
        "/etc/portcullis-webhook/tls",
        &tls.path().display().to_string(),
    );
    Some(
        WebhookConfig::from_yaml(&text, tls.path())
            .unwrap()
            .injection,
    )
}

/// The recipe's Deployment, as the pod its ReplicaSet creates, injected in the recipe's
/// namespace.
fn injected_pod(recipe: &str, settings: &InjectionSettings) -> Value {
    let docs = yaml_docs(&repo().join(format!("examples/{recipe}/app.yaml")));
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap().clone();
    let ns = kind("Namespace");
    let map = |v: &Value| -> BTreeMap<String, String> {
        serde_json::from_value(v.clone()).unwrap_or_default()
    };
    let namespace = NamespaceInfo {
        labels: map(&ns["metadata"]["labels"]),
        annotations: map(&ns["metadata"]["annotations"]),
    };
    let deployment = kind("Deployment");
    let mut pod = deployment["spec"]["template"].clone();
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    let Ok(Mutation::Patch(Injection { patch, config })) =
        mutate(&pod, Scope::Namespace, &namespace, settings)
    else {
        panic!("{recipe}: the recipe's pod is not injected");
    };
    // The namespace names the recipe's config ConfigMap.
    assert_eq!(
        config.unwrap().configmap,
        ns["metadata"]["annotations"]["portcullis.dev/config"]
    );
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(patch)).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

fn container(pod: &Value, name: &str) -> Value {
    pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn overrides(sidecar: &Value) -> Value {
    let args = sidecar["args"].as_array().unwrap();
    let at = args.iter().position(|a| a == "--override").unwrap();
    serde_json::from_str(args[at + 1].as_str().unwrap()).unwrap()
}

fn csi_volumes(pod: &Value) -> Vec<Value> {
    pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v.get("csi").is_some())
        .cloned()
        .collect()
}

fn mount_path(container: &Value, volume: &str) -> String {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume)
        .map(|m| m["mountPath"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container["name"]))
}

#[test]
fn csi_driver_spiffe_recipe_mounts_the_driver_volume_and_reads_its_files() {
    let Some(settings) = settings("csi-driver-spiffe") else {
        return;
    };
    let driver = yaml(&repo().join("examples/csi-driver-spiffe/csi-driver-spiffe-values.yaml"));
    let pod = injected_pod("csi-driver-spiffe", &settings);
    let sidecar = container(&pod, SIDECAR_NAME);

    // Exactly one CSI volume: the driver's, read-only, with the fs-group the sidecar runs as.
    let csi = csi_volumes(&pod);
    assert_eq!(csi.len(), 1, "{csi:?}");
    let volume = &csi[0];
    assert_eq!(volume["csi"]["driver"], CSI_DRIVER_SPIFFE);
    assert_eq!(volume["csi"]["readOnly"], true);
    assert_eq!(
        volume["csi"]["volumeAttributes"],
        serde_json::json!({ "spiffe.csi.cert-manager.io/fs-group": settings.run_as_user.to_string() })
    );
    assert_eq!(
        sidecar["securityContext"]["runAsGroup"],
        settings.run_as_user
    );
    let dir = mount_path(&sidecar, volume["name"].as_str().unwrap());

    // The proxy reads the files the driver writes, under the trust domain the driver issues.
    let files = &driver["app"]["driver"]["volumeFileName"];
    let trust_domain = driver["app"]["trustDomain"].as_str().unwrap();
    let tls = &overrides(&sidecar)["tls"];
    assert_eq!(
        tls["cert"],
        format!("{dir}/{}", files["cert"].as_str().unwrap())
    );
    assert_eq!(
        tls["key"],
        format!("{dir}/{}", files["key"].as_str().unwrap())
    );
    assert_eq!(
        tls["trust_bundles"],
        serde_json::json!({ trust_domain: format!("{dir}/{}", files["ca"].as_str().unwrap()) })
    );
    assert!(pod["spec"]["initContainers"].as_array().unwrap().len() == 1);
}

#[test]
fn spire_recipe_mounts_the_workload_api_socket_for_the_helper_only() {
    let Some(settings) = settings("spire") else {
        return;
    };
    let spire = yaml(&repo().join("examples/spire/spire-values.yaml"));
    let pod = injected_pod("spire", &settings);
    let sidecar = container(&pod, SIDECAR_NAME);
    let helper = container(&pod, HELPER_NAME);

    // Exactly one CSI volume: the SPIFFE CSI driver's socket directory, read-only.
    let csi = csi_volumes(&pod);
    assert_eq!(csi.len(), 1, "{csi:?}");
    let socket_volume = csi[0]["name"].as_str().unwrap();
    assert_eq!(csi[0]["csi"]["driver"], CSI_DRIVER_SPIRE);
    assert_eq!(csi[0]["csi"]["readOnly"], true);
    // The helper mounts it where the agent's socket path says, and names that socket.
    let socket_path = spire["spire-agent"]["socketPath"].as_str().unwrap();
    let (socket_dir, socket_file) = socket_path.rsplit_once('/').unwrap();
    assert_eq!(mount_path(&helper, socket_volume), socket_dir);
    let helper_conf =
        pod["metadata"]["annotations"]["portcullis.dev/rendered-spiffe-helper-config"]
            .as_str()
            .unwrap();
    assert!(
        helper_conf.contains(&format!("agent_address = \"{socket_dir}/{socket_file}\"")),
        "{helper_conf}"
    );
    // The proxy never sees the socket; it reads the files the helper writes into their
    // shared volume, under the trust domain SPIRE serves.
    assert!(
        sidecar["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["name"] != socket_volume)
    );
    let shared = helper["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m.get("readOnly").is_none())
        .unwrap()
        .clone();
    let dir = mount_path(&sidecar, shared["name"].as_str().unwrap());
    assert_eq!(dir, shared["mountPath"]);
    for (key, file) in [
        ("svid_file_name", "svid.pem"),
        ("svid_key_file_name", "svid_key.pem"),
        ("svid_bundle_file_name", "bundle.pem"),
    ] {
        assert!(
            helper_conf.contains(&format!("{key} = \"{file}\"")),
            "{helper_conf}"
        );
    }
    assert!(helper_conf.contains(&format!("cert_dir = \"{dir}\"")));
    let trust_domain = spire["global"]["spire"]["trustDomain"].as_str().unwrap();
    let tls = &overrides(&sidecar)["tls"];
    assert_eq!(tls["cert"], format!("{dir}/svid.pem"));
    assert_eq!(tls["key"], format!("{dir}/svid_key.pem"));
    assert_eq!(
        tls["trust_bundles"],
        serde_json::json!({ trust_domain: format!("{dir}/bundle.pem") })
    );
}
