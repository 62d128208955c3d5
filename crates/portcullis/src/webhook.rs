//! What `portcullis inject-webhook` adds to the injector crate: the sidecar's own config
//! loader as the check of a pod's config ConfigMap, so the webhook refuses at admission
//! exactly the configs `portcullis run` would refuse at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_injector::{
    ANNOTATION_SECRET, CONFIG_DIR, ConfigSource, ConfigValidator, SECRET_DIR,
};

use crate::config::{Access, Config, Confinement, FileRef, FileUse, normalize, overlay};

/// The validator handed to the webhook.
pub fn validator() -> ConfigValidator {
    Arc::new(|data, source: &ConfigSource| {
        validate_configmap(data, &source.overrides, source.secret.is_some())
    })
}

/// Checks a config ConfigMap as the sidecar will load it: every key written as a file (so
/// `jwks_file: jwks.json` finds the ConfigMap's own `jwks.json`, as in the pod, where the
/// ConfigMap is mounted as a directory), `config.yaml` with the webhook's `overrides` laid over
/// it, checked by [`Config::check_confined`] with the files of the pod as [`pod_files`] says.
/// Only the ConfigMap's own files are opened (in a scratch directory standing for
/// [`CONFIG_DIR`]); any other path is decided from its value alone, so the answer never
/// depends on what the webhook's own file system holds.
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
    let rule = |file: FileRef<'_>| pod_files(file, &provided, secret_mounted);
    let confinement = Confinement {
        config_dir: Path::new(CONFIG_DIR),
        rule: &rule,
    };
    let scratch = dir.path().display().to_string();
    Config::check_confined(&merged, dir.path(), &confinement).map_err(|errors| {
        errors
            .0
            .iter()
            // Name the ConfigMap's files where the pod will have them, not in this scratch
            // directory.
            .map(|e| e.to_string().replace(&scratch, CONFIG_DIR))
            .collect()
    })
}

/// What the injected sidecar has of a path its config names (`file.resolved`, as in the pod),
/// decided from the path alone:
/// - under [`CONFIG_DIR`]: a file of the ConfigMap, checked here;
/// - a file or directory the injection provides (`provided`: the SVID, the policy mount) at
///   the key the overrides give it: only in the pod, not looked for. Named at another key
///   (the SVID key as a route's `credential.file`) it is refused;
/// - under [`SECRET_DIR`]: in the Secret, which the webhook may not read: left to the
///   sidecar's start when the pod names a Secret, refused when it names none;
/// - anything else: refused; the pod has no such file, whatever the webhook's file system has.
///
/// Nothing is written: the sidecar's root file system and every mount are read-only, so a
/// file `audit.sink` is refused wherever it points.
fn pod_files(file: FileRef<'_>, provided: &[(String, PathBuf)], secret_mounted: bool) -> Access {
    let FileRef {
        key,
        value,
        resolved,
        usage,
    } = file;
    if usage == FileUse::Write {
        return Access::Refused(format!(
            "{value:?}: the sidecar can write no file in the pod (its root file system and every mount are read-only); use stdout"
        ));
    }
    if let Some((owner, _)) = provided.iter().find(|(_, path)| resolved.starts_with(path)) {
        return if owner == key {
            Access::Elsewhere
        } else {
            Access::Refused(format!(
                "{value:?} is the injection's file for {owner}, not for {key}"
            ))
        };
    }
    if resolved.starts_with(CONFIG_DIR) {
        return Access::Here;
    }
    if resolved.starts_with(SECRET_DIR) {
        return if secret_mounted {
            Access::Elsewhere
        } else {
            Access::Refused(format!(
                "{value:?} is under the Secret mount {SECRET_DIR}, but the pod names no {ANNOTATION_SECRET} (on the pod or its namespace)"
            ))
        };
    }
    let mounts = if secret_mounted {
        format!("{CONFIG_DIR}, {SECRET_DIR}")
    } else {
        CONFIG_DIR.to_owned()
    };
    Access::Refused(format!(
        "{value:?} is outside the sidecar's mounts ({mounts}): the pod cannot have this file"
    ))
}

/// The YAML paths (`tls.cert`, `tls.trust_bundles.cluster.local`, `policy.dir`) and values
/// of the strings in the overrides that are absolute paths: files and directories the
/// injection mounts into the pod, normalised as the loader normalises what it resolves.
fn provided_paths(overrides: &str) -> Vec<(String, PathBuf)> {
    strings(overrides)
        .into_iter()
        .filter(|(_, s)| Path::new(s).is_absolute())
        .map(|(key, s)| (key, normalize(Path::new(&s))))
        .collect()
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

    /// The errors of `audit.signing_key: <value>` alone.
    fn signing_key(value: &str, secret_mounted: bool) -> Result<(), Vec<String>> {
        let config = format!("audit:\n  signing_key: {value:?}\n");
        validate_configmap(&data(&config), OVERRIDES, secret_mounted)
    }

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
            assert_eq!(signing_key(inside, true), Ok(()), "{inside}");
            let errors = signing_key(inside, false).unwrap_err();
            assert_eq!(
                errors,
                [format!(
                    "audit.signing_key: {inside:?} is under the Secret mount /etc/portcullis/secret, but the pod names no portcullis.dev/secret (on the pod or its namespace)"
                )]
            );
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
            let errors = signing_key(outside, true).unwrap_err();
            assert!(
                errors.len() == 1 && !errors[0].contains("Secret mount"),
                "{outside}: {errors:?}"
            );
        }
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
        // Only a file the loader reads is left to the sidecar: an audit log written into
        // the (read-only) Secret mount is refused.
        let sink = "audit:\n  sink: /etc/portcullis/secret/audit.log\n";
        assert_eq!(
            validate_configmap(&data(sink), OVERRIDES, true).unwrap_err(),
            [
                "audit.sink: \"/etc/portcullis/secret/audit.log\": the sidecar can write no file in the pod (its root file system and every mount are read-only); use stdout"
            ]
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

    /// A user token whose key set is `jwks_file`.
    fn user_token(jwks_file: &str) -> String {
        format!(
            "user_token:\n  jwks_file: {jwks_file:?}\n  issuers: [https://idp.example.org]\n  audiences: [orders]\n  max_lifetime: 5m\n"
        )
    }

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    #[test]
    fn files_outside_the_sidecars_mounts_are_refused_without_being_opened() {
        // Outside the scratch directory: files that exist on the webhook's machine.
        let outside = tempfile::tempdir().unwrap();
        let existing = outside.path().join("jwks.json");
        std::fs::write(&existing, JWKS).unwrap();
        let existing = existing.display().to_string();
        let missing = outside.path().join("missing.json").display().to_string();
        for secret_mounted in [false, true] {
            let mounts = if secret_mounted {
                "/etc/portcullis/config, /etc/portcullis/secret"
            } else {
                "/etc/portcullis/config"
            };
            let refusal = |key: &str, value: &str| {
                format!(
                    "{key}: {value:?} is outside the sidecar's mounts ({mounts}): the pod cannot have this file"
                )
            };
            for value in [
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
                "../../../../etc/passwd",
                "../../../../../../../../etc/hostname",
                existing.as_str(),
                missing.as_str(),
            ] {
                let errors =
                    validate_configmap(&data(&user_token(value)), OVERRIDES, secret_mounted)
                        .unwrap_err();
                assert_eq!(errors, [refusal("user_token.jwks_file", value)]);
            }
            // The same answer whether the file exists or not: no oracle.
            let answer = |value: &str| {
                validate_configmap(&data(&user_token(value)), OVERRIDES, secret_mounted)
                    .unwrap_err()
                    .join("\n")
                    .replace(value, "<path>")
            };
            assert_eq!(answer(&existing), answer(&missing));

            // Every key that names a file, the existing file each time (a JWKS, which would
            // pass any check that opened it, or fail one that parsed it as a bundle or key).
            let config = format!(
                "{}approval:\n  jwks_file: {existing:?}\n  issuers: [https://approver]\ntls:\n  trust_bundles:\n    partner.example: {existing:?}\nroutes:\n  - path: /a\n    credential:\n      file: {existing:?}\n  - path: /b\n    credential:\n      token_exchange:\n        endpoint: https://sts.example.org/token\n        audience: b\n        ca_file: {existing:?}\naudit:\n  signing_key: {existing:?}\n",
                user_token(&existing)
            );
            let errors = validate_configmap(&data(&config), OVERRIDES, secret_mounted).unwrap_err();
            let mut expected: Vec<String> = [
                "approval.jwks_file",
                "user_token.jwks_file",
                "routes[0].credential.file",
                "routes[1].credential.token_exchange.ca_file",
                "audit.signing_key",
                "tls.trust_bundles.partner.example",
            ]
            .iter()
            .map(|key| refusal(key, &existing))
            .collect();
            let mut errors = errors;
            errors.sort();
            expected.sort();
            assert_eq!(errors, expected);

            // A directory: an existing one, holding a policy that would not load.
            std::fs::write(outside.path().join("broken.cedar"), "permit(").unwrap();
            let shadow = format!("policy:\n  shadow_dir: {:?}\n", outside.path().display());
            assert_eq!(
                validate_configmap(&data(&shadow), OVERRIDES, secret_mounted).unwrap_err(),
                [refusal(
                    "policy.shadow_dir",
                    &outside.path().display().to_string()
                )]
            );
            // An audit file, wherever it points (nothing in the pod is writable).
            let sink = format!("audit:\n  sink: {:?}\n", outside.path().join("audit.jsonl"));
            let errors = validate_configmap(&data(&sink), OVERRIDES, secret_mounted).unwrap_err();
            assert!(
                errors.len() == 1 && errors[0].contains("the sidecar can write no file"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn the_injections_files_are_for_the_keys_the_injection_gives_them() {
        // The SVID key sent upstream as a route's credential, the policy mount as the shadow
        // set: refused, though the pod has both.
        let config = "routes:\n  - path: /a\n    credential:\n      file: /run/spiffe/tls.key\npolicy:\n  shadow_dir: /etc/portcullis/policies/\n";
        assert_eq!(
            validate_configmap(&data(config), OVERRIDES, true).unwrap_err(),
            [
                "policy.shadow_dir: \"/etc/portcullis/policies/\" is the injection's file for policy.dir, not for policy.shadow_dir",
                "routes[0].credential.file: \"/run/spiffe/tls.key\" is the injection's file for tls.key, not for routes[0].credential.file",
            ]
        );
    }

    #[test]
    fn the_configmaps_own_files_are_checked_however_they_are_named() {
        let mut files = data(&user_token("jwks.json"));
        files.insert("jwks.json".to_owned(), JWKS.to_owned());
        for name in [
            "jwks.json",
            "./jwks.json",
            "../config/jwks.json",
            "/etc/portcullis/config/jwks.json",
        ] {
            files.insert("config.yaml".to_owned(), user_token(name));
            assert_eq!(
                validate_configmap(&files, OVERRIDES, false),
                Ok(()),
                "{name}"
            );
        }
        files.insert(
            "config.yaml".to_owned(),
            user_token("/etc/portcullis/config/nope.json"),
        );
        assert_eq!(
            validate_configmap(&files, OVERRIDES, false).unwrap_err(),
            ["user_token.jwks_file: file not found: /etc/portcullis/config/nope.json"]
        );
    }

    #[test]
    fn a_key_set_left_to_the_sidecar_leaves_no_cascade() {
        // The user token's key set in the Secret: not built here, and the token exchange that
        // needs it (its CA a key of the ConfigMap, so the route is built) is not reported as
        // lacking a user token.
        let config = format!(
            "{}routes:\n  - path: /b\n    credential:\n      token_exchange:\n        endpoint: https://sts.example.org/token\n        audience: b\n        ca_file: sts-ca.pem\n",
            user_token("/etc/portcullis/secret/jwks.json")
        );
        let mut files = data(&config);
        files.insert("sts-ca.pem".to_owned(), "(a CA)".to_owned());
        assert_eq!(validate_configmap(&files, OVERRIDES, true), Ok(()));
        // Without a user token at all, the exchange is still the config's error.
        let routes = &config[config.find("routes:").unwrap_or_default()..];
        files.insert("config.yaml".to_owned(), routes.to_owned());
        let errors = validate_configmap(&files, OVERRIDES, true).unwrap_err();
        assert!(
            errors.contains(&"routes[0].credential.token_exchange: needs user_token: the user's token is what is exchanged".to_owned()),
            "{errors:?}"
        );
    }

    #[test]
    fn the_validator_refuses_an_outside_file() {
        let source = ConfigSource {
            configmap: "orders-portcullis".to_owned(),
            overrides: OVERRIDES.to_owned(),
            secret: Some("orders-keys".to_owned()),
        };
        let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
        assert_eq!(
            validator()(&data(&user_token(token)), &source).unwrap_err(),
            [format!(
                "user_token.jwks_file: {token:?} is outside the sidecar's mounts (/etc/portcullis/config, /etc/portcullis/secret): the pod cannot have this file"
            )]
        );
    }
}
