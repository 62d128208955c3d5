//! The Workload API source against a real gRPC server on a Unix socket: rotation, full-state
//! bundle updates, reconnection, rejected updates, and the refused call without metadata.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use portcullis_identity::workload_api::{
    self, BackoffPolicy, Endpoint, Options, SourceEvent, StartupError, WorkloadApiSource,
    X509Context,
};
use portcullis_test_support::pki::{Ca, LeafSpec, Svid};
use portcullis_test_support::workload_api::{WorkloadApiServer, X509SvidResponse, raw_fetch};
use tokio::sync::mpsc;

const ID: &str = "spiffe://prod.example.org/ns/orders/sa/api";
/// Generous: a test waits for an event that should come in milliseconds; only a broken
/// client reaches this.
const PATIENCE: Duration = Duration::from_secs(10);

/// What the source reported, owned so a test can wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Applied,
    Rejected(String),
    Disconnected,
}

struct Fixture {
    ca: Ca,
    server: WorkloadApiServer,
    source: WorkloadApiSource,
    events: mpsc::UnboundedReceiver<Seen>,
}

impl Fixture {
    /// A server already holding `first`, and a source connected to it with short backoffs.
    async fn start(first: impl FnOnce(&Ca) -> X509SvidResponse) -> Self {
        let ca = Ca::new("prod.example.org").unwrap();
        let server = WorkloadApiServer::start().await.unwrap();
        server.push(first(&ca));
        let (source, events) = spawn_source(&server);
        Self {
            ca,
            server,
            source,
            events,
        }
    }

    fn roots(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        vec![self.ca.cert_der()]
    }

    fn svid(&self) -> Svid {
        self.ca.leaf(&LeafSpec::server(ID)).unwrap()
    }

    async fn first(&self) -> Arc<X509Context> {
        self.source.first_update(PATIENCE).await.unwrap()
    }

    /// Waits until the published state satisfies `done`.
    async fn state_where(&self, done: impl Fn(&X509Context) -> bool) -> Arc<X509Context> {
        let mut updates = self.source.subscribe();
        let state = tokio::time::timeout(
            PATIENCE,
            updates.wait_for(|s| s.as_deref().is_some_and(&done)),
        )
        .await
        .expect("the expected state was never published")
        .unwrap();
        state.clone().unwrap()
    }

    async fn next_event(&mut self, wanted: impl Fn(&Seen) -> bool) -> Seen {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let event = self.events.recv().await.expect("source stopped");
                if wanted(&event) {
                    return event;
                }
            }
        })
        .await
        .expect("the expected event never came")
    }
}

fn spawn_source(server: &WorkloadApiServer) -> (WorkloadApiSource, mpsc::UnboundedReceiver<Seen>) {
    let (sender, events) = mpsc::unbounded_channel();
    let options = Options {
        backoff: BackoffPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        on_event: Some(Arc::new(move |event: &SourceEvent<'_>| {
            let seen = match event {
                SourceEvent::Applied(_) => Seen::Applied,
                SourceEvent::Rejected(error) => Seen::Rejected(error.to_string()),
                SourceEvent::Disconnected(_) => Seen::Disconnected,
            };
            let _ = sender.send(seen);
        })),
    };
    let endpoint = Endpoint::parse(&server.endpoint()).unwrap();
    (workload_api::spawn(endpoint, options), events)
}

fn leaf_der(state: &X509Context) -> &[u8] {
    state.identity.cert_chain[0].as_ref()
}

fn domains(state: &X509Context) -> Vec<String> {
    state
        .bundles
        .iter()
        .map(|(name, _)| name.to_string())
        .collect()
}

#[tokio::test]
async fn first_update_carries_the_svid_its_key_and_its_trust_domains_bundle() {
    let ca = Ca::new("prod.example.org").unwrap();
    let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
    let server = WorkloadApiServer::start().await.unwrap();
    server.push(X509SvidResponse::new(ID, &svid, &[ca.cert_der()]));
    let (source, _events) = spawn_source(&server);

    let state = source.first_update(PATIENCE).await.unwrap();

    assert_eq!(state.spiffe_id.as_str(), ID);
    assert_eq!(leaf_der(&state), svid.cert_der.as_ref());
    assert_eq!(state.identity.key.secret_der(), svid.key_der().secret_der());
    assert_eq!(domains(&state), ["prod.example.org"]);
    let bundle = state.bundles.get("prod.example.org").unwrap();
    assert_eq!(bundle.roots, [ca.cert_der()]);
    assert!(state.not_after > 0);
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn a_rotated_svid_is_published() {
    let fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
    })
    .await;
    let before = fx.first().await;

    let rotated = fx.svid();
    fx.server
        .push(X509SvidResponse::new(ID, &rotated, &fx.roots()));

    let after = fx
        .state_where(|s| leaf_der(s) == rotated.cert_der.as_ref())
        .await;
    assert_ne!(leaf_der(&before), leaf_der(&after));
    assert_eq!(
        after.identity.key.secret_der(),
        rotated.key_der().secret_der()
    );
}

#[tokio::test]
async fn a_trust_domain_missing_from_an_update_is_unloaded() {
    let partner = Ca::new("partner.example").unwrap();
    let partner_root = partner.cert_der();
    let fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
            .federate("partner.example", std::slice::from_ref(&partner_root))
    })
    .await;
    let first = fx.first().await;
    assert_eq!(domains(&first), ["partner.example", "prod.example.org"]);
    assert_eq!(
        first.bundles.get("partner.example").unwrap().roots,
        [partner.cert_der()]
    );

    // Same SVID, no federated bundle: full state, so the partner is no longer trusted.
    fx.server
        .push(X509SvidResponse::new(ID, &fx.svid(), &fx.roots()));

    let after = fx
        .state_where(|s| s.bundles.get("partner.example").is_none())
        .await;
    assert_eq!(domains(&after), ["prod.example.org"]);
}

#[tokio::test]
async fn the_source_reconnects_after_the_agent_closes_the_stream() {
    let mut fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
    })
    .await;
    fx.first().await;
    assert_eq!(fx.server.fetches(), 1);

    fx.server.close_streams();
    fx.next_event(|e| *e == Seen::Disconnected).await;
    // The reconnected stream first re-sends the current state, then carries new ones.
    fx.next_event(|e| *e == Seen::Applied).await;
    assert_eq!(fx.server.fetches(), 2);
    let rotated = fx.svid();
    fx.server
        .push(X509SvidResponse::new(ID, &rotated, &fx.roots()));
    fx.state_where(|s| leaf_der(s) == rotated.cert_der.as_ref())
        .await;
}

#[tokio::test]
async fn the_last_identity_stays_while_the_agent_is_down_and_updates_resume_after_restart() {
    let mut fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
    })
    .await;
    let before = fx.first().await;

    fx.server.stop();
    fx.next_event(|e| *e == Seen::Disconnected).await;
    // Connecting to the removed socket fails too: the source keeps retrying.
    fx.next_event(|e| *e == Seen::Disconnected).await;
    let current = fx.source.current().unwrap();
    assert_eq!(
        leaf_der(&current),
        leaf_der(&before),
        "last good state kept"
    );

    let rotated = fx.svid();
    fx.server
        .push(X509SvidResponse::new(ID, &rotated, &fx.roots()));
    fx.server.restart().unwrap();

    fx.state_where(|s| leaf_der(s) == rotated.cert_der.as_ref())
        .await;
    assert!(fx.server.fetches() >= 2);
}

#[tokio::test]
async fn an_update_whose_key_does_not_match_its_certificate_is_rejected() {
    let mut fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
    })
    .await;
    let before = fx.first().await;
    fx.next_event(|e| *e == Seen::Applied).await;

    let mut mismatched = X509SvidResponse::new(ID, &fx.svid(), &fx.roots());
    mismatched.svids[0].x509_svid_key = fx.svid().key_der().secret_der().to_vec();
    fx.server.push(mismatched);

    let rejected = fx.next_event(|e| matches!(e, Seen::Rejected(_))).await;
    assert_eq!(
        rejected,
        Seen::Rejected(format!(
            "SVID {ID}: private key does not match the certificate"
        ))
    );
    let current = fx.source.current().unwrap();
    assert_eq!(
        leaf_der(&current),
        leaf_der(&before),
        "last good state kept"
    );

    // The stream survives a bad update: the next good one is applied.
    let rotated = fx.svid();
    fx.server
        .push(X509SvidResponse::new(ID, &rotated, &fx.roots()));
    fx.state_where(|s| leaf_der(s) == rotated.cert_der.as_ref())
        .await;
    assert_eq!(fx.server.fetches(), 1, "no reconnect was needed");
}

#[tokio::test]
async fn an_update_without_svid_or_with_garbage_is_rejected() {
    let mut fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
    })
    .await;
    let before = fx.first().await;

    let mut empty = X509SvidResponse::new(ID, &fx.svid(), &fx.roots());
    empty.svids.clear();
    fx.server.push(empty);
    let rejected = fx.next_event(|e| matches!(e, Seen::Rejected(_))).await;
    assert!(
        matches!(&rejected, Seen::Rejected(reason) if reason.contains("svids")),
        "{rejected:?}"
    );

    let mut garbage = X509SvidResponse::new(ID, &fx.svid(), &fx.roots());
    garbage.svids[0].x509_svid = b"not a certificate".to_vec();
    fx.server.push(garbage);
    fx.next_event(|e| matches!(e, Seen::Rejected(_))).await;

    let current = fx.source.current().unwrap();
    assert_eq!(
        leaf_der(&current),
        leaf_der(&before),
        "last good state kept"
    );
}

#[tokio::test]
async fn an_update_whose_own_bundle_has_only_expired_roots_is_rejected() {
    let mut fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
    })
    .await;
    let before = fx.first().await;

    let now = time::OffsetDateTime::now_utc();
    let expired = Ca::with_validity(
        "prod.example.org",
        now - time::Duration::days(2),
        now - time::Duration::days(1),
    )
    .unwrap();
    fx.server
        .push(X509SvidResponse::new(ID, &fx.svid(), &[expired.cert_der()]));

    let rejected = fx.next_event(|e| matches!(e, Seen::Rejected(_))).await;
    assert_eq!(
        rejected,
        Seen::Rejected("every root of trust domain prod.example.org has expired".to_owned())
    );
    let current = fx.source.current().unwrap();
    assert_eq!(leaf_der(&current), leaf_der(&before));
}

#[tokio::test]
async fn the_first_update_times_out_with_the_reason_when_the_agent_never_answers() {
    // A server that accepts the call but has nothing to send (a workload not yet registered).
    let server = WorkloadApiServer::start().await.unwrap();
    let (source, _events) = spawn_source(&server);
    let error = source
        .first_update(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(error, StartupError::Timeout { .. }), "{error}");
    assert!(error.to_string().contains(&server.endpoint()), "{error}");

    // No agent at all: the message carries the connect failure.
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix://{}/agent.sock", dir.path().display());
    let source = workload_api::spawn(Endpoint::parse(&missing).unwrap(), Options::default());
    let error = source
        .first_update(Duration::from_millis(300))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains(&missing), "{message}");
    assert!(message.contains("last error: cannot connect"), "{message}");
}

#[tokio::test]
async fn the_test_agent_refuses_a_call_without_the_security_metadata() {
    let ca = Ca::new("prod.example.org").unwrap();
    let server = WorkloadApiServer::start().await.unwrap();
    server.push(X509SvidResponse::new(
        ID,
        &ca.svid(ID).unwrap(),
        &[ca.cert_der()],
    ));

    let refused = raw_fetch(server.socket_path(), false).await.unwrap();
    assert_eq!(refused.http_status, 200);
    let status = refused.grpc_status.expect("refused in the response head");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");
    assert_eq!(server.fetches(), 0);

    let served = raw_fetch(server.socket_path(), true).await.unwrap();
    assert_eq!(served.http_status, 200);
    assert!(served.grpc_status.is_none(), "the stream began");
    assert_eq!(server.fetches(), 1);
}

#[test]
fn only_unix_endpoints_are_accepted() {
    assert!(Endpoint::parse("unix:///run/spire/agent.sock").is_ok());
    let tcp = Endpoint::parse("tcp://127.0.0.1:8081").unwrap_err();
    assert!(tcp.to_string().contains("only unix://"), "{tcp}");
    assert!(Endpoint::parse("http://agent").is_err());
    assert!(Endpoint::parse("").is_err());
}

/// Accepts one mTLS connection with `config` and answers HTTP/1.1 requests on it with 200.
/// The task's result is the caller's SPIFFE ID, or why the handshake failed.
async fn serve_once(
    config: Arc<rustls::ServerConfig>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<String, String>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let caller =
            portcullis_identity::caller_spiffe_id(leaf.as_ref()).map_err(|e| e.to_string())?;
        let service = hyper::service::service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"ok"),
            )))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
            .await;
        Ok(caller.to_string())
    });
    (addr, task)
}

/// Handshakes with a caller presenting `svid` against a server built from `state`; the
/// caller trusts `server_roots` for the server's certificate.
async fn handshake(
    state: &X509Context,
    svid: &Svid,
    server_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<String, String> {
    use portcullis_test_support::client::{Caller, HttpVersion, request};
    let (addr, server) = serve_once(state.server_config().unwrap()).await;
    let caller = Caller::new(server_roots, Some(svid), HttpVersion::Http1).unwrap();
    let called = async {
        let mut connection = caller.connect(addr).await?;
        connection.send(request("GET", "localhost", "/", "")).await
    }
    .await;
    let served = server.await.unwrap();
    match (called, served) {
        (Ok(response), Ok(caller)) if response.status() == 200 => Ok(caller),
        (Ok(response), _) => Err(format!("unexpected status {}", response.status())),
        (Err(call), Ok(_)) => Err(format!("caller failed: {call}")),
        (_, Err(server)) => Err(server),
    }
}

#[tokio::test]
async fn a_server_config_built_from_each_state_accepts_and_then_refuses_a_dropped_domain() {
    let partner = Ca::new("partner.example").unwrap();
    let partner_root = partner.cert_der();
    let fx = Fixture::start(|ca| {
        let svid = ca.leaf(&LeafSpec::server(ID)).unwrap();
        X509SvidResponse::new(ID, &svid, &[ca.cert_der()])
            .federate("partner.example", std::slice::from_ref(&partner_root))
    })
    .await;
    let agent = partner
        .svid("spiffe://partner.example/agents/summarizer")
        .unwrap();
    let local = fx
        .ca
        .svid("spiffe://prod.example.org/agents/planner")
        .unwrap();

    let federated = fx.first().await;
    assert_eq!(
        handshake(&federated, &agent, &fx.roots()).await.unwrap(),
        "spiffe://partner.example/agents/summarizer"
    );

    fx.server
        .push(X509SvidResponse::new(ID, &fx.svid(), &fx.roots()));
    let narrowed = fx
        .state_where(|s| s.bundles.get("partner.example").is_none())
        .await;
    let refused = handshake(&narrowed, &agent, &fx.roots()).await.unwrap_err();
    assert!(refused.contains("UnknownTrustDomain"), "{refused}");
    // The own trust domain is still served.
    assert_eq!(
        handshake(&narrowed, &local, &fx.roots()).await.unwrap(),
        "spiffe://prod.example.org/agents/planner"
    );
}
