//! The per-request pipeline, in the order it runs. Identity was established once for the
//! connection (see `server`); everything here runs for every request.
//!
//! 1. audit admission: before any work, so a sink that is behind pushes back and a failed
//!    one fails closed, and every later outcome has a record; it reserves nothing, so a slow
//!    request holds no audit capacity; then admit: a place among the requests in flight, per
//!    agent and in total, held until the response body ends; over a cap the request is
//!    refused at once (429 / 503), audited
//! 2. check framing: Host and request-target rules (RFC 9112 §3.2) and path ambiguity, before
//!    classification reads them
//! 3. classify: route → Cedar action + resource; on protocol routes (`openai`, `mcp`) the
//!    body is read (bounded in size, in time and by the shared inspection budget) and
//!    parsed into one Cedar call per message, at most `limits.max_batch` (`protocol`)
//!    (`limits.rate`: the agent's bucket is taken first of all, the user's once the token
//!    verified; see `rate`); a `tools/call` gets the annotations the route's last filtered
//!    listing gave its tool
//! 4. authorize: Cedar, every call; yields a `Permit` only when the request may pass; a call
//!    permitted subject to approval passes only with a grant for exactly it (`approval`),
//!    else 428 with its challenge; then the tool's rate bucket, for permitted tool calls
//! 5. rewrite headers: strip hop-by-hop and caller identity, then set ours
//!    and, last, the route's upstream credential (`credential`: a key file, or an RFC 8693
//!    token exchange; failure is 502 and nothing is forwarded)
//! 6. forward: needs the `Permit`; streams both ways
//! 7. filter: MCP `tools/list` results list only the tools the caller may call, and the
//!    listed tools' annotations are remembered for the route (`protocol::annotations`)
//! 8. audit: written when the response body ends or is dropped

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use portcullis_core::{Decision, SpiffeId};
use portcullis_identity::user_token::TokenMemo;
use portcullis_policy::{AuthzInput, Evaluation, RequestInfo};

use crate::admission::AgentSlot;
use crate::agents::KnownAgent;
use crate::audit::{
    ActorChain, AuditCall, AuditGuard, AuditInput, AuditPolicies, AuditRecord, AuditResource,
    AuditUser, SharedText,
};
use crate::body::{Audited, Forwarded, RequestBody, ResponseBody, Stall, StallTimeout};
use crate::classify::{Protocol, check_path, classify};
use crate::credential;
use crate::error::Refusal;
use crate::headers::{
    AGENT_HEADER, REQUEST_ID_HEADER, TRACEPARENT_HEADER, USER_HEADER, remove_caller_supplied,
    remove_hop_by_hop, set_forwarding, user_header_value,
};
use crate::protocol::{self, Native};
use crate::rate::{self, RatePer};
use crate::sessions::Sessions;
use crate::{Shared, UserTokens};

/// What the connection established once: who is calling, from where.
#[derive(Debug)]
pub(crate) struct ConnectionIdentity {
    pub agent: SpiffeId,
    /// The agent's SPIFFE ID as its requests' audit records and in-flight counts share it.
    agent_text: Arc<str>,
    /// The peer's IP as text, formatted once per connection rather than per request, and
    /// shared by its requests' audit records.
    pub client_address: Arc<str>,
    /// What the agent's connections share: its Cedar entity, `context.agent` and recent
    /// questions' entities (rebuilt after a policy reload), its decision counters, its header.
    pub known: Arc<KnownAgent>,
    /// The peer's IP as the `x-forwarded-for` the upstream receives.
    forwarded_for: Option<HeaderValue>,
    /// The host the last request named, by the bytes it was named with.
    last_host: HostCache,
    /// The user token the last request presented, verified: the next request's is matched
    /// against it by its bytes before the verifier hashes it for its cache.
    last_user_token: TokenMemo,
    /// Where the agent's requests in flight are counted, shared with its other connections.
    inflight: Arc<AgentSlot>,
}

impl ConnectionIdentity {
    /// This connection's place among its agent's (`limits.max_connections_per_agent`).
    pub(crate) fn connection_place(&self) -> Option<crate::admission::ConnectionPlace> {
        self.inflight.connect()
    }

    pub(crate) fn new(agent: SpiffeId, peer: SocketAddr, shared: &Shared) -> Self {
        let client_address: Arc<str> = peer.ip().to_string().into();
        let agent_text: Arc<str> = agent.as_str().into();
        Self {
            inflight: shared.inflight.slot(&agent_text),
            known: shared.agents.get(&agent, &shared.metrics, &shared.policy),
            forwarded_for: HeaderValue::from_str(&client_address).ok(),
            client_address,
            agent_text,
            agent,
            last_host: HostCache::default(),
            last_user_token: TokenMemo::default(),
        }
    }
}

/// A connection's last request host, kept for the next: a connection's requests nearly
/// always name the same host, and working it out (the `Host` field parsed as an authority,
/// its host copied out, lower-cased, shared) took three allocations per request. One entry,
/// replaced when a request names another host: its size does not depend on the caller.
#[derive(Debug, Default)]
struct HostCache(std::sync::Mutex<Option<LastHost>>);

#[derive(Debug)]
struct LastHost {
    place: NamedBy,
    key: Box<[u8]>,
    host: Arc<str>,
}

/// Where a request named its host: the same bytes mean the same host only from the same
/// place (a `Host` field is parsed as an authority, an HTTP/2 `:authority`'s host is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NamedBy {
    Authority,
    HostField,
}

impl HostCache {
    /// The host named by `key` in `place`, from `make` unless the last request named it
    /// with the same bytes in the same place. `make`'s refusals are not kept.
    fn get_or(
        &self,
        place: NamedBy,
        key: &[u8],
        make: impl FnOnce() -> Result<Arc<str>, Refusal>,
    ) -> Result<Arc<str>, Refusal> {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(kept) = last.as_ref()
            && kept.place == place
            && *kept.key == *key
        {
            return Ok(kept.host.clone());
        }
        let host = make()?;
        *last = Some(LastHost {
            place,
            key: key.into(),
            host: host.clone(),
        });
        Ok(host)
    }
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnectionIdentity>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // Every random id of the request from one draw (see `RequestRandomness`).
    let (id, trace) = request_ids(request.headers(), &RequestRandomness::draw());
    let request_id = id.as_str();
    let Ok(()) = shared.audit.admit().await else {
        shared
            .metrics
            .request_rejections
            .with_label_values(&[Refusal::AuditUnavailable.reason()])
            .inc();
        tracing::error!(%request_id, "refusing request: audit sink unavailable");
        return Ok(refusal_response(Refusal::AuditUnavailable, &id));
    };
    // Boxed as it is made (see `RecordBox`): the box is allocated first, so that the record
    // can be built in it (`Box::new` would build it on the stack and copy it in).
    let record = Box::write(
        Box::new_uninit(),
        AuditRecord {
            request_id: SharedText::shared(id.text_shared.clone()),
            trace_id: Some(trace.trace_id()),
            client_address: conn.client_address.clone(),
            agent: Some(conn.agent_text.clone()),
            method: portcullis_core::method_name(request.method().as_str()),
            path: request.uri().path().into(),
            mode: shared.policy.mode().name(),
            ..AuditRecord::default()
        },
    );
    let mut audit = AuditGuard::new(shared.audit.clone(), shared.inventory.clone(), record);
    let mut answer = RefusalForm::default();

    // Stage 1b: a place among the requests in flight. Taken before anything is read or
    // decided, so an agent over its cap costs the others nothing but this check.
    let outcome = match conn.inflight.admit() {
        Ok(permit) => authorize_and_forward(
            &shared,
            &conn,
            request,
            &id,
            &trace,
            &mut audit,
            &mut answer,
        )
        .await
        .map(|response| (response, permit)),
        Err(refusal) => Err(refusal),
    };
    match outcome {
        Ok((response, permit)) => {
            audit.record.status = response.status().as_u16();
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            set_request_id(&mut parts.headers, &id);
            let body =
                StallTimeout::new(body, shared.limits.response_body_timeout, Stall::Response);
            let body = Audited::new(body, audit, permit);
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        Err(refusal) => {
            let metric = if refusal.is_upstream() {
                &shared.metrics.upstream_errors
            } else {
                &shared.metrics.request_rejections
            };
            metric.with_label_values(&[refusal.reason()]).inc();
            audit.record.status = refusal.status().as_u16();
            audit.record.reason = Some(refusal.reason());
            audit.record.completed = true;
            drop(audit);
            Ok(match (&answer.native, &answer.challenge) {
                (_, Some(challenge)) if refusal == Refusal::ApprovalRequired => {
                    let mut response = crate::approval::challenge_response(challenge, request_id);
                    set_request_id(response.headers_mut(), &id);
                    response
                }
                // A refusal before the body was looked at is not in the protocol's terms yet.
                (Some(native), _) => {
                    let mut response = protocol::native_refusal(native, refusal, request_id);
                    set_request_id(response.headers_mut(), &id);
                    response
                }
                (None, _) => refusal_response(refusal, &id),
            })
        }
    }
}

/// What a refusal is answered with besides its status and reason, learnt on the way.
#[derive(Debug, Default)]
struct RefusalForm {
    /// The protocol's own error shape, once the body was looked at.
    native: Option<Native>,
    /// The challenge of a call that needs approval (the 428 body).
    challenge: Option<crate::approval::Challenge>,
}

async fn authorize_and_forward(
    shared: &Shared,
    conn: &ConnectionIdentity,
    request: Request<Incoming>,
    id: &RequestId,
    trace: &Traceparent,
    audit: &mut AuditGuard,
    answer: &mut RefusalForm,
) -> Result<Response<Forwarded>, Refusal> {
    check_head_size(&request, shared.limits.max_header_bytes)?;
    rate::step(shared, RatePer::Agent, conn.agent.as_str(), audit)?;
    let host = check_framing(&request, &conn.last_host)?;
    // Kept past the request's hand-over to the forwarder: a `Uri` and a standard `Method`
    // clone without copying.
    let (uri, method) = (request.uri().clone(), request.method().clone());
    let (path, method) = (uri.path(), method.as_str());
    check_path(path)?;

    let classified = classify(
        &shared.routes,
        audit.record.method.clone(),
        &audit.record.path,
        &host,
    )?;
    let user = match &shared.user_token {
        None => None,
        Some(tokens) => verify_user(shared, tokens, conn, request.headers(), audit).await?,
    };
    if let Some(user) = &user {
        rate::step(shared, RatePer::User, &user.subject, audit)?;
    }
    let token_header = shared.user_token.as_ref().map(|t| &t.header);
    let standing = standing_credentials(request.headers(), token_header);
    // A copy for the record (no allocation when there are none): what is removed below
    // must not depend on what the audit record holds.
    audit.record.standing_credentials = standing.clone();
    for header in &standing {
        shared
            .metrics
            .standing_credentials
            .with_label_values(&[header])
            .inc();
    }
    if shared.reject_standing_credentials && !standing.is_empty() {
        return Err(Refusal::StandingCredential);
    }
    let session = mcp_session(shared, conn, &classified, request.headers())?;
    let (mut parts, body) = request.into_parts();
    // A body that has ended already (most GETs) has nothing to time, and its stand-in is
    // a type of no size, which boxes without an allocation.
    let waiting = !http_body::Body::is_end_stream(&body);
    let body: RequestBody = if waiting {
        StallTimeout::new(body, shared.limits.body_timeout, Stall::Request).boxed_unsync()
    } else {
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync()
    };
    let bounds = protocol::Bounds {
        limit: classified
            .body_limit
            .unwrap_or(shared.limits.body_prefix_bytes),
        budget: &shared.inspect_budget,
        deadline: shared.limits.inspect_timeout,
        max_batch: shared.limits.max_batch,
    };
    // Waiting for the caller's body is not decision time. Without one to wait for, the clock
    // is not read for it: it is read about a dozen times a request, at ~20 ns a read.
    let inspect_started = waiting.then(Instant::now);
    let (route, route_protocol) = (classified.route, classified.protocol);
    let forward_user_token = classified.forward_user_token;
    let mut inspected = protocol::inspect(
        classified,
        method,
        path,
        &parts.headers,
        body,
        &bounds,
        &mut answer.native,
    )
    .await?;
    // Policy's `now` (Unix seconds) is the request's arrival, or the second its body came.
    let (body_wait, now) = match inspect_started {
        Some(at) => (at.elapsed(), unix_seconds(SystemTime::now())),
        None => (Duration::ZERO, unix_seconds(audit.arrived())),
    };
    if let Some(route) = route {
        annotate_tool_calls(shared, route, &mut inspected.calls);
    }
    let request_info = RequestInfo {
        method,
        path,
        host: &host,
        client_address: &conn.client_address,
    };
    // Every call must be allowed: a JSON-RPC batch is denied whole if any message is. Every
    // message of a batch is decided (and recorded in `calls`) even after one is denied, so
    // the audit record shows the whole batch; the top-level fields are the first refused
    // message's, or the last message's when all are allowed.
    let batch = inspected.calls.len() > 1;
    let mut permit = None;
    let mut refused = None;
    let mut scopes = portcullis_policy::GrantedScopes::Unrestricted;
    // Out of `inspected` while its calls are decided: a generic route's body is read whole
    // only when a call needs approval (see below), and put back after.
    let mut body = std::mem::replace(
        &mut inspected.body,
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    // What the body says, for an approval digest: computed once, when first needed.
    let mut content: Option<Option<String>> = None;
    // A grant accepted for a call of this request, spent last before forwarding.
    let mut granted = None;
    for call in &inspected.calls {
        let resource = AuditResource {
            kind: call.resource.entity_type(),
            id: call.resource.shared_id(),
        };
        let input = AuthzInput {
            agent: &conn.agent,
            user: user.as_deref(),
            action: call.action,
            resource: &call.resource,
            request: request_info,
            protocol_context: call.context.clone(),
            now,
        };
        let mut evaluation = shared
            .policy
            .evaluate_prepared(&conn.known.prepared, &input);
        let approval = match evaluation.decision {
            Decision::ApprovalRequired => {
                if content.is_none() {
                    content = Some(match (&inspected.message, route_protocol) {
                        (Some(message), _) => crate::approval::message_content(message),
                        // An MCP message's tool arguments are protocol fields already.
                        (None, Protocol::Mcp) => None,
                        // A generic route's body streams to the upstream unread, unless a
                        // call needs approval: then the grant must be for these bytes, so
                        // they are read first, within the route's inspection bounds.
                        (None, _) => {
                            let (bytes, replay) =
                                protocol::read_whole(&parts.headers, body, &bounds).await?;
                            body = replay;
                            Some(crate::approval::bytes_content(&bytes))
                        }
                    });
                }
                let exactly = crate::approval::Exactly {
                    query: parts.uri.query(),
                    content: content.as_ref().and_then(Option::as_deref),
                };
                crate::approval::step(
                    shared,
                    &input,
                    exactly,
                    &mut evaluation,
                    &parts.headers,
                    audit,
                    &mut answer.challenge,
                )
                .await
                .map(|grant| granted = grant.or(granted.take()))
            }
            Decision::Allow | Decision::Deny | Decision::ShadowDeny | Decision::Approved => Ok(()),
        };
        // From the request's start (its checks, classification and user token included) to
        // this call's decision, less the wait for the body.
        let decision_time = audit.started().elapsed().saturating_sub(body_wait);
        shared
            .metrics
            .decision_duration
            .observe(decision_time.as_secs_f64());
        shared
            .metrics
            .observe_decision(evaluation.decision, call.action);
        conn.known.decisions.observe(evaluation.decision);
        // After the enforced decision is timed: the candidate set costs the caller nothing
        // it would not also cost without one, and never changes what happens next. Every
        // message of a batch counts in the disagreement metric.
        let shadow = shared.shadow_policy.as_ref().map(|shadow| {
            Box::new(crate::shadow::decide(
                shadow,
                &input,
                evaluation.decision,
                &shared.metrics,
            ))
        });
        if batch {
            let asked = AuditInput::new(&input, user.as_ref(), &host);
            let question =
                audit
                    .record
                    .question_about(&asked, Some(call.action.name()), Some(&resource));
            audit.record.calls.push(AuditCall {
                action: call.action.name(),
                resource: resource.clone(),
                decision: evaluation.decision.name(),
                policies: AuditPolicies {
                    agent: evaluation.agent.determining.clone(),
                    user: evaluation.user.as_ref().map(|u| u.determining.clone()),
                },
                input: Some(Box::new(question)),
            });
        }
        if refused.is_none() {
            audit.record.action = Some(call.action.name());
            audit.record.resource = Some(resource);
            record_evaluation(audit, &mut evaluation, decision_time.as_micros());
            audit.record.input = Some(AuditInput::new(&input, user.as_ref(), &host));
            audit.record.shadow = shadow;
        } else {
            // The first refusal's record stands; later messages add only their errors.
            audit
                .record
                .errors
                .extend(evaluation.agent.errors.iter().cloned());
            if let Some(user) = &evaluation.user {
                audit.record.errors.extend(user.errors.iter().cloned());
            }
        }
        tracing::debug!(
            request_id = id.as_str(),
            agent = %conn.agent,
            action = call.action.name(),
            resource = %call.resource,
            decision = evaluation.decision.name(),
            "decided"
        );
        if let Err(refusal) = approval {
            refused.get_or_insert(refusal);
            continue;
        }
        match (evaluation.decision, evaluation.take_permit()) {
            (_, Some(granted)) => {
                scopes = scopes.and(&evaluation.scopes);
                permit = Some(granted);
            }
            (Decision::ApprovalRequired, None) => {
                refused.get_or_insert(Refusal::ApprovalRequired);
            }
            (_, None) => {
                refused.get_or_insert(Refusal::PolicyDenied);
            }
        }
    }
    inspected.body = body;
    // The model call's bytes were kept for an approval digest only: the body replaying them
    // holds the inspection budget's reservation, and this copy must not outlive it.
    inspected.message = None;
    if let Some(refusal) = refused {
        return Err(refusal);
    }
    // `inspect` yields at least one call; none would be a bug, and it denies.
    let permit = permit.ok_or(Refusal::PolicyDenied)?;
    for call in &inspected.calls {
        if call.action == portcullis_core::Action::CallTool {
            rate::step(shared, RatePer::Tool, call.resource.id(), audit)?;
        }
    }

    // The user's token as presented, kept for a token exchange before the rewrite drops it.
    let subject_token = credential::subject_token(shared, route, &parts.headers);
    remove_hop_by_hop(&mut parts.headers);
    // The verified token survives identity stripping when the route forwards it, whatever
    // its header is called (the default `x-portcullis-user-token` is an identity name).
    let forwarded_token = match &shared.user_token {
        Some(tokens) if forward_user_token && user.is_some() => parts
            .headers
            .get(&tokens.header)
            .cloned()
            .map(|value| (tokens.header.clone(), value)),
        _ => None,
    };
    // With the token header's other spellings (`x_user_jwt` for `x-user-jwt`): not verified,
    // and an application reading `_` as `-` would take one for the verified token (captured
    // above when the route forwards it).
    let token_header = shared
        .user_token
        .as_ref()
        .map(|t| crate::headers::folded(&t.header));
    remove_caller_supplied(&mut parts.headers, token_header.as_deref());
    // Long-lived credentials never reach the application (flagged above: every one present
    // but the user-token header, which is handled next), under any spelling flagged.
    if !standing.is_empty() {
        crate::headers::remove_where(&mut parts.headers, |name| {
            standing
                .iter()
                .any(|standing| crate::headers::folds_to(name, standing))
        });
    }
    if let Some(tokens) = &shared.user_token {
        parts.headers.remove(&tokens.header);
    }
    if let Some((name, value)) = forwarded_token {
        parts.headers.insert(name, value);
    }
    if let Some(user) = &user {
        parts
            .headers
            .insert(USER_HEADER, user_header_value(&user.subject));
    }
    if let Some(peer) = &conn.forwarded_for {
        set_forwarding(&mut parts.headers, peer);
    }
    if parts.version == Version::HTTP_2 && parts.uri.authority().is_some() {
        // HTTP/2 carries the host in :authority; the HTTP/1.1 upstream needs a Host header.
        if let Ok(value) = HeaderValue::from_str(&host_with_port(&parts)) {
            parts.headers.insert(header::HOST, value);
        }
    }
    if let Some(agent) = &conn.known.header {
        parts.headers.insert(AGENT_HEADER, agent.clone());
    }
    set_request_id(&mut parts.headers, id);
    parts
        .headers
        .insert(TRACEPARENT_HEADER, trace.header.clone());
    if inspected.listing.is_some() {
        // The filter reads plaintext only: ask for it rather than meet a compressed listing.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    // Last before forwarding: the upstream credential replaces whatever the caller sent.
    credential::step(
        shared,
        route,
        credential::Subject {
            agent: conn.agent.as_str(),
            user: user.as_deref().zip(subject_token.as_deref()),
            scopes: &scopes,
        },
        &mut parts.headers,
        audit,
    )
    .await?;
    if let Some(grant) = &granted
        && let Err(refusal) = shared.approvals.spend(grant, now, &mut audit.record.errors)
    {
        let result = match refusal {
            Refusal::ApprovalReplayed => "replayed",
            _ => "invalid",
        };
        shared
            .metrics
            .approval_grants
            .with_label_values(&[result])
            .inc();
        return Err(refusal);
    }
    let response = match shared
        .forwarder
        .forward(Request::from_parts(parts, inspected.body), permit)
        .await
    {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(
                request_id = id.as_str(),
                error = %error.detail,
                "upstream request failed"
            );
            audit.record.errors.push(error.detail);
            return Err(error.refusal);
        }
    };
    if route_protocol == Protocol::Mcp {
        match &session {
            None => shared
                .sessions
                .issued(response.headers(), conn.agent.as_str()),
            Some(id) if method == "DELETE" && response.status().is_success() => {
                shared.sessions.ended(id);
            }
            Some(_) => {}
        }
    }
    let Some(listed) = inspected.listing else {
        return Ok(response.map(Either::Left));
    };
    let filter = tool_filter(shared, conn, user, (method, path, &host), listed, route);
    let response = response.map(|body| {
        body.map_err(|e| -> crate::body::BoxError { Box::new(e) })
            .boxed_unsync()
    });
    let filtered = filter
        .apply(
            response,
            shared.inspect_budget.reservation(),
            shared.limits.inspect_timeout,
        )
        .await;
    match filtered {
        Ok(filtered) => Ok(filtered.map(Either::Right)),
        Err(error) => {
            tracing::warn!(
                request_id = id.as_str(),
                %error,
                "tools/list response could not be filtered"
            );
            audit.record.errors.push(error.to_string());
            Err(match error {
                protocol::filter::Unreadable::Budget => Refusal::InspectionBudget,
                protocol::filter::Unreadable::Deadline => Refusal::UpstreamTimeout,
                _ => Refusal::UpstreamProtocol,
            })
        }
    }
}

/// Gives each `tools/call` the annotations the server last listed for its tool on this
/// route (`context.tool.annotations`; absent when it never listed any).
fn annotate_tool_calls(shared: &Shared, route: usize, calls: &mut [protocol::Call]) {
    for call in calls {
        if let (portcullis_core::Action::CallTool, portcullis_core::Resource::Tool(tool)) =
            (call.action, &call.resource)
            && let Some(hints) = shared.tool_annotations.get(route, tool)
        {
            protocol::mcp::annotate(call, hints);
        }
    }
}

/// On an MCP route, the session id the request carries, which must have been issued to
/// this agent (see `sessions`); 404 otherwise.
fn mcp_session(
    shared: &Shared,
    conn: &ConnectionIdentity,
    classified: &crate::classify::Classified,
    headers: &http::HeaderMap,
) -> Result<Option<String>, Refusal> {
    if classified.protocol != Protocol::Mcp {
        return Ok(None);
    }
    let session = Sessions::requested(headers).map_err(|_| Refusal::ForeignSession)?;
    if let Some(id) = &session {
        shared
            .sessions
            .check(id, conn.agent.as_str())
            .map_err(|_| Refusal::ForeignSession)?;
    }
    Ok(session)
}

/// The question asked for each tool of a `tools/list` result: may these principals call it?
fn tool_filter(
    shared: &Shared,
    conn: &ConnectionIdentity,
    user: Option<Arc<portcullis_core::UserClaims>>,
    (method, path, host): (&str, &str, &str),
    listed: protocol::filter::Listed,
    route: Option<usize>,
) -> protocol::filter::ToolFilter {
    let policy = shared.policy.clone();
    let agent = conn.agent.clone();
    let known = conn.known.clone();
    let (method, path, host) = (method.to_owned(), path.to_owned(), host.to_owned());
    let client_address = conn.client_address.clone();
    protocol::filter::ToolFilter::new(
        listed,
        Box::new(move |tool, hints| {
            let call = protocol::mcp::listing_call(tool, hints);
            let evaluation = policy.evaluate_prepared(
                &known.prepared,
                &AuthzInput {
                    agent: &agent,
                    user: user.as_deref(),
                    action: call.action,
                    resource: &call.resource,
                    request: RequestInfo {
                        method: &method,
                        path: &path,
                        host: &host,
                        client_address: &client_address,
                    },
                    protocol_context: call.context,
                    now: unix_seconds(SystemTime::now()),
                },
            );
            // Listed when a call could go through: allowed, shadow-denied (shadow mode never
            // changes what the caller sees), or allowed subject to approval.
            match evaluation.decision {
                Decision::Allow
                | Decision::ShadowDeny
                | Decision::ApprovalRequired
                | Decision::Approved => true,
                Decision::Deny => false,
            }
        }),
        route.map(|route| (shared.tool_annotations.clone(), route)),
    )
}

/// Headers that carry long-lived credentials: an agent should hold none (DESIGN: no
/// long-lived API keys in agents; upstream credentials live in the sidecar).
const STANDING_CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

/// The long-lived credential headers present, other than the configured user-token header
/// (whose value was verified as a short-lived token, or the request was already refused).
fn standing_credentials(
    headers: &http::HeaderMap,
    token_header: Option<&http::HeaderName>,
) -> Vec<&'static str> {
    // Compared with the names present rather than looked up (a lookup by `&str` parses and
    // hashes the name, and most requests carry a handful of fields), in one pass. `x_api_key`
    // too: applications that read `_` as `-` (CGI's `HTTP_X_API_KEY`, which Django and
    // uvicorn's WSGI bridge build) take it for `x-api-key`.
    let mut present = [false; STANDING_CREDENTIAL_HEADERS.len()];
    for key in headers.keys() {
        for (seen, standing) in present.iter_mut().zip(STANDING_CREDENTIAL_HEADERS) {
            *seen |= crate::headers::folds_to(key.as_str(), standing);
        }
    }
    STANDING_CREDENTIAL_HEADERS
        .into_iter()
        .zip(present)
        .filter(|(name, seen)| *seen && token_header.is_none_or(|t| t.as_str() != *name))
        .map(|(name, _)| name)
        .collect()
}

/// Finds and verifies the user token. Absent: an autonomous call (`Ok(None)`). Present and
/// invalid: 401, whatever the policies would say.
async fn verify_user(
    shared: &Shared,
    tokens: &UserTokens,
    conn: &ConnectionIdentity,
    headers: &http::HeaderMap,
    audit: &mut AuditGuard,
) -> Result<Option<Arc<portcullis_core::UserClaims>>, Refusal> {
    let mut values = headers.get_all(&tokens.header).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let reject = |reason: &'static str, audit: &mut AuditGuard, detail: String| {
        shared
            .metrics
            .user_token_rejections
            .with_label_values(&[reason])
            .inc();
        audit.record.errors.push(detail);
        Refusal::InvalidUserToken(reason)
    };
    if values.next().is_some() {
        return Err(reject(
            "malformed",
            audit,
            "more than one user token header".to_owned(),
        ));
    }
    let Ok(value) = value.to_str() else {
        return Err(reject(
            "malformed",
            audit,
            "user token is not ASCII".to_owned(),
        ));
    };
    let token = if tokens.header == http::header::AUTHORIZATION {
        // RFC 6750 §2.1: `Bearer` (case-insensitive scheme), one space, the token.
        match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => {
                return Err(reject(
                    "malformed",
                    audit,
                    "authorization header is not a Bearer token".to_owned(),
                ));
            }
        }
    } else {
        value.trim()
    };
    match tokens
        .verifier_for(token, &conn.last_user_token)
        .verify_remembering(token, &conn.agent, &conn.last_user_token)
        .await
    {
        Ok(claims) => {
            // The record shares the verified claims: a cached token copies none of them.
            audit.record.user = Some(AuditUser(claims.clone()));
            audit.record.actor_chain = ActorChain(Some(claims.clone()));
            Ok(Some(claims))
        }
        Err(rejection) => Err(reject(rejection.reason(), audit, rejection.to_string())),
    }
}

/// RFC 9112 §3.2: a request target in absolute form is for proxies that route by it; this
/// one does not, so it is refused rather than having two hosts in play. §3.2 also requires
/// exactly one Host in HTTP/1.1. Returns the host (without port, lower-case).
/// An HTTP/2 header list over the limit, measured as RFC 9113 §6.5.2 does (name and value
/// octets plus 32 per field, pseudo-headers included). HTTP/1.1 heads are bounded by hyper's
/// buffer before a request exists.
fn check_head_size(request: &Request<Incoming>, limit: usize) -> Result<(), Refusal> {
    if request.version() != Version::HTTP_2 {
        return Ok(());
    }
    let uri = request.uri();
    let pseudo = [
        (":method".len(), request.method().as_str().len()),
        (
            ":path".len(),
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
        (":scheme".len(), uri.scheme_str().map_or(0, str::len)),
        (
            ":authority".len(),
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
    ];
    let size = pseudo
        .into_iter()
        .chain(
            request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str().len(), value.len())),
        )
        .map(|(name, value)| name + value + 32)
        .sum::<usize>();
    if size > limit {
        return Err(Refusal::HeadTooLarge);
    }
    Ok(())
}

fn check_framing(request: &Request<Incoming>, last: &HostCache) -> Result<Arc<str>, Refusal> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host_value = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    // `http` parses `user@host` and drops the userinfo; some applications read the field
    // whole, or split it at the first `:`, and would see another host than the policy did.
    // RFC 9110 §4.2.4 deprecated userinfo in http(s) URIs: it is refused.
    let host_header = || match host_value.map(|value| value.to_str()) {
        Some(Ok(value)) if value.contains('@') => Err(Refusal::InvalidHost),
        Some(Ok(value)) => shared_host(
            value
                .parse::<http::uri::Authority>()
                .ok()
                .map(|authority| authority.host().to_owned()),
        ),
        _ => Err(Refusal::MissingHost),
    };
    match request.version() {
        // RFC 9113 §8.3.1: :authority, or Host when a client sent no :authority.
        Version::HTTP_2 | Version::HTTP_3
            if request
                .uri()
                .authority()
                .is_some_and(|authority| authority.as_str().contains('@')) =>
        {
            Err(Refusal::InvalidHost)
        }
        Version::HTTP_2 | Version::HTTP_3 => match (request.uri().host(), host_value) {
            (Some(authority), None) => {
                last.get_or(NamedBy::Authority, authority.as_bytes(), || {
                    shared_host(Some(authority.to_owned()))
                })
            }
            (Some(authority), Some(_)) => {
                if *host_header()? != *authority.to_ascii_lowercase() {
                    // Two different hosts in one request: refuse rather than pick one.
                    return Err(Refusal::DuplicateHost);
                }
                shared_host(Some(authority.to_owned()))
            }
            (None, Some(value)) => last.get_or(NamedBy::HostField, value.as_bytes(), host_header),
            (None, None) => Err(Refusal::MissingHost),
        },
        _ => {
            if request.uri().scheme().is_some() || request.uri().authority().is_some() {
                return Err(Refusal::AbsoluteFormTarget);
            }
            let Some(value) = host_value else {
                return Err(Refusal::MissingHost);
            };
            last.get_or(NamedBy::HostField, value.as_bytes(), host_header)
        }
    }
}

/// The request's host as its resource and record share it: lower-cased, and present.
fn shared_host(host: Option<String>) -> Result<Arc<str>, Refusal> {
    match host {
        Some(host) if !host.is_empty() => {
            // Shared from here on (see `Resource::Route`); most hosts are lower-case already.
            if host.bytes().any(|b| b.is_ascii_uppercase()) {
                Ok(host.to_ascii_lowercase().into())
            } else {
                Ok(host.into())
            }
        }
        _ => Err(Refusal::MissingHost),
    }
}

fn host_with_port(parts: &http::request::Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default()
}

/// Moves the evaluation's determining policies and errors into the record: the evaluation
/// keeps its decision, permit and scopes, which are all that is read of it afterwards.
fn record_evaluation(audit: &mut AuditGuard, evaluation: &mut Evaluation, micros: u128) {
    let record = &mut audit.record;
    record.decision = Some(evaluation.decision.name());
    record.policies.agent = std::mem::take(&mut evaluation.agent.determining);
    record.policies.user = evaluation
        .user
        .as_mut()
        .map(|u| std::mem::take(&mut u.determining));
    record.errors.append(&mut evaluation.agent.errors);
    if let Some(user) = &mut evaluation.user {
        record.errors.append(&mut user.errors);
    }
    record.policy_hash = Some(evaluation.policy_hash.clone());
    record.decision_us = Some(u64::try_from(micros).unwrap_or(u64::MAX));
}

fn set_request_id(headers: &mut http::HeaderMap, id: &RequestId) {
    headers.insert(REQUEST_ID_HEADER, id.header.clone());
}

/// The caller-facing response for a refusal: a status and a stable reason, nothing internal.
pub(crate) fn refusal_response(refusal: Refusal, id: &RequestId) -> Response<ResponseBody> {
    let mut error = serde_json::json!({ "code": refusal.reason(), "request_id": id.as_str() });
    if let Some(detail) = refusal.detail() {
        error["reason"] = detail.into();
    }
    let body = serde_json::json!({ "error": error }).to_string();
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = refusal.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    set_request_id(headers, id);
    if refusal.status() == StatusCode::UNAUTHORIZED {
        // RFC 6750 §3.1.
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    set_retry_after(headers, refusal);
    response
}

/// `retry-after` on refusals that can clear by themselves (capacity, audit sink).
pub(crate) fn set_retry_after(headers: &mut http::HeaderMap, refusal: Refusal) {
    if let Some(seconds) = refusal.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
}

/// W3C Trace Context: the caller's `traceparent` when well-formed, otherwise a new one, so
/// the upstream and the audit record always share a trace id.
#[derive(Debug)]
pub(crate) struct Traceparent {
    /// Valid by construction: the caller's (shares its bytes) or one made here.
    header: HeaderValue,
    /// The bytes of the one made here.
    made: Option<Bytes>,
}

/// The request's id and its traceparent: the caller's when well-formed, else one made from
/// the same draw of random bytes and kept in one buffer with the id's digits (one allocation
/// for both; their clones, for the upstream request, the response and the record, share it).
fn request_ids(headers: &http::HeaderMap, random: &RequestRandomness) -> (RequestId, Traceparent) {
    let mut id = [0; 32];
    write_hex(&mut id, random.request_id());
    let callers = headers
        .get(TRACEPARENT_HEADER)
        .filter(|v| v.to_str().is_ok_and(is_valid_traceparent));
    if let Some(value) = callers {
        let trace = Traceparent {
            header: value.clone(),
            made: None,
        };
        return (RequestId::new(id, Bytes::from_owner(id)), trace);
    }
    const TRACEPARENT: &[u8; 55] = b"00-................................-................-01";
    let mut both = [0; 32 + TRACEPARENT.len()];
    let (digits, header) = both.split_at_mut(32);
    digits.copy_from_slice(&id);
    header.copy_from_slice(TRACEPARENT);
    write_hex(&mut header[3..35], random.trace_id());
    write_hex(&mut header[36..52], random.parent_id());
    let both = Bytes::from_owner(both);
    let made = both.slice(32..);
    let trace = Traceparent {
        // Lowercase hex and dashes: always a valid header value.
        header: HeaderValue::from_maybe_shared(made.clone())
            .unwrap_or_else(|_| HeaderValue::from_static("")),
        made: Some(made),
    };
    (RequestId::new(id, both.slice(..32)), trace)
}

impl Traceparent {
    /// The trace id: a slice of the header made here, or a copy of the caller's (sharing
    /// the caller's bytes would keep the buffer its request was read into for as long as
    /// the record, which lasts as long as the response).
    fn trace_id(&self) -> SharedText {
        match &self.made {
            Some(made) => SharedText::shared(made.slice(3..35)),
            None => self
                .header
                .to_str()
                .ok()
                .and_then(|value| value.get(3..35))
                .unwrap_or_default()
                .to_owned()
                .into(),
        }
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` as lowercase hex.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    for &byte in bytes {
        let [high, low] = HEX_PAIRS[usize::from(byte)];
        out.push(char::from(high));
        out.push(char::from(low));
    }
}

/// The two lowercase hex digits of every byte value: one load a byte where the digits one
/// at a time took two lookups, shifts and masks (the request's ids are 40 random bytes).
static HEX_PAIRS: [[u8; 2]; 256] = {
    let mut pairs = [[0; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [HEX_DIGITS[byte >> 4], HEX_DIGITS[byte & 0x0f]];
        byte += 1;
    }
    pairs
};

/// Writes `bytes` as lowercase hex into `out`, two digits a byte (as far as `out` reaches).
fn write_hex(out: &mut [u8], bytes: &[u8]) {
    let (pairs, _) = out.as_chunks_mut::<2>();
    for (pair, &byte) in pairs.iter_mut().zip(bytes) {
        *pair = HEX_PAIRS[usize::from(byte)];
    }
}

/// `00-<32 hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>`.
fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    matches!(parts.as_slice(), [version, trace, parent, flags]
        if *version == "00"
            && hex(trace, 32) && trace.bytes().any(|b| b != b'0')
            && hex(parent, 16) && parent.bytes().any(|b| b != b'0')
            && hex(flags, 2))
}

/// A request's id, 32 lowercase hex digits, and its `x-request-id` value made once for both
/// the upstream request and the response (sharing one buffer).
pub(crate) struct RequestId {
    text: [u8; 32],
    /// The same digits, shared by the header value and the audit record.
    text_shared: Bytes,
    header: HeaderValue,
}

impl RequestId {
    /// `text`, 32 hex digits, and `text_shared`, the same digits in a shared buffer.
    fn new(text: [u8; 32], text_shared: Bytes) -> Self {
        Self {
            text,
            // Hex digits: always a valid header value.
            header: HeaderValue::from_maybe_shared(text_shared.clone())
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            text_shared,
        }
    }

    fn as_str(&self) -> &str {
        // Hex digits: always UTF-8.
        std::str::from_utf8(&self.text).unwrap_or_default()
    }
}

/// The random bytes of one request's ids: its request id, and the trace and parent ids of a
/// traceparent when the caller sent none.
struct RequestRandomness([u8; 40]);

/// How many requests' random bytes one call to the RNG draws: aws-lc's RNG costs per call
/// far more than per byte, so each thread draws for 64 requests at a time.
const RANDOM_BATCH: usize = 64;

thread_local! {
    /// Drawn and not yet handed out; what is handed out is zeroed, so no id is given twice.
    static RANDOM: std::cell::RefCell<([u8; 40 * RANDOM_BATCH], usize)> =
        const { std::cell::RefCell::new(([0; 40 * RANDOM_BATCH], 40 * RANDOM_BATCH)) };
}

impl RequestRandomness {
    fn draw() -> Self {
        RANDOM.with_borrow_mut(|(pool, next)| {
            if *next == pool.len() {
                // aws-lc's RNG does not fail on supported platforms; a zero id would still be
                // unique enough to correlate within one record, so this does not fail the
                // request.
                let _ = aws_lc_rs::rand::fill(pool);
                *next = 0;
            }
            let mut bytes = [0u8; 40];
            let drawn = &mut pool[*next..*next + 40];
            bytes.copy_from_slice(drawn);
            drawn.fill(0);
            *next += 40;
            Self(bytes)
        })
    }

    fn request_id(&self) -> &[u8; 16] {
        self.0[..16].try_into().unwrap_or(&[0; 16])
    }

    fn trace_id(&self) -> &[u8] {
        &self.0[16..32]
    }

    fn parent_id(&self) -> &[u8] {
        &self.0[32..]
    }
}

fn unix_seconds(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::is_valid_traceparent;

    /// Ids drawn from the per-thread batch are never handed out twice, across refills.
    #[test]
    fn request_randomness_is_never_repeated() {
        let drawn: Vec<[u8; 40]> = (0..3 * super::RANDOM_BATCH + 7)
            .map(|_| super::RequestRandomness::draw().0)
            .collect();
        let distinct: std::collections::HashSet<_> = drawn.iter().collect();
        assert_eq!(distinct.len(), drawn.len());
        assert!(drawn.iter().all(|bytes| bytes.iter().any(|&b| b != 0)));
    }

    /// The id's text, its header value and the record's are the same 32 lowercase hex
    /// digits, whether the buffer holding them holds a made traceparent too or not.
    #[test]
    fn a_request_id_is_its_bytes_in_hex_in_every_form() {
        let bytes: [u8; 40] = std::array::from_fn(|i| (i as u8).wrapping_mul(17));
        let mut callers = http::HeaderMap::new();
        callers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        for headers in [http::HeaderMap::new(), callers] {
            let (id, _) = super::request_ids(&headers, &super::RequestRandomness(bytes));
            assert_eq!(id.as_str(), "00112233445566778899aabbccddeeff");
            assert_eq!(id.header.clone().to_str().unwrap(), id.as_str());
            let recorded = super::SharedText::shared(id.text_shared.clone());
            assert_eq!(recorded.as_str(), id.as_str());
        }
    }

    /// Every byte value, in both writers, as `format!` writes it.
    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut pushed = String::new();
        super::push_hex(&mut pushed, &bytes);
        assert_eq!(pushed, expected);
        let mut written = vec![b'.'; 513];
        super::write_hex(&mut written, &bytes);
        assert_eq!(&written[..512], expected.as_bytes());
        assert_eq!(written[512], b'.', "nothing written past the digits");
    }

    /// A caller's well-formed traceparent is passed on as it came.
    #[test]
    fn a_callers_traceparent_is_kept() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(value));
        let (_, trace) = super::request_ids(&headers, &super::RequestRandomness([7; 40]));
        assert_eq!(trace.header.to_str().unwrap(), value);
        assert_eq!(trace.trace_id().as_str(), &value[3..35]);
    }

    /// Without a valid traceparent from the caller, one is made from the request's random
    /// bytes: valid, and its trace id is the one the record keeps.
    #[test]
    fn a_made_traceparent_is_valid_and_carries_the_trace_id() {
        let bytes: [u8; 40] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) | 1);
        let random = super::RequestRandomness(bytes);
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static("00-bad"));
        let (id, trace) = super::request_ids(&headers, &random);
        let value = trace.header.to_str().unwrap();
        assert_ne!(
            id.as_str(),
            &value[3..35],
            "the id and the trace id are distinct bytes"
        );
        assert!(is_valid_traceparent(value), "{value}");
        let mut hex = String::new();
        super::push_hex(&mut hex, &bytes[16..32]);
        assert_eq!(trace.trace_id().as_str(), hex);
        hex.clear();
        super::push_hex(&mut hex, &bytes[32..]);
        assert_eq!(&value[36..52], hex);
    }

    #[test]
    fn traceparent_validation() {
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent("garbage"));
    }
}
