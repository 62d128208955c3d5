//! The admin listener (plain HTTP, meant for the pod network only): `/healthz`, `/readyz`,
//! `/metrics`, `/inventory`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::AuditLog;
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
}

pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(state.clone(), request));
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
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
    }
    Ok(match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            // A failed audit sink makes every request fail closed; take the pod out of
            // rotation rather than keep routing traffic into 503s.
            if state.draining.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if !state.ready.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n")
            } else if !state.audit.is_healthy() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: audit sink failed\n",
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
        "/inventory" => {
            let mut response = text(StatusCode::OK, "");
            *response.body_mut() = Full::new(Bytes::from(state.inventory.to_json().to_string()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
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
