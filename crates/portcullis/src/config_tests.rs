use std::path::Path;

use super::*;

#[test]
fn durations_need_a_unit_and_are_positive() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert!(parse_duration("60").is_err());
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("1d").is_err());
    assert!(parse_duration("-1s").is_err());
    // Up to a century: beyond, a deadline added to the clock can overflow.
    assert_eq!(
        parse_duration("876000h"),
        Ok(Duration::from_secs(876_000 * 3600))
    );
    assert!(parse_duration("876001h").is_err());
    assert!(parse_duration("18446744073709551615s").is_err());
    assert!(parse_duration("99999999999999999999h").is_err());
}

#[test]
fn every_error_is_listed_with_its_path() {
    let yaml = r#"
listen: nowhere
admin_listen: 127.0.0.1:9901
upstream: https://127.0.0.1:8080
colour: blue
tls:
  cert: missing.pem
  trust_bundles:
    Bad.Domain: bundle.pem
policy:
  dir: no-such-dir
  mode: enforcing
routes:
  - path: /a
    path_prefix: /b
  - path_prefix: /v1
    protocol: grpc
    weight: 3
limits:
  idle_timeout: forever
  response_body_timeout: 0s
  header_read_timeout: 18446744073709551615s
  shredder: 1
"#;
    assert_errors_at(
        yaml,
        &[
            "colour",
            "limits.shredder",
            "listen",
            "upstream",
            "tls.cert",
            "tls.key",
            "tls.trust_bundles.Bad.Domain",
            "policy.mode",
            "policy.dir",
            "routes[0]",
            "routes[1].protocol",
            "routes[1].weight",
            "limits.header_read_timeout",
            "limits.idle_timeout",
            "limits.response_body_timeout",
        ],
    );
}

#[test]
fn shape_errors_carry_their_path() {
    let errors = Config::from_yaml("listen: [1, 2]\n", Path::new("."), Path::new("c.yaml"))
        .unwrap_err()
        .0;
    assert_eq!(errors[0].path, "listen", "{errors:?}");
    let errors = Config::from_yaml("listen: [\n", Path::new("."), Path::new("c.yaml"))
        .unwrap_err()
        .0;
    assert!(errors[0].message.contains("not valid YAML"), "{errors:?}");
}

#[test]
fn a_wrong_type_or_bad_yaml_reports_only_itself() {
    let errors = Config::from_yaml(
        "listen: 0.0.0.0:8443\npolicy:\n  reload_interval: 5\n",
        Path::new("."),
        Path::new("c.yaml"),
    )
    .unwrap_err()
    .0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "policy.reload_interval", "{errors:?}");

    let errors = Config::from_yaml("listen: [\n", Path::new("."), Path::new("c.yaml"))
        .unwrap_err()
        .0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let line = errors[0].to_string();
    assert_eq!(
        line.matches("line ").count(),
        1,
        "position printed once: {line}"
    );
}

#[test]
fn the_key_set_staleness_bound_outlasts_a_refresh_on_time() {
    let config = |extra: &str| {
        format!(
            "listen: 127.0.0.1:8443\nadmin_listen: 127.0.0.1:9901\nupstream: http://127.0.0.1:8080\nuser_token:\n  jwks_file: jwks.json\n  issuers: [https://idp.example.org]\n  audiences: [orders-api]\n  max_lifetime: 1h\n{extra}"
        )
    };
    // The default bound (1h) against a longer interval: stale for half of every period.
    assert_errors_at(
        &config("  jwks_refresh_interval: 2h\n"),
        &["user_token.jwks_refresh_interval"],
    );
    // Equal values: stale for the length of each fetch.
    assert_errors_at(
        &config("  jwks_refresh_interval: 10m\n  jwks_max_stale: 10m\n"),
        &["user_token.jwks_max_stale"],
    );
    // A URL fetch may take its timeout (10 s); a file read does not.
    assert_errors_at(
        &config("  jwks_refresh_interval: 3595s\n").replace(
            "jwks_file: jwks.json",
            "jwks_url: https://idp.example.org/jwks",
        ),
        &["user_token.jwks_refresh_interval"],
    );
    for fine in [
        "",
        "  jwks_refresh_interval: 3595s\n",
        "  jwks_refresh_interval: 100ms\n  jwks_max_stale: 1500ms\n",
        "  jwks_refresh_interval: 2h\n  jwks_max_stale: 3h\n",
    ] {
        // Other errors (jwks.json is not there) do not matter here.
        let errors = Config::from_yaml(
            &config(fine),
            Path::new("/nonexistent"),
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .0;
        assert!(
            !errors.iter().any(|e| matches!(
                e.path.as_str(),
                "user_token.jwks_refresh_interval" | "user_token.jwks_max_stale"
            )),
            "{fine}: {errors:?}"
        );
    }
}

#[test]
fn boundary_keys_are_checked_with_their_paths() {
    let yaml = r#"
listen: 127.0.0.1:8443
admin_listen: 127.0.0.1:9901
upstream: http://127.0.0.1:8080
routes:
  - path_prefix: /api
    match_case: sometimes
user_token:
  jwks_file: jwks.json
  issuers: [https://idp.example.org]
  audiences: [orders-api]
  max_lifetime: 1h
  jwks_max_stale: 1s
  allowed_types: []
  issuer_keys:
    - jwks_file: partner.json
    - issuer: https://idp.example.org
      jwks_url: https://idp.example.org/jwks
    - issuer: https://partner.example.com
      jwks_file: a.json
      jwks_url: https://partner.example.com/jwks
audit:
  sink: stdout
  signing_key: no-such-key.pem
  checkpoint_interval: soon
"#;
    assert_errors_at(
        yaml,
        &[
            "routes[0].match_case",
            "user_token.jwks_max_stale",
            "user_token.allowed_types",
            "user_token.issuer_keys[0].issuer",
            "user_token.issuer_keys[1].issuer",
            "user_token.issuer_keys[2]",
            "audit.signing_key",
            "audit.checkpoint_interval",
        ],
    );
}

#[test]
fn approval_and_rate_errors_carry_their_paths() {
    let yaml = r#"
listen: 127.0.0.1:8443
admin_listen: 127.0.0.1:9901
upstream: http://127.0.0.1:8080
approval:
  jwks_file: missing.json
  max_lifetime: soon
  max_tracked_grants: 0
limits:
  rate:
    - per: planet
      requests_per_minute: 10
    - per: agent
      burst: 0
    - per: tool
      requests_per_minute: 0
"#;
    assert_errors_at(
        yaml,
        &[
            "approval.jwks_file",
            "approval.issuers",
            "approval.max_lifetime",
            "approval.max_tracked_grants",
            "limits.rate[0].per",
            "limits.rate[1].requests_per_minute",
            "limits.rate[1].burst",
            "limits.rate[2].requests_per_minute",
        ],
    );
}

/// Loading `yaml` fails with an error at each of `paths` (among others).
fn assert_errors_at(yaml: &str, paths: &[&str]) {
    let errors = Config::from_yaml(yaml, Path::new("/nonexistent"), Path::new("c.yaml"))
        .unwrap_err()
        .0;
    let found: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for want in paths {
        assert!(found.contains(want), "missing {want} in {errors:#?}");
    }
}

#[test]
fn the_per_agent_connection_cap_follows_a_lower_max_connections() {
    let base =
        "listen: 127.0.0.1:8443\nadmin_listen: 127.0.0.1:9901\nupstream: http://127.0.0.1:8080\n";
    let errors = |limits: &str| -> Vec<String> {
        match Config::from_yaml(
            &format!("{base}{limits}"),
            Path::new("/nonexistent"),
            Path::new("c.yaml"),
        ) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.into_iter().map(|e| e.path).collect(),
        }
    };
    // Unset, it takes all of a lower max_connections (a config written before the key).
    assert!(
        !errors("limits:\n  max_connections: 512\n")
            .contains(&"limits.max_connections_per_agent".to_owned())
    );
    // Set above it, it is an error.
    assert!(
        errors("limits:\n  max_connections: 512\n  max_connections_per_agent: 600\n")
            .contains(&"limits.max_connections_per_agent".to_owned())
    );
}

#[test]
fn the_upstream_is_on_loopback_and_tokens_are_short_lived() {
    let config = |upstream: &str, user_token: &str| {
        format!(
            "listen: 127.0.0.1:8443\nadmin_listen: 127.0.0.1:9901\nupstream: {upstream}\nuser_token:\n  jwks_file: jwks.json\n  issuers: [https://idp.example.org]\n  audiences: [orders-api]\n{user_token}approval:\n  jwks_file: approvers.json\n  issuers: [https://approvals.example.org]\n  max_lifetime: 2h\n  clock_skew: 1h\n"
        )
    };
    let paths = |yaml: &str| -> Vec<String> {
        Config::from_yaml(yaml, Path::new("/nonexistent"), Path::new("c.yaml"))
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.path)
            .collect()
    };
    let found = paths(&config(
        "http://10.0.3.7:8080",
        "  max_lifetime: 8760h\n  clock_skew: 24h\n",
    ));
    for path in [
        "upstream",
        "user_token.max_lifetime",
        "user_token.clock_skew",
        "approval.max_lifetime",
        "approval.clock_skew",
    ] {
        assert!(found.contains(&path.to_owned()), "{path}: {found:?}");
    }
    // Loopback in every spelling, and the bounds themselves, are fine.
    for upstream in [
        "http://127.0.0.1:8080",
        "http://127.0.0.9:1",
        "http://[::1]:8080",
        "http://localhost:8080",
    ] {
        let found = paths(&config(upstream, "  max_lifetime: 24h\n  clock_skew: 5m\n"));
        for path in [
            "upstream",
            "user_token.max_lifetime",
            "user_token.clock_skew",
        ] {
            assert!(
                !found.contains(&path.to_owned()),
                "{upstream} {path}: {found:?}"
            );
        }
    }
}

#[test]
fn paths_fold_without_the_file_system() {
    for (path, folded) in [
        (
            "/etc/portcullis/config/../secret/k",
            "/etc/portcullis/secret/k",
        ),
        (
            "/etc/portcullis/config/./a/../b",
            "/etc/portcullis/config/b",
        ),
        (
            "/etc/portcullis/config/../../../../../etc/passwd",
            "/etc/passwd",
        ),
        ("/a//b/", "/a/b"),
    ] {
        assert_eq!(normalize(Path::new(path)), Path::new(folded), "{path}");
    }
}

/// Every path a config names goes to the confinement's rule, resolved and folded as where the
/// config runs, before anything is looked at: with a rule that refuses everything, each is
/// refused at its own key and nothing else is reported about it.
#[test]
fn a_confined_check_asks_before_every_file_and_directory() {
    let yaml = r#"
listen: 127.0.0.1:8443
admin_listen: 127.0.0.1:9901
upstream: http://127.0.0.1:8080
tls:
  cert: /run/spiffe/tls.crt
  key: ../../../../run/spiffe/tls.key
  trust_bundles:
    cluster.local: ca.crt
user_token:
  jwks_file: jwks.json
  issuers: [https://idp]
  audiences: [a]
  max_lifetime: 5m
  issuer_keys:
    - {issuer: https://other, jwks_url: https://other/keys, jwks_ca_file: /etc/ca.pem}
approval:
  jwks_file: approvers.json
  issuers: [https://approver]
policy:
  dir: /etc/portcullis/policies
  shadow_dir: ./shadow/
routes:
  - path: /a
    credential: {file: ../secret/key}
  - path: /b
    credential:
      token_exchange: {endpoint: https://sts/token, audience: b, ca_file: sts.pem}
audit:
  sink: audit/../audit.jsonl
  signing_key: /etc/portcullis/secret/signing.pem
"#;
    let asked = std::sync::Mutex::new(Vec::new());
    let rule = |file: FileRef<'_>| {
        asked.lock().unwrap().push((
            file.key.to_owned(),
            file.resolved.display().to_string(),
            file.usage,
        ));
        Access::Refused(format!("{:?} refused", file.value))
    };
    let confinement = Confinement {
        config_dir: Path::new("/etc/portcullis/config"),
        rule: &rule,
    };
    // A directory that exists and holds files of those names: never looked at.
    let dir = tempfile::tempdir().unwrap();
    for name in ["ca.crt", "jwks.json", "approvers.json", "sts.pem"] {
        std::fs::write(dir.path().join(name), "x").unwrap();
    }
    let errors = Config::check_confined(yaml, dir.path(), &confinement)
        .unwrap_err()
        .0;
    let mut expected = vec![
        ("tls.cert", "/run/spiffe/tls.crt", FileUse::Read),
        ("tls.key", "/run/spiffe/tls.key", FileUse::Read),
        (
            "tls.trust_bundles.cluster.local",
            "/etc/portcullis/config/ca.crt",
            FileUse::Read,
        ),
        (
            "user_token.jwks_file",
            "/etc/portcullis/config/jwks.json",
            FileUse::Read,
        ),
        (
            "user_token.issuer_keys[0].jwks_ca_file",
            "/etc/ca.pem",
            FileUse::Read,
        ),
        (
            "approval.jwks_file",
            "/etc/portcullis/config/approvers.json",
            FileUse::Read,
        ),
        ("policy.dir", "/etc/portcullis/policies", FileUse::Read),
        (
            "policy.shadow_dir",
            "/etc/portcullis/config/shadow",
            FileUse::Read,
        ),
        (
            "routes[0].credential.file",
            "/etc/portcullis/secret/key",
            FileUse::Read,
        ),
        (
            "routes[1].credential.token_exchange.ca_file",
            "/etc/portcullis/config/sts.pem",
            FileUse::Read,
        ),
        (
            "audit.signing_key",
            "/etc/portcullis/secret/signing.pem",
            FileUse::Read,
        ),
        (
            "audit.sink",
            "/etc/portcullis/config/audit.jsonl",
            FileUse::Write,
        ),
    ];
    expected.sort();
    let mut asked = asked.into_inner().unwrap();
    asked.sort();
    let asked: Vec<(&str, &str, FileUse)> = asked
        .iter()
        .map(|(k, p, u)| (k.as_str(), p.as_str(), *u))
        .collect();
    assert_eq!(asked, expected);
    let mut refused: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    refused.sort();
    let keys: Vec<&str> = expected.iter().map(|(k, _, _)| *k).collect();
    assert_eq!(refused, keys, "{errors:#?}");
}
