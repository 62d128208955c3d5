//! What `portcullis inject-webhook` adds to the injector crate: the sidecar's own config
//! loader as the check of a pod's config ConfigMap, so the webhook refuses at admission
//! exactly the configs `portcullis run` would refuse at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use portcullis_injector::{CONFIG_DIR, ConfigValidator};

use crate::config::{Config, overlay};

/// The validator handed to the webhook.
pub fn validator() -> ConfigValidator {
    Arc::new(validate_configmap)
}

/// Checks a config ConfigMap as the sidecar will load it: every key written as a file (so
/// `jwks_file: jwks.json` finds the ConfigMap's own `jwks.json`, as in the pod, where the
/// ConfigMap is mounted as a directory), `config.yaml` with the webhook's `overrides` laid over
/// it, loaded by [`Config::from_yaml`]. The files the overrides point at (the SVID from the CSI
/// driver, the policy ConfigMap's mount) exist only in the pod, so errors about exactly those
/// paths are not the ConfigMap's and are left out; every other error is returned with its path.
pub fn validate_configmap(
    data: &BTreeMap<String, String>,
    overrides: &str,
) -> Result<(), Vec<String>> {
    let dir = tempfile::tempdir()
        .map_err(|e| vec![format!("(webhook): cannot create a scratch directory: {e}")])?;
    for (key, value) in data {
        // ConfigMap keys are [-._a-zA-Z0-9]+ and never "." or ".."; checked again because
        // the key becomes a path.
        if key.is_empty() || key == "." || key == ".." || key.contains(['/', '\\']) {
            return Err(vec![format!("{key}: not a valid ConfigMap key")]);
        }
        std::fs::write(dir.path().join(key), value)
            .map_err(|e| vec![format!("(webhook): cannot write {key}: {e}")])?;
    }
    let text = data
        .get("config.yaml")
        .map(String::as_str)
        .unwrap_or_default();
    let merged = overlay(text, overrides)
        .map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let provided = provided_paths(overrides);
    let scratch = dir.path().display().to_string();
    match Config::from_yaml(&merged, dir.path(), &dir.path().join("config.yaml")) {
        Ok(_) => Ok(()),
        Err(errors) => {
            let theirs: Vec<String> = errors
                .0
                .iter()
                .filter(|e| {
                    !provided
                        .iter()
                        .any(|p| e.path == *p || e.path.starts_with(&format!("{p}: ")))
                })
                // Name files where the pod will have them, not in this scratch directory.
                .map(|e| e.to_string().replace(&scratch, CONFIG_DIR))
                .collect();
            if theirs.is_empty() {
                Ok(())
            } else {
                Err(theirs)
            }
        }
    }
}

/// YAML paths (`tls.cert`, `tls.trust_bundles.cluster.local`, `policy.dir`) of the string
/// values in the overrides that are absolute paths: files the injection mounts into the pod.
fn provided_paths(overrides: &str) -> Vec<String> {
    fn walk(prefix: &str, value: &serde_yaml::Value, out: &mut Vec<String>) {
        match value {
            serde_yaml::Value::Mapping(map) => {
                for (key, value) in map {
                    if let Some(key) = key.as_str() {
                        let path = if prefix.is_empty() {
                            key.to_owned()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        walk(&path, value, out);
                    }
                }
            }
            serde_yaml::Value::String(s) if Path::new(s).is_absolute() => {
                out.push(prefix.to_owned())
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(overrides) {
        walk("", &value, &mut out);
    }
    out
}
