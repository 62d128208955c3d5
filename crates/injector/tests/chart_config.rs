#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The webhook configs the Helm chart renders must load with [`WebhookConfig::load`]: the
//! chart and the parser cannot drift apart (unknown keys are errors).
//!
//! `.ci/k8s-checks` renders the chart for each of its value sets into a directory and runs
//! this test with `PORTCULLIS_RENDERED_WEBHOOK_CONFIGS` pointing there. Without it (a plain
//! `cargo test`), there is nothing to check.

use std::path::Path;

use portcullis_injector::{SvidSource, WebhookConfig};

const CHART_TLS_DIR: &str = "/etc/portcullis-webhook/tls";
/// Where the chart mounts the API server's client CA (`webhook.clientCA`).
const CHART_CLIENT_CA_DIR: &str = "/etc/portcullis-webhook/client-ca";

#[test]
fn every_rendered_chart_config_loads() {
    let Some(dir) = std::env::var_os("PORTCULLIS_RENDERED_WEBHOOK_CONFIGS") else {
        eprintln!("notice: PORTCULLIS_RENDERED_WEBHOOK_CONFIGS is not set; run .ci/k8s-checks");
        return;
    };
    // The chart points at the mounted Secret; put a real pair where the test can read it.
    let tls = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["portcullis-injector.portcullis.svc".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(tls.path().join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(tls.path().join("tls.key"), key.serialize_pem()).unwrap();
    // And a CA where the client CA's Secret would be (a case that sets webhook.clientCA).
    let client_ca = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(client_ca.path().join("ca.crt"), ca.pem()).unwrap();

    let mut checked = 0;
    for entry in std::fs::read_dir(Path::new(&dir)).unwrap() {
        let case = entry.unwrap().path();
        let file = case.join("webhook-config.yaml");
        if !file.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains(CHART_TLS_DIR), "{}", file.display());
        let text = text
            .replace(CHART_TLS_DIR, &tls.path().display().to_string())
            .replace(CHART_CLIENT_CA_DIR, &client_ca.path().display().to_string());
        let config = WebhookConfig::from_yaml(&text, tls.path())
            .unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
        // Each case's expectations travel with it, written by the script.
        if let Ok(expect) = std::fs::read_to_string(case.join("expect")) {
            for line in expect.lines() {
                match line {
                    "native_sidecar=false" => assert!(!config.injection.native_sidecar),
                    "native_sidecar=true" => assert!(config.injection.native_sidecar),
                    "svid=spire" => {
                        assert!(matches!(config.injection.svid, SvidSource::Spire { .. }))
                    }
                    "svid=csi-driver-spiffe" => {
                        assert_eq!(config.injection.svid, SvidSource::CsiDriverSpiffe)
                    }
                    "client_ca=true" => assert_eq!(
                        config.tls.client_ca.as_deref(),
                        Some(client_ca.path().join("ca.crt").as_path())
                    ),
                    "client_ca=false" => assert_eq!(config.tls.client_ca, None),
                    other => panic!("unknown expectation {other:?} in {}", case.display()),
                }
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "no rendered webhook-config.yaml under {dir:?}");
    eprintln!("{checked} rendered chart configs load");
}
