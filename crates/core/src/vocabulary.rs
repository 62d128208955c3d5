use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// A Cedar action of the shipped schema (`policies/schema.cedarschema`). The names are a
/// contract with every policy already written: they are never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Get,
    Head,
    Options,
    Post,
    Put,
    Patch,
    Delete,
    InvokeModel,
    CallTool,
    ListTools,
    ReadResource,
    GetPrompt,
    /// MCP `initialize` (the lifecycle handshake).
    McpInitialize,
    /// MCP `ping`.
    McpPing,
    /// Any MCP JSON-RPC notification (a message without an `id`), e.g.
    /// `notifications/initialized`, `notifications/cancelled`.
    McpNotification,
    /// The Streamable HTTP session calls that carry no JSON-RPC message: `GET` (open the
    /// server-to-client SSE stream) and `DELETE` (terminate the session).
    McpSession,
    /// Any other MCP method (`resources/list`, `prompts/list`, `completion/complete`,
    /// `logging/setLevel`, ...) and client-sent JSON-RPC responses: denied unless a policy
    /// permits it by `context.mcp.method`.
    McpMethod,
}

/// The action groups generic HTTP methods belong to, so a policy can say `action in
/// Action::"read"` rather than list methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionGroup {
    Read,
    Write,
}

impl Action {
    pub const ALL: [Action; 17] = [
        Action::Get,
        Action::Head,
        Action::Options,
        Action::Post,
        Action::Put,
        Action::Patch,
        Action::Delete,
        Action::InvokeModel,
        Action::CallTool,
        Action::ListTools,
        Action::ReadResource,
        Action::GetPrompt,
        Action::McpInitialize,
        Action::McpPing,
        Action::McpNotification,
        Action::McpSession,
        Action::McpMethod,
    ];

    /// The generic action for an HTTP method; `None` for methods no policy can name (TRACE,
    /// CONNECT, extension methods), which are refused before any policy runs.
    pub fn for_method(method: &str) -> Option<Self> {
        Some(match method {
            "GET" => Action::Get,
            "HEAD" => Action::Head,
            "OPTIONS" => Action::Options,
            "POST" => Action::Post,
            "PUT" => Action::Put,
            "PATCH" => Action::Patch,
            "DELETE" => Action::Delete,
            _ => return None,
        })
    }

    /// The Cedar entity id: `Action::"<name>"`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Get => "GET",
            Action::Head => "HEAD",
            Action::Options => "OPTIONS",
            Action::Post => "POST",
            Action::Put => "PUT",
            Action::Patch => "PATCH",
            Action::Delete => "DELETE",
            Action::InvokeModel => "invoke_model",
            Action::CallTool => "call_tool",
            Action::ListTools => "list_tools",
            Action::ReadResource => "read_resource",
            Action::GetPrompt => "get_prompt",
            Action::McpInitialize => "mcp_initialize",
            Action::McpPing => "mcp_ping",
            Action::McpNotification => "mcp_notification",
            Action::McpSession => "mcp_session",
            Action::McpMethod => "mcp_method",
        }
    }

    pub fn group(self) -> Option<ActionGroup> {
        match self {
            Action::Get | Action::Head | Action::Options => Some(ActionGroup::Read),
            Action::Post | Action::Put | Action::Patch | Action::Delete => Some(ActionGroup::Write),
            Action::InvokeModel
            | Action::CallTool
            | Action::ListTools
            | Action::ReadResource
            | Action::GetPrompt
            | Action::McpInitialize
            | Action::McpPing
            | Action::McpNotification
            | Action::McpSession
            | Action::McpMethod => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ActionGroup {
    pub fn name(self) -> &'static str {
        match self {
            ActionGroup::Read => "read",
            ActionGroup::Write => "write",
        }
    }
}

/// What a request acts on, as a Cedar resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A generic HTTP route: `Route::"<path>"`. The path excludes the query string.
    Route {
        /// Shared: the proxy's audit record holds the same path, and names this resource by it.
        path: Arc<str>,
        /// Shared: the proxy's request, its audit record and this resource hold one host.
        host: Arc<str>,
        /// A standard method's name is a constant (see [`method_name`]).
        method: Cow<'static, str>,
    },
    /// `Model::"<name>"`, from an OpenAI-style body's `model`.
    Model(String),
    /// `Tool::"<name>"`, from an MCP `tools/call`'s `params.name`.
    Tool(String),
    /// `McpResource::"<uri>"`, from an MCP `resources/read`'s `params.uri`.
    McpResource(String),
    /// `Prompt::"<name>"`, from an MCP `prompts/get`'s `params.name`.
    Prompt(String),
}

impl Resource {
    pub fn entity_type(&self) -> &'static str {
        match self {
            Resource::Route { .. } => "Route",
            Resource::Model(_) => "Model",
            Resource::Tool(_) => "Tool",
            Resource::McpResource(_) => "McpResource",
            Resource::Prompt(_) => "Prompt",
        }
    }

    /// The id as a route shares it: a route's path without a copy, any other name copied.
    pub fn shared_id(&self) -> Arc<str> {
        match self {
            Resource::Route { path, .. } => path.clone(),
            Resource::Model(name)
            | Resource::Tool(name)
            | Resource::McpResource(name)
            | Resource::Prompt(name) => name.as_str().into(),
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Resource::Route { path, .. } => path,
            Resource::Model(name)
            | Resource::Tool(name)
            | Resource::McpResource(name)
            | Resource::Prompt(name) => name,
        }
    }
}

/// `method` as a resource's and an audit record's method: the name of a method policies can
/// decide is its action's, a constant, so the requests that use one copy nothing; any other
/// (refused, but still recorded) is copied.
pub fn method_name(method: &str) -> Cow<'static, str> {
    match Action::for_method(method) {
        Some(action) => Cow::Borrowed(action.name()),
        None => Cow::Owned(method.to_owned()),
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_entity(f, self.entity_type(), self.id())
    }
}

/// [`write_entity`] into a new string, sized for it.
pub fn entity_text(entity_type: &str, id: &str) -> String {
    let mut text = String::with_capacity(entity_type.len() + id.len() + 4);
    // Writing to a `String` cannot fail.
    let _ = write_entity(&mut text, entity_type, id);
    text
}

/// `Type::"id"`, an entity as Cedar writes it, with the id quoted as `{:?}` quotes it. Ids
/// are almost always printable ASCII with nothing to escape, copied whole: `{:?}` escapes
/// char by char, and every audited request writes its resource this way.
pub fn write_entity(out: &mut impl fmt::Write, entity_type: &str, id: &str) -> fmt::Result {
    out.write_str(entity_type)?;
    out.write_str("::")?;
    if id
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.write_char('"')?;
        out.write_str(id)?;
        out.write_char('"')
    } else {
        write!(out, "{id:?}")
    }
}

/// The outcome of authorizing one request. The names are the `decision` label values of
/// `portcullis_decisions_total` and the `decision` field of audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Allow,
    Deny,
    /// Shadow mode: the policies deny, the request is forwarded anyway and recorded.
    ShadowDeny,
    /// A permit marked `@approval("required")` applied, and no approval was presented.
    ApprovalRequired,
    /// A permit marked `@approval("required")` applied, and a valid grant for exactly this
    /// call was presented: forwarded once.
    Approved,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::ShadowDeny => "shadow_deny",
            Decision::ApprovalRequired => "approval_required",
            Decision::Approved => "approved",
        }
    }

    /// Whether the request may reach the upstream.
    pub fn forwards(self) -> bool {
        match self {
            Decision::Allow | Decision::ShadowDeny | Decision::Approved => true,
            Decision::Deny | Decision::ApprovalRequired => false,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The verified claims of the user an agent acts for. Only a token verifier constructs
/// these; everything downstream may trust them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserClaims {
    /// `sub`: the Cedar id of `User::"<sub>"`.
    pub subject: String,
    /// `iss`.
    pub issuer: String,
    /// `scope` (space-separated) or `scp` (array), as a set.
    pub scopes: Vec<String>,
    pub email: Option<String>,
    /// From the configured groups claim; each becomes a parent `Group::"<g>"`.
    pub groups: Vec<String>,
    /// RFC 8693 actor chain, outermost (the caller) first.
    pub actor_chain: Vec<String>,
    /// `exp`, unix seconds.
    pub expires_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A method's recorded name is the method as sent: a constant for those policies decide,
    /// a copy for the rest.
    #[test]
    fn a_method_name_is_the_method_as_sent() {
        for method in ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"] {
            let name = method_name(method);
            assert!(matches!(name, Cow::Borrowed(_)), "{method}");
            assert_eq!(name, method);
        }
        for method in ["TRACE", "CONNECT", "get", "PROPFIND"] {
            let name = method_name(method);
            assert!(matches!(name, Cow::Owned(_)), "{method}");
            assert_eq!(name, method);
        }
    }

    #[test]
    fn an_entity_is_written_as_debug_quotes_its_id() {
        let ids = [
            "/api/orders",
            "",
            "refund",
            "it's",
            "a \"b\"",
            "back\\slash",
            "line\nbreak",
            "\t\u{0}\u{7f}",
            "é模型🦀",
            "\u{301}combining",
            "\u{200b}zero width",
        ];
        for id in ids {
            assert_eq!(entity_text("Tool", id), format!("Tool::{id:?}"));
            assert_eq!(
                Resource::Model(id.to_owned()).to_string(),
                format!("Model::{id:?}")
            );
        }
    }
}
