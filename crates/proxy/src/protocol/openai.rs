//! OpenAI-compatible inference requests: `POST .../chat/completions`, `.../completions`,
//! `.../embeddings`, `.../responses` → action `invoke_model` on `Model::"<body.model>"` with
//! `context.model = {name, stream, max_tokens?, tools}`; and the OpenAI-shaped error body.
//!
//! Only the fields policies read are interpreted, and each strictly: a field of the wrong
//! type is a malformed request (400), never a default. It does not validate the rest of the
//! request (the model server does).

use portcullis_core::{Action, Resource};
use serde_json::{Value, json};

use super::Call;
use super::inspect::parse_strict;
use crate::error::Refusal;

/// The OpenAI API endpoints whose body names a model (API reference: Chat Completions,
/// Completions (legacy), Embeddings, Responses).
const ENDPOINTS: [&str; 4] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
];

/// Whether `path` is one of the inference endpoints (under any prefix, e.g. `/v1`). One
/// trailing slash is ignored, so `/v1/chat/completions/` is not a way around inspection.
pub(crate) fn is_inference_endpoint(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    ENDPOINTS.iter().any(|endpoint| path.ends_with(endpoint))
}

/// The token limit fields, in the order the API introduced them: `max_tokens` (chat,
/// completions), `max_completion_tokens` (chat, replacing it), `max_output_tokens`
/// (responses). When several are present the largest is the budget policies see.
const TOKEN_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

pub(crate) fn classify(bytes: &[u8]) -> Result<Call, Refusal> {
    let body = parse_strict(bytes)?;
    let Value::Object(body) = body else {
        return Err(Refusal::InvalidMessage);
    };
    let model = match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return Err(Refusal::InvalidMessage),
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(Refusal::InvalidMessage),
    };
    let mut max_tokens: Option<i64> = None;
    for field in TOKEN_FIELDS {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(value) => {
                // Cedar's Long is i64; a budget that does not fit is not a budget.
                let n = value
                    .as_u64()
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or(Refusal::InvalidMessage)?;
                max_tokens = Some(max_tokens.map_or(n, |m| m.max(n)));
            }
        }
    }
    let mut tools = Vec::new();
    for field in ["tools", "functions"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for tool in list {
                    tools.push(tool_name(tool).ok_or(Refusal::InvalidMessage)?);
                }
            }
            Some(_) => return Err(Refusal::InvalidMessage),
        }
    }
    tools.sort();
    tools.dedup();
    let mut context = json!({ "name": model, "stream": stream, "tools": tools });
    if let Some(max_tokens) = max_tokens {
        context["max_tokens"] = max_tokens.into();
    }
    Ok(Call {
        action: Action::InvokeModel,
        resource: Resource::Model(model),
        context: vec![("model", context)],
    })
}

/// Chat Completions: `{"type":"function","function":{"name":..}}`; Responses:
/// `{"type":"function","name":..}` or a built-in tool named by its `type`
/// (`{"type":"web_search"}`); legacy `functions`: `{"name":..}`.
fn tool_name(tool: &Value) -> Option<String> {
    let name = tool["function"]["name"]
        .as_str()
        .or_else(|| tool["name"].as_str())
        .or_else(|| tool["type"].as_str())?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// The error body the OpenAI API returns (`{"error":{"message","type","param","code"}}`),
/// so the official clients raise their usual exceptions (403 → `PermissionDeniedError`).
pub(crate) fn error_body(refusal: Refusal, model: Option<&str>, request_id: &str) -> Value {
    let (kind, message, param) = match refusal {
        Refusal::PolicyDenied => (
            "permission_error",
            match model {
                Some(model) => format!("model {model:?} is not permitted for this caller"),
                None => "request denied by policy".to_owned(),
            },
            Some("model"),
        ),
        Refusal::ApprovalRequired => (
            "permission_error",
            "this request requires approval".to_owned(),
            Some("model"),
        ),
        Refusal::InvalidUserToken(_) => (
            "authentication_error",
            "the user token was rejected".to_owned(),
            None,
        ),
        Refusal::StandingCredential => (
            "authentication_error",
            "long-lived API keys are refused; use a short-lived user token".to_owned(),
            None,
        ),
        Refusal::MalformedBody => (
            "invalid_request_error",
            "the request body is not valid JSON".to_owned(),
            None,
        ),
        Refusal::InvalidMessage => (
            "invalid_request_error",
            "the request body is not a valid request (model, stream, token limits or tools)"
                .to_owned(),
            None,
        ),
        Refusal::BodyTooLarge => (
            "invalid_request_error",
            "the request body is too large".to_owned(),
            None,
        ),
        Refusal::UnsupportedMediaType => (
            "invalid_request_error",
            "the request body must be application/json".to_owned(),
            None,
        ),
        Refusal::BodyUnreadable => (
            "invalid_request_error",
            "the request body could not be read".to_owned(),
            None,
        ),
        Refusal::AbsoluteFormTarget
        | Refusal::MissingHost
        | Refusal::DuplicateHost
        | Refusal::AmbiguousPath
        | Refusal::UnsupportedMethod => (
            "invalid_request_error",
            "the request was refused".to_owned(),
            None,
        ),
        Refusal::AuditUnavailable
        | Refusal::UpstreamConnect
        | Refusal::UpstreamTimeout
        | Refusal::UpstreamProtocol => (
            "server_error",
            "the model server is unavailable".to_owned(),
            None,
        ),
    };
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": refusal.reason(),
            "request_id": request_id,
        }
    })
}
