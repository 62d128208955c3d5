//! `portcullis-bench`: the helpers `benches/load/run.sh` drives.
//!
//! - `fixtures DIR`: a CA, the proxy's serving SVID (nginx serves the same one), an agent
//!   SVID, per-agent policy sets of 10 / 1,000 / 10,000 policies (one of them matches the
//!   agent), a JWKS and a user token, and one Portcullis config per variant (`issuers`: the
//!   token's issuer with a key set of its own, beside another issuer's).
//! - `sse-upstream ADDR GAP_MS EVENTS`: a raw-socket upstream. `GET /bench/sse` streams
//!   Server-Sent Events: the response head and every event are separate writes, the first
//!   event at once, the next ones `GAP_MS` apart. Anything else gets 1 KiB.
//! - `firstbyte DIR NAME=URL...`: first request on new connections (with and without
//!   TCP_NODELAY), time to the first SSE event and the gaps between events, over HTTP/1.1 and
//!   HTTP/2 (HTTP/1.1 only for a plain `http://` URL); the paths take turns for the first
//!   request, round by round; one line of results per path and measurement, starting with its NAME.
//! - `hold ADDR DIR N`: opens N mTLS connections (one request each) and keeps them open until
//!   stdin closes, for the memory measurement.
//! - `token-service DIR`: an RFC 8693 token service (test-support's, accepting the fixtures'
//!   SVIDs as clients) and `portcullis-exchange.yaml`, the user-token variant whose route
//!   exchanges the token upstream; prints `ready` and serves until stdin closes. With one user
//!   the exchanged token is cached after the first call: the row measures the cached path.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark tool fails loudly"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_test_support::jwt::{self, SigningKey};
use portcullis_test_support::pki::{Ca, LeafSpec};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TRUST_DOMAIN: &str = "prod.example.org";
const SERVER_ID: &str = "spiffe://prod.example.org/ns/bench/sa/app";
const ISSUER: &str = "https://idp.example.org";
const AUDIENCE: &str = "bench-app";
const OTHER_ISSUER: &str = "https://other-idp.example.org";
const POLICY_SIZES: [usize; 3] = [10, 1_000, 10_000];

fn agent_id(index: usize) -> String {
    format!("spiffe://prod.example.org/ns/team{index}/sa/agent")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(Path::new(&args[1])),
        Some("sse-upstream") => runtime.block_on(sse_upstream(
            args[1].parse().unwrap(),
            Duration::from_millis(args[2].parse().unwrap()),
            args[3].parse().unwrap(),
        )),
        Some("firstbyte") if args.len() > 2 => {
            runtime.block_on(firstbyte(Path::new(&args[1]), &args[2..]));
        }
        Some("hold") => runtime.block_on(hold(
            args[1].parse().unwrap(),
            Path::new(&args[2]),
            args[3].parse().unwrap(),
        )),
        Some("token-service") => runtime.block_on(token_service(Path::new(&args[1]))),
        _ => {
            eprintln!(
                "usage: portcullis-bench fixtures DIR | sse-upstream ADDR GAP_MS EVENTS | \
                 firstbyte DIR NAME=(http|https)://ADDR... | hold ADDR DIR N | token-service DIR"
            );
            std::process::exit(64);
        }
    }
}

fn fixtures(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    // The audit files get a directory of their own, as on a log volume (injected pods
    // audit to stdout): in the directory of the certificates, every audit write would wake
    // the file watcher that follows them.
    std::fs::create_dir_all(dir.join("audit")).unwrap();
    let write = |name: &str, contents: &str| std::fs::write(dir.join(name), contents).unwrap();
    let ca = Ca::new(TRUST_DOMAIN).unwrap();
    let server = ca.leaf(&LeafSpec::server(SERVER_ID)).unwrap();
    let agent = ca.svid(&agent_id(0)).unwrap();
    write("ca.pem", &ca.cert_pem());
    write("server.pem", &server.cert_pem);
    write("server-key.pem", &server.key_pem);
    write("agent.pem", &agent.cert_pem);
    write("agent-key.pem", &agent.key_pem);

    let idp = SigningKey::es256("bench-idp");
    write("jwks.json", &jwt::jwks(&[&idp]));
    let now = jwt::now();
    let mut claims = jwt::claims(ISSUER, AUDIENCE, "alice", &agent_id(0), now);
    // Long enough for one benchmark run, within the configured max_lifetime.
    claims["exp"] = (now + 3_000).into();
    write("token.txt", &idp.token(&claims));

    // Embedded, so the tool does not depend on the checkout it was built from still existing.
    let schema = include_str!("../../policies/schema.cedarschema");
    for size in POLICY_SIZES {
        let policies = dir.join(format!("policies-{size}"));
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("schema.cedarschema"), schema).unwrap();
        std::fs::write(policies.join("agents.cedar"), policy_set(size)).unwrap();
        write(
            &format!("portcullis-{size}.yaml"),
            &config(dir, size, false),
        );
    }
    write("portcullis-token.yaml", &config(dir, 10, true));
    // The same token where each issuer has a key set of its own (`user_token.issuer_keys`):
    // the token's issuer is one of two, the other with another IdP's key.
    let other = SigningKey::es256("bench-other-idp");
    write("jwks-other.json", &jwt::jwks(&[&other]));
    let issuers = config(dir, 10, true)
        .replace("audit-token.jsonl", "audit-issuers.jsonl")
        .replace("jwks_file: jwks.json", "jwks_file: jwks-other.json")
        .replace(
            &format!("issuers: [{ISSUER}]"),
            &format!("issuers: [{OTHER_ISSUER}]"),
        )
        + &format!("  issuer_keys:\n    - issuer: {ISSUER}\n      jwks_file: jwks.json\n");
    write("portcullis-issuers.yaml", &issuers);
    let streaming = config(dir, 10, false)
        .replace("http://127.0.0.1:18080", "http://127.0.0.1:18081")
        .replace("audit-10.jsonl", "audit-firstbyte.jsonl");
    write("portcullis-firstbyte.yaml", &streaming);
}

async fn token_service(dir: &Path) {
    use rustls::pki_types::pem::PemObject as _;
    let fixtures_ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
    let ca = Ca::new("sts.example.org").unwrap();
    // Tokens for an hour: the whole run is served from the cache after the first call.
    let service = portcullis_test_support::token_exchange::TokenService::start_trusting(
        &ca,
        &[fixtures_ca],
        3_600,
    )
    .await;
    std::fs::write(dir.join("sts-ca.pem"), ca.cert_pem()).unwrap();
    let yaml = config(dir, 10, true).replace("audit-token.jsonl", "audit-exchange.jsonl")
        + &format!(
            "routes:\n  - path_prefix: /bench\n    credential:\n      token_exchange:\n        \
             endpoint: {}\n        audience: bench-backend\n        scope: bench:read\n        \
             ca_file: sts-ca.pem\n",
            service.endpoint()
        );
    std::fs::write(dir.join("portcullis-exchange.yaml"), yaml).unwrap();
    println!("ready");
    // Serves (on this runtime) until the script closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
    eprintln!("token service: {} exchanges", service.issued());
}

/// One permit per agent (a security team's policy per workload), a forbid every tenth, and
/// one user rule for delegated calls. Agent 0 is the one the benchmark connects as.
fn policy_set(size: usize) -> String {
    let mut out = String::from(
        "@id(\"users-read-bench\")\npermit (principal is User, action in Action::\"read\", resource)\n  when { resource.path like \"/bench/*\" };\n",
    );
    for index in 0..size.saturating_sub(1) {
        let agent = agent_id(index);
        if index % 10 == 9 {
            out.push_str(&format!(
                "@id(\"team{index}-no-admin\")\nforbid (principal == Agent::\"{agent}\", action in Action::\"write\", resource)\n  when {{ resource.path like \"/admin/*\" }};\n"
            ));
        } else {
            out.push_str(&format!(
                "@id(\"team{index}-read\")\npermit (principal == Agent::\"{agent}\", action in Action::\"read\", resource)\n  when {{ resource.path like \"/bench/*\" }};\n"
            ));
        }
    }
    out
}

fn config(dir: &Path, size: usize, token: bool) -> String {
    let name = if token {
        "token".to_owned()
    } else {
        size.to_string()
    };
    let mut yaml = format!(
        "listen: 127.0.0.1:19443\nadmin_listen: 127.0.0.1:19901\nupstream: http://127.0.0.1:18080\n\
         tls:\n  cert: server.pem\n  key: server-key.pem\n  trust_bundles:\n    {TRUST_DOMAIN}: ca.pem\n\
         policy:\n  dir: policies-{size}\n\
         audit:\n  sink: {}\n",
        dir.join("audit")
            .join(format!("audit-{name}.jsonl"))
            .display()
    );
    if token {
        yaml.push_str(&format!(
            "user_token:\n  jwks_file: jwks.json\n  issuers: [{ISSUER}]\n  audiences: [{AUDIENCE}]\n  max_lifetime: 1h\n"
        ));
    }
    yaml
}

/// Head and events in separate writes, as a token-streaming model server sends them.
async fn sse_upstream(addr: SocketAddr, gap: Duration, events: usize) {
    let listener = TcpListener::bind(addr).await.unwrap();
    loop {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 16 * 1024];
            let mut seen = Vec::new();
            loop {
                // One request at a time: read a head, answer it, keep the connection.
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buffer[..n]),
                    }
                }
                let sse = seen.starts_with(b"GET /bench/sse ");
                seen.clear();
                if !sse {
                    let body = "x".repeat(1024);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                    continue;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for index in 0..events {
                    if index > 0 {
                        tokio::time::sleep(gap).await;
                    }
                    let event = format!("data: {{\"token\":{index}}}\n\n");
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if tcp.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
                if tcp.write_all(b"0\r\n\r\n").await.is_err() {
                    return;
                }
            }
        });
    }
}

/// How a measurement connects: TLS (with the agent's SVID) or plain, HTTP/1.1 or HTTP/2,
/// TCP_NODELAY or not.
#[derive(Clone)]
struct Client {
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>)>,
    host: String,
}

type Sender = Box<
    dyn FnMut(
        http::Request<Empty<Bytes>>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>>,
    >,
>;

impl Client {
    fn new(url: &str, dir: &Path) -> Self {
        let (scheme, rest) = url.split_once("://").unwrap();
        let addr: SocketAddr = rest.trim_end_matches('/').parse().unwrap();
        let tls =
            (scheme == "https").then(|| (agent_config(dir, b"http/1.1"), agent_config(dir, b"h2")));
        Self {
            addr,
            tls,
            host: "localhost".to_owned(),
        }
    }

    /// Connects (handshake included) and returns a request sender.
    async fn connect(&self, h2: bool, nodelay: bool) -> Sender {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(nodelay).unwrap();
        match &self.tls {
            None => handshake(TokioIo::new(tcp), false).await,
            Some((h1_config, h2_config)) => {
                let config = if h2 { h2_config } else { h1_config };
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
                    .await
                    .unwrap();
                handshake(TokioIo::new(tls), h2).await
            }
        }
    }

    fn request(&self, path: &str, h2: bool) -> http::Request<Empty<Bytes>> {
        let uri = if h2 {
            format!("https://{}{path}", self.host)
        } else {
            path.to_owned()
        };
        let mut request = http::Request::get(uri);
        if !h2 {
            request = request.header(http::header::HOST, &self.host);
        }
        request.body(Empty::new()).unwrap()
    }
}

async fn handshake<I>(io: TokioIo<I>, h2: bool) -> Sender
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        Box::new(move |request| {
            let mut sender = sender.clone();
            Box::pin(async move { sender.send_request(request).await })
        })
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        Box::new(move |request| {
            let sender = sender.clone();
            Box::pin(async move {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await
            })
        })
    }
}

/// The agent's mTLS client configuration, from the fixture PEM files.
fn agent_config(dir: &Path, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let roots = portcullis_benches::fixture_roots(dir);
    let (chain, key) = portcullis_benches::fixture_identity(dir, "agent");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

const ROUNDS: usize = 200;
/// SSE requests per path and HTTP version: enough for the p99 to be more than the slowest one.
const SSE_ROUNDS: usize = 200;

/// Prints, per path and HTTP version: first request on a new connection (time from the
/// handshake's end to the complete response) with and without TCP_NODELAY; TTFT (request sent
/// to the first SSE event) and inter-event gaps, on kept-alive connections.
///
/// For the first request the paths take turns within every round (one new connection each), so
/// a slow spell of the host lands on all of them alike and the ratios between them hold;
/// measured one path after the other, a path's p50 moved by a third from one series to the
/// next, nginx's too.
async fn firstbyte(dir: &Path, targets: &[String]) {
    let paths: Vec<(&str, Client)> = targets
        .iter()
        .map(|target| {
            let (name, url) = target
                .split_once('=')
                .expect("a target is NAME=URL, e.g. portcullis=https://127.0.0.1:19443");
            (name, Client::new(url, dir))
        })
        .collect();
    for h2 in [false, true] {
        // Plain HTTP is the direct path: HTTP/1.1 only, as the proxies speak to it.
        let paths: Vec<&(&str, Client)> = paths
            .iter()
            .filter(|(_, client)| !h2 || client.tls.is_some())
            .collect();
        let version = if h2 { "h2" } else { "h1" };
        for nodelay in [true, false] {
            let mut samples = vec![Vec::with_capacity(ROUNDS); paths.len()];
            for _ in 0..ROUNDS {
                for ((_, client), samples) in paths.iter().zip(&mut samples) {
                    let mut send = client.connect(h2, nodelay).await;
                    let started = Instant::now();
                    let response = send(client.request("/bench/1k", h2)).await.unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                    response.into_body().collect().await.unwrap();
                    samples.push(started.elapsed());
                }
            }
            let kind = if nodelay { "nodelay" } else { "nagle" };
            for ((name, _), samples) in paths.iter().zip(&mut samples) {
                report(&format!("{name} first_request {version} {kind}"), samples);
            }
        }
        // Streams go back to back on one kept-alive connection per path, a path at a time: a
        // stream's TTFT is what the path adds while it is busy. (Taking turns here would leave
        // each proxy's core idle ~0.1 s before each request; both proxies then pay the core's
        // wake-up on top, ~0.1 ms on these VMs, and direct, all on one core, does not.)
        for (name, client) in &paths {
            let mut send = client.connect(h2, true).await;
            let mut ttft = Vec::with_capacity(SSE_ROUNDS);
            let mut gaps = Vec::new();
            for _ in 0..SSE_ROUNDS {
                let started = Instant::now();
                let response = send(client.request("/bench/sse", h2)).await.unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                let mut body = response.into_body();
                let mut last: Option<Instant> = None;
                while let Some(frame) = body.frame().await {
                    let frame = frame.unwrap();
                    if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                        let now = Instant::now();
                        match last {
                            None => ttft.push(now - started),
                            Some(previous) => gaps.push(now - previous),
                        }
                        last = Some(now);
                    }
                }
            }
            report(&format!("{name} ttft {version}"), &mut ttft);
            report(&format!("{name} event_gap {version}"), &mut gaps);
        }
    }
}

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[index].as_secs_f64() * 1e3
    };
    println!("{name} p50_ms={:.3} p99_ms={:.3}", at(0.5), at(0.99));
}

async fn hold(addr: SocketAddr, dir: &Path, count: usize) {
    let client = Client::new(&format!("https://{addr}"), dir);
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        let mut send = client.connect(false, true).await;
        let response = send(client.request("/bench/1k", false)).await.unwrap();
        response.into_body().collect().await.unwrap();
        open.push(send);
    }
    println!("ready {count}");
    // Blocks until the script closes our stdin; the connections stay open meanwhile.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
    drop(open);
}
