//! MCP over the Streamable HTTP transport (MCP specification 2025-06-18, "Transports";
//! batches as in 2025-03-26): each JSON-RPC 2.0 message of a POST body → one Cedar call;
//! the GET stream and DELETE session calls → `mcp_session`; refusals as JSON-RPC errors.
//!
//! | message | action | resource |
//! |---|---|---|
//! | `tools/call` | `call_tool` | `Tool::"<params.name>"`, `context.tool = {name, arguments}` |
//! | `tools/list`, `server/discover` (2026-07-28) | `list_tools` | the endpoint's `Route` (results filtered per tool) |
//! | `resources/read` | `read_resource` | `McpResource::"<params.uri>"` |
//! | `prompts/get` | `get_prompt` | `Prompt::"<params.name>"` |
//! | `initialize`, `ping` | `mcp_initialize`, `mcp_ping` | `Route` |
//! | `notifications/*` (no `id`) | `mcp_notification` | `Route` |
//! | any other method; a client's JSON-RPC response | `mcp_method` | `Route` |
//!
//! Every call's context carries `mcp.method`. Unknown methods are not let through silently:
//! `mcp_method` is permitted only by a policy that names it. Anything that is not a valid
//! JSON-RPC 2.0 message is refused (400) rather than guessed at. This module does not talk
//! to the server or keep session state.

use portcullis_core::{Action, Resource};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::Call;
use super::annotations::Hints;
use super::inspect::{
    as_string, check_strict, count_values, for_each_element, is_null, is_object, present,
};
use crate::error::Refusal;

/// JSON-RPC 2.0 §5.1 reserves -32768..-32000; -32000..-32099 are "server error"s an
/// implementation defines. Portcullis uses this one for "refused by the proxy's policy".
pub(crate) const POLICY_DENIED_CODE: i64 = -32001;

/// SEP-2243 (MCP 2026-07-28): "HeaderMismatch", for a request whose `Mcp-Method` or
/// `Mcp-Name` header disagrees with its body.
pub(crate) const HEADER_MISMATCH_CODE: i64 = -32020;

/// JSON values in all `tools/call` arguments of one body together. Arguments become a
/// `serde_json::Value` for the Cedar context (about 32 bytes per value plus string bytes),
/// so this bounds that tree whatever the body's shape; more is 413.
pub(crate) const MAX_ARGUMENT_VALUES: usize = 65_536;

/// A POST body, classified.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub calls: Vec<Call>,
    /// The ids of the requests (messages with an `id`), which a refusal answers.
    pub request_ids: Vec<Value>,
    pub tools_list_ids: Vec<Value>,
    pub batch: bool,
    /// Per message: its method and the name it targets (`params.name`, or `params.uri` for
    /// `resources/read`), as SEP-2243's `Mcp-Method` / `Mcp-Name` mirror them; `None` for a
    /// client's JSON-RPC response.
    pub targets: Vec<Option<(String, Option<String>)>>,
}

/// One JSON-RPC message, its members borrowed from the body (present `null`s kept).
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
}

/// The `params` members a classification reads.
#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    name: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    uri: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    arguments: Option<&'a RawValue>,
}

/// Classifies a POST body: a single message or a batch of at most `max_batch` (more is
/// [`Refusal::BatchTooLarge`], found before any message is classified or decided).
pub(crate) fn classify(
    bytes: &[u8],
    endpoint: &Resource,
    max_batch: usize,
) -> Result<Parsed, Refusal> {
    let text = std::str::from_utf8(bytes).map_err(|_| Refusal::MalformedBody)?;
    let batch = text.trim_start().starts_with('[');
    if batch {
        // Counted before the whole body is checked, so an oversized batch costs one pass
        // over its first `max_batch + 1` elements.
        for_each_element(text, max_batch, |_| Ok(()))?;
    }
    check_strict(bytes)?;
    let mut parsed = Parsed {
        calls: Vec::new(),
        request_ids: Vec::new(),
        tools_list_ids: Vec::new(),
        batch,
        targets: Vec::new(),
    };
    let mut argument_values = 0;
    let mut add = |message: &RawValue| -> Result<(), Refusal> {
        let (call, id, target) = classify_raw(message, endpoint, &mut argument_values)?;
        parsed.targets.push(target);
        if let Some(id) = id {
            if call.action == Action::ListTools {
                parsed.tools_list_ids.push(id.clone());
            }
            if parsed.request_ids.contains(&id) {
                // Two requests with one id: their responses could not be told apart, and a
                // filtered `tools/list` result could be swapped for an unfiltered one.
                return Err(Refusal::InvalidMessage);
            }
            parsed.request_ids.push(id);
        }
        parsed.calls.push(call);
        Ok(())
    };
    if batch {
        for_each_element(text, max_batch, &mut add)?;
    } else {
        let message: &RawValue = serde_json::from_str(text).map_err(|_| Refusal::MalformedBody)?;
        add(message)?;
    }
    // JSON-RPC 2.0 §6: an empty batch is an invalid request.
    if parsed.calls.is_empty() {
        return Err(Refusal::InvalidMessage);
    }
    Ok(parsed)
}

/// A message's method and the name it targets.
type Target = Option<(String, Option<String>)>;

fn classify_raw(
    message: &RawValue,
    endpoint: &Resource,
    argument_values: &mut usize,
) -> Result<(Call, Option<Value>, Target), Refusal> {
    if !is_object(message) {
        return Err(Refusal::InvalidMessage);
    }
    let message: Message<'_> =
        serde_json::from_str(message.get()).map_err(|_| Refusal::InvalidMessage)?;
    classify_message(&message, endpoint, argument_values)
}

/// The largest integer every JSON reader keeps exactly (2^53 - 1: JavaScript's
/// `Number.MAX_SAFE_INTEGER`).
const MAX_SAFE_ID: u64 = (1 << 53) - 1;

/// A JSON-RPC id: a string or an integer (never a structure, which could be any size), and
/// an integer only as large as every reader keeps exactly. A server that reads numbers as
/// doubles (the TypeScript SDK's `JSON.parse`) answers 9007199254740993 as ...992; the
/// `tools/list` filter, which finds the listing by the id it was asked with, would then not
/// know the answer for one and pass the whole listing through.
fn request_id(raw: &RawValue) -> Result<Value, Refusal> {
    let text = raw.get();
    let scalar = text.starts_with('"')
        || text.starts_with('-')
        || text.starts_with(|c: char| c.is_ascii_digit());
    if !scalar {
        return Err(Refusal::InvalidMessage);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(id @ Value::String(_)) => Ok(id),
        Ok(Value::Number(n))
            if n.as_u64().is_some_and(|n| n <= MAX_SAFE_ID)
                || n.as_i64().is_some_and(|n| n.unsigned_abs() <= MAX_SAFE_ID) =>
        {
            Ok(Value::Number(n))
        }
        _ => Err(Refusal::InvalidMessage),
    }
}

fn classify_message(
    message: &Message<'_>,
    endpoint: &Resource,
    argument_values: &mut usize,
) -> Result<(Call, Option<Value>, Target), Refusal> {
    // JSON-RPC 2.0 §4: "jsonrpc" MUST be exactly "2.0".
    if message.jsonrpc.and_then(as_string).as_deref() != Some("2.0") {
        return Err(Refusal::InvalidMessage);
    }
    // MCP 2025-06-18 (Base Protocol, Requests): "Requests MUST include a string or integer
    // ID", "the ID MUST NOT be null".
    let id = message.id.map(request_id).transpose()?;
    let Some(method) = message.method else {
        // A response the client sends to a server-initiated request (sampling, elicitation).
        let is_response = message.result.is_some() ^ message.error.is_some();
        return match (is_response, id) {
            (true, Some(id)) => Ok((
                route_call(Action::McpMethod, "response", endpoint),
                Some(id),
                None,
            )),
            _ => Err(Refusal::InvalidMessage),
        };
    };
    let method = as_string(method).ok_or(Refusal::InvalidMessage)?;
    let params: Option<Params<'_>> = match message.params {
        None => None,
        Some(params) if is_object(params) => {
            Some(serde_json::from_str(params.get()).map_err(|_| Refusal::InvalidMessage)?)
        }
        // MCP params are always objects (by-name); an array would carry no tool name.
        Some(_) => return Err(Refusal::InvalidMessage),
    };
    // Notifications are the `notifications/` methods, and only they may omit the id: a
    // `tools/call` without an id is refused rather than classified as a notification that
    // a server might still execute.
    let notification = method.starts_with("notifications/");
    match (notification, &id) {
        (true, None) => {
            let call = route_call(Action::McpNotification, &method, endpoint);
            return Ok((call, None, Some((method, None))));
        }
        (false, Some(_)) => {}
        (true, Some(_)) | (false, None) => return Err(Refusal::InvalidMessage),
    }
    let param_str = |field: Option<&RawValue>| -> Result<String, Refusal> {
        field
            .and_then(as_string)
            .filter(|s| !s.is_empty())
            .ok_or(Refusal::InvalidMessage)
    };
    let name = params.as_ref().and_then(|p| p.name);
    let uri = params.as_ref().and_then(|p| p.uri);
    let mut target = None;
    let call = match method.as_str() {
        "tools/call" => {
            let name = param_str(name)?;
            target = Some(name.clone());
            let arguments = match params.as_ref().and_then(|p| p.arguments) {
                None => Value::Object(Map::new()),
                Some(raw) if is_null(raw) => Value::Object(Map::new()),
                Some(raw) if is_object(raw) => {
                    *argument_values += count_values(raw, MAX_ARGUMENT_VALUES - *argument_values)?;
                    serde_json::from_str(raw.get()).map_err(|_| Refusal::InvalidMessage)?
                }
                Some(_) => return Err(Refusal::InvalidMessage),
            };
            Call {
                action: Action::CallTool,
                resource: Resource::Tool(name.clone()),
                context: vec![
                    mcp_context(&method),
                    ("tool", json!({ "name": name, "arguments": arguments })),
                ],
            }
        }
        // MCP 2026-07-28: `server/discover` describes the server, its tools included, so it
        // is a listing like `tools/list` and its result is filtered the same way.
        "tools/list" | "server/discover" => route_call(Action::ListTools, &method, endpoint),
        "resources/read" => {
            let uri = param_str(uri)?;
            target = Some(uri.clone());
            Call {
                action: Action::ReadResource,
                resource: Resource::McpResource(uri),
                context: vec![mcp_context(&method)],
            }
        }
        "prompts/get" => {
            let name = param_str(name)?;
            target = Some(name.clone());
            Call {
                action: Action::GetPrompt,
                resource: Resource::Prompt(name),
                context: vec![mcp_context(&method)],
            }
        }
        "initialize" => route_call(Action::McpInitialize, &method, endpoint),
        "ping" => route_call(Action::McpPing, &method, endpoint),
        _ => route_call(Action::McpMethod, &method, endpoint),
    };
    Ok((call, id, Some((method, target))))
}

/// The protocol version whose requests must mirror their method and target in headers.
pub(crate) const HEADER_MIRRORING_VERSION: &str = "2026-07-28";

/// SEP-2243 (MCP 2026-07-28, Streamable HTTP): `Mcp-Method` mirrors the body's `method`,
/// `Mcp-Name` its `params.name` (`tools/call`, `prompts/get`) or `params.uri`
/// (`resources/read`), and "servers that process the request body MUST reject requests
/// where the values specified in the headers do not match the values in the request body".
/// The proxy is such a reader: whatever sends a header, it must agree with the body, under
/// any protocol version. Under `MCP-Protocol-Version: 2026-07-28` the headers are required
/// (a client that omits them is not speaking that version), and a batch, which one header
/// cannot describe, is refused. `Mcp-Name` may carry the `=?base64?…?=` form for names
/// outside the header character set.
pub(crate) fn check_headers(headers: &http::HeaderMap, parsed: &Parsed) -> Result<(), Refusal> {
    let single = |name: &str| -> Result<Option<String>, Refusal> {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(value), None) => value
                .to_str()
                .map(|v| Some(v.trim().to_owned()))
                .map_err(|_| Refusal::HeaderMismatch),
            (Some(_), Some(_)) => Err(Refusal::HeaderMismatch),
        }
    };
    let version = single("mcp-protocol-version")?;
    let modern = version.as_deref() == Some(HEADER_MIRRORING_VERSION);
    let method = single("mcp-method")?;
    let name = single("mcp-name")?
        .map(|name| decode_sentinel(&name))
        .transpose()?;
    if parsed.batch {
        return match (modern, &method, &name) {
            (false, None, None) => Ok(()),
            _ => Err(Refusal::HeaderMismatch),
        };
    }
    let Some(target) = parsed.targets.first() else {
        return Err(Refusal::HeaderMismatch);
    };
    let (body_method, body_name) = match target {
        Some((method, name)) => (Some(method.as_str()), name.as_deref()),
        // A response carries neither header.
        None => (None, None),
    };
    let agrees = |header: &Option<String>, body: Option<&str>| match header {
        Some(header) => Some(header.as_str()) == body,
        None => !modern || body.is_none(),
    };
    if agrees(&method, body_method) && agrees(&name, body_name) {
        Ok(())
    } else {
        Err(Refusal::HeaderMismatch)
    }
}

/// SEP-2243's encoding of a header value outside the visible-ASCII set:
/// `=?base64?<standard base64 of the UTF-8 bytes>?=`; any other value is itself.
fn decode_sentinel(value: &str) -> Result<String, Refusal> {
    use base64::Engine as _;
    let Some(encoded) = value
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    else {
        return Ok(value.to_owned());
    };
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or(Refusal::HeaderMismatch)
}

/// `GET` (open the SSE stream) or `DELETE` (terminate the session) on the endpoint.
pub(crate) fn session_call(method: &str, endpoint: &Resource) -> Call {
    route_call(Action::McpSession, method, endpoint)
}

/// A call on the endpoint itself (its `Route`), with `context.mcp`.
fn route_call(action: Action, method: &str, endpoint: &Resource) -> Call {
    Call {
        action,
        resource: endpoint.clone(),
        context: vec![mcp_context(method)],
    }
}

fn mcp_context(method: &str) -> (&'static str, Value) {
    ("mcp", json!({ "method": method }))
}

/// The `call_tool` question asked for each tool of a `tools/list` result: no arguments (the
/// projection then shows none), the annotations the listing gives it, `mcp.method` =
/// `tools/list`.
pub(crate) fn listing_call(tool: &str, hints: Option<Hints>) -> Call {
    let mut call = Call {
        action: Action::CallTool,
        resource: Resource::Tool(tool.to_owned()),
        context: vec![mcp_context("tools/list"), ("tool", json!({ "name": tool }))],
    };
    if let Some(hints) = hints {
        annotate(&mut call, hints);
    }
    call
}

/// Gives a `call_tool` question the server's annotations of its tool
/// (`context.tool.annotations`).
pub(crate) fn annotate(call: &mut Call, hints: Hints) {
    for (key, value) in &mut call.context {
        if *key == "tool"
            && let Some(tool) = value.as_object_mut()
        {
            tool.insert("annotations".to_owned(), hints.to_json());
        }
    }
}

/// JSON-RPC 2.0 §5.1 error response(s) for a refused body: one per request id, an array for
/// a batch; `id: null` when no id is known (§5: "If there was an error in detecting the id
/// in the Request object ... it MUST be Null"). A batch of only notifications, which has no
/// ids to answer, also gets the single `null` error, since the HTTP status alone would not say why.
pub(crate) fn error_body(refusal: Refusal, ids: &[Value], batch: bool, request_id: &str) -> Value {
    let (code, message) = match refusal {
        // §5.1: -32700 Parse error, -32600 Invalid Request.
        Refusal::MalformedBody => (-32700, "parse error"),
        Refusal::InvalidMessage => (-32600, "invalid request"),
        Refusal::BodyTooLarge => (-32600, "request body too large"),
        Refusal::UnsupportedMediaType => (-32600, "request body must be application/json"),
        Refusal::BodyUnreadable => (-32600, "request body could not be read"),
        Refusal::BodyDeadline => (-32600, "request body arrived too slowly"),
        Refusal::BatchTooLarge => (-32600, "batch has too many messages"),
        // SEP-2243 (MCP 2026-07-28): HeaderMismatch.
        Refusal::HeaderMismatch => (HEADER_MISMATCH_CODE, "mcp headers do not match the body"),
        Refusal::ModelMismatch => (-32600, "request refused"),
        Refusal::ForeignSession => (-32600, "session not found"),
        Refusal::AbsoluteFormTarget
        | Refusal::MissingHost
        | Refusal::DuplicateHost
        | Refusal::InvalidHost
        | Refusal::AmbiguousPath
        | Refusal::UnsupportedMethod
        | Refusal::HeadTooLarge => (-32600, "request refused"),
        Refusal::PolicyDenied => (POLICY_DENIED_CODE, "denied by policy"),
        Refusal::ApprovalRequired => (POLICY_DENIED_CODE, "approval required"),
        Refusal::InvalidUserToken(_) => (POLICY_DENIED_CODE, "user token rejected"),
        Refusal::InvalidApproval(_) => (POLICY_DENIED_CODE, "approval grant rejected"),
        Refusal::ApprovalReplayed => (POLICY_DENIED_CODE, "approval grant already used"),
        Refusal::RateLimited(_) => (-32603, "rate limit exceeded"),
        Refusal::CredentialUnavailable => (-32603, "server unavailable"),
        Refusal::StandingCredential => (POLICY_DENIED_CODE, "long-lived credentials are refused"),
        Refusal::AgentBusy => (-32603, "too many requests in flight from this agent"),
        Refusal::Overloaded | Refusal::InspectionBudget => (-32603, "server busy"),
        Refusal::AuditUnavailable
        | Refusal::UpstreamConnect
        | Refusal::UpstreamTimeout
        | Refusal::UpstreamProtocol => (-32603, "server unavailable"),
    };
    let error = |id: &Value| {
        json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {
                "code": code,
                "message": message,
                "data": { "reason": refusal.reason(), "request_id": request_id },
            },
        })
    };
    match (ids, batch) {
        ([], _) => error(&Value::Null),
        (ids, true) => Value::Array(ids.iter().map(error).collect()),
        ([id, ..], false) => error(id),
    }
}
