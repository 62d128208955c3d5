//! The data plane: the mTLS listener agents call, the per-request authorization pipeline,
//! forwarding to the application in the pod, metrics, audit, and the admin listener.
//!
//! Configuration parsing lives in the binary; this crate takes typed [`ProxyOptions`] and
//! runs them. Identity (who) comes from `portcullis-identity`, decisions (may they) from
//! `portcullis-policy`.

mod admin;
mod admission;
mod agents;
pub mod approval;
pub mod audit;
mod body;
pub mod classify;
pub mod credential;
pub mod error;
mod forward;
pub mod headers;
pub mod inventory;
pub mod metrics;
mod pipeline;
pub mod protocol;
pub mod rate;
mod server;
mod sessions;
pub mod shadow;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use portcullis_identity::{IdentityFeed, LiveIdentity};
use portcullis_policy::{PolicyEngine, ReloadOutcome};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use audit::{AuditLog, AuditSink};
pub use classify::{PathMatch, Protocol, RouteRule};
pub use metrics::Metrics;

use crate::forward::Forwarder;

/// Explicit limits and timeouts (`limits:` in the config). Every one of them bounds what a
/// misbehaving or malicious caller can hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request head size (HTTP/1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// How much of a body may be read for inspection (protocol routes).
    pub body_prefix_bytes: usize,
    /// Time to receive a complete request head once a request started (slowloris).
    pub header_read_timeout: Duration,
    /// Time for the upstream to answer with a response head.
    pub request_timeout: Duration,
    /// Longest pause between request body frames before the request is aborted.
    pub body_timeout: Duration,
    /// Longest pause between response body frames from the upstream, counted while the
    /// caller is waiting for the next one; past it the response is cut off (and audited as
    /// such), so a stalled upstream cannot hold the caller's connection and its place in
    /// flight for ever.
    pub response_body_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Time to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to connect to the upstream.
    pub connect_timeout: Duration,
    /// Concurrent agent connections.
    pub max_connections: usize,
    /// Connections in their TLS handshake at once (no identity shown yet); past it a new
    /// connection is closed at once.
    pub max_pending_handshakes: usize,
    /// Concurrent connections of one agent (SPIFFE ID); a connection past it is closed after
    /// its handshake, so one agent cannot take every place of `max_connections`.
    pub max_connections_per_agent: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_h2_streams: u32,
    /// Requests in flight (head received, response body not finished), all agents together.
    /// Over it: 503 with `retry-after`.
    pub max_inflight: usize,
    /// Requests in flight from one agent (SPIFFE ID). Over it: 429 with `retry-after`, so
    /// one agent at its cap leaves the rest of `max_inflight` to the others.
    pub max_inflight_per_agent: usize,
    /// Bytes of request bodies buffered for inspection, all requests together. A request
    /// that would pass it gets 503 rather than the process growing.
    pub inspect_memory_bytes: usize,
    /// Whole-body deadline: an inspected body must arrive complete within this.
    pub inspect_timeout: Duration,
    /// Messages in one JSON-RPC batch; more is 413 before any Cedar call.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            body_prefix_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            response_body_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            max_connections_per_agent: 1_000,
            max_pending_handshakes: 1_000,
            max_h2_streams: 100,
            max_inflight: 2048,
            max_inflight_per_agent: 512,
            inspect_memory_bytes: 64 * 1024 * 1024,
            inspect_timeout: Duration::from_secs(30),
            max_batch: 64,
        }
    }
}

/// Everything the proxy runs with, already validated.
#[derive(Debug)]
pub struct ProxyOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The serving SVID and trust bundles in force, and what keeps them current. Each new
    /// handshake uses the latest; the acceptor never knows where it came from.
    pub identity: IdentityFeed,
    pub policy: Arc<PolicyEngine>,
    /// `policy.shadow_dir`: a candidate set decided beside `policy`, never enforced.
    pub shadow_policy: Option<Arc<PolicyEngine>>,
    /// How often the policy directory is checked for changes.
    pub policy_reload_interval: Duration,
    pub upstream: Authority,
    pub routes: Vec<RouteRule>,
    pub limits: Limits,
    pub audit: AuditSink,
    /// Signed checkpoints in the audit trail (`audit.signing_key`), if configured.
    pub audit_checkpoints: Option<audit::Checkpoints>,
    /// User-token verification; `None` makes every call autonomous (agent question only).
    pub user_token: Option<UserTokens>,
    /// Refuse (401) requests that carry a long-lived credential header instead of only
    /// flagging them.
    pub reject_standing_credentials: bool,
    /// Agents given their own label in `portcullis_agent_decisions_total` before `other`.
    pub max_agent_labels: usize,
    /// `approval:`: how grants for `@approval("required")` calls are verified; `None`
    /// answers every such call 428 with its challenge and accepts no grant.
    pub approval: Option<approval::ApprovalOptions>,
    /// `limits.rate`: token buckets per agent, user and tool.
    pub rate: Vec<rate::RateRule>,
}

/// How user tokens are found and verified.
#[derive(Debug, Clone)]
pub struct UserTokens {
    /// The key set shared by `user_token.issuers`.
    pub verifier: portcullis_identity::user_token::UserTokenVerifier,
    /// `user_token.issuer_keys`: an issuer's own key set. A token claiming one of these
    /// issuers is verified with that set only, and a token of another issuer never with it,
    /// so a key is bound to the issuer that published it.
    pub by_issuer: Vec<(String, portcullis_identity::user_token::UserTokenVerifier)>,
    /// The header carrying the token. `authorization` means the `Bearer` scheme (RFC 6750).
    pub header: http::HeaderName,
}

impl UserTokens {
    /// The verifier for `token`, chosen by its (not yet verified) `iss`: the one that
    /// verifies it also checks that `iss` is its own. A token the connection's `memo` holds
    /// goes to the verifier that took it, which its `iss` chose: decoding the payload to
    /// find the issuer cost more than the rest of a repeated token's checks together.
    pub fn verifier_for(
        &self,
        token: &str,
        memo: &portcullis_identity::user_token::TokenMemo,
    ) -> &portcullis_identity::user_token::UserTokenVerifier {
        if self.by_issuer.is_empty() {
            return &self.verifier;
        }
        if let Some(id) = memo.verified_by(token)
            && let Some(verifier) = self.all().find(|verifier| verifier.id() == id)
        {
            return verifier;
        }
        let issuer = portcullis_identity::user_token::unverified_issuer(token);
        issuer
            .and_then(|issuer| self.by_issuer.iter().find(|(i, _)| *i == issuer))
            .map_or(&self.verifier, |(_, verifier)| verifier)
    }

    /// Every verifier (the shared set first).
    pub fn all(&self) -> impl Iterator<Item = &portcullis_identity::user_token::UserTokenVerifier> {
        std::iter::once(&self.verifier).chain(self.by_issuer.iter().map(|(_, v)| v))
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    policy: Arc<PolicyEngine>,
    shadow_policy: Option<Arc<PolicyEngine>>,
    routes: Vec<RouteRule>,
    forwarder: Forwarder,
    metrics: Metrics,
    audit: AuditLog,
    limits: Limits,
    user_token: Option<UserTokens>,
    inventory: Arc<inventory::Inventory>,
    reject_standing_credentials: bool,
    inflight: Arc<admission::Inflight>,
    inspect_budget: admission::InspectBudget,
    /// Which agent each MCP session id was issued to.
    sessions: sessions::Sessions,
    approvals: approval::Approvals,
    rates: rate::RateLimits,
    /// What each agent's connections share.
    agents: agents::KnownAgents,
    /// `routes[].credential`, by route index.
    credentials: Vec<Option<credential::Credential>>,
    /// What the listings filtered on each route said about its tools.
    tool_annotations: Arc<protocol::annotations::ToolAnnotations>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the audit sink: {0}")]
    Audit(std::io::Error),
    #[error("routes[{index}].credential: {source}")]
    Credential {
        index: usize,
        source: credential::CredentialError,
    },
    #[error("no random source for TLS: {0:?}")]
    Random(rustls::crypto::GetRandomFailed),
}

/// A running proxy. Dropping it does not stop it; call [`Running::shutdown`].
#[derive(Debug)]
pub struct Running {
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    metrics: Metrics,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    audit_writer: audit::AuditWriter,
    admin_state: Arc<admin::AdminState>,
    admin_shutdown: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
}

/// Binds both listeners, opens the audit sink and starts serving.
pub async fn start(options: ProxyOptions) -> Result<Running, StartError> {
    // Before the listener exists, so no connection waits for it: see `seed_random`.
    portcullis_identity::seed_random().map_err(StartError::Random)?;
    let metrics = Metrics::with_agent_label_cap(options.max_agent_labels);
    let inventory = Arc::new(inventory::Inventory::new());
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(options.listen).await?;
    let admin_listener = bind(options.admin_listen).await?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: options.admin_listen,
            source,
        })?;
    let (audit, audit_writer) = AuditLog::start_sealed(
        &options.audit,
        metrics.clone(),
        options.audit_checkpoints.clone(),
    )
    .map_err(StartError::Audit)?;
    if options.audit_checkpoints.is_none() {
        // The hash chain shows accidental damage; without signed checkpoints anyone who can
        // write where the records go can rewrite them and every hash after (docs/audit.md).
        tracing::warn!(
            "audit records are not sealed: audit.signing_key is unset, so no signed checkpoint vouches for the trail; set it in production"
        );
    }

    let identity = options.identity.current.clone();
    metrics.set_certificates(&identity.borrow().certificates);
    metrics
        .policy_count
        .set(options.policy.policy_count() as f64);

    let credentials = options
        .routes
        .iter()
        .enumerate()
        .map(|(index, route)| {
            route
                .credential
                .as_ref()
                .map(|spec| credential::Credential::new(spec, identity.clone()))
                .transpose()
                .map_err(|source| StartError::Credential { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let file_credentials = options.routes.iter().any(|route| {
        matches!(
            route.credential,
            Some(credential::CredentialSpec::File { .. })
        )
    });
    let tool_annotations = Arc::new(protocol::annotations::ToolAnnotations::new(
        options.routes.len(),
    ));
    let shared = Arc::new(Shared {
        policy: options.policy.clone(),
        shadow_policy: options.shadow_policy.clone(),
        routes: options.routes,
        forwarder: Forwarder::new(
            options.upstream,
            options.limits.connect_timeout,
            options.limits.request_timeout,
        ),
        metrics: metrics.clone(),
        audit: audit.clone(),
        limits: options.limits.clone(),
        user_token: options.user_token.clone(),
        inventory: inventory.clone(),
        reject_standing_credentials: options.reject_standing_credentials,
        inflight: admission::Inflight::new(
            options.limits.max_inflight,
            options.limits.max_inflight_per_agent,
            options.limits.max_connections_per_agent,
        ),
        inspect_budget: admission::InspectBudget::new(options.limits.inspect_memory_bytes),
        sessions: sessions::Sessions::default(),
        approvals: approval::Approvals::new(options.approval.clone()),
        rates: rate::RateLimits::new(options.rate.clone()),
        agents: agents::KnownAgents::default(),
        credentials,
        tool_annotations,
    });
    let admin_state = Arc::new(admin::AdminState {
        metrics: metrics.clone(),
        ready: false.into(),
        draining: false.into(),
        audit,
        inventory,
        identity: identity.clone(),
        user_tokens: options
            .user_token
            .iter()
            .flat_map(|t| t.all().cloned())
            .collect(),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    // The admin listener outlives the drain, so `/readyz` can say "draining" meanwhile.
    let (admin_shutdown, admin_shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    if file_credentials {
        // Re-read as often as policies: both are mounted files that change together.
        tasks.push(tokio::spawn(credential::reload_files(
            shared.clone(),
            options.policy_reload_interval,
            shutdown_rx.clone(),
        )));
    }
    tasks.extend([
        tokio::spawn(server::serve(
            listener,
            identity.clone(),
            shared,
            shutdown_rx.clone(),
        )),
        tokio::spawn(follow_identity(
            identity,
            metrics.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(reload_policies(
            options.policy,
            options.policy_reload_interval,
            metrics.clone(),
            shutdown_rx,
        )),
    ]);
    if let Some(shadow) = options.shadow_policy {
        tasks.push(tokio::spawn(shadow::reload(
            shadow,
            options.policy_reload_interval,
            shutdown.subscribe(),
        )));
    }
    if let Some(producer) = options.identity.producer {
        // The producer stops by itself once every receiver (the tasks above) is gone.
        drop(producer(Arc::new(metrics.clone())));
    }
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin_state.clone(),
        admin_shutdown_rx,
    ));
    if let Some(approval) = &options.approval {
        // As for user tokens: the grant keys' poll ends with the last verifier handle.
        drop(approval.verifier.spawn_refresh());
    }
    if let Some(tokens) = &options.user_token {
        // The key refresh runs until the last verifier handle is dropped; it is not a task
        // that shutdown must wait for.
        for verifier in tokens.all() {
            drop(verifier.spawn_refresh());
        }
    }
    // Policies and certificates were loaded before we got here, and both listeners are bound.
    // What loading them freed goes back to the system before the first request.
    portcullis_memory::release_freed();
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(%local_addr, %admin_addr, "portcullis serving");
    Ok(Running {
        local_addr,
        admin_addr,
        metrics,
        shutdown,
        tasks,
        audit_writer,
        admin_state,
        admin_shutdown,
        admin_task,
    })
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain` (`/readyz` answers
    /// 503 meanwhile), then flushes the audit trail.
    pub async fn shutdown(self, drain: Duration) {
        self.admin_state.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(drain, async {
            for task in self.tasks {
                let _ = task.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?drain,
                "shutdown grace passed with requests still in flight"
            );
        }
        let _ = self.admin_shutdown.send(true);
        let _ = self.admin_task.await;
        // The admin state holds an audit handle; the writer finishes once every handle is gone.
        drop(self.admin_state);
        // Connections still open past the deadline keep their queue handles; the writer then
        // stops with the process, having flushed every record it received.
        let writer = self.audit_writer;
        let _ =
            tokio::time::timeout(drain, tokio::task::spawn_blocking(move || writer.join())).await;
    }
}

/// Keeps the expiry gauge on the identity in force, and says loudly when that identity
/// cannot serve: an SVID that expires without a replacement, one not yet valid, one that does
/// not chain to its own bundle. `/readyz` reports the same state on every probe.
async fn follow_identity(
    mut identity: watch::Receiver<Arc<LiveIdentity>>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut producer_alive = true;
    loop {
        let current = identity.borrow_and_update().clone();
        metrics.set_certificates(&current.certificates);
        if let Err(problem) = current.readiness(SystemTime::now()) {
            tracing::error!(
                spiffe_id = %current.serving.id,
                %problem,
                "serving identity unusable: /readyz reports not ready until it is replaced"
            );
        }
        let expires_in = u64::try_from(current.serving.not_after + 1 - now_unix())
            .ok()
            .map(Duration::from_secs);
        let expiry = async move {
            match expires_in {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = identity.changed(), if producer_alive => {
                producer_alive = changed.is_ok();
            }
            // Loops to log the expired identity; the next expiry is then never.
            () = expiry => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The beat of every reload loop: true after `interval`, false once shutdown begins.
pub(crate) async fn beat(interval: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(interval) => true,
        _ = shutdown.changed() => false,
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Reloads `engine`; a set that was read and parsed (swapped in or not) leaves its
/// temporaries freed, and those go back to the system.
pub(crate) fn reload_and_release(engine: &PolicyEngine) -> ReloadOutcome {
    let outcome = engine.reload();
    if !matches!(outcome, ReloadOutcome::Unchanged) {
        portcullis_memory::release_freed();
    }
    outcome
}

/// Polls the policy directory. A change that loads is swapped in; one that does not is
/// logged and counted, and the last good set stays in force (`/readyz` stays ready).
async fn reload_policies(
    policy: Arc<PolicyEngine>,
    interval: Duration,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing_hash: Option<String> = None;
    while crate::beat(interval, &mut shutdown).await {
        let engine = policy.clone();
        let Ok(outcome) = tokio::task::spawn_blocking(move || reload_and_release(&engine)).await
        else {
            continue;
        };
        match outcome {
            ReloadOutcome::Unchanged => failing_hash = None,
            ReloadOutcome::Reloaded(hash) => {
                failing_hash = None;
                metrics.policy_reloads.with_label_values(&["success"]).inc();
                metrics.policy_count.set(policy.policy_count() as f64);
                tracing::info!(%hash, policies = policy.policy_count(), "policy set reloaded");
            }
            ReloadOutcome::Failed(errors) => {
                // Count and log a broken set once per distinct content, not every interval.
                let fingerprint = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                if failing_hash.as_deref() != Some(fingerprint.as_str()) {
                    metrics.policy_reloads.with_label_values(&["failure"]).inc();
                    for error in &errors {
                        tracing::error!(%error, "policy reload failed; keeping the last good set");
                    }
                    failing_hash = Some(fingerprint);
                }
            }
        }
    }
}
