//! Callers the X509-SVID rules refuse never get an HTTP exchange, and each refusal is counted
//! by reason.

use std::sync::Arc;

use portcullis_test_support::pki::{Ca, LeafSpec, Svid};
use time::{Duration, OffsetDateTime};

use crate::harness::{Harness, TRIAGE, TRUST_DOMAIN, eventually, sample};

#[tokio::test]
async fn a_valid_svid_is_served() {
    let h = Harness::start().await;
    let svid = h.svid(TRIAGE);
    assert_eq!(h.try_call(Some(&svid)).await.unwrap(), 200);
}

#[tokio::test]
async fn invalid_callers_are_refused_in_the_handshake() {
    let partner = Arc::new(Ca::new("partner.example.net").unwrap());
    // Both bundles are loaded: the partner CA is trusted, but only for its own trust domain.
    let h = Harness::builder()
        .trust("partner.example.net", partner.clone())
        .start()
        .await;
    let now = OffsetDateTime::now_utc();
    let leaf = |edit: &dyn Fn(&mut LeafSpec)| {
        let mut spec = LeafSpec::workload(TRIAGE);
        edit(&mut spec);
        h.ca.leaf(&spec).unwrap()
    };
    let unknown_ca = Ca::new(TRUST_DOMAIN).unwrap();
    let cases = vec![
        ("no client certificate", None, "no_certificate"),
        (
            "unknown CA",
            Some(
                Ca::new("elsewhere.example")
                    .unwrap()
                    .svid("spiffe://elsewhere.example/x")
                    .unwrap(),
            ),
            "unknown_trust_domain",
        ),
        (
            "untrusted CA claiming our trust domain",
            Some(unknown_ca.svid(TRIAGE).unwrap()),
            "bad_signature",
        ),
        (
            "trust domain B's CA claiming trust domain A",
            Some(partner.svid(TRIAGE).unwrap()),
            "unknown_ca",
        ),
        (
            "expired leaf",
            Some(leaf(&|s| {
                s.not_before = now - Duration::days(2);
                s.not_after = now - Duration::days(1);
            })),
            "expired",
        ),
        (
            "not yet valid leaf",
            Some(leaf(&|s| {
                s.not_before = now + Duration::days(1);
                s.not_after = now + Duration::days(2);
            })),
            "not_yet_valid",
        ),
        (
            "serverAuth-only EKU",
            Some(leaf(&|s| s.client_auth = false)),
            "missing_client_auth",
        ),
        (
            "CA certificate as leaf",
            Some(leaf(&|s| s.is_ca = true)),
            "ca_leaf",
        ),
        (
            "keyCertSign leaf",
            Some(leaf(&|s| s.key_cert_sign = true)),
            "signing_key_usage",
        ),
        (
            "two URI SANs",
            Some(leaf(&|s| {
                s.uris
                    .push("spiffe://prod.example.org/ns/admin/sa/root".to_owned())
            })),
            "multiple_uri_sans",
        ),
        (
            "no URI SAN",
            Some(leaf(&|s| {
                s.uris.clear();
                s.dns_names.push("triage.example.org".to_owned());
            })),
            "no_uri_san",
        ),
        (
            "root-only SPIFFE ID",
            Some(leaf(&|s| {
                s.uris = vec!["spiffe://prod.example.org".to_owned()]
            })),
            "root_only_id",
        ),
        (
            "upper-case trust domain",
            Some(leaf(&|s| {
                s.uris = vec!["spiffe://PROD.example.org/ns/a/sa/b".to_owned()]
            })),
            "invalid_spiffe_id",
        ),
        (
            "dot segment in path",
            Some(leaf(&|s| {
                s.uris = vec!["spiffe://prod.example.org/ns/../sa/b".to_owned()]
            })),
            "invalid_spiffe_id",
        ),
    ];
    for (name, svid, reason) in cases {
        assert_refused(&h, name, svid.as_ref(), reason).await;
    }
    assert!(
        h.upstream.requests().is_empty(),
        "the upstream saw a request"
    );
    // The audit trail records HTTP decisions; refused handshakes are counted, not audited.
    assert_eq!(h.audit(0).await.len(), 1);
}

/// X509-SVID §4.3 on the path webpki verified: the leaf sets digitalSignature, and every CA
/// certificate (intermediates and the root) sets keyCertSign.
#[tokio::test]
async fn key_usage_rules_apply_to_the_leaf_and_every_issuer_of_the_verified_path() {
    let weak_root = Arc::new(Ca::without_key_cert_sign("weak.example.net").unwrap());
    let h = Harness::builder()
        .trust("weak.example.net", weak_root.clone())
        .start()
        .await;
    let signing_intermediate = h.ca.intermediate("signing intermediate", true).unwrap();
    let good = signing_intermediate.svid(TRIAGE).unwrap();
    assert_eq!(good.chain.len(), 1);
    assert_eq!(
        h.try_call(Some(&good)).await.unwrap(),
        200,
        "root -> intermediate (keyCertSign) -> leaf (digitalSignature) is an SVID"
    );

    let non_signing =
        h.ca.intermediate("non-signing intermediate", false)
            .unwrap();
    let mut key_agreement_only = LeafSpec::workload(TRIAGE);
    key_agreement_only.digital_signature = false;
    key_agreement_only.key_agreement = true;
    let cases = [
        (
            "intermediate without keyCertSign",
            non_signing.svid(TRIAGE).unwrap(),
            "issuer_key_usage",
        ),
        (
            "signing intermediate under a non-signing one",
            non_signing
                .intermediate("nested", true)
                .unwrap()
                .svid(TRIAGE)
                .unwrap(),
            "issuer_key_usage",
        ),
        (
            "root without keyCertSign",
            weak_root.svid("spiffe://weak.example.net/agent").unwrap(),
            "issuer_key_usage",
        ),
        (
            "leaf with keyAgreement only",
            h.ca.leaf(&key_agreement_only).unwrap(),
            "leaf_key_usage",
        ),
        (
            "leaf with keyAgreement only, through a signing intermediate",
            signing_intermediate.leaf(&key_agreement_only).unwrap(),
            "leaf_key_usage",
        ),
    ];
    for (name, svid, reason) in cases {
        assert_refused(&h, name, Some(&svid), reason).await;
    }
    assert_eq!(
        h.upstream.requests().len(),
        1,
        "only the valid chain was forwarded"
    );
}

/// `svid` is refused during the handshake (no HTTP exchange) and counted under `reason`.
async fn assert_refused(h: &Harness, name: &str, svid: Option<&Svid>, reason: &str) {
    let label = format!("portcullis_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    let before = sample(&h.metrics().await, &label);
    let error = h.try_call(svid).await.expect_err(name);
    assert!(
        error.is_tls(),
        "{name}: expected a TLS refusal, got {error}"
    );
    assert!(
        eventually(async || sample(&h.metrics().await, &label) > before).await,
        "{name}: {label} did not increase\n{}",
        h.metrics().await
    );
}

#[tokio::test]
async fn an_expired_root_is_dropped_from_its_bundle() {
    let now = OffsetDateTime::now_utc();
    let expired = Arc::new(
        Ca::with_validity(
            "old.example.org",
            now - Duration::days(10),
            now - Duration::days(1),
        )
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.pem"), expired.cert_pem()).unwrap();
    let error = portcullis_identity::bundle::read_bundle(
        &dir.path().join("old.pem"),
        std::time::SystemTime::now(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("every root has expired"),
        "{error}"
    );
}
