//! [`Question`]: one request as tools (and the audit trail) write it down.

use std::str::FromStr;

use cedar_policy::EntityUid;
use portcullis_core::{Action, Resource, SpiffeId, UserClaims};
use serde::{Deserialize, Serialize};

use crate::{AuthzInput, RequestInfo};

/// A request to decide: who asks (agent, and the user for a delegated call), what for
/// (`method` + `path` for a generic route, or `action` + `resource`), and the protocol
/// fields policies read. The same shape in `check` flags, test cases and audit records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// The agent's SPIFFE ID.
    pub agent: String,
    /// The user's verified claims; absent for an autonomous call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserSpec>,
    /// HTTP method. With `path` alone it makes a generic route request (action = method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Cedar action name (`invoke_model`, `call_tool`, `GET`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Cedar resource: `Tool::"refund"`, `Model::"gpt-4o"`, `Route::"/api/orders"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// `Host` of the request (default `localhost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Protocol fields by key: `model` (`{name, stream, max_tokens?, tools}`), `mcp`
    /// (`{method}`), `tool` (`{name, arguments}`), as the proxy's classifier builds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
    /// Unix seconds of the decision (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
}

/// A user's claims as a test or `--user` file writes them (JWT claim names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub sub: String,
    #[serde(default)]
    pub iss: String,
    /// `scope` as in a token: space-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl UserSpec {
    /// A verified user's claims as the audit record's question keeps them.
    pub fn from_claims(claims: &UserClaims) -> Self {
        Self {
            sub: claims.subject.clone(),
            iss: claims.issuer.clone(),
            scope: None,
            scopes: claims.scopes.clone(),
            email: claims.email.clone(),
            groups: claims.groups.clone(),
        }
    }
}

/// A question that cannot be asked, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QuestionError(pub String);

/// A question resolved into the vocabulary evaluation takes.
#[derive(Debug)]
pub(crate) struct Resolved {
    agent: SpiffeId,
    user: Option<UserClaims>,
    action: Action,
    resource: Resource,
    method: String,
    path: String,
    host: String,
    client_address: String,
    context: Vec<(&'static str, serde_json::Value)>,
    now: i64,
}

/// The protocol keys the shipped schema's contexts have.
const CONTEXT_KEYS: [&str; 3] = ["model", "mcp", "tool"];

impl Question {
    /// A generic-route question: `method path` as `agent`.
    pub fn route(agent: &str, method: &str, path: &str) -> Self {
        Question {
            agent: agent.to_owned(),
            user: None,
            method: Some(method.to_owned()),
            path: Some(path.to_owned()),
            action: None,
            resource: None,
            host: None,
            context: None,
            now: None,
            client_address: None,
        }
    }

    pub(crate) fn resolve(&self) -> Result<Resolved, QuestionError> {
        let err = |m: String| QuestionError(m);
        let agent = SpiffeId::parse(&self.agent)
            .map_err(|e| err(format!("agent {:?}: {e}", self.agent)))?;
        let host = self.host.clone().unwrap_or_else(|| "localhost".to_owned());
        let (action, resource, method, path) = match (&self.action, &self.resource) {
            (None, None) => {
                let (Some(method), Some(path)) = (&self.method, &self.path) else {
                    return Err(err(
                        "give method and path, or action and resource".to_owned()
                    ));
                };
                let method = method.to_ascii_uppercase();
                let action = Action::for_method(&method).ok_or_else(|| {
                    err(format!("method {method:?} is not one policies can name"))
                })?;
                let resource = Resource::Route {
                    path: path.as_str().into(),
                    host: host.as_str().into(),
                    method: method.clone().into(),
                };
                (action, resource, method, path.clone())
            }
            (Some(action), Some(resource)) => {
                let action = Action::ALL
                    .into_iter()
                    .find(|a| a.name() == action)
                    .ok_or_else(|| {
                        err(format!(
                            "action {action:?} is not one of: {}",
                            Action::ALL.map(Action::name).join(", ")
                        ))
                    })?;
                let uid = EntityUid::from_str(resource).map_err(|e| {
                    err(format!(
                        "resource {resource:?} is not an entity like Tool::\"refund\": {e}"
                    ))
                })?;
                let id = uid.id().unescaped().to_owned();
                let method = self.method.clone().unwrap_or_else(|| match action.group() {
                    Some(_) => action.name().to_owned(),
                    None => "POST".to_owned(),
                });
                let resource = match uid.type_name().to_string().as_str() {
                    "Route" => Resource::Route {
                        path: id.as_str().into(),
                        host: host.as_str().into(),
                        method: method.clone().into(),
                    },
                    "Model" => Resource::Model(id.clone()),
                    "Tool" => Resource::Tool(id.clone()),
                    "McpResource" => Resource::McpResource(id.clone()),
                    "Prompt" => Resource::Prompt(id.clone()),
                    other => {
                        return Err(err(format!(
                            "resource type {other:?} is not one of: Route, Model, Tool, McpResource, Prompt"
                        )));
                    }
                };
                let path = self.path.clone().unwrap_or_else(|| match &resource {
                    Resource::Route { path, .. } => path.to_string(),
                    _ => "/".to_owned(),
                });
                (action, resource, method, path)
            }
            _ => {
                return Err(err(
                    "action and resource go together (or give method and path)".to_owned(),
                ));
            }
        };
        let mut context = Vec::new();
        for (key, value) in self.context.iter().flatten() {
            let Some(key) = CONTEXT_KEYS.into_iter().find(|k| k == key) else {
                return Err(err(format!(
                    "context key {key:?} is not one of: {}",
                    CONTEXT_KEYS.join(", ")
                )));
            };
            context.push((key, value.clone()));
        }
        // What the classifier would send, under whatever the question left out.
        for (key, default) in defaults(action, &resource, &method) {
            match context.iter_mut().find(|(k, _)| *k == key) {
                None => context.push((key, default)),
                Some((_, given)) => {
                    if let (Some(given), serde_json::Value::Object(default)) =
                        (given.as_object_mut(), default)
                    {
                        for (field, value) in default {
                            given.entry(field).or_insert(value);
                        }
                    }
                }
            }
        }
        let user = self.user.as_ref().map(|u| {
            let mut scopes = u.scopes.clone();
            if let Some(scope) = &u.scope {
                scopes.extend(scope.split_whitespace().map(str::to_owned));
            }
            UserClaims {
                subject: u.sub.clone(),
                issuer: u.iss.clone(),
                scopes,
                email: u.email.clone(),
                groups: u.groups.clone(),
                actor_chain: vec![self.agent.clone()],
                expires_at: 0,
            }
        });
        Ok(Resolved {
            agent,
            user,
            action,
            resource,
            method,
            path,
            host,
            client_address: self
                .client_address
                .clone()
                .unwrap_or_else(|| "127.0.0.1".to_owned()),
            context,
            now: self.now.unwrap_or_else(unix_now),
        })
    }
}

impl Resolved {
    pub(crate) fn input(&self) -> AuthzInput<'_> {
        AuthzInput {
            agent: &self.agent,
            user: self.user.as_ref(),
            action: self.action,
            resource: &self.resource,
            request: RequestInfo {
                method: &self.method,
                path: &self.path,
                host: &self.host,
                client_address: &self.client_address,
            },
            protocol_context: self.context.clone(),
            now: self.now,
        }
    }

    pub(crate) fn agent(&self) -> &SpiffeId {
        &self.agent
    }

    pub(crate) fn action(&self) -> Action {
        self.action
    }

    pub(crate) fn resource(&self) -> &Resource {
        &self.resource
    }

    pub(crate) fn user(&self) -> Option<&UserClaims> {
        self.user.as_ref()
    }
}

/// The protocol fields the proxy's classifier builds for `action` on `resource`, with the
/// quietest values (no streaming, no tools offered, no tool arguments).
fn defaults(
    action: Action,
    resource: &Resource,
    method: &str,
) -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let mcp = |method: &str| ("mcp", json!({ "method": method }));
    match action {
        Action::InvokeModel => vec![(
            "model",
            json!({ "name": resource.id(), "stream": false, "tools": [] }),
        )],
        Action::CallTool => vec![
            mcp("tools/call"),
            ("tool", json!({ "name": resource.id(), "arguments": {} })),
        ],
        Action::ListTools => vec![mcp("tools/list")],
        Action::ReadResource => vec![mcp("resources/read")],
        Action::GetPrompt => vec![mcp("prompts/get")],
        Action::McpInitialize => vec![mcp("initialize")],
        Action::McpPing => vec![mcp("ping")],
        Action::McpNotification => vec![mcp("notifications/initialized")],
        Action::McpSession => vec![mcp(method)],
        Action::McpMethod => vec![mcp("response")],
        Action::Get
        | Action::Head
        | Action::Options
        | Action::Post
        | Action::Put
        | Action::Patch
        | Action::Delete => Vec::new(),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
