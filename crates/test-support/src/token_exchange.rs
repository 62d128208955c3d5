//! A test-only RFC 8693 token exchange service: HTTPS on loopback that requires a client
//! certificate from a given CA (RFC 8705 mTLS client authentication), records each exchange
//! request (form fields and the client certificate presented), and issues opaque tokens with
//! a fixed lifetime. It can be switched to failing (HTTP 503 with an OAuth error object).
//!
//! Not a token service anyone should run: it checks nothing but the client certificate.
#![allow(
    clippy::expect_used,
    reason = "a test fixture that cannot start should fail the test loudly"
)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;

use crate::pki::{Ca, LeafSpec};

/// One exchange request as the service received it.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The decoded `application/x-www-form-urlencoded` fields.
    pub form: HashMap<String, String>,
    /// The leaf certificate the client authenticated with.
    pub client_cert: Option<CertificateDer<'static>>,
}

#[derive(Debug)]
pub struct TokenService {
    pub addr: SocketAddr,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    failing: Arc<AtomicBool>,
    issued: Arc<AtomicUsize>,
    /// Milliseconds each answer waits (a slow token service).
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenService {
    /// Serves with a certificate for `localhost` from `ca`, and accepts only clients whose
    /// certificate chains to `ca`. Issued tokens say `expires_in: lifetime_secs`.
    pub async fn start(ca: &Ca, lifetime_secs: u64) -> Self {
        Self::start_trusting(ca, &[ca.cert_der()], lifetime_secs).await
    }

    /// Serves with a certificate from `ca`, and accepts clients whose certificate chains to
    /// one of `client_roots`.
    pub async fn start_trusting(
        ca: &Ca,
        client_roots: &[CertificateDer<'static>],
        lifetime_secs: u64,
    ) -> Self {
        let leaf = ca
            .leaf(&LeafSpec::server("spiffe://prod.example.org/token-service"))
            .expect("token service certificate");
        let mut roots = rustls::RootCertStore::empty();
        for root in client_roots {
            roots.add(root.clone()).expect("client root");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(leaf.cert_chain(), leaf.key_der())
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (task_exchanges, task_failing, task_issued, task_delay) = (
            exchanges.clone(),
            failing.clone(),
            issued.clone(),
            delay_ms.clone(),
        );
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                while connections.try_join_next().is_some() {}
                let acceptor = acceptor.clone();
                let (exchanges, failing, issued, delay) = (
                    task_exchanges.clone(),
                    task_failing.clone(),
                    task_issued.clone(),
                    task_delay.clone(),
                );
                connections.spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let client_cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first().cloned());
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (exchanges, failing, issued, delay, client_cert) = (
                            exchanges.clone(),
                            failing.clone(),
                            issued.clone(),
                            delay.clone(),
                            client_cert.clone(),
                        );
                        async move {
                            let delay = delay.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                            }
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let form = parse_form(&String::from_utf8_lossy(&body));
                            exchanges
                                .lock()
                                .expect("exchanges")
                                .push(Exchange { form, client_cert });
                            let (status, answer) = if failing.load(Ordering::SeqCst) {
                                (503, serde_json::json!({"error": "temporarily_unavailable"}))
                            } else {
                                let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                                (
                                    200,
                                    serde_json::json!({
                                        "access_token": format!("exchanged-{n}"),
                                        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                                        "token_type": "Bearer",
                                        "expires_in": lifetime_secs,
                                    }),
                                )
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(answer.to_string())))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            exchanges,
            failing,
            issued,
            delay_ms,
            task,
        }
    }

    /// `https://localhost:<port>/token`.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}/token", self.addr.port())
    }

    /// Every exchange request received so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().expect("exchanges").clone()
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// From now on, take this long to answer each exchange.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// From now on, answer 503 `temporarily_unavailable` (or recover).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

/// `application/x-www-form-urlencoded` → fields (later duplicates win).
fn parse_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let escaped = (byte == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (byte, escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (other, None) => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
