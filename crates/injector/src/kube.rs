//! The two reads the webhook makes from the Kubernetes API, and nothing else: a namespace (its
//! labels and annotations say whether opt-out is allowed and which config ConfigMap applies)
//! and a ConfigMap (the sidecar config it validates before admitting the pod).
//!
//! [`Cluster`] is what the admission logic needs; [`ApiServer`] is the in-cluster
//! implementation: one HTTPS GET per read, HTTP/1.1 over rustls, authenticated with the
//! service-account token (re-read for every call, because the kubelet rotates projected tokens)
//! and verified against the cluster CA. The chart grants exactly `get` on `namespaces` and
//! `configmaps`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::ApiSettings;

/// A boxed future, so [`Cluster`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the webhook reads about the pod's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

/// Reads from the cluster. `Ok(None)`: the object does not exist.
pub trait Cluster: Send + Sync + std::fmt::Debug {
    /// The namespace called `name`.
    fn namespace<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>>;
    /// The `data` of ConfigMap `namespace/name`.
    fn configmap<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, ApiError>>;
}

/// A read from the API server failed (as opposed to: the object does not exist).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The service-account token or CA file could not be read.
    #[error("cannot read {}: {}", .0.display(), .1)]
    File(PathBuf, std::io::Error),
    /// The CA file holds no usable certificate.
    #[error("no CA certificate in {}", .0.display())]
    NoCa(PathBuf),
    /// TCP, TLS or HTTP failed.
    #[error("kubernetes api unreachable: {0}")]
    Transport(String),
    /// The API server answered with an unexpected status (403: RBAC is missing).
    #[error("kubernetes api answered {0} for {1}")]
    Status(StatusCode, String),
    /// The body was not the expected object.
    #[error("kubernetes api sent an unreadable object: {0}")]
    Body(String),
}

/// In-cluster reads over HTTPS.
#[derive(Debug, Clone)]
pub struct ApiServer {
    settings: ApiSettings,
}

const TIMEOUT: Duration = Duration::from_secs(5);
/// A ConfigMap is at most 1 MiB; a namespace is small.
const MAX_BODY: usize = 2 * 1024 * 1024;

impl ApiServer {
    /// Reads go to `settings.url`; the files are read per call.
    pub fn new(settings: ApiSettings) -> Self {
        Self { settings }
    }

    fn connector(&self) -> Result<TlsConnector, ApiError> {
        let pem = std::fs::read(&self.settings.ca_file)
            .map_err(|e| ApiError::File(self.settings.ca_file.clone(), e))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
            roots
                .add(cert)
                .map_err(|_| ApiError::NoCa(self.settings.ca_file.clone()))?;
        }
        if roots.is_empty() {
            return Err(ApiError::NoCa(self.settings.ca_file.clone()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ApiError::Transport(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// `GET path`: `Ok(None)` on 404.
    async fn get(&self, path: &str) -> Result<Option<Value>, ApiError> {
        let token = std::fs::read_to_string(&self.settings.token_file)
            .map_err(|e| ApiError::File(self.settings.token_file.clone(), e))?;
        let connector = self.connector()?;
        let (host, port) = (&self.settings.host, self.settings.port);
        let transport = |e: &dyn std::fmt::Display| ApiError::Transport(e.to_string());
        let exchange = async {
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| transport(&e))?;
            let name = ServerName::try_from(host.clone()).map_err(|e| transport(&e))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| transport(&e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| transport(&e))?;
            tokio::spawn(conn);
            let request = Request::get(path)
                .header(header::HOST, format!("{host}:{port}"))
                .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
                .header(header::ACCEPT, "application/json")
                .body(Empty::<Bytes>::new())
                .map_err(|e| transport(&e))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| transport(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ApiError::Body(e.to_string()))?
                .to_bytes();
            Ok::<_, ApiError>((status, body))
        };
        let (status, body) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| ApiError::Transport(format!("no answer within {TIMEOUT:?}")))??;
        match status {
            StatusCode::OK => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| ApiError::Body(e.to_string())),
            StatusCode::NOT_FOUND => Ok(None),
            other => Err(ApiError::Status(other, path.to_owned())),
        }
    }
}

fn string_map(value: Option<&Value>) -> Result<BTreeMap<String, String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| ApiError::Body(e.to_string())),
    }
}

impl Cluster for ApiServer {
    fn namespace<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>> {
        Box::pin(async move {
            let Some(object) = self.get(&format!("/api/v1/namespaces/{name}")).await? else {
                return Ok(None);
            };
            Ok(Some(NamespaceInfo {
                labels: string_map(object.pointer("/metadata/labels"))?,
                annotations: string_map(object.pointer("/metadata/annotations"))?,
            }))
        })
    }

    fn configmap<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, ApiError>> {
        Box::pin(async move {
            let path = format!("/api/v1/namespaces/{namespace}/configmaps/{name}");
            match self.get(&path).await? {
                None => Ok(None),
                Some(object) => string_map(object.get("data")).map(Some),
            }
        })
    }
}

/// A fixed set of namespaces and ConfigMaps held in memory: for tests of the admission logic,
/// which need the cluster's answers but not the HTTP exchange ([`ApiServer`] has its own test
/// against a mock API server). A namespace it does not hold reads as one without labels.
#[derive(Debug, Clone, Default)]
pub struct StaticCluster {
    /// Namespace name → its labels and annotations.
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// (namespace, name) → ConfigMap data.
    pub configmaps: BTreeMap<(String, String), BTreeMap<String, String>>,
}

impl Cluster for StaticCluster {
    fn namespace<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>> {
        let found = Some(self.namespaces.get(name).cloned().unwrap_or_default());
        Box::pin(async move { Ok(found) })
    }

    fn configmap<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, ApiError>> {
        let found = self
            .configmaps
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned();
        Box::pin(async move { Ok(found) })
    }
}
