//! Live identity: the serving pair and the trust bundles are re-read from their files while
//! the proxy runs; new handshakes see the change, established connections finish undisturbed,
//! a bad replacement keeps the last good one, and an identity that cannot serve is reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use portcullis_test_support::client::{Caller, HttpVersion, request};
use portcullis_test_support::pki::{Ca, LeafSpec, Svid};
use time::OffsetDateTime;

use crate::harness::{
    HOST, Harness, SERVER_ID, TRIAGE, TRUST_DOMAIN, admin_get, portcullis, replace, sample, write,
};

/// Polls `check` every 50 ms for at most 10 s: the issue's bound for a rotation to apply.
pub(crate) async fn within_10s<F: AsyncFnMut() -> bool>(mut check: F) -> bool {
    for _ in 0..200 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A serving SVID of the harness CA that differs from the first one (new key, later expiry).
fn next_server(h: &Harness, hours: i64) -> Svid {
    let mut spec = LeafSpec::server(SERVER_ID);
    spec.not_after = OffsetDateTime::now_utc() + time::Duration::hours(hours);
    h.ca.leaf(&spec).unwrap()
}

fn install(h: &Harness, svid: &Svid) {
    replace(h.dir.path(), "server-key.pem", &svid.key_pem);
    replace(h.dir.path(), "server.pem", &svid.cert_pem);
}

async fn reloads(h: &Harness, kind: &str, result: &str) -> f64 {
    sample(
        &h.metrics().await,
        &format!("portcullis_certificate_reloads_total{{kind=\"{kind}\",result=\"{result}\"}}"),
    )
}

#[tokio::test]
async fn a_rotated_pair_serves_new_handshakes_while_old_connections_finish() {
    let h = Harness::builder()
        .tls_reload_interval("100ms")
        .start()
        .await;
    let first = h.served_leaf().await.unwrap();
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    let mut before = caller.connect(h.addr).await.unwrap();
    let get = || request("GET", HOST, "/api/orders/1", Bytes::new());
    assert_eq!(before.send(get()).await.unwrap().status(), 200);

    let b = next_server(&h, 3);
    install(&h, &b);
    assert!(
        within_10s(async || h.served_leaf().await.as_deref() == Some(b.cert_der.as_ref())).await,
        "a new handshake still presents the old certificate"
    );
    assert_ne!(first, b.cert_der.to_vec());
    // The connection accepted before the swap keeps working.
    let response = before.send(get()).await.unwrap();
    assert_eq!(response.status(), 200);

    let metrics = h.metrics().await;
    assert_eq!(reloads(&h, "serving", "success").await, 1.0, "{metrics}");
    let (_, b_not_after) = portcullis_identity::bundle::subject_and_expiry(&b.cert_der).unwrap();
    let gauge = metrics
        .lines()
        .filter(|line| {
            line.starts_with("portcullis_certificate_expiry_timestamp_seconds{kind=\"serving\"")
        })
        .collect::<Vec<_>>();
    assert_eq!(
        gauge.len(),
        1,
        "the replaced certificate's series is gone: {gauge:?}"
    );
    assert!(
        gauge[0].contains(&format!("spiffe_id=\"{SERVER_ID}\"")),
        "{gauge:?}"
    );
    assert!(gauge[0].ends_with(&format!(" {b_not_after}")), "{gauge:?}");
}

#[tokio::test]
async fn a_kubernetes_symlink_swap_is_seen() {
    // The layout the kubelet's atomic writer leaves: files are symlinks through `..data` to a
    // timestamped directory, and an update swaps `..data` to a new directory. With a one-hour
    // poll, only the events on those entries can bring the swap in.
    let h = Harness::builder().tls_reload_interval("1h").start().await;
    let dir = h.dir.path();
    let publish = |generation: &str, svid: &Svid| {
        let target = dir.join(generation);
        std::fs::create_dir(&target).unwrap();
        write(&target, "tls.crt", &svid.cert_pem);
        write(&target, "tls.key", &svid.key_pem);
        let staged = dir.join("..data_tmp");
        std::os::unix::fs::symlink(generation, &staged).unwrap();
        std::fs::rename(&staged, dir.join("..data")).unwrap();
    };
    let b = next_server(&h, 3);
    publish("..2026_01", &b);
    for (link, file) in [("server.pem", "tls.crt"), ("server-key.pem", "tls.key")] {
        let staged = dir.join(format!("{link}.link"));
        std::os::unix::fs::symlink(format!("..data/{file}"), &staged).unwrap();
        std::fs::rename(staged, dir.join(link)).unwrap();
    }
    assert!(
        within_10s(async || h.served_leaf().await.as_deref() == Some(b.cert_der.as_ref())).await
    );
    let c = next_server(&h, 4);
    publish("..2026_02", &c);
    assert!(
        within_10s(async || h.served_leaf().await.as_deref() == Some(c.cert_der.as_ref())).await,
        "the ..data swap was not seen"
    );
}

/// File events, not the poll: with a one-hour `reload_interval`, only an event from the
/// certificate directory can make the new pair serve.
#[tokio::test]
async fn a_file_event_applies_a_rotation_before_the_next_poll() {
    let h = Harness::builder().tls_reload_interval("1h").start().await;
    // The watcher's first check (when it starts watching) picks up B, so by the time B serves
    // the directory is watched; C can then only arrive through an event.
    let b = next_server(&h, 3);
    install(&h, &b);
    assert!(
        within_10s(async || h.served_leaf().await.as_deref() == Some(b.cert_der.as_ref())).await
    );
    let c = next_server(&h, 4);
    install(&h, &c);
    assert!(
        within_10s(async || h.served_leaf().await.as_deref() == Some(c.cert_der.as_ref())).await,
        "the rotation was not seen without the poll"
    );
    assert_eq!(reloads(&h, "serving", "success").await, 2.0);
}

#[tokio::test]
async fn a_removed_root_is_refused_and_a_readded_one_trusted() {
    let h = Harness::builder()
        .tls_reload_interval("100ms")
        .start()
        .await;
    // A second CA of the same trust domain, as during a CA rotation.
    let second = Ca::new(TRUST_DOMAIN).unwrap();
    let agent = second.svid(TRIAGE).unwrap();
    let caller = Caller::new(&[h.ca.cert_der()], Some(&agent), HttpVersion::Http1).unwrap();
    let call = async || {
        caller
            .call(h.addr, request("GET", HOST, "/api/orders/1", Bytes::new()))
            .await
            .map(|r| r.status().as_u16())
    };
    assert!(call().await.unwrap_err().is_tls());

    // Added (PEM): trusted from a next handshake on.
    replace(
        h.dir.path(),
        "ca.pem",
        &format!("{}{}", h.ca.cert_pem(), second.cert_pem()),
    );
    assert!(within_10s(async || call().await.is_ok_and(|s| s == 200)).await);
    // An established connection from the second CA, to show what removal does not touch.
    let mut established = caller.connect(h.addr).await.unwrap();

    // Removed: refused from the next handshake on.
    replace(h.dir.path(), "ca.pem", &h.ca.cert_pem());
    assert!(
        within_10s(async || call().await.is_err_and(|e| e.is_tls())).await,
        "a removed root is still trusted"
    );
    // Full handshakes only (no resumption): every retry is refused, not just the first.
    for _ in 0..3 {
        assert!(call().await.unwrap_err().is_tls());
    }
    let response = established
        .send(request("GET", HOST, "/api/orders/1", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Re-added, as SPIFFE bundle JSON this time (what SPIRE federation publishes).
    replace(h.dir.path(), "ca.pem", &spiffe_bundle(&[&h.ca, &second]));
    assert!(
        within_10s(async || call().await.is_ok_and(|s| s == 200)).await,
        "a re-added root is not trusted"
    );
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);
    assert_eq!(reloads(&h, "bundle", "success").await, 3.0);
}

/// A SPIFFE bundle document (JWK set with `x509-svid` keys) holding `roots`.
fn spiffe_bundle(roots: &[&Ca]) -> String {
    use base64::Engine as _;
    let keys: Vec<_> = roots
        .iter()
        .map(|ca| {
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": "P-256",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(ca.cert_der())],
            })
        })
        .collect();
    serde_json::json!({"keys": keys, "spiffe_sequence": 2, "spiffe_refresh_hint": 300}).to_string()
}

#[tokio::test]
async fn a_bad_replacement_keeps_the_last_good_pair() {
    let h = Harness::builder()
        .tls_reload_interval("100ms")
        .start()
        .await;
    let first = h.served_leaf().await.unwrap();
    let failures = async || reloads(&h, "serving", "failure").await;
    // Each bad state stays until it was counted, and a little longer (a few checks), so that
    // the next increase belongs to the next state.
    let settle = async |before: f64| {
        let counted = within_10s(async || failures().await > before).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        counted
    };

    // B's certificate with C's key: mismatched.
    let (b, c, d) = (next_server(&h, 3), next_server(&h, 4), next_server(&h, 5));
    replace(h.dir.path(), "server.pem", &b.cert_pem);
    replace(h.dir.path(), "server-key.pem", &c.key_pem);
    assert!(settle(0.0).await, "a mismatched pair was not counted");
    assert_eq!(h.served_leaf().await.unwrap(), first);

    // Garbage where the certificate was.
    let before = failures().await;
    replace(h.dir.path(), "server.pem", "not a certificate\n");
    assert!(settle(before).await, "garbage was not counted");
    assert_eq!(h.served_leaf().await.unwrap(), first);
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);
    assert_eq!(reloads(&h, "serving", "success").await, 0.0);

    // A certificate written before its key: kept out until the key lands, then used.
    let before = failures().await;
    replace(h.dir.path(), "server.pem", &d.cert_pem);
    assert!(settle(before).await);
    assert_eq!(h.served_leaf().await.unwrap(), first);
    replace(h.dir.path(), "server-key.pem", &d.key_pem);
    assert!(
        within_10s(async || h.served_leaf().await.as_deref() == Some(d.cert_der.as_ref())).await
    );
    assert_eq!(reloads(&h, "serving", "success").await, 1.0);
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
}

#[tokio::test]
async fn a_serving_svid_that_expires_unreplaced_makes_readyz_503() {
    let mut spec = LeafSpec::server(SERVER_ID);
    spec.not_after = OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let h = Harness::builder().server_leaf(spec).start().await;
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
    let mut status = (0, Bytes::new());
    for _ in 0..200 {
        status = admin_get(h.admin, "/readyz").await;
        if status.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status.0, 503);
    assert_eq!(&status.1[..], b"not ready: serving certificate expired\n");
    assert_eq!(admin_get(h.admin, "/healthz").await.0, 200);
}

/// A serving chain (PEM, leaf first), its key, and the root it chains to, minted with rcgen
/// directly: the shared test CA's intermediates all last a day.
struct ShortChain {
    root_pem: String,
    chain_pem: String,
    key_pem: String,
}

impl ShortChain {
    /// `SERVER_ID`'s serving SVID, valid for an hour, under an intermediate that ends
    /// `intermediate_for` from now, under a root valid for a day.
    fn mint(intermediate_for: time::Duration) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
        };
        let now = OffsetDateTime::now_utc();
        let ca = |name: &str, not_after: OffsetDateTime| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.subject_alt_names = vec![SanType::URI(
                format!("spiffe://{TRUST_DOMAIN}").try_into().unwrap(),
            )];
            params.not_before = now - time::Duration::hours(1);
            params.not_after = not_after;
            params
        };
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca("short-chain root", now + time::Duration::days(1));
        let root = root_params.self_signed(&root_key).unwrap();
        let intermediate_key = KeyPair::generate().unwrap();
        let intermediate_params = ca("short-lived intermediate", now + intermediate_for);
        let intermediate = intermediate_params
            .signed_by(
                &intermediate_key,
                &Issuer::from_params(&root_params, &root_key),
            )
            .unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![
            SanType::URI(SERVER_ID.try_into().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        ];
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.not_before = now - time::Duration::hours(1);
        leaf.not_after = now + time::Duration::hours(1);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf
            .signed_by(
                &leaf_key,
                &Issuer::from_params(&intermediate_params, &intermediate_key),
            )
            .unwrap();
        Self {
            root_pem: root.pem(),
            chain_pem: leaf.pem() + &intermediate.pem(),
            key_pem: leaf_key.serialize_pem(),
        }
    }
}

#[tokio::test]
async fn a_serving_intermediate_that_expires_before_its_leaf_makes_readyz_503() {
    let h = Harness::builder()
        .tls_reload_interval("100ms")
        .start()
        .await;
    let chain = ShortChain::mint(time::Duration::seconds(5));
    // Its root beside the harness CA in the bundle, and the pair in force.
    replace(
        h.dir.path(),
        "ca.pem",
        &format!("{}{}", h.ca.cert_pem(), chain.root_pem),
    );
    replace(h.dir.path(), "server-key.pem", &chain.key_pem);
    replace(h.dir.path(), "server.pem", &chain.chain_pem);
    assert!(
        within_10s(async || {
            reloads(&h, "serving", "success").await == 1.0
                && admin_get(h.admin, "/readyz").await.0 == 200
        })
        .await,
        "the chain did not come into force ready"
    );
    // No file changes from here on: the intermediate's end alone must make the sidecar unready.
    assert!(
        within_10s(async || admin_get(h.admin, "/readyz").await.0 == 503).await,
        "/readyz stayed ready after the serving chain's intermediate expired"
    );
    let (status, body) = admin_get(h.admin, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        &body[..],
        b"not ready: serving certificate does not chain to its trust bundle\n"
    );
    assert_eq!(admin_get(h.admin, "/healthz").await.0, 200);
}

/// A bundle file that still parses but holds no usable root has removed every root: that trust
/// domain's callers are refused from the next handshake and the reload counts as a failure,
/// until a bundle with a root comes back. A file that does not parse keeps the last good roots.
#[tokio::test]
async fn a_bundle_left_without_roots_refuses_its_trust_domain_until_restored() {
    const PARTNER: &str = "partner.example.net";
    let partner = Arc::new(Ca::new(PARTNER).unwrap());
    let h = Harness::builder()
        .tls_reload_interval("100ms")
        .trust(PARTNER, partner.clone())
        .start()
        .await;
    let own = h.svid(TRIAGE);
    let indexer = partner
        .svid("spiffe://partner.example.net/ns/crawl/sa/indexer")
        .unwrap();
    let refused = async |svid: &Svid| h.try_call(Some(svid)).await.is_err_and(|e| e.is_tls());
    // Any HTTP answer: the handshake let it through (policy decides the rest).
    let admitted = async |svid: &Svid| h.try_call(Some(svid)).await.is_ok();
    let failures = async || reloads(&h, "bundle", "failure").await;
    assert!(admitted(&indexer).await);

    // Not parsable (as a file caught mid-write would be): counted, the roots stay.
    replace(h.dir.path(), "extra-0.pem", "{\"keys\": [");
    assert!(within_10s(async || failures().await == 1.0).await);
    assert!(
        admitted(&indexer).await,
        "an unparsable bundle dropped the roots"
    );

    // A SPIFFE bundle with no keys: the partner's callers are refused, ours are not.
    replace(h.dir.path(), "extra-0.pem", &spiffe_bundle(&[]));
    assert!(
        within_10s(async || refused(&indexer).await).await,
        "an empty bundle left the old roots trusted"
    );
    assert!(within_10s(async || failures().await == 2.0).await);
    assert_eq!(h.try_call(Some(&own)).await.unwrap(), 200);
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
    replace(h.dir.path(), "extra-0.pem", &spiffe_bundle(&[&partner]));
    assert!(within_10s(async || admitted(&indexer).await).await);

    // Our own trust domain's bundle as a PEM file without certificates: our callers are
    // refused, and the serving certificate no longer chains, so the sidecar is not ready.
    replace(h.dir.path(), "ca.pem", "");
    assert!(
        within_10s(async || refused(&own).await).await,
        "an empty bundle left the old roots trusted"
    );
    assert!(within_10s(async || failures().await == 3.0).await);
    let (status, body) = admin_get(h.admin, "/readyz").await;
    assert_eq!(
        (status, &body[..]),
        (
            503,
            &b"not ready: serving certificate does not chain to its trust bundle\n"[..]
        )
    );
    assert!(
        sample(
            &h.metrics().await,
            "portcullis_tls_handshake_failures_total{reason=\"unknown_ca\"}"
        ) >= 1.0
    );
    replace(h.dir.path(), "ca.pem", &h.ca.cert_pem());
    assert!(within_10s(async || h.try_call(Some(&own)).await.is_ok_and(|s| s == 200)).await);
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
    assert!(admitted(&indexer).await);
    assert_eq!(reloads(&h, "bundle", "success").await, 2.0);
    assert_eq!(failures().await, 3.0);
}

/// webpki never reads a trust anchor's validity: a root that expires while loaded, its file
/// unchanged, must still stop anchoring callers' chains. Here it is the partner's only root,
/// so the partner's trust domain is left without roots (a reload counted as a failure, as for
/// a file that holds none); our own callers and readiness are untouched.
#[tokio::test]
async fn a_root_that_expires_while_loaded_is_refused_without_a_file_change() {
    const PARTNER: &str = "partner.example.net";
    let now = OffsetDateTime::now_utc();
    let partner = Arc::new(
        Ca::with_validity(
            PARTNER,
            now - time::Duration::hours(1),
            now + time::Duration::seconds(5),
        )
        .unwrap(),
    );
    let h = Harness::builder()
        .tls_reload_interval("100ms")
        .trust(PARTNER, partner.clone())
        .start()
        .await;
    // Its SVID outlives its root: only the root's end can refuse it.
    let indexer = partner
        .svid("spiffe://partner.example.net/ns/crawl/sa/indexer")
        .unwrap();
    assert!(
        h.try_call(Some(&indexer)).await.is_ok(),
        "refused before its root expired"
    );
    assert!(
        within_10s(async || h.try_call(Some(&indexer)).await.is_err_and(|e| e.is_tls())).await,
        "a root that expired while loaded is still trusted"
    );
    assert!(within_10s(async || reloads(&h, "bundle", "failure").await == 1.0).await);
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
    assert_eq!(reloads(&h, "bundle", "success").await, 0.0);
}

/// The same through the Workload API: between two updates nothing replaces the bundles, so a
/// federated root that expires is dropped by the source itself, counted as an update.
#[tokio::test]
async fn a_workload_api_root_that_expires_between_updates_is_refused() {
    use portcullis_test_support::workload_api::{WorkloadApiServer, X509SvidResponse};
    const PARTNER: &str = "partner.example.net";
    let agent = WorkloadApiServer::start().await.unwrap();
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let now = OffsetDateTime::now_utc();
    let partner = Ca::with_validity(
        PARTNER,
        now - time::Duration::hours(1),
        now + time::Duration::seconds(5),
    )
    .unwrap();
    let mut spec = LeafSpec::server(SERVER_ID);
    spec.not_after = now + time::Duration::hours(2);
    let serving = ca.leaf(&spec).unwrap();
    agent.push(
        X509SvidResponse::new(SERVER_ID, &serving, &[ca.cert_der()])
            .federate(PARTNER, &[partner.cert_der()]),
    );
    let h = Harness::builder()
        .workload_api(agent.endpoint(), ca)
        .start()
        .await;
    let indexer = partner
        .svid("spiffe://partner.example.net/ns/crawl/sa/indexer")
        .unwrap();
    assert!(
        h.try_call(Some(&indexer)).await.is_ok(),
        "refused before its root expired"
    );
    assert!(
        within_10s(async || h.try_call(Some(&indexer)).await.is_err_and(|e| e.is_tls())).await,
        "a Workload API root that expired between updates is still trusted"
    );
    assert!(within_10s(async || reloads(&h, "workload_api", "success").await == 1.0).await);
    assert_eq!(h.try_call(Some(&h.svid(TRIAGE))).await.unwrap(), 200);
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
}

/// Failed handshakes, every reason together.
async fn handshake_failures(h: &Harness) -> f64 {
    h.metrics()
        .await
        .lines()
        .filter(|line| line.starts_with("portcullis_tls_handshake_failures_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The server config (and the roots its client verifier holds) is the one in force when the
/// ClientHello arrives, not when the TCP connection was accepted: a caller that connected
/// before its root was removed, and says hello after the removal applied, is refused.
#[tokio::test]
async fn a_root_removed_between_connect_and_client_hello_refuses_that_handshake() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BAD_SIGNATURE: &str = "portcullis_tls_handshake_failures_total{reason=\"bad_signature\"}";
    let h = Harness::builder()
        .tls_reload_interval("100ms")
        .start()
        .await;
    let second = Ca::new(TRUST_DOMAIN).unwrap();
    let agent = second.svid(TRIAGE).unwrap();
    let caller = Caller::new(&[h.ca.cert_der()], Some(&agent), HttpVersion::Http1).unwrap();
    replace(
        h.dir.path(),
        "ca.pem",
        &format!("{}{}", h.ca.cert_pem(), second.cert_pem()),
    );
    assert!(
        within_10s(async || {
            caller
                .call(h.addr, request("GET", HOST, "/api/orders/1", Bytes::new()))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await
    );
    let open = async || sample(&h.metrics().await, "portcullis_connections_active");
    // The calls above have closed their connections; then ours is accepted and waits.
    assert!(within_10s(async || open().await == 0.0).await);
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    assert!(
        within_10s(async || open().await == 1.0).await,
        "the connection was not accepted"
    );

    // The second CA's root removed (the bundle keeps the first), and the removal applied.
    replace(h.dir.path(), "ca.pem", &h.ca.cert_pem());
    assert!(within_10s(async || reloads(&h, "bundle", "success").await == 2.0).await);
    let refused_before = handshake_failures(&h).await;
    let bad_signature_before = sample(&h.metrics().await, BAD_SIGNATURE);

    let config = portcullis_test_support::pki::client_config(
        &[h.ca.cert_der()],
        Some(&agent),
        &[b"http/1.1"],
    )
    .unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(h.addr.ip().into());
    // TLS 1.3: the client's handshake completes before the server judged its certificate;
    // the verdict arrives as an alert on the first read.
    let outcome = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(mut tls) => {
            let head =
                format!("GET /api/orders/1 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
            let mut reply = Vec::new();
            match tls.write_all(head.as_bytes()).await {
                Ok(()) => tls
                    .read_to_end(&mut reply)
                    .await
                    .map(|_| String::from_utf8_lossy(&reply).into_owned()),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };
    let alert = outcome.as_ref().err().and_then(|error| {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
    });
    assert!(
        matches!(alert, Some(rustls::Error::AlertReceived(_))),
        "a hello after the root's removal was verified against the roots of the accept: {outcome:?}"
    );
    // Counted as a refused certificate (both CAs have the same name, so webpki finds the
    // first as the issuer and the signature does not verify).
    assert!(
        within_10s(async || handshake_failures(&h).await == refused_before + 1.0).await,
        "{}",
        h.metrics().await
    );
    assert_eq!(
        sample(&h.metrics().await, BAD_SIGNATURE),
        bad_signature_before + 1.0
    );
}

/// Each serving identity agents would refuse fails `validate` with its YAML path, exit 64.
#[test]
fn validate_refuses_each_bad_serving_identity() {
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let now = OffsetDateTime::now_utc();
    let spec = |edit: &dyn Fn(&mut LeafSpec)| {
        let mut spec = LeafSpec::server(SERVER_ID);
        edit(&mut spec);
        spec
    };
    let other_key = ca.svid(SERVER_ID).unwrap().key_pem;
    let cases: Vec<(&str, Svid, Option<String>, &str)> = vec![
        (
            "expired",
            ca.leaf(&spec(&|s| {
                s.not_before = now - time::Duration::days(2);
                s.not_after = now - time::Duration::days(1);
            }))
            .unwrap(),
            None,
            "tls.cert: serving certificate expired at",
        ),
        (
            "not yet valid",
            ca.leaf(&spec(&|s| {
                s.not_before = now + time::Duration::days(1);
                s.not_after = now + time::Duration::days(2);
            }))
            .unwrap(),
            None,
            "tls.cert: serving certificate is not valid before",
        ),
        (
            "no URI SAN",
            ca.leaf(&spec(&|s| s.uris.clear())).unwrap(),
            None,
            "tls.cert: serving certificate is not an X509-SVID: leaf has no URI SAN",
        ),
        (
            "two URI SANs",
            ca.leaf(&spec(&|s| s.uris.push(format!("{SERVER_ID}-2"))))
                .unwrap(),
            None,
            "tls.cert: serving certificate is not an X509-SVID: leaf has more than one URI SAN",
        ),
        (
            "CA leaf",
            ca.leaf(&spec(&|s| s.is_ca = true)).unwrap(),
            None,
            "tls.cert: serving certificate is not an X509-SVID: leaf is a CA certificate",
        ),
        (
            "key mismatch",
            ca.leaf(&spec(&|_| {})).unwrap(),
            Some(other_key),
            "tls.key: private key does not match the serving certificate (key ",
        ),
        (
            "another CA",
            Ca::new(TRUST_DOMAIN).unwrap().leaf(&spec(&|_| {})).unwrap(),
            None,
            "tls.cert: serving certificate does not chain to the trust bundle of prod.example.org",
        ),
    ];
    for (name, svid, key, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        for file in ["schema.cedarschema", "agents.cedar", "entities.json"] {
            std::fs::copy(
                crate::harness::repo_root().join("policies").join(file),
                dir.path().join("policies").join(file),
            )
            .unwrap();
        }
        write(dir.path(), "ca.pem", &ca.cert_pem());
        write(dir.path(), "svid.pem", &svid.cert_pem);
        write(
            dir.path(),
            "key.pem",
            key.as_deref().unwrap_or(&svid.key_pem),
        );
        write(
            dir.path(),
            "config.yaml",
            &format!(
                "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: http://127.0.0.1:1\n\
                 tls:\n  cert: svid.pem\n  key: key.pem\n  trust_bundles:\n    {TRUST_DOMAIN}: ca.pem\n\
                 policy:\n  dir: policies\n"
            ),
        );
        let config = dir.path().join("config.yaml");
        let (code, stdout, stderr) =
            portcullis(&["validate", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 64, "{name}: {stdout}{stderr}");
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in\n{stderr}"
        );
        if name == "key mismatch" {
            // Both files are named.
            assert!(
                stderr.contains("key.pem") && stderr.contains("svid.pem"),
                "{stderr}"
            );
        }
    }
}

/// 50 rotations of the serving pair under a steady 200 requests per second, half of them on
/// new connections (new handshakes, each with the pair in force), half on kept-alive ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_rotations_under_load_fail_no_request() {
    const ROTATIONS: usize = 50;
    let h = Arc::new(Harness::builder().tls_reload_interval("50ms").start().await);
    let pairs: Vec<Svid> = (0..ROTATIONS)
        .map(|i| next_server(&h, 2 + i as i64))
        .collect();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);

    let load = {
        let (h, ok, failed, stop) = (h.clone(), ok.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            // 200 requests per second: one every 5 ms, each in its own task so a slow one
            // does not lower the rate.
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut sent = 0u64;
            let mut kept = caller.connect(h.addr).await.unwrap();
            let mut inflight = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                sent += 1;
                if sent.is_multiple_of(2) {
                    let (caller, addr, ok, failed) =
                        (caller.clone(), h.addr, ok.clone(), failed.clone());
                    inflight.push(tokio::spawn(async move {
                        match caller
                            .call(addr, request("GET", HOST, "/api/orders/1", Bytes::new()))
                            .await
                        {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(r) => {
                                eprintln!("status {}", r.status());
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => {
                                eprintln!("new connection: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }));
                } else {
                    match kept
                        .send(request("GET", HOST, "/api/orders/1", Bytes::new()))
                        .await
                    {
                        Ok(r) if r.status() == 200 => {
                            use http_body_util::BodyExt as _;
                            let _ = r.into_body().collect().await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            eprintln!("status {}", r.status());
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("kept connection: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            for task in inflight {
                task.await.unwrap();
            }
        })
    };

    let started = std::time::Instant::now();
    for (index, pair) in pairs.iter().enumerate() {
        install(&h, pair);
        let applied =
            within_10s(async || reloads(&h, "serving", "success").await >= (index + 1) as f64)
                .await;
        assert!(applied, "rotation {index} was not applied");
    }
    assert_eq!(
        h.served_leaf().await.unwrap(),
        pairs[ROTATIONS - 1].cert_der.to_vec()
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    // Reported, not asserted: the rate depends on the machine.
    let rate = (ok + failed) as f64 / started.elapsed().as_secs_f64();
    println!(
        "{ROTATIONS} rotations under load: {ok} requests succeeded, {failed} failed ({rate:.0} requests/s)"
    );
    assert_eq!(failed, 0);
    assert!(ok >= 100, "too few requests to mean anything: {ok}");
}

/// Every example's README commands (`portcullis dev-certs`, `validate`, `run`), run as
/// documented from a copy of the repository layout. `run` gets ephemeral ports (the only
/// change), must become ready, serve an agent minted by `dev-certs`, and log a refused caller
/// with the identity it claimed.
#[test]
fn every_example_runs_as_documented_after_dev_certs() {
    let root = crate::harness::repo_root();
    let work = tempfile::tempdir().unwrap();
    copy_dir(&root.join("policies"), &work.path().join("policies"));
    let mut examples = 0;
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let example = entry.unwrap().path();
        if !example.join("config.yaml").is_file() {
            continue;
        }
        let name = example.file_name().unwrap().to_str().unwrap().to_owned();
        let copy = work.path().join("examples").join(&name);
        copy_dir(&example, &copy);
        let readme = std::fs::read_to_string(example.join("README.md")).unwrap();
        let commands = documented_commands(&readme);
        let verbs: Vec<&str> = commands.iter().map(|c| c[1].as_str()).collect();
        assert_eq!(
            verbs,
            ["dev-certs", "validate", "run"],
            "{name}: {commands:?}"
        );
        for command in &commands {
            match command[1].as_str() {
                "run" => run_example(&name, command, work.path()),
                _ => {
                    let output = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                        .args(&command[1..])
                        .current_dir(work.path())
                        .output()
                        .unwrap();
                    assert!(
                        output.status.success(),
                        "{name}: {command:?}: {}{}",
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            }
        }
        examples += 1;
    }
    assert!(examples >= 4, "{examples} examples");
}

/// Lines of ```sh blocks that start with `portcullis `, split into words.
fn documented_commands(readme: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            command if in_sh && command.starts_with("portcullis ") => {
                commands.push(command.split_whitespace().map(str::to_owned).collect());
            }
            _ => {}
        }
    }
    commands
}

fn run_example(name: &str, command: &[String], work: &std::path::Path) {
    use std::io::BufRead as _;

    let config = work.join(&command[3]);
    let yaml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("0.0.0.0:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0");
    std::fs::write(&config, yaml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(&command[1..])
        .current_dir(work)
        .env("PORTCULLIS_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut field = |wanted: &str| -> Option<serde_json::Value> {
        for line in lines.by_ref() {
            let line = line.ok()?;
            let record: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if record["fields"]["message"] == wanted {
                return Some(record["fields"].clone());
            }
        }
        None
    };
    let serving = field("portcullis serving");
    let Some(serving) = serving else {
        let _ = child.kill();
        panic!("{name}: `run` did not start serving");
    };
    let addr: std::net::SocketAddr = serving["local_addr"].as_str().unwrap().parse().unwrap();
    let admin: std::net::SocketAddr = serving["admin_addr"].as_str().unwrap().parse().unwrap();
    let certs = config.parent().unwrap().join("certs");
    let (agent_cert, agent_key) = std::fs::read_dir(&certs)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|f| f.ends_with("-agent.pem") || f.ends_with("-assistant.pem") || f == "analyst.pem")
        .map(|f| (f.clone(), f.replace(".pem", "_key.pem")))
        .unwrap();
    let ca = std::fs::read(certs.join("bundle.pem")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (ready, served, refused) = runtime.block_on(async {
        let ready = admin_get(admin, "/readyz").await.0;
        use rustls::pki_types::pem::PemObject as _;
        let roots = vec![rustls::pki_types::CertificateDer::from_pem_slice(&ca).unwrap()];
        let agent = Svid::from_pem(
            &std::fs::read_to_string(certs.join(&agent_cert)).unwrap(),
            &std::fs::read_to_string(certs.join(&agent_key)).unwrap(),
        )
        .unwrap();
        let caller = Caller::new(&roots, Some(&agent), HttpVersion::Http1).unwrap();
        let served = caller
            .call(addr, request("GET", HOST, "/api/orders/17", Bytes::new()))
            .await
            .map(|r| r.status().as_u16());
        let stranger = Ca::new("elsewhere.example")
            .unwrap()
            .svid("spiffe://elsewhere.example/ns/x/sa/scanner")
            .unwrap();
        let refused = Caller::new(&roots, Some(&stranger), HttpVersion::Http1)
            .unwrap()
            .call(addr, request("GET", HOST, "/", Bytes::new()))
            .await;
        (ready, served, refused)
    });
    let refusal = field("tls handshake refused");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready, 200, "{name}: /readyz");
    // No application listens behind the example: any HTTP answer shows the agent got through
    // the handshake and the pipeline.
    assert!(served.is_ok(), "{name}: {served:?}");
    assert!(
        refused.is_err_and(|e| e.is_tls()),
        "{name}: a stranger was served"
    );
    let refusal = refusal.unwrap_or_else(|| panic!("{name}: refusal not logged"));
    assert_eq!(refusal["reason"], "unknown_trust_domain", "{refusal}");
    assert_eq!(
        refusal["claimed_spiffe_id"], "spiffe://elsewhere.example/ns/x/sa/scanner",
        "{refusal}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}
