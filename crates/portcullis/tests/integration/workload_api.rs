//! Identity from the SPIFFE Workload API (`tls.workload_api`), against a real gRPC agent on a
//! Unix socket: the serving SVID rotates, a root added to or removed from an update applies
//! from the next handshake, and a trust domain missing from a (full-state) update is unloaded.

use bytes::Bytes;
use portcullis_test_support::client::{Caller, HttpVersion, request};
use portcullis_test_support::pki::{Ca, LeafSpec, Svid};
use portcullis_test_support::workload_api::{WorkloadApiServer, X509SvidResponse};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::harness::{HOST, Harness, SERVER_ID, TRIAGE, TRUST_DOMAIN, sample};
use crate::live_identity::within_10s;

const PARTNER: &str = "partner.example.net";

fn serving(ca: &Ca, hours: i64) -> Svid {
    let mut spec = LeafSpec::server(SERVER_ID);
    spec.not_after = OffsetDateTime::now_utc() + time::Duration::hours(hours);
    ca.leaf(&spec).unwrap()
}

async fn status(caller: &Caller, h: &Harness) -> Result<u16, bool> {
    caller
        .call(h.addr, request("GET", HOST, "/api/orders/1", Bytes::new()))
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.is_tls())
}

#[tokio::test]
async fn the_workload_api_source_rotates_the_svid_and_follows_every_bundle_update() {
    let agent = WorkloadApiServer::start().await.unwrap();
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let first = serving(&ca, 2);
    let roots = |extra: &[&Ca]| -> Vec<CertificateDer<'static>> {
        std::iter::once(ca.cert_der())
            .chain(extra.iter().map(|c| c.cert_der()))
            .collect()
    };
    agent.push(X509SvidResponse::new(SERVER_ID, &first, &roots(&[])));
    let root = ca.cert_der();
    let own = vec![root.clone()];
    let h = Harness::builder()
        .workload_api(agent.endpoint(), ca)
        .start()
        .await;
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);
    assert_eq!(h.served_leaf().await.unwrap(), first.cert_der.to_vec());

    // Rotation: new handshakes get the new SVID; a connection from before keeps working.
    let triage = Caller::new(&own, Some(&h.svid(TRIAGE)), HttpVersion::Http1).unwrap();
    let mut established = triage.connect(h.addr).await.unwrap();
    let second = serving(&h.ca, 3);
    agent.push(X509SvidResponse::new(SERVER_ID, &second, &own));
    assert!(
        within_10s(async || h.served_leaf().await.as_deref() == Some(second.cert_der.as_ref()))
            .await,
        "a new handshake still presents the first SVID"
    );
    let response = established
        .send(request("GET", HOST, "/api/orders/1", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A second root of our trust domain: trusted once an update carries it, refused once an
    // update no longer does, trusted again when it is back.
    let rotated_ca = Ca::new(TRUST_DOMAIN).unwrap();
    let rotated = Caller::new(
        &own,
        Some(&rotated_ca.svid(TRIAGE).unwrap()),
        HttpVersion::Http1,
    )
    .unwrap();
    assert_eq!(status(&rotated, &h).await, Err(true));
    let with_both = vec![root.clone(), rotated_ca.cert_der()];
    agent.push(X509SvidResponse::new(SERVER_ID, &second, &with_both));
    assert!(within_10s(async || status(&rotated, &h).await == Ok(200)).await);
    agent.push(X509SvidResponse::new(SERVER_ID, &second, &own));
    assert!(
        within_10s(async || status(&rotated, &h).await == Err(true)).await,
        "a root removed by an update is still trusted"
    );
    agent.push(X509SvidResponse::new(SERVER_ID, &second, &with_both));
    assert!(within_10s(async || status(&rotated, &h).await == Ok(200)).await);

    // A federated trust domain: its callers pass the handshake while an update lists it (the
    // shipped policies then decide), and are refused in the handshake once one does not.
    let partner_ca = Ca::new(PARTNER).unwrap();
    let partner = Caller::new(
        &own,
        Some(
            &partner_ca
                .svid("spiffe://partner.example.net/crawler")
                .unwrap(),
        ),
        HttpVersion::Http1,
    )
    .unwrap();
    assert_eq!(status(&partner, &h).await, Err(true));
    agent.push(
        X509SvidResponse::new(SERVER_ID, &second, &own).federate(PARTNER, &[partner_ca.cert_der()]),
    );
    assert!(within_10s(async || status(&partner, &h).await.is_ok()).await);
    agent.push(X509SvidResponse::new(SERVER_ID, &second, &own));
    assert!(
        within_10s(async || status(&partner, &h).await == Err(true)).await,
        "a trust domain missing from a full-state update is still trusted"
    );
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);

    let metrics = h.metrics().await;
    let applied = sample(
        &metrics,
        "portcullis_certificate_reloads_total{kind=\"workload_api\",result=\"success\"}",
    );
    assert!(applied >= 6.0, "{metrics}");
    assert!(
        metrics.contains(&format!("spiffe_id=\"{SERVER_ID}\"")),
        "the expiry gauge names the serving SPIFFE ID\n{metrics}"
    );
}

#[tokio::test]
async fn an_unusable_update_keeps_the_last_good_identity() {
    let agent = WorkloadApiServer::start().await.unwrap();
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let first = serving(&ca, 2);
    agent.push(X509SvidResponse::new(SERVER_ID, &first, &[ca.cert_der()]));
    let root = ca.cert_der();
    let h = Harness::builder()
        .workload_api(agent.endpoint(), ca)
        .start()
        .await;
    // An SVID that expired: the source accepts it (the key matches), the sidecar must not
    // serve with it.
    let mut expired = LeafSpec::server(SERVER_ID);
    expired.not_before = OffsetDateTime::now_utc() - time::Duration::hours(3);
    expired.not_after = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let expired = h.ca.leaf(&expired).unwrap();
    agent.push(X509SvidResponse::new(SERVER_ID, &expired, &[root]));
    let label = "portcullis_certificate_reloads_total{kind=\"workload_api\",result=\"failure\"}";
    assert!(within_10s(async || sample(&h.metrics().await, label) >= 1.0).await);
    assert_eq!(h.served_leaf().await.unwrap(), first.cert_der.to_vec());
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);
}

#[tokio::test]
async fn an_update_whose_svid_cannot_serve_still_unloads_what_it_unloads() {
    let agent = WorkloadApiServer::start().await.unwrap();
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let partner_ca = Ca::new(PARTNER).unwrap();
    let first = serving(&ca, 2);
    agent.push(
        X509SvidResponse::new(SERVER_ID, &first, &[ca.cert_der()])
            .federate(PARTNER, &[partner_ca.cert_der()]),
    );
    let root = ca.cert_der();
    let h = Harness::builder()
        .workload_api(agent.endpoint(), ca)
        .start()
        .await;
    let partner = Caller::new(
        std::slice::from_ref(&root),
        Some(
            &partner_ca
                .svid("spiffe://partner.example.net/crawler")
                .unwrap(),
        ),
        HttpVersion::Http1,
    )
    .unwrap();
    assert!(status(&partner, &h).await.is_ok());
    // The next update drops the partner, and its SVID has expired: the SVID in force stays,
    // the partner goes all the same.
    let mut expired = LeafSpec::server(SERVER_ID);
    expired.not_before = OffsetDateTime::now_utc() - time::Duration::hours(3);
    expired.not_after = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let expired = h.ca.leaf(&expired).unwrap();
    agent.push(X509SvidResponse::new(SERVER_ID, &expired, &[root]));
    assert!(
        within_10s(async || status(&partner, &h).await == Err(true)).await,
        "a trust domain the refused update unloads is still trusted"
    );
    assert_eq!(h.served_leaf().await.unwrap(), first.cert_der.to_vec());
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);
}

#[tokio::test]
async fn startup_fails_with_the_reason_when_the_agent_sends_nothing() {
    let agent = WorkloadApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policies = crate::harness::repo_root().join("policies");
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: http://127.0.0.1:9\n\
         tls:\n  workload_api: {}\n  workload_api_timeout: 300ms\n\
         policy:\n  dir: {}\n",
        agent.endpoint(),
        policies.display()
    );
    let config =
        portcullis::config::Config::from_yaml(&yaml, dir.path(), &dir.path().join("c.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
    let errors = config.into_options().await.unwrap_err().to_string();
    assert!(
        errors.contains("tls.workload_api") && errors.contains("no usable X509-SVID"),
        "{errors}"
    );
}
