//! OpenAI-compatible inference requests: `POST .../chat/completions`, `.../completions`,
//! `.../embeddings`, `.../responses` → action `invoke_model` on `Model::"<body.model>"` with
//! `context.model = {name, stream, max_tokens?, tools}`; and the OpenAI-shaped error body.
//!
//! Only the fields policies read are interpreted, and each strictly: a field of the wrong
//! type is a malformed request (400), never a default. It does not validate the rest of the
//! request (the model server does).

use portcullis_core::{Action, Resource};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::Call;
use super::inspect::{as_string, check_strict, for_each_element, is_null, is_object, present};
use crate::error::Refusal;

/// The endpoints whose body names a model: OpenAI's Chat Completions, Completions (legacy),
/// Responses, Embeddings and Moderations, Anthropic's Messages, each under any prefix (e.g.
/// `/v1`); and every endpoint under OpenAI's `/images/` and `/audio/` (generations, edits,
/// variations; speech, transcriptions, translations).
const ENDPOINTS: [&str; 6] = [
    "/chat/completions",
    "/completions",
    "/responses",
    "/embeddings",
    "/moderations",
    "/messages",
];
const FAMILIES: [&str; 2] = ["/images/", "/audio/"];

/// Azure OpenAI names the model (its deployment) in the path:
/// `/openai/deployments/<deployment>/chat/completions?api-version=…`.
const AZURE_DEPLOYMENTS: &str = "/openai/deployments/";

/// Whether `path` is one of the inference endpoints. One trailing slash is ignored, so
/// `/v1/chat/completions/` is not a way around inspection.
pub(crate) fn is_inference_endpoint(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    ENDPOINTS.iter().any(|endpoint| path.ends_with(endpoint))
        || FAMILIES.iter().any(|family| {
            path.rfind(family).is_some_and(|at| {
                let rest = &path[at + family.len()..];
                !rest.is_empty() && !rest.contains('/')
            })
        })
        || path_model(path).is_some()
}

/// The model an Azure-style path names (`/openai/deployments/<model>/<endpoint>`), if any.
pub(crate) fn path_model(path: &str) -> Option<&str> {
    let at = path.find(AZURE_DEPLOYMENTS)?;
    let rest = &path[at + AZURE_DEPLOYMENTS.len()..];
    let (model, endpoint) = rest.split_once('/')?;
    (!model.is_empty() && !endpoint.is_empty()).then_some(model)
}

/// The members policies read, borrowed from the body; everything else (messages, input)
/// is skipped without being kept.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    model: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream: Option<&'a RawValue>,
    /// The token limit fields, in the order the API introduced them: `max_tokens` (chat,
    /// completions), `max_completion_tokens` (chat, replacing it), `max_output_tokens`
    /// (responses). When several are present the largest is the budget policies see.
    #[serde(borrow, default, deserialize_with = "present")]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    functions: Option<&'a RawValue>,
}

/// One entry of `tools` / `functions`.
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    function: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    name: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present", rename = "type")]
    kind: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    name: Option<&'a RawValue>,
}

/// Classifies an inference request on `path`: the model comes from the body, or from an
/// Azure-style path; when both name one, they must agree ([`Refusal::ModelMismatch`]).
pub(crate) fn classify(path: &str, bytes: &[u8]) -> Result<Call, Refusal> {
    check_strict(bytes)?;
    let text = std::str::from_utf8(bytes).map_err(|_| Refusal::MalformedBody)?;
    // A struct also deserializes from an array; only an object is a request.
    if !text.trim_start().starts_with('{') {
        return Err(Refusal::InvalidMessage);
    }
    let body: Request<'_> = serde_json::from_str(text).map_err(|_| Refusal::InvalidMessage)?;
    let body_model = match body.model {
        None => None,
        Some(raw) => Some(
            as_string(raw)
                .filter(|m| !m.is_empty())
                .ok_or(Refusal::InvalidMessage)?,
        ),
    };
    let model = match (body_model, path_model(path)) {
        (Some(body), Some(path)) if body != path => return Err(Refusal::ModelMismatch),
        (Some(model), _) => model,
        (None, Some(path)) => path.to_owned(),
        (None, None) => return Err(Refusal::InvalidMessage),
    };
    let stream = match body.stream {
        None => false,
        Some(raw) if is_null(raw) => false,
        Some(raw) => {
            serde_json::from_str::<bool>(raw.get()).map_err(|_| Refusal::InvalidMessage)?
        }
    };
    let mut max_tokens: Option<i64> = None;
    for field in [
        body.max_tokens,
        body.max_completion_tokens,
        body.max_output_tokens,
    ] {
        match field {
            None => {}
            Some(raw) if is_null(raw) => {}
            Some(raw) => {
                // Cedar's Long is i64; a budget that does not fit is not a budget.
                let n = serde_json::from_str::<u64>(raw.get())
                    .ok()
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or(Refusal::InvalidMessage)?;
                max_tokens = Some(max_tokens.map_or(n, |m| m.max(n)));
            }
        }
    }
    let mut tools = Vec::new();
    for field in [body.tools, body.functions] {
        match field {
            None => {}
            Some(raw) if is_null(raw) => {}
            Some(raw) if raw.get().starts_with('[') => {
                // Read one entry at a time: only the names are kept.
                for_each_element(raw.get(), usize::MAX, |tool| {
                    tools.push(tool_name(tool).ok_or(Refusal::InvalidMessage)?);
                    Ok(())
                })?;
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
fn tool_name(tool: &RawValue) -> Option<String> {
    if !is_object(tool) {
        return None;
    }
    let tool: Tool<'_> = serde_json::from_str(tool.get()).ok()?;
    let function_name = tool
        .function
        .filter(|f| is_object(f))
        .and_then(|f| serde_json::from_str::<Function<'_>>(f.get()).ok())
        .and_then(|f| f.name)
        .and_then(as_string);
    let name = function_name
        .or_else(|| tool.name.and_then(as_string))
        .or_else(|| tool.kind.and_then(as_string))?;
    (!name.is_empty()).then_some(name)
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
        | Refusal::InvalidHost
        | Refusal::AmbiguousPath
        | Refusal::UnsupportedMethod
        | Refusal::HeadTooLarge => (
            "invalid_request_error",
            "the request was refused".to_owned(),
            None,
        ),
        Refusal::BodyDeadline => (
            "invalid_request_error",
            "the request body arrived too slowly".to_owned(),
            None,
        ),
        Refusal::BatchTooLarge => (
            "invalid_request_error",
            "the request carries too many messages".to_owned(),
            None,
        ),
        Refusal::ModelMismatch => (
            "invalid_request_error",
            "the path and the body name different models".to_owned(),
            Some("model"),
        ),
        Refusal::HeaderMismatch | Refusal::ForeignSession => (
            "invalid_request_error",
            "the request was refused".to_owned(),
            None,
        ),
        Refusal::InvalidApproval(_) => (
            "authentication_error",
            "the approval grant was rejected".to_owned(),
            None,
        ),
        Refusal::ApprovalReplayed => (
            "authentication_error",
            "the approval grant was already used".to_owned(),
            None,
        ),
        Refusal::RateLimited(_) => (
            "rate_limit_error",
            "rate limit exceeded; retry later".to_owned(),
            None,
        ),
        Refusal::AgentBusy => (
            "rate_limit_error",
            "too many requests in flight from this caller".to_owned(),
            None,
        ),
        Refusal::Overloaded | Refusal::InspectionBudget => (
            "server_error",
            "the server is busy; retry later".to_owned(),
            None,
        ),
        Refusal::AuditUnavailable
        | Refusal::UpstreamConnect
        | Refusal::UpstreamTimeout
        | Refusal::UpstreamProtocol
        | Refusal::CredentialUnavailable => (
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
