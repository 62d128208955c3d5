//! One small GET, sequentially on a kept-alive connection: directly to the upstream (the
//! baseline, plain HTTP/1.1) and through the proxy (mTLS, identity, Cedar, audit, forward),
//! HTTP/1.1 and HTTP/2; plus a new mTLS connection per request (full handshake). Compare the
//! proxy rows against `direct` from the same run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "bench set-up fails loudly"
)]

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use portcullis_test_support::client::{Caller, HttpVersion, request};

const AGENT: &str = "spiffe://prod.example.org/ns/support/sa/triage-agent";
const HOST: &str = "orders.prod.example.org";
const PATH: &str = "/api/orders/17";

fn through_proxy(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let setup = runtime.block_on(portcullis_benches::start_proxy());
    let addr = setup.proxy.local_addr();
    let svid = setup.ca.svid(AGENT).unwrap();
    let roots = [setup.ca.cert_der()];

    let mut group = c.benchmark_group("request");
    let mut direct = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(setup.upstream.addr)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    });
    group.bench_function("direct_http1", |b| {
        b.iter(|| {
            runtime.block_on(async {
                direct.ready().await.unwrap();
                let response = direct
                    .send_request(request("GET", HOST, PATH, Bytes::new()))
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
            });
        });
    });
    for (name, version) in [
        ("proxy_http1", HttpVersion::Http1),
        ("proxy_http2", HttpVersion::Http2),
    ] {
        let caller = Caller::new(&roots, Some(&svid), version).unwrap();
        let mut connection = runtime.block_on(caller.connect(addr)).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let response = connection
                        .send(request("GET", HOST, PATH, Bytes::new()))
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    response.into_body().collect().await.unwrap();
                });
            });
        });
    }
    let caller = Caller::new(&roots, Some(&svid), HttpVersion::Http1).unwrap();
    group.bench_function("proxy_new_mtls_connection", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = caller
                    .call(addr, request("GET", HOST, PATH, Bytes::new()))
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
            });
        });
    });
    group.finish();
}

criterion_group!(benches, through_proxy);
criterion_main!(benches);
