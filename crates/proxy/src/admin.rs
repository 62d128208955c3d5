//! The admin listener (plain HTTP, meant for the pod network only): `/healthz`, `/readyz`,
//! `/metrics` for the kubelet's probes and for scraping, and `/inventory` for loopback callers
//! only.
//!
//! In a pod the admin listener binds the pod IP (probes come from the node), which every other
//! pod can reach. `/inventory` names agent SPIFFE IDs and the tools and paths they called, so it
//! answers only connections whose peer is a loopback address, i.e. a process in the pod's own
//! network namespace (`kubectl port-forward` arrives there too); anyone else gets the same 404
//! as for an unknown path. The kernel drops packets with a loopback source arriving on another
//! interface (RFC 1122 §3.2.1.3 "martian" addresses), so the peer address cannot be forged
//! from outside the pod.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_identity::LiveIdentity;
use portcullis_identity::serving::ServingProblem;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::{AuditHealth, AuditLog};
use crate::metrics::Metrics;

#[derive(Debug)]
pub(crate) struct AdminState {
    pub metrics: Metrics,
    /// Set once policies and certificates are loaded and the agent listener is bound.
    pub ready: AtomicBool,
    /// Set when a shutdown began: the pod is taken out of rotation while it drains.
    pub draining: AtomicBool,
    pub audit: AuditLog,
    pub inventory: Arc<crate::inventory::Inventory>,
    /// The identity in force: a serving SVID that cannot serve makes the pod not ready.
    pub identity: watch::Receiver<Arc<LiveIdentity>>,
    /// The user-token verifier, whose key set past `jwks_max_stale` makes the pod not ready.
    pub user_tokens: Vec<portcullis_identity::user_token::UserTokenVerifier>,
}

/// Admin connections open at once, at most (kubelet probes, a scraper, an operator's curl).
const MAX_ADMIN_CONNECTIONS: usize = 64;

pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Probes and scrapers need a handful of connections; the listener is reachable from the
    // pod network, so any pod could otherwise open them without end (each held up to the
    // header timeout) and take the process's descriptors from the data plane.
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends leave the connection queued: back off, not spin.
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| respond(state.clone(), peer, request));
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5));
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn respond(
    state: Arc<AdminState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(route(&state, peer, request.method(), request.uri().path()))
}

/// Whether `peer` is in the pod's own network namespace. An IPv4 peer on a dual-stack socket
/// shows up as `::ffff:127.0.0.1`, hence the canonical form.
fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

fn route(
    state: &AdminState,
    peer: SocketAddr,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            // A failed or stuck audit sink makes requests fail closed; take the pod out of
            // rotation rather than keep routing traffic into 503s.
            if state.draining.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if !state.ready.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n")
            } else if let Some(not_ready) = audit_not_ready(state.audit.health()) {
                not_ready
            } else if let Some((stale, max)) = state
                .user_tokens
                .iter()
                .find_map(|v| v.stale_for().map(|stale| (stale, v.max_stale())))
            {
                text_owned(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: a user token key set (jwks) has not been refreshed for {}s, past user_token.jwks_max_stale ({}s); its tokens are refused\n",
                        stale.as_secs(),
                        max.as_secs(),
                    ),
                )
            } else if let Err(problem) = state.identity.borrow().readiness(SystemTime::now()) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    identity_not_ready(&problem),
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/metrics" => {
            let mut response = text(StatusCode::OK, "");
            *response.body_mut() = Full::new(Bytes::from(state.metrics.render()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/inventory" if is_loopback(peer) => {
            let mut response = text(StatusCode::OK, "");
            *response.body_mut() = Full::new(Bytes::from(state.inventory.to_json().to_string()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A sink that failed, or one stuck in a write (a reader that stopped reading, a hung
/// mount), refuses requests: take the pod out of rotation until it takes records again.
fn audit_not_ready(health: AuditHealth) -> Option<Response<Full<Bytes>>> {
    match health {
        AuditHealth::Healthy => None,
        AuditHealth::Failed => Some(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: audit sink failed\n",
        )),
        AuditHealth::Stuck { writing_for } => Some(text_owned(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: audit sink stuck: records are waiting and a write has not returned for {}s\n",
                writing_for.as_secs()
            ),
        )),
    }
}

/// A fixed line per problem; the detail is in the operational log.
fn identity_not_ready(problem: &ServingProblem) -> &'static str {
    match problem {
        ServingProblem::Expired { .. } => "not ready: serving certificate expired\n",
        ServingProblem::NotYetValid { .. } => "not ready: serving certificate not yet valid\n",
        ServingProblem::NotChaining { .. } | ServingProblem::NoOwnBundle(_) => {
            "not ready: serving certificate does not chain to its trust bundle\n"
        }
        ServingProblem::NotSvid(_)
        | ServingProblem::KeyMismatch
        | ServingProblem::KeyUnusable(_) => "not ready: serving certificate unusable\n",
    }
}

fn text_owned(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = text(status, "");
    *response.body_mut() = Full::new(Bytes::from(body));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
#[path = "admin_tests.rs"]
mod tests;
