//! Bounded under abuse (DESIGN "Bounded under abuse"), through real mTLS: in-flight caps per
//! agent and in total, the inspection memory budget (measured on a real `portcullis run`
//! process), the batch cap, connection deadlines (idle HTTP/2 with pings, slowloris heads,
//! idle HTTP/1.1 keep-alive), readable 431s, and the SIGTERM drain.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_test_support::client::{HttpVersion, request};
use portcullis_test_support::upstream::SsePacing;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Builder, HOST, Harness, REPORT, TRIAGE, admin_try_get, eventually, sample};

const ROUTES: &str = "routes:\n  - path: /mcp\n    protocol: mcp\n";
const POLICIES: &str = r#"
@id("mcp-for-support") permit (principal in AgentGroup::"support-agents", action in [Action::"mcp_ping", Action::"list_tools", Action::"call_tool"], resource);
@id("health") permit (principal, action == Action::"GET", resource == Route::"/health");
@id("chat") permit (principal in AgentGroup::"support-agents", action == Action::"POST", resource == Route::"/v1/chat/completions");
"#;

fn builder() -> Builder {
    Harness::builder().policies(POLICIES).yaml(ROUTES)
}

/// A request body the test controls: some bytes now, then nothing, ever (a caller that
/// trickles its body and stops), or the given bytes and the end.
enum TestBody {
    Stalled(Option<Bytes>),
    Full(Option<Bytes>),
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            TestBody::Stalled(first) => match first.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                // Never woken: the stream stays open without data, as a slow caller's does.
                None => Poll::Pending,
            },
            TestBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, TestBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            TestBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            TestBody::Full(None) => SizeHint::with_exact(0),
            TestBody::Stalled(_) => SizeHint::default(),
        }
    }
}

async fn tls(
    h: &Harness,
    agent: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = portcullis_test_support::pki::client_config(
        &[h.ca.cert_der()],
        Some(&h.svid(agent)),
        &[alpn],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(h.addr.ip().into()), tcp)
        .await
        .unwrap()
}

/// An HTTP/2 connection as `agent` that sends keep-alive pings every `ping` (if given); the
/// sender and the connection task (which ends when the server closes the connection).
async fn h2(
    h: &Harness,
    agent: &str,
    ping: Option<Duration>,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let io = TokioIo::new(tls(h, agent, b"h2").await);
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if let Some(ping) = ping {
        builder
            .keep_alive_interval(ping)
            .keep_alive_while_idle(true);
    }
    let (sender, conn) = builder.handshake(io).await.unwrap();
    (sender, tokio::spawn(conn))
}

fn h2_request(method: &str, path: &str, body: TestBody) -> http::Request<TestBody> {
    let mut req = http::Request::new(body);
    *req.method_mut() = method.parse().unwrap();
    *req.uri_mut() = format!("https://{HOST}{path}").parse().unwrap();
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    req
}

#[tokio::test]
async fn one_agent_at_its_cap_does_not_starve_another() {
    // Default caps; the body timeouts are only lengthened so that no stalled request ends
    // while the test runs.
    let h = builder()
        .yaml("limits:\n  inspect_timeout: 5m\n  body_timeout: 5m\n")
        .start()
        .await;
    let caller_b = h.caller(&h.svid(TRIAGE), HttpVersion::Http2);
    let mut b = caller_b.connect(h.addr).await.unwrap();

    // Agent A: 1,100 inspected requests whose bodies stall after the first byte, on 11
    // HTTP/2 connections of 100 streams (the server's stream limit).
    let mut statuses = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..11 {
        let (sender, conn) = h2(&h, REPORT, None).await;
        connections.push(conn);
        for _ in 0..100 {
            let mut sender = sender.clone();
            statuses.push(tokio::spawn(async move {
                let mut req = h2_request("POST", "/mcp", TestBody::Stalled(Some(Bytes::from("["))));
                req.headers_mut()
                    .insert("content-length", "1000".parse().unwrap());
                sender.ready().await.ok()?;
                let response = sender.send_request(req).await.ok()?;
                Some(response.status().as_u16())
            }));
        }
    }
    // The default per-agent cap (512) holds; everything past it is refused at once.
    let refused = async || {
        sample(
            &h.metrics().await,
            "portcullis_request_rejections_total{reason=\"agent_inflight_limit\"}",
        ) >= 588.0
    };
    assert!(crate::harness::eventually_for(Duration::from_secs(60), refused).await);

    // Agent B, meanwhile: an allowed request answers promptly.
    let answered = tokio::time::timeout(
        Duration::from_secs(1),
        b.send(request("GET", HOST, "/health", Bytes::new())),
    )
    .await
    .expect("agent B answered within 1 s")
    .unwrap();
    assert_eq!(answered.status(), 200);

    let all_answered = async || statuses.iter().filter(|s| s.is_finished()).count() >= 588;
    assert!(crate::harness::eventually_for(Duration::from_secs(30), all_answered).await);
    let mut too_many = 0;
    for status in statuses.iter_mut() {
        if status.is_finished() {
            assert_eq!(status.await.unwrap(), Some(429));
            too_many += 1;
        }
    }
    assert_eq!(too_many, 1100 - 512, "every request over the cap got 429");
    let records = h.audit(589).await;
    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| r["reason"] == "agent_inflight_limit")
        .collect();
    assert_eq!(refused.len(), 588, "each refusal is audited");
    assert_eq!(refused[0]["status"], 429);
    for status in statuses {
        status.abort();
    }
    for conn in connections {
        conn.abort();
    }
}

#[tokio::test]
async fn refusals_over_a_cap_carry_retry_after() {
    let h = builder()
        .yaml("limits:\n  max_inflight: 2\n  max_inflight_per_agent: 1\n")
        .start()
        .await;
    let (sender, _conn) = h2(&h, REPORT, None).await;
    let send = |body| {
        let mut sender = sender.clone();
        async move {
            sender.ready().await.unwrap();
            sender
                .send_request(h2_request("POST", "/mcp", body))
                .await
                .unwrap()
        }
    };
    // One stalled request from REPORT holds its agent's only place...
    let held = tokio::spawn(send(TestBody::Stalled(Some(Bytes::from("[")))));
    let over_agent = async || {
        let response = send(TestBody::Full(Some(Bytes::from("{}")))).await;
        response.status() == 429
            && response
                .headers()
                .get("retry-after")
                .is_some_and(|v| v == "1")
    };
    assert!(eventually(over_agent).await);
    // ...one from TRIAGE the last place in total: a third agent gets 503.
    let (triage, _conn2) = h2(&h, TRIAGE, None).await;
    let mut t = triage.clone();
    let held2 = tokio::spawn(async move {
        t.ready().await.unwrap();
        t.send_request(h2_request(
            "POST",
            "/mcp",
            TestBody::Stalled(Some(Bytes::from("["))),
        ))
        .await
    });
    let third = "spiffe://prod.example.org/ns/other/sa/third";
    let over_total = async || {
        let (status, _) = h.get(third, "/health").await;
        status == 503
    };
    assert!(eventually(over_total).await);
    let metrics = h.metrics().await;
    assert!(
        sample(
            &metrics,
            "portcullis_request_rejections_total{reason=\"inflight_limit\"}"
        ) >= 1.0
    );
    held.abort();
    held2.abort();
}

fn batch(n: usize) -> String {
    let calls: Vec<Value> = (0..n)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
        .collect();
    Value::Array(calls).to_string()
}

async fn post_mcp(h: &Harness, body: String) -> (u16, Value) {
    let mut req = request("POST", HOST, "/mcp", body);
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let (status, body) = h.send(TRIAGE, HttpVersion::Http1, req).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn decisions(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_decisions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_batch_over_the_cap_is_refused_before_any_decision() {
    let h = builder().start().await;
    let (status, reply) = post_mcp(&h, batch(100)).await;
    assert_eq!(status, 413, "{reply}");
    // JSON-RPC shaped, like every native denial; no message was read, so no id is known.
    assert_eq!(reply["jsonrpc"], "2.0");
    assert_eq!(reply["id"], Value::Null);
    assert_eq!(reply["error"]["data"]["reason"], "batch_too_large");
    assert_eq!(decisions(&h.metrics().await), 0.0, "no Cedar call was made");
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(1).await;
    assert_eq!(records[1]["reason"], "batch_too_large");
    assert_eq!(records[1]["status"], 413);

    // Within the cap, every message is decided.
    let (status, _) = post_mcp(&h, batch(64)).await;
    assert_eq!(status, 200);
    assert_eq!(decisions(&h.metrics().await), 64.0);
}

#[tokio::test]
async fn a_zero_flood_gets_503_past_the_budget_and_the_process_stays_small() {
    // 32 parallel 1 MiB `[0,0,...]` MCP bodies against a real `portcullis run` with a
    // 2 MiB inspection budget: requests that fit are read and refused (413, too many
    // messages); the others get 503 at once. Peak RSS of the sidecar process stays small.
    let mut spawned = builder()
        .yaml("limits:\n  inspect_memory_bytes: 2097152\n")
        .spawn()
        .await;
    let h = &spawned.harness;
    let zeros = (1024 * 1024 - 4) / 2;
    let body = format!("[{}0] ", "0,".repeat(zeros)).into_bytes();
    assert_eq!(body.len(), 1024 * 1024);
    let body = Bytes::from(body);
    let before = spawned.vm_hwm_kb();
    // Connect first, then send all 32 at once.
    let mut connections = Vec::new();
    for _ in 0..32 {
        connections.push(h2(h, TRIAGE, None).await);
    }
    let mut tasks = Vec::new();
    for (mut sender, conn) in connections {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = h2_request("POST", "/mcp", TestBody::Full(Some(body)));
            req.headers_mut()
                .insert("content-length", "1048576".parse().unwrap());
            sender.ready().await.unwrap();
            let response = sender.send_request(req).await.unwrap();
            let status = response.status().as_u16();
            let retry = response.headers().contains_key("retry-after");
            let _ = response.into_body().collect().await;
            drop(conn);
            (status, retry)
        }));
    }
    let mut counts = std::collections::BTreeMap::new();
    for task in tasks {
        let (status, retry) = task.await.unwrap();
        assert!(status == 413 || status == 503, "{status}");
        if status == 503 {
            assert!(retry, "503 carries retry-after");
        }
        *counts.entry(status).or_insert(0) += 1;
    }
    let peak = spawned.vm_hwm_kb();
    println!(
        "32 x 1 MiB [0,0,...]: statuses {counts:?}; sidecar VmHWM {} MiB (before {} MiB)",
        peak / 1024,
        before / 1024
    );
    assert!(peak < 128 * 1024, "peak RSS {} MiB", peak / 1024);
    assert!(
        counts.get(&503).is_some_and(|n| *n > 0),
        "the budget refused some: {counts:?}"
    );
    assert!(h.upstream.requests().is_empty());
    spawned.terminate();
    assert_eq!(spawned.wait(Duration::from_secs(30)).await, Some(0));
}

const SHORT: &str = "limits:\n  header_read_timeout: 1s\n  idle_timeout: 3s\n";

#[tokio::test]
async fn an_idle_http2_connection_closes_even_with_pings() {
    let h = builder().yaml(SHORT).start().await;
    let (mut sender, conn) = h2(&h, TRIAGE, Some(Duration::from_millis(200))).await;
    sender.ready().await.unwrap();
    let response = sender
        .send_request(h2_request("GET", "/health", TestBody::Full(None)))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    // Past the header timeout it is still open (pinging; nothing to time out)...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!conn.is_finished());
    // ...and the idle timeout closes it.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok(), "idle HTTP/2 connection still open");
}

#[tokio::test]
async fn a_slowloris_head_is_closed_after_the_header_timeout() {
    // A long idle timeout: only the header timeout can close it within the test's deadline.
    let h = builder()
        .yaml("limits:\n  header_read_timeout: 1s\n  idle_timeout: 60s\n")
        .start()
        .await;
    let mut stream = tls(&h, TRIAGE, b"http/1.1").await;
    stream
        .write_all(format!("GET /health HTTP/1.1\r\nhost: {HOST}\r\nx-slow: ").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    // Far before the idle timeout (60 s) and the test's deadline.
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "connection with a stalled head still open");
    assert!(!String::from_utf8_lossy(&out).contains("200"));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
    // The relation of "idle 15 s with a 10 s header timeout still serves", scaled to
    // header 1 s / idle 3 s.
    let h = builder().yaml(SHORT).start().await;
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    let mut connection = caller.connect(h.addr).await.unwrap();
    let first = connection
        .send(request("GET", HOST, "/health", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let _ = first.into_body().collect().await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let second = connection
        .send(request("GET", HOST, "/health", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
}

#[tokio::test]
async fn an_idle_http1_connection_is_closed_after_its_last_response() {
    let h = builder().yaml(SHORT).start().await;
    let mut stream = tls(&h, TRIAGE, b"http/1.1").await;
    let get = format!("GET /health HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    stream.write_all(get.as_bytes()).await.unwrap();
    // Within the idle timeout (3 s) of the first response, a second request is served...
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stream.write_all(get.as_bytes()).await.unwrap();
    // ...and the connection then closes by itself, with both responses delivered.
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "idle HTTP/1.1 connection still open");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
}

#[tokio::test]
async fn an_oversized_head_gets_a_readable_431() {
    let h = builder().start().await;
    let big = "a".repeat(70 * 1024);
    // HTTP/1.1: the status line arrives, not a reset.
    let raw = format!("GET /health HTTP/1.1\r\nhost: {HOST}\r\nx-big: {big}\r\n\r\n");
    let reply = h.raw(TRIAGE, raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:.200}");

    // HTTP/2: the stream is answered with the proxy's own 431 (a body naming the reason, a
    // request id: not h2's bare refusal, which curl reports as REFUSED_STREAM), and the
    // connection stays usable.
    let (mut sender, conn) = h2(&h, TRIAGE, None).await;
    let mut req = h2_request("GET", "/health", TestBody::Full(None));
    req.headers_mut().insert("x-big", big.parse().unwrap());
    sender.ready().await.unwrap();
    match sender.send_request(req).await {
        Ok(response) => {
            assert_eq!(response.status(), 431);
            assert!(response.headers().contains_key("x-request-id"));
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                String::from_utf8_lossy(&body).contains("header_too_large"),
                "{body:?}"
            );
        }
        Err(error) => panic!("HTTP/2 oversized head: {error}"),
    }
    sender.ready().await.unwrap();
    let ok = sender
        .send_request(h2_request("GET", "/health", TestBody::Full(None)))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(!conn.is_finished());
}

#[tokio::test]
async fn sigterm_lets_a_streaming_response_finish_then_exits_0() {
    let mut spawned = builder()
        .pacing(SsePacing::Delay(Duration::from_millis(500)))
        .spawn()
        .await;
    let h = &spawned.harness;
    // Five words at 500 ms each: a response of about 2 s.
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"one two three four five"}]}"#;
    let (mut sender, _conn) = h2(h, TRIAGE, None).await;
    sender.ready().await.unwrap();
    let response = sender
        .send_request(h2_request(
            "POST",
            "/v1/chat/completions",
            TestBody::Full(Some(Bytes::from(body))),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());

    spawned.terminate();
    let h = &spawned.harness;
    // Draining: out of rotation, but the stream goes on.
    let draining = async || admin_try_get(h.admin, "/readyz").await == Some(503);
    assert!(eventually(draining).await, "/readyz 503 during the drain");
    let mut rest = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            rest.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(rest.contains("five"), "{rest}");
    assert!(rest.contains("[DONE]"), "{rest}");
    assert_eq!(spawned.wait(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn limits_config_errors_name_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = "limits:\n  max_inflight: 10\n  max_inflight_per_agent: 20\n  max_batch: 0\n";
    std::fs::write(dir.path().join("c.yaml"), config).unwrap();
    let path = dir.path().join("c.yaml");
    let (code, _, stderr) =
        crate::harness::portcullis(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(stderr.contains("limits.max_inflight_per_agent"), "{stderr}");
    assert!(stderr.contains("limits.max_batch"), "{stderr}");
}

#[tokio::test]
async fn one_agent_cannot_hold_every_connection() {
    let h = builder()
        .yaml("limits:\n  max_connections_per_agent: 2\n")
        .start()
        .await;
    let get = || request("GET", HOST, "/health", Bytes::new());
    let triage = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    let mut first = triage.connect(h.addr).await.unwrap();
    let mut second = triage.connect(h.addr).await.unwrap();
    assert_eq!(first.send(get()).await.unwrap().status(), 200);
    assert_eq!(second.send(get()).await.unwrap().status(), 200);
    // A third connection of the same agent is closed after its handshake, without an answer.
    let third = match triage.connect(h.addr).await {
        Ok(mut third) => third.send(get()).await.map(|r| r.status().as_u16()),
        Err(e) => Err(e),
    };
    assert!(third.is_err(), "{third:?}");
    // Another agent is not affected; the agent's own connections go on.
    let report = h.caller(&h.svid(REPORT), HttpVersion::Http1);
    let mut other = report.connect(h.addr).await.unwrap();
    assert_eq!(other.send(get()).await.unwrap().status(), 200);
    assert_eq!(first.send(get()).await.unwrap().status(), 200);
    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "portcullis_tls_handshake_failures_total{reason=\"agent_connections\"}"
        ),
        1.0
    );
    // A place given back is a place to take.
    drop(second);
    assert!(
        eventually(async || match triage.connect(h.addr).await {
            Ok(mut again) => again.send(get()).await.is_ok_and(|r| r.status() == 200),
            Err(_) => false,
        })
        .await
    );
}

#[tokio::test]
async fn connections_that_never_start_their_handshake_are_bounded_apart() {
    let h = builder()
        .yaml("limits:\n  max_pending_handshakes: 2\n")
        .start()
        .await;
    let get = || request("GET", HOST, "/health", Bytes::new());
    let triage = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    let mut established = triage.connect(h.addr).await.unwrap();
    // Two connections that never send a ClientHello hold both places...
    let silent = [
        tokio::net::TcpStream::connect(h.addr).await.unwrap(),
        tokio::net::TcpStream::connect(h.addr).await.unwrap(),
    ];
    assert!(
        eventually(async || { sample(&h.metrics().await, "portcullis_connections_active") >= 3.0 })
            .await
    );
    // ...so a third is closed at once, and counted; established connections go on.
    assert!(triage.connect(h.addr).await.is_err());
    assert_eq!(established.send(get()).await.unwrap().status(), 200);
    assert_eq!(
        sample(
            &h.metrics().await,
            "portcullis_tls_handshake_failures_total{reason=\"pending_handshakes\"}"
        ),
        1.0
    );
    drop(silent);
    assert!(
        eventually(async || match triage.connect(h.addr).await {
            Ok(mut again) => again.send(get()).await.is_ok_and(|r| r.status() == 200),
            Err(_) => false,
        })
        .await
    );
}

/// An upstream that stops sending mid-response (its head and part of its body, then nothing,
/// the connection held open) does not hold the caller for ever: past
/// `limits.response_body_timeout` of silence the response is cut off (HTTP/1.1: the connection
/// closed short of its content-length), the audit record says why and that it did not
/// complete, and the agent's place in flight is free again.
#[tokio::test]
async fn an_upstream_that_stalls_mid_response_is_cut_off() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst part")
                .await;
            // Nothing more, and the connection kept open.
            held.push(stream);
        }
    });
    let h = builder()
        .upstream(upstream)
        .yaml("limits:\n  response_body_timeout: 300ms\n  max_inflight_per_agent: 1\n")
        .start()
        .await;

    for _ in 0..2 {
        // The same agent twice, with an in-flight cap of one: the second call is only
        // admitted (and cut off in turn) because the first gave its place back.
        let mut tls = tls(&h, TRIAGE, b"http/1.1").await;
        tls.write_all(format!("GET /health HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        // A bound for a test that would otherwise hang, not a measured duration: the proxy
        // closing the connection is what ends the read.
        let read = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection was not closed");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 100\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nfirst part"), "{text}");
    }

    let records = h.audit(2).await;
    let cut: Vec<&Value> = records.iter().filter(|r| r["path"] == "/health").collect();
    assert_eq!(cut.len(), 2, "{records:?}");
    for record in cut {
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["completed"], false, "{record}");
        assert_eq!(
            record["errors"],
            json!([
                "response body failed mid-stream: the upstream sent nothing of the response body for longer than limits.response_body_timeout"
            ]),
            "{record}"
        );
    }
    server.abort();
}

/// A caller that sends part of a forwarded (uninspected) body and then nothing does not hold
/// the upstream request open: past `limits.body_timeout` of silence the upstream request is
/// aborted (its connection closed), the caller gets 408 `body_deadline` (its own stall, not
/// the upstream's failure), the audit record says why, and the agent's place in flight is
/// free again.
#[tokio::test]
async fn a_caller_that_stalls_its_body_is_answered_408_and_the_upstream_request_aborted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    // Reads whatever comes and never answers: a request is only over for it when the proxy
    // closes the connection, which it reports.
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = closed_tx.send(String::from_utf8_lossy(&received).into_owned());
            });
        }
    });
    let h = builder()
        .upstream(upstream)
        .yaml("limits:\n  body_timeout: 300ms\n  max_inflight_per_agent: 1\n")
        .start()
        .await;

    let (sender, conn) = h2(&h, TRIAGE, None).await;
    for _ in 0..2 {
        // The same agent twice, with an in-flight cap of one: the second call is only
        // admitted (and answered 408 in turn) because the first gave its place back.
        let mut sender = sender.clone();
        let mut req = h2_request(
            "POST",
            "/v1/chat/completions",
            TestBody::Stalled(Some(Bytes::from("{\"model\""))),
        );
        req.headers_mut()
            .insert("content-length", "1000".parse().unwrap());
        sender.ready().await.unwrap();
        // A bound for a test that would otherwise hang, not a measured duration.
        let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
            .await
            .expect("the proxy answered")
            .unwrap();
        assert_eq!(response.status(), 408);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "body_deadline", "{body}");

        let received = tokio::time::timeout(Duration::from_secs(60), closed.recv())
            .await
            .expect("the upstream request was aborted")
            .unwrap();
        assert!(
            received.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{received}"
        );
        assert!(received.ends_with("\r\n\r\n{\"model\""), "{received}");
    }

    let records = h.audit(2).await;
    let stalled: Vec<&Value> = records
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .collect();
    assert_eq!(stalled.len(), 2, "{records:?}");
    for record in stalled {
        assert_eq!(record["status"], 408, "{record}");
        assert_eq!(record["reason"], "body_deadline", "{record}");
        let errors = record["errors"].to_string();
        assert!(
            errors.contains("request body stalled for longer than the body timeout"),
            "{record}"
        );
    }
    conn.abort();
    server.abort();
}
