//! An mTLS caller: connects with a chosen SVID (or none), speaks HTTP/1.1 or HTTP/2, and
//! reports whether a failure happened in TLS or in HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::pki::{Svid, client_config};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// A failed call: the stage tells a refused handshake from an HTTP error.
#[derive(Debug)]
pub enum CallError {
    Connect(std::io::Error),
    /// The TLS handshake failed, or the server's alert arrived with the first read (TLS 1.3
    /// sends the client-certificate verdict after the client considers itself connected).
    Tls(String),
    Http(hyper::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Connect(e) => write!(f, "connect: {e}"),
            CallError::Tls(e) => write!(f, "tls: {e}"),
            CallError::Http(e) => write!(f, "http: {e}"),
        }
    }
}

impl CallError {
    pub fn is_tls(&self) -> bool {
        matches!(self, CallError::Tls(_))
    }
}

/// A calling workload.
#[derive(Clone)]
pub struct Caller {
    config: Arc<rustls::ClientConfig>,
    version: HttpVersion,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// An open connection to send requests on.
#[derive(Debug)]
pub struct Connection {
    sender: Sender,
    /// The connection task; its error is the real one (a TLS alert) when a send fails
    /// because the connection went away.
    task: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

#[derive(Debug)]
enum Sender {
    /// The sender, and whether a request was already sent on it.
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>, bool),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Caller {
    pub fn new(
        roots: &[CertificateDer<'static>],
        svid: Option<&Svid>,
        version: HttpVersion,
    ) -> Result<Self, rustls::Error> {
        let alpn: &[&[u8]] = match version {
            HttpVersion::Http1 => &[b"http/1.1"],
            HttpVersion::Http2 => &[b"h2"],
        };
        Ok(Self {
            config: client_config(roots, svid, alpn)?,
            version,
        })
    }

    pub async fn connect(&self, addr: SocketAddr) -> Result<Connection, CallError> {
        let tcp = TcpStream::connect(addr).await.map_err(CallError::Connect)?;
        // Without it, Nagle's algorithm holds the client's second handshake flight for the
        // peer's delayed ACK (~40 ms on Linux).
        tcp.set_nodelay(true).map_err(CallError::Connect)?;
        let connector = TlsConnector::from(self.config.clone());
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| CallError::Tls(e.to_string()))?;
        let io = TokioIo::new(tls);
        Ok(match self.version {
            HttpVersion::Http1 => {
                let (sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(CallError::Http)?;
                Connection {
                    sender: Sender::Http1(sender, false),
                    task: tokio::spawn(conn),
                }
            }
            HttpVersion::Http2 => {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(CallError::Http)?;
                Connection {
                    sender: Sender::Http2(sender),
                    task: tokio::spawn(conn),
                }
            }
        })
    }

    /// Connects, sends one request, returns the response head (body still streaming).
    pub async fn call(
        &self,
        addr: SocketAddr,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, CallError> {
        let mut connection = self.connect(addr).await?;
        connection.send(request).await
    }
}

impl Connection {
    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, CallError> {
        let result = match &mut self.sender {
            // A kept-alive HTTP/1.1 connection takes the next request only once the previous
            // response has been read to its end: wait for it.
            Sender::Http1(sender, used) => {
                // The first request goes straight out, so that a server's TLS alert (TLS 1.3
                // rejects a client certificate after the client's handshake) surfaces as the
                // send's error rather than as a closed channel.
                let ready = if *used { sender.ready().await } else { Ok(()) };
                *used = true;
                match ready {
                    Ok(()) => sender.send_request(request).await,
                    Err(error) => Err(error),
                }
            }
            Sender::Http2(sender) => sender.send_request(to_http2(request)).await,
        };
        match result {
            Ok(response) => Ok(response),
            Err(error) => {
                // The send may fail only as "canceled" or "closed" when the connection task
                // died first; its own error says why (e.g. the server's TLS alert).
                if let Ok(Ok(Err(cause))) =
                    tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.task).await
                    && let CallError::Tls(tls) = classify_hyper_error(cause)
                {
                    return Err(CallError::Tls(tls));
                }
                Err(classify_hyper_error(error))
            }
        }
    }
}

/// Another handle on an HTTP/2 connection, for concurrent streams: clone it once per
/// stream to keep many requests in flight on one connection.
#[derive(Debug, Clone)]
pub struct Streams(hyper::client::conn::http2::SendRequest<Full<Bytes>>);

impl Streams {
    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, CallError> {
        self.0
            .send_request(to_http2(request))
            .await
            .map_err(classify_hyper_error)
    }
}

impl Connection {
    /// Concurrent streams on this connection; `None` for HTTP/1.1 (one request at a time).
    pub fn streams(&self) -> Option<Streams> {
        match &self.sender {
            Sender::Http2(sender) => Some(Streams(sender.clone())),
            Sender::Http1(..) => None,
        }
    }
}

/// HTTP/2 names the host in `:authority` (RFC 9113 §8.3.1), taken from an absolute URI:
/// move a relative request's Host header there.
fn to_http2(mut request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    if request.uri().authority().is_none()
        && let Some(host) = request.headers_mut().remove(http::header::HOST)
    {
        {
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            if let Ok(uri) =
                format!("https://{}{path}", host.to_str().unwrap_or("localhost")).parse()
            {
                *request.uri_mut() = uri;
            }
        }
    }
    request
}

/// A TLS alert surfaces as an I/O error inside hyper's error; report it as TLS.
fn classify_hyper_error(error: hyper::Error) -> CallError {
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return CallError::Tls(tls.to_string());
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return CallError::Tls(tls.to_string());
        }
        source = cause.source();
    }
    CallError::Http(error)
}

/// A request with a Host header (HTTP/1.1 requires one) and an empty or given body.
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body.into()));
    *request.method_mut() = method.parse().unwrap_or(http::Method::GET);
    *request.uri_mut() = path.parse().unwrap_or_default();
    if let Ok(host) = host.parse() {
        request.headers_mut().insert(http::header::HOST, host);
    }
    request
}
