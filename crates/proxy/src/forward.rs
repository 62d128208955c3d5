//! Forwarding to the application in the pod, over a pooled HTTP/1.1 client.

use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portcullis_policy::Permit;

use crate::body::RequestBody;
use crate::error::Refusal;

/// Sends authorized requests upstream. The only way in is [`Forwarder::forward`], which takes
/// a [`Permit`]: a request that skipped authorization cannot be forwarded.
#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    client: Client<HttpConnector, RequestBody>,
    upstream: Authority,
    response_timeout: Duration,
}

/// Why forwarding failed, with detail for the audit record and log (never for the caller).
#[derive(Debug)]
pub(crate) struct ForwardError {
    pub refusal: Refusal,
    pub detail: String,
}

impl Forwarder {
    pub(crate) fn new(
        upstream: Authority,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        // The upstream is plain HTTP on localhost; refusing other schemes keeps a mistaken
        // absolute URI from ever leaving the pod.
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self {
            client,
            upstream,
            response_timeout,
        }
    }

    /// Sends `request` (headers already sanitised) and waits for the response head.
    pub(crate) async fn forward(
        &self,
        mut request: Request<RequestBody>,
        _permit: Permit,
    ) -> Result<Response<Incoming>, ForwardError> {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.upstream.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ForwardError {
                refusal: Refusal::UpstreamProtocol,
                detail: e.to_string(),
            })?;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        let response =
            match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
                Err(_) => {
                    return Err(ForwardError {
                        refusal: Refusal::UpstreamTimeout,
                        detail: format!("no response within {:?}", self.response_timeout),
                    });
                }
                Ok(Err(error)) => {
                    let refusal = if error.is_connect() {
                        Refusal::UpstreamConnect
                    } else {
                        Refusal::UpstreamProtocol
                    };
                    return Err(ForwardError {
                        refusal,
                        detail: error_chain(&error),
                    });
                }
                Ok(Ok(response)) => response,
            };
        // No tunnels: the caller's Upgrade was stripped, so a 101 here is the upstream's error.
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(ForwardError {
                refusal: Refusal::UpstreamProtocol,
                detail: "upstream answered 101 Switching Protocols".to_owned(),
            });
        }
        Ok(response)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
