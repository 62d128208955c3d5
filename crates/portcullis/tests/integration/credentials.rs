//! Upstream credentials held by the sidecar (`routes[].credential`) over real mTLS: a key
//! file that replaces whatever the caller sent and follows the file; an RFC 8693 token
//! exchange against a test token service (mTLS with the sidecar's SVID), cached, narrowed by
//! `@scope`, and failing closed.

use bytes::Bytes;
use portcullis_test_support::client::{HttpVersion, request};
use portcullis_test_support::pki::Ca;
use portcullis_test_support::token_exchange::TokenService;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use crate::harness::{HOST, Harness, TRIAGE, TRUST_DOMAIN, eventually, replace};

const FILE_ROUTE: &str = "routes:\n  - path_prefix: /api\n    credential:\n      file: upstream-key.txt\n      header: x-api-token\n";

#[tokio::test]
async fn the_upstream_gets_the_sidecars_key_never_the_callers_and_a_new_key_once_the_file_changes()
{
    let h = Harness::builder()
        .file("upstream-key.txt", "sidecar-key-1\n")
        .yaml(FILE_ROUTE)
        .start()
        .await;
    let send = async |h: &Harness| {
        let mut req = request("GET", HOST, "/api/orders/1", Bytes::new());
        req.headers_mut()
            .append("x-api-token", "held-by-the-agent".parse().unwrap());
        req.headers_mut()
            .append("x-api-token", "and-another".parse().unwrap());
        // The same field to applications that read `_` as `-`.
        req.headers_mut()
            .append("x_api_token", "spelled-otherwise".parse().unwrap());
        h.send(TRIAGE, HttpVersion::Http1, req).await.0
    };
    assert_eq!(send(&h).await, 200);
    let seen = h.upstream.requests();
    let values: Vec<_> = seen[0].headers.get_all("x-api-token").iter().collect();
    assert_eq!(values, ["sidecar-key-1"]);
    assert!(!seen[0].headers.contains_key("x_api_token"));

    replace(h.dir.path(), "upstream-key.txt", "sidecar-key-2\n");
    assert!(
        eventually(async || {
            send(&h).await == 200
                && h.upstream.requests().last().unwrap().headers["x-api-token"] == "sidecar-key-2"
        })
        .await
    );
    let records = h.audit(1).await;
    assert_eq!(records[1]["credential"], "file");
}

const POLICIES: &str = r#"
@id("agents-read") permit (principal, action == Action::"GET", resource);
@id("users-read-orders") @scope("orders:read")
permit (principal is User, action == Action::"GET", resource);
"#;

async fn exchange_harness(service: &TokenService, ca: Ca) -> Harness {
    Harness::builder()
        .ca(ca)
        .policies(POLICIES)
        .user_tokens()
        .yaml(&format!(
            "routes:\n  - path_prefix: /api\n    credential:\n      token_exchange:\n        endpoint: {}\n        audience: orders-backend\n        scope: orders:read orders:write\n        ca_file: ca.pem\n",
            service.endpoint()
        ))
        .start()
        .await
}

async fn call(h: &Harness, token: &str) -> u16 {
    let mut req = request("GET", HOST, "/api/orders/1", Bytes::new());
    req.headers_mut()
        .insert("x-portcullis-user-token", token.parse().unwrap());
    req.headers_mut()
        .insert("authorization", "Bearer agents-own-key".parse().unwrap());
    h.send(TRIAGE, HttpVersion::Http1, req).await.0
}

#[tokio::test]
async fn the_user_token_is_exchanged_over_mtls_for_a_narrowed_scope_once_per_lifetime() {
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let service = TokenService::start(&ca, 600).await;
    let h = exchange_harness(&service, ca).await;
    let token = h.token("alice", &["staff"], TRIAGE);

    assert_eq!(call(&h, &token).await, 200);
    let seen = h.upstream.requests();
    assert_eq!(seen[0].headers["authorization"], "Bearer exchanged-1");
    assert!(!seen[0].headers.contains_key("x-portcullis-user-token"));

    let exchanges = service.exchanges();
    assert_eq!(exchanges.len(), 1);
    let form = &exchanges[0].form;
    assert_eq!(form["subject_token"], token);
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(form["audience"], "orders-backend");
    // orders:write is not in the determining permits' @scope.
    assert_eq!(form["scope"], "orders:read");
    // The sidecar authenticated with its own SVID.
    let serving = CertificateDer::pem_file_iter(h.dir.path().join("server.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(exchanges[0].client_cert.as_ref(), Some(&serving));

    // Within the lifetime: the cached token, no second exchange.
    assert_eq!(call(&h, &token).await, 200);
    assert_eq!(service.exchanges().len(), 1);
    assert_eq!(
        h.upstream.requests()[1].headers["authorization"],
        "Bearer exchanged-1"
    );
    let records = h.audit(2).await;
    assert_eq!(records[1]["credential"], "token_exchange");
    let log = std::fs::read_to_string(h.audit_path()).unwrap();
    assert!(
        !log.contains("exchanged-1"),
        "a credential in the audit log"
    );
}

#[tokio::test]
async fn a_route_without_a_scope_asks_for_what_the_determining_permits_scope() {
    // Without a route scope the token service would issue its default (often broadest) scope.
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let service = TokenService::start(&ca, 600).await;
    let h = Harness::builder()
        .ca(ca)
        .policies(POLICIES)
        .user_tokens()
        .yaml(&format!(
            "routes:\n  - path_prefix: /api\n    credential:\n      token_exchange:\n        endpoint: {}\n        audience: orders-backend\n        ca_file: ca.pem\n",
            service.endpoint()
        ))
        .start()
        .await;
    let token = h.token("alice", &["staff"], TRIAGE);
    assert_eq!(call(&h, &token).await, 200);
    let exchanges = service.exchanges();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].form["scope"], "orders:read");
}

#[tokio::test]
async fn the_same_subject_at_another_issuer_is_another_user_with_its_own_token() {
    use portcullis_test_support::jwt;
    const PARTNER: &str = "https://partner.example.com";
    let partner = jwt::SigningKey::es256("partner-1");
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let service = TokenService::start(&ca, 600).await;
    let h = Harness::builder()
        .ca(ca)
        .policies(POLICIES)
        .user_tokens()
        .file("partner.json", &jwt::jwks(&[&partner]))
        .user_token_yaml(&format!(
            "  issuer_keys:\n    - issuer: {PARTNER}\n      jwks_file: partner.json\n"
        ))
        .yaml(&format!(
            "routes:\n  - path_prefix: /api\n    credential:\n      token_exchange:\n        endpoint: {}\n        audience: orders-backend\n        scope: orders:read\n        ca_file: ca.pem\n",
            service.endpoint()
        ))
        .start()
        .await;
    let alice_at_partner = partner.token(&jwt::claims(
        PARTNER,
        crate::harness::AUDIENCE,
        "alice",
        TRIAGE,
        jwt::now(),
    ));
    assert_eq!(call(&h, &h.token("alice", &["staff"], TRIAGE)).await, 200);
    assert_eq!(call(&h, &alice_at_partner).await, 200);
    let exchanges = service.exchanges();
    assert_eq!(
        exchanges.len(),
        2,
        "the partner's alice got the IdP alice's token"
    );
    assert_eq!(exchanges[1].form["subject_token"], alice_at_partner);
    let seen = h.upstream.requests();
    assert_eq!(seen[0].headers["authorization"], "Bearer exchanged-1");
    assert_eq!(seen[1].headers["authorization"], "Bearer exchanged-2");
}

#[tokio::test]
async fn concurrent_calls_for_one_user_share_one_exchange_and_its_failure() {
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let service = TokenService::start(&ca, 600).await;
    // Slow enough that every call below misses the cache while the first exchange runs.
    service.set_delay(std::time::Duration::from_millis(300));
    let h = exchange_harness(&service, ca).await;
    let token = h.token("dana", &["staff"], TRIAGE);
    let statuses = futures_join(&h, &token, 8).await;
    assert_eq!(statuses, vec![200; 8]);
    assert_eq!(service.exchanges().len(), 1, "one exchange for eight calls");
    assert!(
        h.upstream
            .requests()
            .iter()
            .all(|r| r.headers["authorization"] == "Bearer exchanged-1")
    );
    let metrics = h.metrics().await;
    assert_eq!(
        crate::harness::sample(&metrics, "portcullis_token_exchanges_total{result=\"ok\"}"),
        1.0,
        "{metrics}"
    );

    // A failure is shared too: eight waiting calls cost the token service one request.
    service.set_failing(true);
    let token = h.token("erin", &["staff"], TRIAGE);
    assert_eq!(futures_join(&h, &token, 8).await, vec![502; 8]);
    assert_eq!(service.exchanges().len(), 2);
}

/// `n` calls with `token` at once, each on its own connection; their statuses.
async fn futures_join(h: &Harness, token: &str, n: usize) -> Vec<u16> {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (addr, caller, token) = (
            h.addr,
            h.caller(&h.svid(TRIAGE), HttpVersion::Http1),
            token.to_owned(),
        );
        calls.spawn(async move {
            let mut req = request("GET", HOST, "/api/orders/1", Bytes::new());
            req.headers_mut()
                .insert("x-portcullis-user-token", token.parse().unwrap());
            caller.call(addr, req).await.unwrap().status().as_u16()
        });
    }
    calls.join_all().await
}

#[tokio::test]
async fn a_failing_or_unreachable_token_service_is_502_and_nothing_is_forwarded() {
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let service = TokenService::start(&ca, 600).await;
    let h = exchange_harness(&service, ca).await;
    service.set_failing(true);
    assert_eq!(call(&h, &h.token("bob", &["staff"], TRIAGE)).await, 502);
    assert_eq!(service.exchanges().len(), 1);
    drop(service);
    assert_eq!(call(&h, &h.token("carol", &["staff"], TRIAGE)).await, 502);
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(2).await;
    for record in &records[1..3] {
        assert_eq!(record["reason"], "credential_unavailable");
        assert_eq!(record["status"], 502);
        assert!(
            record["errors"][0]
                .as_str()
                .unwrap()
                .starts_with("token exchange:"),
            "{record}"
        );
    }
    let metrics = h.metrics().await;
    assert_eq!(
        crate::harness::sample(
            &metrics,
            "portcullis_token_exchanges_total{result=\"failed\"}"
        ),
        2.0
    );
}
