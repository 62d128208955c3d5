use super::*;
use std::io::Write;

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(body.as_bytes()).unwrap();
    p
}

fn pem_pair(dir: &Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["webhook.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    write(dir, "tls.crt", &cert.pem());
    write(dir, "tls.key", &key.serialize_pem());
}

#[test]
fn minimal_config_takes_the_documented_defaults() {
    let dir = tempfile::tempdir().unwrap();
    pem_pair(dir.path());
    let cfg = write(
        dir.path(),
        "c.yaml",
        "tls:\n  cert: tls.crt\n  key: tls.key\n",
    );
    let c = WebhookConfig::load(&cfg).unwrap();
    assert_eq!(c.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(c.tls.cert, dir.path().join("tls.crt"));
    assert_eq!(c.tls.reload_interval, Duration::from_secs(60));
    assert_eq!(c.injection, InjectionSettings::default());
    assert_eq!(c.injection.trust_domain.as_str(), "cluster.local");
}

#[test]
fn full_config_is_read() {
    let dir = tempfile::tempdir().unwrap();
    pem_pair(dir.path());
    let cfg = write(
        dir.path(),
        "c.yaml",
        r#"
listen: 127.0.0.1:9443
tls: { cert: tls.crt, key: tls.key, reload_interval: 5m }
injection:
  image: registry.example/portcullis:1.2.3
  image_pull_policy: Always
  native_sidecar: false
  trust_domain: prod.example.org
  policy_configmap: team-policies
  policy_mode: shadow
  listen_port: 15443
  admin_port: 15901
  run_as_user: 1000
  resources:
    requests: { cpu: 100m, memory: 128Mi }
    limits: { memory: 1Gi }
  svid:
    source: spire
    spiffe_helper_image: helper:1
    spire_socket_file: agent.sock
"#,
    );
    let c = WebhookConfig::load(&cfg).unwrap();
    let i = &c.injection;
    assert_eq!(c.tls.reload_interval, Duration::from_secs(300));
    assert!(!i.native_sidecar);
    assert_eq!(i.policy_mode, PolicyMode::Shadow);
    assert_eq!(i.listen_port, 15443);
    assert_eq!(i.limits.get("memory").map(String::as_str), Some("1Gi"));
    assert_eq!(
        i.svid,
        SvidSource::Spire {
            helper_image: "helper:1".into(),
            socket_file: "agent.sock".into()
        }
    );
}

#[test]
fn every_error_is_listed_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.yaml",
        r#"
listen: nowhere
bogus: 1
tls:
  cert: missing.crt
  colour: blue
injection:
  image_pull_policy: Sometimes
  trust_domain: "UPPER.case"
  policy_mode: loud
  listen_port: 9901
  run_as_user: 0
  resources:
    requests: { cpu: lots, gpu: "1" }
  svid: { source: vault }
"#,
    );
    let err = WebhookConfig::load(&cfg).unwrap_err();
    let text = err.to_string();
    for expected in [
        "bogus: unknown key",
        "tls.colour: unknown key",
        "listen: not a socket address",
        "tls.cert: file not found",
        "tls.key: required",
        "injection.image_pull_policy: must be Always, IfNotPresent or Never",
        "injection.trust_domain: \"UPPER.case\"",
        "injection.policy_mode: must be enforce or shadow",
        "injection.admin_port: must differ from injection.listen_port (9901)",
        "injection.run_as_user: must be a non-root uid",
        "injection.resources.requests.cpu: not a Kubernetes quantity",
        "injection.resources.requests.gpu: unknown resource",
        "injection.svid.source: must be csi-driver-spiffe or spire",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(expected)),
            "missing {expected:?} in:\n{text}"
        );
    }
    assert_eq!(text.lines().count(), err.errors.len());
}

#[test]
fn type_errors_carry_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.yaml",
        "injection:\n  listen_port: many\n  extra: 1\n",
    );
    let text = WebhookConfig::load(&cfg).unwrap_err().to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("injection.listen_port: ")),
        "{text}"
    );
}

#[test]
fn unreadable_or_invalid_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = WebhookConfig::load(&dir.path().join("nope.yaml")).unwrap_err();
    assert!(missing.to_string().contains("cannot read file"));
    let bad = write(dir.path(), "bad.yaml", "listen: [unclosed\n");
    let text = WebhookConfig::load(&bad).unwrap_err().to_string();
    assert!(text.starts_with("config: invalid yaml"), "{text}");
    write(dir.path(), "tls.crt", "not pem");
    write(dir.path(), "tls.key", "not pem");
    let cfg = write(
        dir.path(),
        "c.yaml",
        "tls: { cert: tls.crt, key: tls.key }\n",
    );
    let text = WebhookConfig::load(&cfg).unwrap_err().to_string();
    assert!(text.contains("tls.cert: no certificate found"), "{text}");
    assert!(text.contains("tls.key: no private key found"), "{text}");
}

#[test]
fn helpers_accept_what_kubernetes_accepts() {
    for ok in ["50m", "1", "0.5", "64Mi", "1G", "1e3", "128974848"] {
        assert!(is_quantity(ok), "{ok}");
    }
    for bad in ["", "m", "1.2.3", "10 Mi", "1x", "-1"] {
        assert!(!is_quantity(bad), "{bad}");
    }
    assert!(is_dns_subdomain("team-a.policies"));
    assert!(!is_dns_subdomain("Team"));
    assert!(!is_dns_subdomain("-a"));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1d"), None);
    assert_eq!(parse_duration("s"), None);
}
