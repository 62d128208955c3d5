//! What `portcullis inject-webhook` adds to the injector crate: the sidecar's own config
//! loader as the check of a pod's config ConfigMap, so the webhook refuses at admission
//! exactly the configs `portcullis run` would refuse at start.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use portcullis_injector::{
    ANNOTATION_SECRET, CONFIG_DIR, ConfigSource, ConfigValidator, SECRET_DIR,
};

use crate::config::{Config, overlay};

/// The validator handed to the webhook.
pub fn validator() -> ConfigValidator {
    Arc::new(|data, source: &ConfigSource| {
        validate_configmap(data, &source.overrides, source.secret.is_some())
    })
}

/// Checks a config ConfigMap as the sidecar will load it: every key written as a file (so
/// `jwks_file: jwks.json` finds the ConfigMap's own `jwks.json`, as in the pod, where the
/// ConfigMap is mounted as a directory), `config.yaml` with the webhook's `overrides` laid over
/// it, loaded by [`Config::from_yaml`]. The files the overrides point at (the SVID from the CSI
/// driver, the policy ConfigMap's mount) exist only in the pod, so errors about exactly those
/// paths are not the ConfigMap's and are left out; every other error is returned with its path.
///
/// Files under [`SECRET_DIR`] (written absolute, or relative to the config directory, as
/// `../secret/key`, which is the same file in the pod) are in the pod's Secret, which the
/// webhook may not read. With `secret_mounted` their "file not found" is left out (the sidecar
/// checks them at start); without it the pod would have no such file, and the error says so.
pub fn validate_configmap(
    data: &BTreeMap<String, String>,
    overrides: &str,
    secret_mounted: bool,
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
    let secret_files = secret_paths(&merged);
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
                .filter_map(|e| {
                    // Only the loader's "file not found" at a path whose value is in the
                    // Secret: the same string at a key that is not a file (a route's
                    // path_prefix, say) is not a Secret file, and any other error stands.
                    let in_secret = secret_files
                        .iter()
                        .find(|(path, _)| *path == e.path)
                        .filter(|_| e.message.starts_with("file not found"));
                    match in_secret {
                        Some(_) if secret_mounted => None,
                        Some((path, value)) => Some(format!(
                            "{path}: {value:?} is under the Secret mount {SECRET_DIR}, but the pod names no {ANNOTATION_SECRET} (on the pod or its namespace)"
                        )),
                        // Name files where the pod will have them, not in this scratch
                        // directory.
                        None => Some(e.to_string().replace(&scratch, CONFIG_DIR)),
                    }
                })
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
    strings(overrides)
        .into_iter()
        .filter(|(_, s)| Path::new(s).is_absolute())
        .map(|(path, _)| path)
        .collect()
}

/// YAML paths (as the loader names them: `routes[0].credential.file`, `audit.signing_key`)
/// and values of the strings in `config` that, read as paths in the pod (relative ones from
/// the config directory, where the sidecar resolves them), are under [`SECRET_DIR`].
fn secret_paths(config: &str) -> Vec<(String, String)> {
    strings(config)
        .into_iter()
        .filter(|(_, s)| in_secret_dir(s))
        .collect()
}

/// `value`, a path as a config names it, is in the Secret mount of the pod: resolved against
/// [`CONFIG_DIR`] and normalised lexically (in the pod, `..` of the ConfigMap mount is
/// `/etc/portcullis`, so `../secret/key` and `/etc/portcullis/config/../secret/key` are
/// `/etc/portcullis/secret/key`).
fn in_secret_dir(value: &str) -> bool {
    let mut resolved = PathBuf::new();
    for component in Path::new(CONFIG_DIR).join(value).components() {
        match component {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::CurDir => {}
            other => resolved.push(other),
        }
    }
    resolved.starts_with(SECRET_DIR)
}

/// Every string value of a YAML document with its path: mapping keys joined by `.`, sequence
/// items as `[i]`.
fn strings(text: &str) -> Vec<(String, String)> {
    fn walk(prefix: &str, value: &serde_yaml::Value, out: &mut Vec<(String, String)>) {
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
            serde_yaml::Value::Sequence(items) => {
                for (i, value) in items.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), value, out);
                }
            }
            serde_yaml::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(text) {
        walk("", &value, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_resolve_into_the_secret_mount() {
        for inside in [
            "/etc/portcullis/secret/api-key",
            "/etc/portcullis/secret",
            "../secret/api-key",
            "./../secret/api-key",
            "sub/../../secret/api-key",
            "/etc/portcullis/config/../secret/api-key",
            "/etc//portcullis/./secret/api-key",
            "../../../../../../etc/portcullis/secret/api-key",
        ] {
            assert!(in_secret_dir(inside), "{inside}");
        }
        for outside in [
            "api-key",
            "secret/api-key",
            "../secrets/api-key",
            "/etc/portcullis/secretive/api-key",
            "/etc/portcullis/config/secret/api-key",
            "/etc/portcullis/secret/../config/api-key",
            "stdout",
        ] {
            assert!(!in_secret_dir(outside), "{outside}");
        }
    }

    #[test]
    fn yaml_paths_are_named_as_the_loader_names_them() {
        let found = secret_paths(
            "routes:\n  - path: /a\n  - credential:\n      file: ../secret/k\naudit:\n  signing_key: /etc/portcullis/secret/s.pem\n  sink: stdout\n",
        );
        assert_eq!(
            found,
            [
                (
                    "routes[1].credential.file".to_owned(),
                    "../secret/k".to_owned()
                ),
                (
                    "audit.signing_key".to_owned(),
                    "/etc/portcullis/secret/s.pem".to_owned()
                ),
            ]
        );
    }

    fn data(config: &str) -> BTreeMap<String, String> {
        [("config.yaml".to_owned(), config.to_owned())].into()
    }

    /// A minimal override, as the webhook renders it (files that do not exist here).
    const OVERRIDES: &str = r#"{"listen":"0.0.0.0:8443","admin_listen":"0.0.0.0:9901","upstream":"http://127.0.0.1:8080","tls":{"cert":"/run/spiffe/tls.crt","key":"/run/spiffe/tls.key","trust_bundles":{"cluster.local":"/run/spiffe/ca.crt"}},"policy":{"dir":"/etc/portcullis/policies","mode":"enforce"}}"#;

    #[test]
    fn secret_files_are_left_to_the_sidecar_only_with_a_secret() {
        let config = "audit:\n  signing_key: ../secret/audit.pem\n";
        assert_eq!(validate_configmap(&data(config), OVERRIDES, true), Ok(()));
        let errors = validate_configmap(&data(config), OVERRIDES, false).unwrap_err();
        assert_eq!(
            errors,
            [
                "audit.signing_key: \"../secret/audit.pem\" is under the Secret mount /etc/portcullis/secret, but the pod names no portcullis.dev/secret (on the pod or its namespace)"
            ]
        );
        // Only a file the loader looks for is left to the sidecar: an audit log written into
        // the (read-only) Secret mount is refused with the loader's own error.
        let sink = "audit:\n  sink: /etc/portcullis/secret/audit.log\n";
        assert_eq!(
            validate_configmap(&data(sink), OVERRIDES, true).unwrap_err(),
            ["audit.sink: directory of /etc/portcullis/secret/audit.log does not exist"]
        );
        // A file elsewhere that is missing is the ConfigMap's error either way.
        let elsewhere = "audit:\n  signing_key: audit.pem\n";
        for mounted in [true, false] {
            let errors = validate_configmap(&data(elsewhere), OVERRIDES, mounted).unwrap_err();
            assert_eq!(
                errors,
                ["audit.signing_key: file not found: /etc/portcullis/config/audit.pem"]
            );
        }
    }
}
