//! What crosses the proxy, and what does not.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use portcullis_test_support::client::{HttpVersion, request};
use portcullis_test_support::upstream::SsePacing;
use tokio::sync::Semaphore;

use crate::harness::{HOST, Harness, REPORT, TRIAGE, sample};

#[tokio::test]
async fn an_allowed_agent_reaches_the_upstream_with_its_identity() {
    let h = Harness::start().await;
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let (status, body) = h
            .send(
                TRIAGE,
                version,
                request("GET", HOST, "/api/orders/17?expand=lines", Bytes::new()),
            )
            .await;
        assert_eq!(status, 200, "{version:?}: {body:?}");
    }
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.uri, "/api/orders/17?expand=lines");
        assert_eq!(request.headers["x-portcullis-agent"], TRIAGE);
        assert_eq!(request.headers["host"], HOST);
        assert_eq!(request.headers["x-request-id"].len(), 32);
        assert!(request.headers.contains_key("traceparent"));
    }
    // The caller sent no traceparent: each request gets a new, well-formed one, and its audit
    // record carries the same trace id.
    let audit = h.audit(2).await;
    for (request, record) in seen.iter().zip(&audit[1..]) {
        let traceparent = request.headers["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = traceparent.split('-').collect();
        let hex = |s: &str, len| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        assert!(
            matches!(parts.as_slice(), ["00", trace, parent, "01"] if hex(trace, 32) && hex(parent, 16)),
            "{traceparent}"
        );
        assert_eq!(record["trace_id"], parts[1], "{record}");
    }
    assert_ne!(audit[1]["trace_id"], audit[2]["trace_id"]);
}

#[tokio::test]
async fn a_denied_agent_gets_403_and_the_upstream_sees_nothing() {
    let h = Harness::start().await;
    let (status, body) = h.get(REPORT, "/api/orders/17").await;
    assert_eq!(status, 403);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "policy_denied");
    // No policy text, no policy id: internals stay in the audit record.
    assert!(!String::from_utf8_lossy(&body).contains("support-agents"));
    assert!(h.upstream.requests().is_empty());
    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"portcullis_decisions_total{action="GET",decision="deny"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn spoofed_identity_and_hop_by_hop_headers_never_reach_the_upstream() {
    let h = Harness::start().await;
    let mut req = request("GET", HOST, "/api/orders/17", Bytes::new());
    let headers = req.headers_mut();
    for (name, value) in [
        (
            "x-portcullis-agent",
            "spiffe://prod.example.org/ns/admin/sa/root",
        ),
        ("x-portcullis-user", "admin"),
        (
            "x-forwarded-client-cert",
            "By=spiffe://prod.example.org/ns/admin/sa/root",
        ),
        ("connection", "x-internal-secret"),
        ("x-internal-secret", "1"),
        ("upgrade", "h2c"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-request-id", "caller-chosen"),
    ] {
        headers.append(name, value.parse().unwrap());
    }
    let (status, _) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 200);
    let seen = &h.upstream.requests()[0];
    assert_eq!(
        seen.headers
            .get_all("x-portcullis-agent")
            .iter()
            .collect::<Vec<_>>(),
        [TRIAGE]
    );
    for stripped in [
        "x-portcullis-user",
        "x-forwarded-client-cert",
        "x-internal-secret",
        "upgrade",
    ] {
        assert!(
            !seen.headers.contains_key(stripped),
            "{stripped} reached the upstream"
        );
    }
    assert_ne!(seen.headers["x-request-id"], "caller-chosen");
    assert_eq!(
        seen.headers["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    let audit = h.audit(1).await;
    assert_eq!(audit[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test]
async fn malformed_framing_gets_400_and_no_upgrade_tunnel() {
    let h = Harness::start().await;
    let wait = Duration::from_secs(5);
    let cases: [(&str, &[u8]); 4] = [
        ("two Host headers", b"GET /api/orders/1 HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n"),
        ("no Host", b"GET /api/orders/1 HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ("absolute-form target", b"GET http://orders.prod.example.org/api/orders/1 HTTP/1.1\r\nHost: orders.prod.example.org\r\nConnection: close\r\n\r\n"),
        ("dot segments", b"GET /api/../admin HTTP/1.1\r\nHost: orders.prod.example.org\r\nConnection: close\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let response = h.raw(TRIAGE, raw, wait).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{name}: {response}");
    }
    let upgrade = h
        .raw(TRIAGE, b"GET /api/orders/1 HTTP/1.1\r\nHost: orders.prod.example.org\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n", wait)
        .await;
    assert!(upgrade.starts_with("HTTP/1.1 200"), "{upgrade}");
    assert_eq!(h.upstream.requests().len(), 1);
    assert!(!h.upstream.requests()[0].headers.contains_key("upgrade"));
}

/// Requests on one connection are decided on the host each names, however they alternate
/// (the proxy keeps the host the last one named, and must never decide on another's).
#[tokio::test]
async fn each_request_on_a_connection_is_decided_on_the_host_it_names() {
    let h = Harness::builder()
        .policies(
            r#"@id("orders") permit (principal, action, resource is Route)
                 when { resource.host == "orders.prod.example.org" };"#,
        )
        .start()
        .await;
    let hosts = [
        (HOST, 200),
        ("admin.internal", 403),
        ("Orders.Prod.Example.org:8443", 200),
        ("admin.internal", 403),
        ("admin.internal", 403),
        (HOST, 200),
    ];
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let caller = h.caller(&h.svid(TRIAGE), version);
        let mut connection = caller.connect(h.addr).await.unwrap();
        for (host, expected) in hosts {
            let response = connection
                .send(request("GET", host, "/api/orders/1", Bytes::new()))
                .await
                .unwrap();
            let status = response.status().as_u16();
            response.into_body().collect().await.unwrap();
            assert_eq!(status, expected, "{version:?}, host {host}");
        }
    }
    let records = h.audit(2 * hosts.len()).await;
    let decided: Vec<&str> = records
        .iter()
        .filter_map(|r| r["input"]["host"].as_str())
        .collect();
    let named = hosts.map(|(host, _)| {
        if host.starts_with("admin") {
            "admin.internal"
        } else {
            HOST
        }
    });
    assert_eq!(decided, [named, named].concat());
}

#[tokio::test]
async fn a_host_with_userinfo_is_refused_and_connection_cannot_drop_host() {
    let h = Harness::builder()
        .policies(
            r#"@id("orders") permit (principal, action, resource is Route)
                 when { resource.host == "orders.prod.example.org" };"#,
        )
        .start()
        .await;
    // `http` reads the host after the `@`; an application splitting the field at `:` reads
    // `admin.internal`. Over HTTP/1.1 in Host, over HTTP/2 in :authority.
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let caller = h.caller(&h.svid(TRIAGE), version);
        let response = caller
            .call(
                h.addr,
                request(
                    "GET",
                    &format!("admin.internal:1@{HOST}"),
                    "/api/orders/1",
                    Bytes::new(),
                ),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{version:?}");
    }
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(2).await;
    for record in &records[1..] {
        assert_eq!(record["reason"], "invalid_host", "{record}");
    }
    // A sender may not name Host in Connection (RFC 9110 §7.6.1); were it dropped as a
    // connection option, the upstream would get another host than the one decided on.
    let mut req = request("GET", HOST, "/api/orders/1", Bytes::new());
    req.headers_mut()
        .insert("connection", "host, x-drop-me".parse().unwrap());
    req.headers_mut().insert("x-drop-me", "1".parse().unwrap());
    let (status, _) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    assert_eq!(status, 200);
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers.get("host").unwrap(), HOST);
    assert!(seen[0].headers.get("x-drop-me").is_none());
}

#[tokio::test]
async fn sse_events_cross_one_by_one() {
    let gate = Arc::new(Semaphore::new(0));
    let h = Harness::builder()
        .pacing(SsePacing::Gate(gate.clone()))
        .start()
        .await;
    let body =
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"one two three"}]}"#;
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http2);
    let response = caller
        .call(h.addr, request("POST", HOST, "/v1/chat/completions", body))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut next_event = async || loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Some(data) = frame.data_ref() {
            return String::from_utf8_lossy(data).into_owned();
        }
    };
    // Each event is read through the proxy before the upstream is allowed to produce the
    // next one: nothing is buffered on the way.
    for word in ["one", "two", "three"] {
        let event = next_event().await;
        assert!(
            event.contains(&format!("\"content\":\"{word}\"")),
            "{event}"
        );
        gate.add_permits(1);
    }
    assert!(next_event().await.contains("[DONE]"));
}

/// The inter-event gap is the upstream's, not the proxy's: over HTTP/1.1 (chunked) and
/// HTTP/2, each event is a frame of its own at the caller while the upstream is still held
/// at the gate before the next one, so nothing waits in a buffer for more data or a timer.
#[tokio::test]
async fn each_sse_event_reaches_the_caller_before_the_next_is_produced() {
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let gate = Arc::new(Semaphore::new(0));
        let h = Harness::builder()
            .pacing(SsePacing::Gate(gate.clone()))
            .start()
            .await;
        let words = ["alpha", "beta", "gamma", "delta"];
        let body = format!(
            r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            words.join(" ")
        );
        let caller = h.caller(&h.svid(TRIAGE), version);
        let response = caller
            .call(h.addr, request("POST", HOST, "/v1/chat/completions", body))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{version:?}");
        let mut body = response.into_body();
        for word in words {
            let data = loop {
                let frame = body.frame().await.unwrap().unwrap();
                if let Ok(data) = frame.into_data() {
                    break String::from_utf8_lossy(&data).into_owned();
                }
            };
            // Exactly this event, whole, in one frame; the next one does not exist yet.
            assert_eq!(data.matches("data: ").count(), 1, "{version:?}: {data}");
            assert!(data.contains(&format!("\"content\":\"{word}\"")), "{data}");
            assert_eq!(gate.available_permits(), 0, "{version:?}");
            gate.add_permits(1);
        }
        let rest = body.collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&rest).contains("[DONE]"),
            "{version:?}"
        );
    }
}

/// Upstream connections outlive the request: sequential callers, over HTTP/1.1 and HTTP/2, on
/// connections of their own, are served over the one kept-alive upstream connection.
#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let h = Harness::start().await;
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        for _ in 0..5 {
            let (status, body) = h
                .send(
                    TRIAGE,
                    version,
                    request("GET", HOST, "/api/orders/1", Bytes::new()),
                )
                .await;
            assert_eq!(status, 200, "{version:?} {body:?}");
        }
    }
    // A streamed response read to its end gives its connection back too.
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    let chat = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = caller
        .call(h.addr, request("POST", HOST, "/v1/chat/completions", chat))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let streamed = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&streamed).contains("[DONE]"));
    let (status, _) = h.get(TRIAGE, "/api/orders/2").await;
    assert_eq!(status, 200);
    assert_eq!(h.upstream.requests().len(), 12);
    assert_eq!(h.upstream.connections(), 1);
}

/// An upstream that closes each connection after one response, without saying so: the
/// proxy notices the closed connection and opens a new one, and no caller sees an error.
#[tokio::test]
async fn an_upstream_that_closes_idle_connections_costs_callers_nothing() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            // Closed with no `connection: close`: the next request must not be sent here.
        }
    });
    let h = Harness::builder().upstream(addr).start().await;
    for _ in 0..10 {
        let (status, body) = h.get(TRIAGE, "/api/orders/1").await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(body, "ok");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
    server.abort();
}

/// An upstream response framed by Transfer-Encoding that also carries a Content-Length: the
/// body is read chunked, so the length must not be passed on (RFC 9112 §6.3), or the agent's
/// side would cut the body at it.
#[tokio::test]
async fn a_chunked_response_with_a_content_length_reaches_the_agent_whole() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n\
                          14\r\nthe whole body, 20 b\r\n0\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    let h = Harness::builder().upstream(addr).start().await;
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let (status, body) = h
            .send(
                TRIAGE,
                version,
                request("GET", HOST, "/api/orders/1", Bytes::new()),
            )
            .await;
        assert_eq!(status, 200, "{version:?}");
        assert_eq!(body, "the whole body, 20 b", "{version:?}");
    }
    server.abort();
}

/// An upstream that answers each request head at once, whatever body follows, and keeps
/// reading: its address, how many connections it accepted, and its task.
async fn early_answering_upstream() -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    // Answers each head at once, whatever body follows, and keeps reading.
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, accepted, server)
}

/// An upstream that answered before reading the whole request body left its connection mid-
/// request: the rest of that body could be read there as a request of its own (one Portcullis
/// never decided), so the connection is not kept for another request once the body is out.
#[tokio::test]
async fn a_connection_answered_before_its_body_was_sent_is_not_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, accepted, server) = early_answering_upstream().await;
    let h = Harness::builder()
        .policies(r#"@id("all") permit (principal, action, resource);"#)
        .upstream(addr)
        .start()
        .await;
    let config = portcullis_test_support::pki::client_config(
        &[h.ca.cert_der()],
        Some(&h.svid(TRIAGE)),
        &[b"http/1.1"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::IpAddress(h.addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    // Half the body; the whole response comes back; then the other half.
    let head =
        format!("POST /api/orders HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 10\r\n\r\nhello");
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    while !reply.ends_with(b"ok") {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
    assert!(reply.starts_with(b"HTTP/1.1 200"));
    tls.write_all(b"world").await.unwrap();
    tls.flush().await.unwrap();
    // Later requests go on another connection: the first is never handed out again.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 200);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    server.abort();
}

/// An upstream may answer before it has read the whole request body. The connection is still
/// sending that body, so it is not idle: another caller's request goes on a new connection
/// rather than waiting behind the first caller's upload (here, until its own timeout).
#[tokio::test]
async fn a_connection_still_sending_a_body_is_not_lent_to_another_request() {
    let (addr, _, server) = early_answering_upstream().await;
    let h = Harness::builder()
        .policies(r#"@id("all") permit (principal, action, resource);"#)
        .upstream(addr)
        .yaml("limits:\n  request_timeout: 2s\n")
        .start()
        .await;
    // Half of a 10-byte body, then nothing for longer than the request timeout.
    let upload =
        format!("POST /api/orders HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 10\r\n\r\nhello");
    let (uploading, (status, body)) = tokio::join!(
        h.raw(TRIAGE, upload.as_bytes(), Duration::from_secs(3)),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            h.get(TRIAGE, "/api/orders/1").await
        }
    );
    assert!(uploading.starts_with("HTTP/1.1 200"), "{uploading}");
    assert_eq!(status, 200, "{body:?}");
    server.abort();
}

#[tokio::test]
async fn upstream_down_is_502_and_timeout_is_504() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let h = Harness::builder().upstream(closed).start().await;
    let (status, body) = h.get(TRIAGE, "/api/orders/1").await;
    assert_eq!(status, 502, "{body:?}");
    let audit = h.audit(1).await;
    assert_eq!(audit[1]["status"], 502);
    assert_eq!(audit[1]["reason"], "upstream_unavailable");
    assert_eq!(
        sample(
            &h.metrics().await,
            r#"portcullis_upstream_errors_total{reason="upstream_unavailable"}"#
        ),
        1.0
    );

    let h = Harness::builder()
        .yaml("limits:\n  request_timeout: 300ms\n")
        .start()
        .await;
    // On a new connection, then on the one the first request left idle: the deadline holds
    // for both ways a request goes upstream.
    let (status, _) = h.get(TRIAGE, "/slow").await;
    assert_eq!(status, 504);
    let (status, body) = h.get(TRIAGE, "/api/orders/1").await;
    assert_eq!(status, 200, "{body:?}");
    let (status, _) = h.get(TRIAGE, "/slow").await;
    assert_eq!(status, 504);
    let audit = h.audit(3).await;
    for record in [&audit[1], &audit[3]] {
        assert_eq!(record["status"], 504);
        assert_eq!(record["reason"], "upstream_timeout");
    }
}

#[tokio::test]
async fn a_body_that_fails_mid_stream_aborts_the_upstream_request() {
    let h = Harness::builder()
        .policies(r#"@id("all") permit (principal, action, resource);"#)
        .start()
        .await;
    let good = b"POST /upload HTTP/1.1\r\nHost: orders.prod.example.org\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n";
    let response = h.raw(TRIAGE, good, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let complete = |h: &Harness| {
        h.upstream
            .requests()
            .iter()
            .filter(|r| r.body_complete)
            .count()
    };
    assert_eq!(complete(&h), 1);
    assert_eq!(h.upstream.requests()[0].body, "helloworld");

    // A valid first chunk, then a chunk-size line that is not hex.
    let bad = b"POST /upload HTTP/1.1\r\nHost: orders.prod.example.org\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nworld\r\n0\r\n\r\n";
    let _ = h.raw(TRIAGE, bad, Duration::from_secs(3)).await;
    // Whether or not the upstream saw the head, it never sees a complete body.
    let audit = h.audit(2).await;
    assert_eq!(audit.len(), 3, "one record per request: {audit:#?}");
    assert_eq!(complete(&h), 1, "{:?}", h.upstream.requests());
}
