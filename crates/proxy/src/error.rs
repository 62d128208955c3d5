//! Every way the data plane refuses or fails a request, mapped to an HTTP status and a
//! bounded reason label by exhaustive matches: a new variant does not compile until someone
//! decides both. Internal detail (policy text, upstream errors) never reaches the caller; it
//! goes to the audit record and the operational log.

use http::StatusCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// HTTP/1 request target in absolute form (`GET http://host/ HTTP/1.1`).
    AbsoluteFormTarget,
    /// HTTP/1.1 request without `Host`, or an HTTP/2 request without `:authority`.
    MissingHost,
    /// More than one `Host` header, or a `Host` and an `:authority` naming different hosts.
    DuplicateHost,
    /// A `Host` or `:authority` with userinfo (`user@host`): the host a policy would decide on
    /// (after the `@`) is not the one every application reads from the field.
    InvalidHost,
    /// A path the application might normalise differently from the policy (dot segments,
    /// encoded slashes); see `classify::check_path`.
    AmbiguousPath,
    /// A method no Cedar action names (TRACE, CONNECT, extension methods).
    UnsupportedMethod,
    /// A user token was present and failed verification (its reason label inside). A token
    /// that is present and invalid always rejects, whatever the policies say.
    InvalidUserToken(&'static str),
    /// A long-lived credential (`Authorization` that is not the user token, `x-api-key`) with
    /// `reject_standing_credentials: true`.
    StandingCredential,
    /// A protocol route's body is not valid JSON (or repeats an object key).
    MalformedBody,
    /// A protocol route's body is JSON but not a valid message of the protocol (no `model`,
    /// not JSON-RPC 2.0, a `tools/call` without a tool name, a field of the wrong type).
    InvalidMessage,
    /// A protocol route's body is larger than its inspection limit (`body_limit`).
    BodyTooLarge,
    /// A protocol route's body is not declared `application/json`.
    UnsupportedMediaType,
    /// A protocol route's body failed or stalled while it was read for inspection.
    BodyUnreadable,
    /// The policies deny.
    PolicyDenied,
    /// A permit marked `@approval("required")` applied.
    ApprovalRequired,
    /// The audit sink cannot take the record: fail closed rather than serve unaudited.
    AuditUnavailable,
    /// The upstream refused or reset the connection.
    UpstreamConnect,
    /// The upstream did not answer within the request timeout.
    UpstreamTimeout,
    /// The upstream answered with something that cannot be relayed (e.g. `101`).
    UpstreamProtocol,
    /// The calling agent has `limits.max_inflight_per_agent` requests in flight already.
    AgentBusy,
    /// `limits.max_inflight` requests are in flight, all agents together.
    Overloaded,
    /// Buffering this body for inspection would pass `limits.inspect_memory_bytes`.
    InspectionBudget,
    /// A request body arrived too slowly: an inspected one not complete within
    /// `limits.inspect_timeout`, or a forwarded one silent for longer than
    /// `limits.body_timeout` before the upstream answered.
    BodyDeadline,
    /// A JSON-RPC batch of more than `limits.max_batch` messages.
    BatchTooLarge,
    /// An HTTP/2 request whose header list (RFC 9113 §6.5.2) is over
    /// `limits.max_header_bytes`. (An HTTP/1.1 head over it gets hyper's 431 before any
    /// request exists.)
    HeadTooLarge,
    /// MCP `Mcp-Method` / `Mcp-Name` headers that disagree with the body, or are missing
    /// where `MCP-Protocol-Version: 2026-07-28` requires them: an intermediary routing by
    /// the header and the server acting on the body would see two different requests.
    HeaderMismatch,
    /// An MCP request carrying an `Mcp-Session-Id` that was not issued to the calling agent
    /// (see `sessions`): 404, as the transport answers an unknown session.
    ForeignSession,
    /// An inference request whose path (`/openai/deployments/<model>/…`) and body name
    /// different models.
    ModelMismatch,
    /// An approval grant (`x-portcullis-approval`) was present and failed verification (its
    /// reason label inside): signature, issuer, `aud`, lifetime, expiry, claims.
    InvalidApproval(&'static str),
    /// A valid grant whose `jti` was already used: a grant approves one call, once.
    ApprovalReplayed,
    /// Over a `limits.rate` bucket; seconds until a token is back inside.
    RateLimited(u32),
    /// The route's upstream credential could not be had (key file unreadable, token
    /// service unreachable or refusing): nothing is forwarded without it.
    CredentialUnavailable,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::AbsoluteFormTarget
            | Refusal::MissingHost
            | Refusal::DuplicateHost
            | Refusal::InvalidHost
            | Refusal::AmbiguousPath
            | Refusal::MalformedBody
            | Refusal::InvalidMessage
            | Refusal::HeaderMismatch
            | Refusal::ModelMismatch
            | Refusal::BodyUnreadable => StatusCode::BAD_REQUEST,
            Refusal::BodyTooLarge | Refusal::BatchTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::BodyDeadline => StatusCode::REQUEST_TIMEOUT,
            Refusal::AgentBusy => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Overloaded | Refusal::InspectionBudget => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::UnsupportedMethod => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::ForeignSession => StatusCode::NOT_FOUND,
            Refusal::InvalidUserToken(_)
            | Refusal::StandingCredential
            | Refusal::InvalidApproval(_)
            | Refusal::ApprovalReplayed => StatusCode::UNAUTHORIZED,
            Refusal::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::CredentialUnavailable => StatusCode::BAD_GATEWAY,
            Refusal::PolicyDenied => StatusCode::FORBIDDEN,
            Refusal::ApprovalRequired => StatusCode::PRECONDITION_REQUIRED,
            Refusal::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamConnect | Refusal::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Machine-readable, stable, and safe to show the caller.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::AbsoluteFormTarget => "absolute_form_target",
            Refusal::MissingHost => "missing_host",
            Refusal::DuplicateHost => "duplicate_host",
            Refusal::InvalidHost => "invalid_host",
            Refusal::AmbiguousPath => "ambiguous_path",
            Refusal::UnsupportedMethod => "unsupported_method",
            Refusal::InvalidUserToken(_) => "invalid_user_token",
            Refusal::StandingCredential => "standing_credential",
            Refusal::MalformedBody => "malformed_body",
            Refusal::InvalidMessage => "invalid_message",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::UnsupportedMediaType => "unsupported_media_type",
            Refusal::BodyUnreadable => "body_unreadable",
            Refusal::PolicyDenied => "policy_denied",
            Refusal::ApprovalRequired => "approval_required",
            Refusal::AuditUnavailable => "audit_unavailable",
            Refusal::UpstreamConnect => "upstream_unavailable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::UpstreamProtocol => "upstream_protocol_error",
            Refusal::AgentBusy => "agent_inflight_limit",
            Refusal::Overloaded => "inflight_limit",
            Refusal::InspectionBudget => "inspect_memory_limit",
            Refusal::BodyDeadline => "body_deadline",
            Refusal::BatchTooLarge => "batch_too_large",
            Refusal::HeadTooLarge => "header_too_large",
            Refusal::HeaderMismatch => "mcp_header_mismatch",
            Refusal::ModelMismatch => "model_mismatch",
            Refusal::ForeignSession => "session_not_found",
            Refusal::InvalidApproval(_) => "invalid_approval",
            Refusal::ApprovalReplayed => "approval_replayed",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::CredentialUnavailable => "credential_unavailable",
        }
    }

    /// A finer reason the caller may see (the token rejection reason), if any.
    pub fn detail(self) -> Option<&'static str> {
        match self {
            Refusal::InvalidUserToken(reason) | Refusal::InvalidApproval(reason) => Some(reason),
            Refusal::AbsoluteFormTarget
            | Refusal::MissingHost
            | Refusal::DuplicateHost
            | Refusal::InvalidHost
            | Refusal::AmbiguousPath
            | Refusal::UnsupportedMethod
            | Refusal::StandingCredential
            | Refusal::MalformedBody
            | Refusal::InvalidMessage
            | Refusal::BodyTooLarge
            | Refusal::UnsupportedMediaType
            | Refusal::BodyUnreadable
            | Refusal::PolicyDenied
            | Refusal::ApprovalRequired
            | Refusal::AuditUnavailable
            | Refusal::UpstreamConnect
            | Refusal::UpstreamTimeout
            | Refusal::UpstreamProtocol
            | Refusal::AgentBusy
            | Refusal::Overloaded
            | Refusal::InspectionBudget
            | Refusal::BodyDeadline
            | Refusal::BatchTooLarge
            | Refusal::HeadTooLarge => None,
            Refusal::HeaderMismatch | Refusal::ModelMismatch | Refusal::ForeignSession => None,
            Refusal::ApprovalReplayed
            | Refusal::RateLimited(_)
            | Refusal::CredentialUnavailable => None,
        }
    }

    /// Whether the failure is the upstream's (counted in `portcullis_upstream_errors_total`)
    /// rather than a refusal of the request (`portcullis_request_rejections_total`).
    pub fn is_upstream(self) -> bool {
        match self {
            Refusal::UpstreamConnect
            | Refusal::UpstreamTimeout
            | Refusal::UpstreamProtocol
            | Refusal::CredentialUnavailable => true,
            Refusal::AbsoluteFormTarget
            | Refusal::MissingHost
            | Refusal::DuplicateHost
            | Refusal::InvalidHost
            | Refusal::AmbiguousPath
            | Refusal::UnsupportedMethod
            | Refusal::InvalidUserToken(_)
            | Refusal::StandingCredential
            | Refusal::MalformedBody
            | Refusal::InvalidMessage
            | Refusal::BodyTooLarge
            | Refusal::UnsupportedMediaType
            | Refusal::BodyUnreadable
            | Refusal::PolicyDenied
            | Refusal::ApprovalRequired
            | Refusal::AuditUnavailable
            | Refusal::AgentBusy
            | Refusal::Overloaded
            | Refusal::InspectionBudget
            | Refusal::BodyDeadline
            | Refusal::BatchTooLarge
            | Refusal::HeadTooLarge => false,
            Refusal::HeaderMismatch | Refusal::ModelMismatch | Refusal::ForeignSession => false,
            Refusal::InvalidApproval(_) | Refusal::ApprovalReplayed | Refusal::RateLimited(_) => {
                false
            }
        }
    }

    /// Seconds for `retry-after` (RFC 9110 §10.2.3) when trying again later can succeed: a
    /// capacity refusal clears as other requests finish, a failed audit sink may recover.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            Refusal::AgentBusy | Refusal::Overloaded | Refusal::InspectionBudget => Some(1),
            Refusal::AuditUnavailable => Some(5),
            Refusal::RateLimited(seconds) => Some(seconds.max(1)),
            Refusal::AbsoluteFormTarget
            | Refusal::MissingHost
            | Refusal::DuplicateHost
            | Refusal::InvalidHost
            | Refusal::AmbiguousPath
            | Refusal::UnsupportedMethod
            | Refusal::InvalidUserToken(_)
            | Refusal::StandingCredential
            | Refusal::MalformedBody
            | Refusal::InvalidMessage
            | Refusal::BodyTooLarge
            | Refusal::UnsupportedMediaType
            | Refusal::BodyUnreadable
            | Refusal::PolicyDenied
            | Refusal::ApprovalRequired
            | Refusal::UpstreamConnect
            | Refusal::UpstreamTimeout
            | Refusal::UpstreamProtocol
            | Refusal::BodyDeadline
            | Refusal::BatchTooLarge
            | Refusal::HeadTooLarge => None,
            Refusal::HeaderMismatch | Refusal::ModelMismatch | Refusal::ForeignSession => None,
            Refusal::InvalidApproval(_)
            | Refusal::ApprovalReplayed
            | Refusal::CredentialUnavailable => None,
        }
    }
}
