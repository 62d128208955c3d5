//! What an upstream credential costs an allowed call once the exchanged token is cached
//! (issue #13: under 5 µs). One proxy, one kept-alive HTTP/1.1 mTLS connection, the same
//! agent, user token and policies; `/plain/…` has no credential, `/api/…` gets an RFC 8693
//! token exchanged once (against the test token service, over mTLS with the sidecar's SVID)
//! and then served from the cache. Compare `cached_token_exchange` with `no_credential`
//! from the same run; a `file` row shows the key-file credential for reference.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "bench set-up fails loudly"
)]

use std::path::Path;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use portcullis_test_support::client::{Caller, HttpVersion, request};
use portcullis_test_support::jwt::{self, SigningKey};
use portcullis_test_support::pki::{Ca, LeafSpec};
use portcullis_test_support::token_exchange::TokenService;
use portcullis_test_support::upstream::{SsePacing, Upstream};

const AGENT: &str = "spiffe://prod.example.org/ns/support/sa/triage-agent";
const HOST: &str = "orders.prod.example.org";
const ISSUER: &str = "https://idp.example.org";
const AUDIENCE: &str = "orders-api";

const POLICIES: &str = r#"
@id("agents-read") permit (principal, action == Action::"GET", resource);
@id("users-read-orders") @scope("orders:read")
permit (principal is User, action == Action::"GET", resource);
"#;

fn credentials(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("prod.example.org").unwrap();
    let idp = SigningKey::es256("idp-1");
    let (upstream, service, proxy) = runtime.block_on(async {
        let upstream = Upstream::start(SsePacing::Delay(std::time::Duration::ZERO))
            .await
            .unwrap();
        let service = TokenService::start(&ca, 3600).await;
        let proxy = start(dir.path(), &ca, &idp, &upstream, &service).await;
        (upstream, service, proxy)
    });
    let svid = ca.svid(AGENT).unwrap();
    let caller = Caller::new(&[ca.cert_der()], Some(&svid), HttpVersion::Http1).unwrap();
    let mut connection = runtime
        .block_on(caller.connect(proxy.local_addr()))
        .unwrap();
    let now = jwt::now();
    let mut claims = jwt::claims(ISSUER, AUDIENCE, "alice", AGENT, now);
    claims["exp"] = (now + 3000).into();
    let token = idp.token(&claims);

    let mut send = |path: &'static str| {
        let mut req = request("GET", HOST, path, Bytes::new());
        req.headers_mut()
            .insert("x-portcullis-user-token", token.parse().unwrap());
        runtime.block_on(async {
            let response = connection.send(req).await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.into_body().collect().await.unwrap();
        });
    };
    // The first call exchanges; every later one must be served from the cache.
    send("/api/orders/1");
    assert_eq!(service.issued(), 1);

    let mut group = c.benchmark_group("credential");
    group.bench_function("no_credential", |b| b.iter(|| send("/plain/orders/1")));
    group.bench_function("cached_token_exchange", |b| {
        b.iter(|| send("/api/orders/1"))
    });
    group.bench_function("file", |b| b.iter(|| send("/keyed/orders/1")));
    group.finish();
    assert_eq!(service.issued(), 1, "the exchanged token was not cached");
    let last = upstream.requests().pop().unwrap();
    assert_eq!(last.headers["authorization"], "Bearer upstream-key");
    drop(proxy);
}

async fn start(
    dir: &Path,
    ca: &Ca,
    idp: &SigningKey,
    upstream: &Upstream,
    service: &TokenService,
) -> portcullis_proxy::Running {
    let write = |name: &str, contents: &[u8]| std::fs::write(dir.join(name), contents).unwrap();
    let server = ca
        .leaf(&LeafSpec::server(
            "spiffe://prod.example.org/ns/orders/sa/orders-api",
        ))
        .unwrap();
    write("ca.pem", ca.cert_pem().as_bytes());
    write("server.pem", server.cert_pem.as_bytes());
    write("server-key.pem", server.key_pem.as_bytes());
    write("jwks.json", jwt::jwks(&[idp]).as_bytes());
    write("upstream-key.txt", b"upstream-key\n");
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    std::fs::copy(
        shipped.join("schema.cedarschema"),
        policies.join("schema.cedarschema"),
    )
    .unwrap();
    std::fs::write(policies.join("bench.cedar"), POLICIES).unwrap();
    let config = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: http://{upstream}\n\
         tls:\n  cert: server.pem\n  key: server-key.pem\n  trust_bundles:\n    prod.example.org: ca.pem\n\
         policy:\n  dir: policies\n\
         user_token:\n  jwks_file: jwks.json\n  issuers: [{ISSUER}]\n  audiences: [{AUDIENCE}]\n  max_lifetime: 1h\n\
         routes:\n\
         \x20 - path_prefix: /plain\n\
         \x20 - path_prefix: /api\n    credential:\n      token_exchange:\n        endpoint: {endpoint}\n        audience: orders-backend\n        scope: orders:read\n        ca_file: ca.pem\n\
         \x20 - path_prefix: /keyed\n    credential:\n      file: upstream-key.txt\n      header: authorization\n      prefix: \"Bearer \"\n\
         audit:\n  sink: audit.jsonl\n",
        upstream = upstream.addr,
        endpoint = service.endpoint(),
    );
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    let config = portcullis::config::Config::load(&dir.join("config.yaml")).unwrap();
    portcullis_proxy::start(config.into_options().await.unwrap())
        .await
        .unwrap()
}

criterion_group!(benches, credentials);
criterion_main!(benches);
