//! A SPIFFE Workload API server for tests: real gRPC (HTTP/2) on a Unix socket in a temporary
//! directory, serving `FetchX509SVID` as an agent does. A test holds the handle and pushes
//! full-state updates (rotate the SVID, drop a federated trust domain, send a malformed one),
//! closes the open streams, or stops and restarts the whole server.
//!
//! Like SPIRE's agent, it refuses a call without the `workload.spiffe.io: true` metadata with
//! `InvalidArgument` "security header missing from request". Only `FetchX509SVID` is served;
//! every other method is `Unimplemented`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, Service};
use tonic::{Request, Response, Status};

use crate::pki::Svid;

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
const SECURITY_HEADER: &str = "workload.spiffe.io";

// The messages of SPIFFE's `workload.proto` that `FetchX509SVID` uses, written as prost-build
// would generate them (no protoc needed):
//
//   message X509SVIDRequest {}
//   message X509SVIDResponse {
//     repeated X509SVID svids = 1;
//     repeated bytes crl = 2;
//     map<string, bytes> federated_bundles = 3;
//   }
//   message X509SVID {
//     string spiffe_id = 1; bytes x509_svid = 2; bytes x509_svid_key = 3;
//     bytes bundle = 4; string hint = 5;
//   }

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    /// Keyed by the foreign trust domain's SPIFFE ID (`spiffe://name`); concatenated DER.
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// The chain, leaf first, as concatenated DER.
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    /// PKCS#8 DER.
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    /// The SVID's own trust domain's roots, concatenated DER.
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

impl X509SvidResponse {
    /// A response carrying `svid` (for `spiffe_id`) and its trust domain's `roots`.
    pub fn new(spiffe_id: &str, svid: &Svid, roots: &[CertificateDer<'static>]) -> Self {
        Self {
            svids: vec![X509Svid {
                spiffe_id: spiffe_id.to_owned(),
                x509_svid: svid.cert_der.to_vec(),
                x509_svid_key: svid.key_der().secret_der().to_vec(),
                bundle: concat_der(roots),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        }
    }

    /// Adds a federated trust domain (bare name, e.g. `partner.example`) and its roots.
    pub fn federate(mut self, trust_domain: &str, roots: &[CertificateDer<'static>]) -> Self {
        self.federated_bundles
            .insert(format!("spiffe://{trust_domain}"), concat_der(roots));
        self
    }
}

fn concat_der(certs: &[CertificateDer<'static>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

/// What every stream sends: the current full state, and which generation of streams may stay
/// open (bumped to close them all).
#[derive(Debug, Clone, Default)]
struct State {
    response: Option<X509SvidResponse>,
    generation: u64,
}

/// A running test agent. Dropping it stops the server.
#[derive(Debug)]
pub struct WorkloadApiServer {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    state: watch::Sender<State>,
    fetches: Arc<AtomicUsize>,
    accept: Option<JoinHandle<()>>,
}

impl WorkloadApiServer {
    /// Listens on `agent.sock` in a new temporary directory, with no state yet (streams stay
    /// open and silent until the first [`push`](Self::push)).
    pub async fn start() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("agent.sock");
        let mut server = Self {
            _dir: dir,
            socket,
            state: watch::Sender::new(State::default()),
            fetches: Arc::new(AtomicUsize::new(0)),
            accept: None,
        };
        server.listen()?;
        Ok(server)
    }

    /// `unix:///…/agent.sock`, as `tls.workload_api` takes it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Replaces the full state; every open stream sends it, and so does every new one.
    pub fn push(&self, response: X509SvidResponse) {
        self.state
            .send_modify(|state| state.response = Some(response));
    }

    /// Ends every open stream cleanly (grpc-status OK), as an agent does when it restarts its
    /// cache; clients must call again.
    pub fn close_streams(&self) {
        self.state.send_modify(|state| state.generation += 1);
    }

    /// How many `FetchX509SVID` calls were accepted (with the security header).
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Kills the server: every connection is dropped mid-stream and the socket removed, so
    /// clients fail to connect until [`restart`](Self::restart). The pushed state is kept.
    pub fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            // Aborting the accept task drops its JoinSet, which aborts every connection.
            accept.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Listens again on the same socket path, serving the last pushed state.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.listen()
    }

    fn listen(&mut self) -> io::Result<()> {
        let listener = UnixListener::bind(&self.socket)?;
        let agent = Agent {
            state: self.state.subscribe(),
            fetches: self.fetches.clone(),
        };
        self.accept = Some(tokio::spawn(accept_loop(listener, agent)));
        Ok(())
    }
}

impl Drop for WorkloadApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: UnixListener, agent: Agent) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.spawn(serve_connection(stream, agent.clone()));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_connection(stream: UnixStream, agent: Agent) {
    let service = hyper::service::service_fn(move |request| {
        let agent = agent.clone();
        async move { Ok::<_, Infallible>(agent.route(request).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[derive(Debug, Clone)]
struct Agent {
    state: watch::Receiver<State>,
    fetches: Arc<AtomicUsize>,
}

type ResponseStream = ReceiverStream<Result<X509SvidResponse, Status>>;

impl Agent {
    async fn route(self, request: http::Request<Incoming>) -> http::Response<tonic::body::Body> {
        if request.uri().path() != FETCH_X509_SVID {
            return Status::unimplemented(format!("{} is not served", request.uri().path()))
                .into_http();
        }
        let codec = tonic_prost::ProstCodec::<X509SvidResponse, X509SvidRequest>::default();
        tonic::server::Grpc::new(codec)
            .server_streaming(self, request)
            .await
    }

    /// One stream: the current state now, each new state as it is pushed, until the client
    /// goes away or the stream generation changes.
    fn stream(&self) -> ResponseStream {
        let (sender, receiver) = mpsc::channel(4);
        let mut state = self.state.clone();
        let generation = state.borrow().generation;
        state.mark_changed();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = sender.closed() => return,
                    changed = state.changed() => if changed.is_err() { return },
                }
                let current = state.borrow_and_update().clone();
                if current.generation != generation {
                    return;
                }
                if let Some(response) = current.response
                    && sender.send(Ok(response)).await.is_err()
                {
                    return;
                }
            }
        });
        ReceiverStream::new(receiver)
    }
}

impl Service<Request<X509SvidRequest>> for Agent {
    type Response = Response<ResponseStream>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<X509SvidRequest>) -> Self::Future {
        // The SPIFFE Workload Endpoint spec makes clients send it and servers refuse calls
        // without it, so that a request forged through some other client (SSRF) cannot fetch a
        // workload's keys; SPIRE answers exactly this.
        let secured = request
            .metadata()
            .get(SECURITY_HEADER)
            .is_some_and(|value| value == "true");
        let result = if secured {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(self.stream()))
        } else {
            Err(Status::invalid_argument(
                "security header missing from request",
            ))
        };
        Box::pin(async move { result })
    }
}

/// The head of a raw `FetchX509SVID` call: what a client that does not use `spiffe` sees.
#[derive(Debug)]
pub struct RawReply {
    pub http_status: http::StatusCode,
    /// The gRPC status when the server answered in the head (a trailers-only refusal);
    /// `None` when it began streaming.
    pub grpc_status: Option<Status>,
}

/// Calls `FetchX509SVID` over plain HTTP/2, with or without the security metadata, and
/// returns the response head. For testing what the server refuses.
pub async fn raw_fetch(socket: &Path, security_header: bool) -> Result<RawReply, String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://localhost{FETCH_X509_SVID}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if security_header {
        request = request.header(SECURITY_HEADER, "true");
    }
    // One gRPC frame: not compressed, length 0 (an empty X509SVIDRequest).
    let request = request
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(RawReply {
        http_status: response.status(),
        grpc_status: Status::from_header_map(response.headers()),
    })
}
