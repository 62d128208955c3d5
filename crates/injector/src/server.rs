//! The thin HTTPS handler: rustls (aws-lc-rs) + hyper HTTP/1.1, routing the two webhook
//! paths to [`review`](crate::review()), plus `/healthz`, `/readyz` and `/metrics`.
//!
//! The serving certificate is re-read on an interval so a cert-manager (or chart) rotation is
//! picked up without a restart; a broken new pair is logged and the previous one kept.
//!
//! With `tls.client_ca` the admission paths answer only connections whose client certificate
//! verified against that CA (the API server's, from its AdmissionConfiguration); others get a
//! 403 before their body is read or the cluster is asked anything. A certificate that does not
//! verify fails the handshake. The probe and metrics paths stay open: the kubelet's HTTPS
//! probes present no certificate.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::WebhookConfig;
use crate::kube::{ApiServer, Cluster};
use crate::mutate::Scope;
use crate::review::{Admission, ConfigValidator, Verdict, review};

/// Path of the webhook entry whose namespaceSelector matches opted-in namespaces.
pub const PATH_NAMESPACE: &str = "/inject/namespace";
/// Path of the webhook entry for pods that opt in themselves.
pub const PATH_POD: &str = "/inject/pod";

/// An AdmissionReview holds the object and, for updates, the old one; etcd caps an object at
/// 1.5 MiB, so this leaves room without letting a client make us buffer without bound.
const MAX_BODY: usize = 8 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);

/// Why the webhook server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The serving certificate or key could not be loaded.
    #[error("cannot load serving certificate: {0}")]
    Certificate(String),
    /// The client CA bundle (`tls.client_ca`) could not be loaded.
    #[error("cannot load client CA {path}: {message}")]
    ClientCa {
        /// The configured file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls rejected the configuration.
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Accepting connections failed for good.
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
}

/// Serve admission reviews until `shutdown` completes, then drain open connections. Reads go
/// to the API server `config.kubernetes` names; ConfigMaps are checked with `validate`.
pub async fn serve(
    config: WebhookConfig,
    validate: ConfigValidator,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cluster = Arc::new(ApiServer::new(config.kubernetes.clone()));
    Server::bind(config, cluster, validate)
        .await?
        .run(shutdown)
        .await
}

/// A bound, not yet running webhook server; lets callers (tests) learn the real port.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    reloader: Arc<CertReloader>,
    reload_interval: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("reload_interval", &self.reload_interval)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    admission: Admission,
    metrics: Metrics,
    /// `tls.client_ca` is set: admission requests need a verified client certificate.
    require_client_cert: bool,
}

impl Server {
    /// Load the serving certificate and bind the listener; `cluster` answers the namespace and
    /// ConfigMap reads, `validate` checks sidecar configs.
    pub async fn bind(
        config: WebhookConfig,
        cluster: Arc<dyn Cluster>,
        validate: ConfigValidator,
    ) -> Result<Server, ServeError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let reloader = Arc::new(CertReloader::new(
            config.tls.cert.clone(),
            config.tls.key.clone(),
            provider.clone(),
        )?);
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let require_client_cert = config.tls.client_ca.is_some();
        let builder = match &config.tls.client_ca {
            Some(path) => {
                let roots = load_client_ca(path)?;
                // Anonymous clients may connect (the kubelet's probes); `handle` refuses them
                // the admission paths. A presented certificate must verify.
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| ServeError::ClientCa {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => {
                tracing::warn!(
                    "tls.client_ca is not set: admission requests are not authenticated, anyone \
                     who can reach the webhook can ask it to read namespaces and ConfigMaps"
                );
                builder.with_no_client_auth()
            }
        };
        let mut tls = builder.with_cert_resolver(reloader.clone());
        // The API server speaks HTTP/1.1 or HTTP/2; one protocol keeps this server small.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Server {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                admission: Admission {
                    settings: config.injection,
                    cluster,
                    validate,
                },
                metrics: Metrics::default(),
                require_client_cert,
            }),
            reloader,
            reload_interval: config.tls.reload_interval,
        })
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept connections until `shutdown` completes, then drain with a deadline.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            listener,
            acceptor,
            state,
            reloader,
            reload_interval,
        } = self;
        tracing::info!(addr = ?listener.local_addr().ok(), "injection webhook listening");
        let reload_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                reloader.reload_if_changed();
            }
        });
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let result = loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(error = %e, "accept failed, retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => break Err(ServeError::Accept(e)),
                },
            };
            let acceptor = acceptor.clone();
            let state = state.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "tls handshake timed out");
                        return;
                    }
                };
                // Some only when the client presented a certificate the verifier accepted
                // (without tls.client_ca no certificate is ever asked for).
                let authenticated = tls.get_ref().1.peer_certificates().is_some();
                let service = service_fn(move |req| handle(req, state.clone(), authenticated));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        };
        drop(listener);
        reload_task.abort();
        if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the drain deadline");
        }
        result
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(24) // EMFILE: too many open files, back off and retry
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    authenticated: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let scope = match (req.method(), req.uri().path()) {
        (&Method::POST, PATH_NAMESPACE) => Scope::Namespace,
        (&Method::POST, PATH_POD) => Scope::Pod,
        (&Method::GET, "/healthz" | "/readyz") => return Ok(text(StatusCode::OK, "ok\n".into())),
        (&Method::GET, "/metrics") => {
            return Ok(text(StatusCode::OK, state.metrics.render()));
        }
        _ => return Ok(text(StatusCode::NOT_FOUND, "not found\n".into())),
    };
    if state.require_client_cert && !authenticated {
        // Neither the body nor the cluster is looked at for an unknown caller.
        state
            .metrics
            .unauthenticated
            .fetch_add(1, Ordering::Relaxed);
        // debug, not warn: anyone can send these, the counter shows them.
        tracing::debug!(
            path = req.uri().path(),
            "admission request without a client certificate refused"
        );
        return Ok(text(
            StatusCode::FORBIDDEN,
            "client certificate required\n".into(),
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read admission review body");
            // Still an AdmissionReview, though without the uid the API server will count it
            // as a failed call and, with failurePolicy Fail, refuse the pod.
            let answer = review(b"", scope, &state.admission).await;
            state.metrics.count(&answer.verdict);
            return Ok(json(StatusCode::PAYLOAD_TOO_LARGE, &answer.review));
        }
    };
    let answer = review(&body, scope, &state.admission).await;
    state.metrics.count(&answer.verdict);
    match &answer.verdict {
        Verdict::Injected => tracing::info!(pod = %answer.subject, "sidecar injected"),
        Verdict::Skipped(reason) => {
            tracing::debug!(pod = %answer.subject, reason = reason.as_str(), "not injected")
        }
        Verdict::Ignored => {}
        Verdict::Refused(r) => tracing::warn!(pod = %answer.subject, reason = %r, "pod refused"),
        Verdict::Malformed(m) => tracing::warn!(reason = %m, "malformed admission review"),
    }
    Ok(json(StatusCode::OK, &answer.review))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(value).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

#[derive(Debug, Default)]
struct Metrics {
    injected: AtomicU64,
    skipped: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
    /// Admission requests refused (403) for want of a verified client certificate.
    unauthenticated: AtomicU64,
}

impl Metrics {
    fn count(&self, verdict: &Verdict) {
        let counter = match verdict {
            Verdict::Injected => &self.injected,
            Verdict::Skipped(_) | Verdict::Ignored => &self.skipped,
            Verdict::Refused(_) => &self.refused,
            Verdict::Malformed(_) => &self.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "# HELP portcullis_injector_admissions_total Admission reviews answered, by result.\n\
             # TYPE portcullis_injector_admissions_total counter\n",
        );
        for (label, counter) in [
            ("injected", &self.injected),
            ("skipped", &self.skipped),
            ("refused", &self.refused),
            ("malformed", &self.malformed),
        ] {
            out.push_str(&format!(
                "portcullis_injector_admissions_total{{result=\"{label}\"}} {}\n",
                counter.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# HELP portcullis_injector_unauthenticated_total Admission requests refused with 403: \
             no verified client certificate (tls.client_ca set).\n\
             # TYPE portcullis_injector_unauthenticated_total counter\n\
             portcullis_injector_unauthenticated_total {}\n",
            self.unauthenticated.load(Ordering::Relaxed)
        ));
        out
    }
}

/// Serves the current serving certificate and swaps in a new one when the files change.
#[derive(Debug)]
struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// The raw file contents, to notice a change without re-parsing every tick.
    raw: (Vec<u8>, Vec<u8>),
    key: Arc<CertifiedKey>,
}

impl CertReloader {
    fn new(
        cert_path: PathBuf,
        key_path: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServeError> {
        let loaded = load_pair(&cert_path, &key_path, &provider)?;
        Ok(Self {
            cert_path,
            key_path,
            provider,
            current: ArcSwap::from_pointee(loaded),
        })
    }

    fn reload_if_changed(&self) {
        let (Ok(cert), Ok(key)) = (
            std::fs::read(&self.cert_path),
            std::fs::read(&self.key_path),
        ) else {
            tracing::warn!("cannot read serving certificate files, keeping the current ones");
            return;
        };
        let current = self.current.load();
        if current.raw.0 == cert && current.raw.1 == key {
            return;
        }
        match parse_pair(cert, key, &self.provider) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                tracing::info!("serving certificate reloaded");
            }
            // Mid-rotation the two files can briefly disagree; the next tick sees both.
            Err(e) => {
                tracing::warn!(error = %e, "new serving certificate rejected, keeping the current one")
            }
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

/// The CA bundle client certificates must chain to; read once, at start.
fn load_client_ca(path: &Path) -> Result<Arc<rustls::RootCertStore>, ServeError> {
    let err = |message: String| ServeError::ClientCa {
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("bad certificate pem: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let (_, invalid) = roots.add_parsable_certificates(certs);
    if invalid > 0 {
        return Err(err(format!("{invalid} unparsable certificate(s)")));
    }
    if roots.is_empty() {
        return Err(err("no certificate found".to_owned()));
    }
    Ok(Arc::new(roots))
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Loaded, ServeError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ServeError::Certificate(format!("{}: {e}", p.display())))
    };
    parse_pair(read(cert)?, read(key)?, provider)
}

fn parse_pair(
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    provider: &CryptoProvider,
) -> Result<Loaded, ServeError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Certificate(format!("bad certificate pem: {e}")))?;
    if chain.is_empty() {
        return Err(ServeError::Certificate("no certificate found".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ServeError::Certificate(format!("bad private key pem: {e}")))?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| ServeError::Certificate(e.to_string()))?;
    Ok(Loaded {
        raw: (cert_pem, key_pem),
        key: Arc::new(certified),
    })
}
