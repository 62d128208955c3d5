//! `portcullis-floor LISTEN UPSTREAM DIR`: the proxy's chosen stack with nothing of Portcullis
//! in it, the load benchmark's `floor` row (`benches/load/run.sh`).
//!
//! rustls (aws-lc-rs) terminating mTLS with the same serving SVID and client-certificate
//! verification (WebPKI against the fixtures' CA), hyper-util's auto server (HTTP/1.1 and
//! HTTP/2, as Portcullis serves), and hyper's HTTP/1.1 client on a stack of kept-alive
//! upstream connections, on a current-thread runtime (what Portcullis runs on one core). No
//! identity, policy, audit, header hygiene, limits or metrics: the request goes upstream as it
//! came and the response comes back as it went. What Portcullis costs beyond this row is its
//! own work; what this row costs beyond nginx is the stack's.
//!
//! Not a product and not a pattern to copy: it forwards anything any client certificate the
//! CA signed asks for. Built with the profile Portcullis is measured in (`dist`), so the two
//! rows differ by what Portcullis does, not by how it was compiled.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark tool fails loudly"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

type Pool = Arc<Mutex<Vec<SendRequest<Incoming>>>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, dir] = args.as_slice() else {
        eprintln!("usage: portcullis-floor LISTEN UPSTREAM DIR");
        std::process::exit(64);
    };
    // What Portcullis runs on one core (`worker_threads` follows the CPU quota).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            // SIGTERM ends the process by returning from `main`, as it ends Portcullis: an
            // instrumented build writes its execution profile on the way out
            // (benches/pgo/run.sh), which a process killed by the signal never does.
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::select! {
                () = floor(listen.parse().unwrap(), upstream.parse().unwrap(), Path::new(dir)) => {}
                _ = terminate.recv() => {}
            }
        });
}

async fn floor(listen: SocketAddr, upstream: SocketAddr, dir: &Path) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(dir));
    let listener = TcpListener::bind(listen).await.unwrap();
    let pool: Pool = Arc::default();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, pool) = (acceptor.clone(), pool.clone());
        tokio::spawn(async move {
            tcp.set_nodelay(true).unwrap();
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service =
                hyper::service::service_fn(move |request| forward(request, upstream, pool.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// The serving SVID, and client certificates verified against the fixtures' CA.
fn server_config(dir: &Path) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = Arc::new(portcullis_benches::fixture_roots(dir));
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .unwrap();
    let (chain, key) = portcullis_benches::fixture_identity(dir, "server");
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn forward(
    mut request: http::Request<Incoming>,
    upstream: SocketAddr,
    pool: Pool,
) -> Result<http::Response<Lent>, hyper::Error> {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = http::Uri::from(path);
    *request.version_mut() = http::Version::HTTP_11;
    let idle = {
        let mut idle = pool.lock().unwrap();
        std::iter::from_fn(|| idle.pop()).find(SendRequest::is_ready)
    };
    let mut sender = match idle {
        Some(sender) => sender,
        None => {
            let tcp = TcpStream::connect(upstream).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(connection);
            sender
        }
    };
    let response = sender.send_request(request).await?;
    Ok(response.map(|inner| {
        let mut body = Lent {
            inner,
            giveback: Some((sender, pool)),
        };
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }))
}

/// The upstream response body, which puts its connection back on the stack when it ends.
struct Lent {
    inner: Incoming,
    giveback: Option<(SendRequest<Incoming>, Pool)>,
}

impl Lent {
    fn give_back(&mut self) {
        let Some((mut sender, pool)) = self.giveback.take() else {
            return;
        };
        if sender.is_ready() {
            pool.lock().unwrap().push(sender);
        } else {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.lock().unwrap().push(sender);
                }
            });
        }
    }
}

impl Body for Lent {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
            // A connection whose response failed is not reused.
            Some(Err(_)) => self.giveback = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
