//! AI protocol routes (`routes[].protocol: openai | mcp`): bounded body inspection, the
//! per-message Cedar calls a body stands for, native error bodies, and `tools/list` filtering.
//!
//! What it does: reads at most `body_limit` bytes of a protocol request (refusing larger
//! bodies with 413 before the upstream sees a byte), parses them defensively (strict JSON:
//! duplicate object keys are refused, so the proxy and the application cannot read two
//! different messages out of one body), turns them into `Call`s (action, resource, context)
//! and hands back a body that replays exactly the bytes read, followed by the rest of the
//! stream. What it does not: decide (the pipeline asks Cedar for every call) or forward.

pub(crate) mod annotations;
pub(crate) mod filter;
mod inspect;
pub(crate) mod mcp;
pub(crate) mod openai;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use portcullis_core::{Action, Resource};

use std::time::Duration;

use crate::admission::InspectBudget;
use crate::body::{RequestBody, ResponseBody};
use crate::classify::{Classified, Protocol};
use crate::error::Refusal;

#[doc(hidden)]
pub use filter::fuzz_tools_list;
pub(crate) use inspect::read_bounded;

/// One Cedar question a request stands for. A JSON-RPC batch stands for several.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub action: Action,
    pub resource: Resource,
    /// Protocol entries of the Cedar context (`model`; `mcp` and `tool`).
    pub context: Vec<(&'static str, serde_json::Value)>,
}

/// How refusals of a protocol request are rendered: in the caller's own protocol, so an SDK
/// surfaces them as the errors it knows rather than as transport failures.
#[derive(Debug, Clone)]
pub(crate) enum Native {
    /// `{"error": {"message", "type", "param", "code"}}`.
    OpenAi { model: Option<String> },
    /// JSON-RPC 2.0 error objects: one per request `id` (a batch answers with an array; a
    /// body whose ids are unknown, e.g. unparseable, gets one error with `id: null`).
    Mcp {
        ids: Vec<serde_json::Value>,
        batch: bool,
    },
}

/// A classified protocol request, ready to be decided and forwarded.
#[derive(Debug)]
pub(crate) struct Inspected {
    pub calls: Vec<Call>,
    pub body: RequestBody,
    /// Which responses list tools (`tools/list` and `server/discover` results on a POST,
    /// any result on the GET stream): they are filtered on the way back.
    pub listing: Option<filter::Listed>,
    /// What the body says when it is one message the protocol fields do not carry whole (a
    /// model call's body, prompt included): its canonical form goes into an approval digest.
    /// `None` for generic routes (their body is read only when a call needs approval) and
    /// MCP (whose tool arguments are protocol fields).
    pub message: Option<Bytes>,
}

/// What bounds the inspection of one body.
#[derive(Debug)]
pub(crate) struct Bounds<'a> {
    /// Bytes of this body that may be buffered (the route's `body_limit`).
    pub limit: usize,
    /// The budget every inspected body is charged to.
    pub budget: &'a InspectBudget,
    /// The whole body must have arrived within this.
    pub deadline: Duration,
    /// Messages in one JSON-RPC batch.
    pub max_batch: usize,
}

/// Reads and classifies the body of a protocol request; for a generic route, the request is
/// the one call `classify` made of it and the body is untouched. `native` is set as soon as
/// the route's protocol is known, so even a refusal of the body itself is rendered natively.
pub(crate) async fn inspect(
    classified: Classified,
    method: &str,
    path: &str,
    headers: &http::HeaderMap,
    body: RequestBody,
    bounds: &Bounds<'_>,
    native: &mut Option<Native>,
) -> Result<Inspected, Refusal> {
    // The one call of a generic route takes the classified resource itself (no copy).
    let generic = |classified: Classified, body| Inspected {
        calls: vec![Call {
            action: classified.action,
            resource: classified.resource,
            context: Vec::new(),
        }],
        body,
        listing: None,
        message: None,
    };
    match classified.protocol {
        Protocol::Http => Ok(generic(classified, body)),
        Protocol::OpenAi => {
            if method != "POST" || !openai::is_inference_endpoint(path) {
                // Model listing, file retrieval and the like carry no model in a body: they
                // are generic routes (action = method, resource = Route), decided as such.
                return Ok(generic(classified, body));
            }
            *native = Some(Native::OpenAi { model: None });
            let (bytes, body) = read_json_body(headers, body, bounds).await?;
            let call = openai::classify(path, &bytes)?;
            *native = Some(Native::OpenAi {
                model: Some(call.resource.id().to_owned()),
            });
            Ok(Inspected {
                calls: vec![call],
                body,
                listing: None,
                message: Some(bytes),
            })
        }
        Protocol::Mcp => {
            *native = Some(Native::Mcp {
                ids: Vec::new(),
                batch: false,
            });
            match method {
                // MCP 2025-06-18, Streamable HTTP: GET opens the server-to-client SSE stream,
                // DELETE terminates the session. Neither carries a JSON-RPC message. A GET
                // stream resumed with `Last-Event-ID` may replay a `tools/list` result, so
                // everything it carries is filtered.
                "GET" | "DELETE" => Ok(Inspected {
                    calls: vec![mcp::session_call(method, &classified.resource)],
                    body,
                    listing: (method == "GET").then_some(filter::Listed::Any),
                    message: None,
                }),
                "POST" => {
                    let (bytes, body) = read_json_body(headers, body, bounds).await?;
                    let parsed = mcp::classify(&bytes, &classified.resource, bounds.max_batch)?;
                    *native = Some(Native::Mcp {
                        ids: parsed.request_ids.clone(),
                        batch: parsed.batch,
                    });
                    mcp::check_headers(headers, &parsed)?;
                    Ok(Inspected {
                        calls: parsed.calls,
                        body,
                        listing: (!parsed.tools_list_ids.is_empty())
                            .then_some(filter::Listed::Ids(parsed.tools_list_ids)),
                        message: None,
                    })
                }
                // The transport defines no other method on the MCP endpoint.
                _ => Err(Refusal::UnsupportedMethod),
            }
        }
    }
}

/// 415 unless the body is declared JSON and not content-encoded (the proxy would read one
/// thing and the application, after decoding, another); 413 when it is (or turns out) larger than the
/// limit; 503 when the inspection budget cannot hold it; 408 when it does not arrive whole
/// within the deadline (the per-frame stall timeout alone lets a caller trickle a byte at a
/// time for ever).
async fn read_json_body(
    headers: &http::HeaderMap,
    body: RequestBody,
    bounds: &Bounds<'_>,
) -> Result<(Bytes, RequestBody), Refusal> {
    if !is_json(headers) || !is_identity_encoded(headers) {
        return Err(Refusal::UnsupportedMediaType);
    }
    read_whole(headers, body, bounds).await
}

/// The whole body, within `bounds` (its length, the shared budget, the deadline), and a body
/// replaying it.
pub(crate) async fn read_whole(
    headers: &http::HeaderMap,
    body: RequestBody,
    bounds: &Bounds<'_>,
) -> Result<(Bytes, RequestBody), Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > bounds.limit as u64) {
        // Refused before reading a byte of it.
        return Err(Refusal::BodyTooLarge);
    }
    let declared = declared.and_then(|len| usize::try_from(len).ok());
    let read = read_bounded(body, bounds.limit, declared, bounds.budget.reservation());
    tokio::time::timeout(bounds.deadline, read)
        .await
        .map_err(|_| Refusal::BodyDeadline)?
}

/// `application/json`, with or without parameters (RFC 8259 §11 defines no charset; one is
/// tolerated because clients send it).
fn is_json(headers: &http::HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// No `content-encoding`, or only `identity` (RFC 9110 §8.4.1).
fn is_identity_encoded(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .all(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .all(|coding| coding.trim().eq_ignore_ascii_case("identity"))
            })
        })
}

/// The caller-facing refusal in the caller's protocol. Carries the stable reason and request
/// id, never internal detail.
pub(crate) fn native_refusal(
    native: &Native,
    refusal: Refusal,
    request_id: &str,
) -> Response<ResponseBody> {
    let body = match native {
        Native::OpenAi { model } => openai::error_body(refusal, model.as_deref(), request_id),
        Native::Mcp { ids, batch } => mcp::error_body(refusal, ids, *batch, request_id),
    };
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = refusal.status();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if refusal.status() == StatusCode::UNAUTHORIZED {
        // RFC 6750 §3.1.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    crate::pipeline::set_retry_after(response.headers_mut(), refusal);
    response
}

/// The batch cap [`classify_body`] applies (the default of `limits.max_batch`).
pub const DEFAULT_MAX_BATCH: usize = 64;

/// One classified protocol body as the pipeline sees it, for benches and tools: each Cedar
/// call's action, resource and protocol context, or the refusal.
pub type BodyCalls = Vec<(Action, Resource, Vec<(&'static str, serde_json::Value)>)>;

/// Classifies a complete `POST` body of a protocol route the way the pipeline does (MCP
/// calls on `endpoint`; an OpenAI body as sent to the path `endpoint`). Generic HTTP bodies are not inspected: `Ok(vec![])`.
pub fn classify_body(
    protocol: Protocol,
    body: &[u8],
    endpoint: &str,
) -> Result<BodyCalls, Refusal> {
    let calls = match protocol {
        Protocol::Http => Vec::new(),
        Protocol::OpenAi => vec![openai::classify(endpoint, body)?],
        Protocol::Mcp => {
            let route = Resource::Route {
                path: endpoint.into(),
                host: "".into(),
                method: "POST".into(),
            };
            mcp::classify(body, &route, DEFAULT_MAX_BATCH)?.calls
        }
    };
    Ok(calls
        .into_iter()
        .map(|call| (call.action, call.resource, call.context))
        .collect())
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
