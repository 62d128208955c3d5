//! The audit trail: one JSON line per request, on its own sink, hash-chained.
//!
//! Each line carries `prev_hash`, the SHA-256 (hex) of the previous line's bytes, so a
//! deleted, reordered or edited line breaks the chain. A process's first line is a `start`
//! line whose `prev_hash` is the hash of the last line already in the file sink (`genesis`
//! for an empty file, and for stdout, where nothing can be read back), so a process start is
//! a link of the chain, not a place where it may begin again. With `audit.signing_key`, a
//! signed `checkpoint` line is written every `audit.checkpoint_interval` while records come
//! (and at shutdown), see `audit_seal`.
//!
//! Writing is off the request path (a dedicated thread, group commit: one write and flush
//! per batch, at most one batch per `BATCH_WINDOW` (4 ms), so a record waits at most that long
//! while the process has CPU to spare; the writer is a batch-class thread, so on a saturated
//! core it waits a time slice rather than pre-empt the request being served) but never lossy.
//! A request is admitted before it is served ([`AuditLog::admit`]): at once while the sink
//! keeps up, after a wait when a full queue of finished records is still unwritten
//! (back-pressure), and refused (503) when the sink has failed. Admission reserves nothing,
//! so requests that wait on their caller or the upstream hold no audit capacity.
//! The record is written exactly once, when the request's [`AuditGuard`] is dropped,
//! whatever the outcome; a record that can no longer be written (the sink failed meanwhile)
//! is counted in `portcullis_audit_write_failures_total`, never dropped silently.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};

use crate::inventory::{Inventory, Observation};
use crate::metrics::Metrics;

#[path = "audit_json.rs"]
mod json;
#[path = "audit_seal.rs"]
mod seal;
pub use seal::{KeyError, SigningKey, VerifyingKey};

/// Signed checkpoints: the key, and how often.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub key: Arc<SigningKey>,
    pub interval: Duration,
}

/// The `prev_hash` of the first line of a trail that begins with nothing before it.
pub const GENESIS: &str = "genesis";

/// What flows to the writer thread: records, and the checkpoint clock's ticks.
#[derive(Debug)]
enum Entry {
    /// A finished record, serialized as a JSON object by the request that made it (see
    /// [`AuditLog::submit`]); the writer adds `prev_hash`.
    Record(Vec<u8>),
    Checkpoint,
}

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    /// Opened for append; written and flushed once per batch.
    File {
        path: PathBuf,
        /// Rotate when the file would exceed this size: `path` becomes `path.1`, `path.1`
        /// becomes `path.2`, … up to `keep` files. The chain continues across files.
        rotate_bytes: Option<u64>,
        keep: usize,
    },
}

/// One request, as the audit trail records it. Field names are documented for log pipelines
/// and are a contract like metric names. Written by `audit_json::write_record`, by hand: a
/// field added here is added there too, and to its test's generator, which compares the two
/// writers (this derive is the reference).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditRecord {
    pub time: String,
    /// Shared with the request's `x-request-id` value.
    pub request_id: SharedText,
    /// Shared with the `traceparent` made for the request; a caller's is copied.
    pub trace_id: Option<SharedText>,
    /// Shared with the connection, as `agent` is: the same for each of its requests.
    pub client_address: Arc<str>,
    pub agent: Option<Arc<str>>,
    pub user: Option<AuditUser>,
    pub actor_chain: ActorChain,
    /// A constant for a standard method (`portcullis_core::method_name`).
    pub method: std::borrow::Cow<'static, str>,
    /// Shared with the request's resource (`Resource::Route`), which names the route by it.
    pub path: Arc<str>,
    pub action: Option<&'static str>,
    pub resource: Option<AuditResource>,
    pub decision: Option<&'static str>,
    /// Why the request was refused or failed, when it was (the caller sees the same reason).
    pub reason: Option<&'static str>,
    pub policies: AuditPolicies,
    pub errors: Vec<String>,
    /// Shared with the policy set it names: the same hash for every record until a reload.
    pub policy_hash: Option<Arc<str>>,
    pub mode: &'static str,
    pub status: u16,
    /// Time from the request's start to its decision, less any wait for its body, in
    /// microseconds.
    pub decision_us: Option<u64>,
    /// Time from request head to the end of the response, in milliseconds.
    pub duration_ms: f64,
    /// False when the response did not finish (caller went away, upstream broke mid-body).
    pub completed: bool,
    /// Long-lived credential headers the caller sent (never forwarded), e.g. `x-api-key`.
    pub standing_credentials: Vec<&'static str>,
    /// The Cedar inputs of the decision (agent, user claims, action, resource, request and
    /// protocol fields, time), so `portcullis replay` can decide it again: written as the
    /// whole question from this and the record's own agent, method, path, action, resource
    /// and client address, which it does not copy. Written by hand only: the derive skips
    /// it, and the writer's test puts it back (`AuditRecord::question`).
    #[serde(skip)]
    pub input: Option<AuditInput>,
    /// What the shadow set (`policy.shadow_dir`) decided, when one is configured. Boxed,
    /// as are `approval` and the input's user and context: what most records lack takes a
    /// pointer's room, which keeps the record (moved several times per request, and held in
    /// the response body's box) under the size glibc serves from its per-thread cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Box<crate::shadow::ShadowOutcome>>,
    /// Every message of a JSON-RPC batch, in order, each decided on its own (the request is
    /// allowed only if all are); absent for a request that is one call.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<AuditCall>,
    /// A call that needed approval: its challenge digest, and who approved it when a grant
    /// was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Box<AuditApproval>>,
    /// The upstream credential attached after the permit (`file` or `token_exchange`), never
    /// its value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<&'static str>,
}

/// What the record's `input` holds beyond the record's own fields.
#[derive(Debug, Clone, Default)]
pub struct AuditInput {
    /// The verified claims, shared with the request; written as the question's `user`
    /// (`UserSpec::from_claims`).
    pub user: Option<Arc<portcullis_core::UserClaims>>,
    /// The request's, shared.
    pub host: Arc<str>,
    /// Protocol fields by key (`model`, `mcp`, `tool`); absent on a generic route.
    pub context: Option<Box<serde_json::Map<String, serde_json::Value>>>,
    /// Unix seconds of the decision.
    pub now: i64,
}

impl AuditInput {
    /// `user` is `input.user` and `host` is `input.request.host`, shared rather than copied.
    pub fn new(
        input: &portcullis_policy::AuthzInput<'_>,
        user: Option<&Arc<portcullis_core::UserClaims>>,
        host: &Arc<str>,
    ) -> Self {
        Self {
            user: user.cloned(),
            host: host.clone(),
            context: (!input.protocol_context.is_empty()).then(|| {
                Box::new(
                    input
                        .protocol_context
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect(),
                )
            }),
            now: input.now,
        }
    }
}

impl AuditRecord {
    /// The question `portcullis check` and `replay` read for `action` on `resource`, asked
    /// with `input`: the agent, method, path and client address are the record's own.
    pub fn question_about(
        &self,
        input: &AuditInput,
        action: Option<&str>,
        resource: Option<&AuditResource>,
    ) -> portcullis_policy::tools::Question {
        portcullis_policy::tools::Question {
            agent: self.agent.as_deref().unwrap_or_default().to_owned(),
            user: input
                .user
                .as_deref()
                .map(portcullis_policy::tools::UserSpec::from_claims),
            method: Some(self.method.to_string()),
            path: Some(self.path.to_string()),
            action: action.map(str::to_owned),
            resource: resource.map(|r| portcullis_core::entity_text(r.kind, &r.id)),
            host: Some(input.host.to_string()),
            context: input.context.as_deref().cloned(),
            now: Some(input.now),
            client_address: Some(self.client_address.to_string()),
        }
    }

    /// The record's `input`: the question of its action and resource, whole (set together
    /// with `input`, from the same call). The writer's test reference: the writer itself
    /// writes these fields in place.
    #[cfg(test)]
    pub fn question(&self) -> Option<portcullis_policy::tools::Question> {
        let input = self.input.as_ref()?;
        Some(self.question_about(input, self.action, self.resource.as_ref()))
    }
}

/// One message of a batch, as decided.
#[derive(Debug, Clone, Serialize)]
pub struct AuditCall {
    pub action: &'static str,
    pub resource: AuditResource,
    pub decision: &'static str,
    pub policies: AuditPolicies,
    /// The question this message asked, so `portcullis replay` decides the whole batch again
    /// (the record's own `input` is one message's: the first refused, or the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<Box<portcullis_policy::tools::Question>>,
}

/// The approval side of a decision.
#[derive(Debug, Clone, Serialize)]
pub struct AuditApproval {
    /// `sha256:<hex>` of the call (see `approval::digest`).
    pub digest: String,
    /// The grant's `sub`, when one was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// The user a request was made for, as the record names them (`sub`, `iss`): the verified
/// claims themselves, shared with the request rather than copied.
#[derive(Debug, Clone)]
pub struct AuditUser(pub Arc<portcullis_core::UserClaims>);

impl Serialize for AuditUser {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut user = serializer.serialize_struct("AuditUser", 2)?;
        user.serialize_field("sub", &self.0.subject)?;
        user.serialize_field("iss", &self.0.issuer)?;
        user.end()
    }
}

/// The record's `actor_chain`: the verified user's (RFC 8693 `act` subjects, outermost
/// first), shared with the request's claims; empty without a user token.
#[derive(Debug, Clone, Default)]
pub struct ActorChain(pub Option<Arc<portcullis_core::UserClaims>>);

impl ActorChain {
    pub fn as_slice(&self) -> &[String] {
        self.0.as_deref().map_or(&[], |user| &user.actor_chain)
    }
}

impl Serialize for ActorChain {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(serializer)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditResource {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Shared with the resource it names: a route's id is the record's path.
    pub id: Arc<str>,
}

/// Text a record shares with the request it describes rather than copies (its ids are
/// header values the caller and the upstream see): a reference count per record, not an
/// allocation. UTF-8 by construction (it is made from a `String` or a `&'static str`, or by
/// the proxy from hex digits).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SharedText(bytes::Bytes);

impl SharedText {
    /// Shares `bytes`, which must be UTF-8; anything else reads as empty.
    pub(crate) fn shared(bytes: bytes::Bytes) -> Self {
        if std::str::from_utf8(&bytes).is_ok() {
            Self(bytes)
        } else {
            Self::default()
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The text's bytes, UTF-8 (checked when it was made).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<String> for SharedText {
    fn from(text: String) -> Self {
        Self(text.into())
    }
}

impl From<&'static str> for SharedText {
    fn from(text: &'static str) -> Self {
        Self(bytes::Bytes::from_static(text.as_bytes()))
    }
}

impl std::fmt::Debug for SharedText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for SharedText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Determining policy ids per question.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditPolicies {
    pub agent: Arc<[String]>,
    pub user: Option<Arc<[String]>>,
}

/// The sending half of the audit queue. One reference count: every request's guard holds a
/// clone, and the deferred submission another.
#[derive(Debug, Clone)]
pub struct AuditLog(Arc<LogHandle>);

#[derive(Debug)]
struct LogHandle {
    tx: mpsc::UnboundedSender<Entry>,
    backlog: Arc<Backlog>,
    metrics: Metrics,
    admit_timeout: Duration,
}

/// Records handed to the writer and not yet written. Only finished records count: a request
/// that is still waiting on its caller or the upstream holds no audit capacity, so slow
/// requests cannot starve fast ones (audit capacity is not concurrency capacity).
#[derive(Debug)]
struct Backlog {
    queued: AtomicUsize,
    capacity: usize,
    /// Signalled by the writer after each batch, and when the sink fails.
    drained: Notify,
    /// Serialization buffers the writer is done with, for the next records. Each request
    /// serializes its own record into one (so the record's many strings are freed by the
    /// thread that allocated them, and the writer frees nothing); the writer gives them back
    /// after each batch.
    spare: Mutex<Vec<Vec<u8>>>,
    /// Finished records waiting for the task that submits them (see [`AuditLog::submit_soon`]).
    deferred: Mutex<Deferred>,
    /// When the writer took the batch it is writing (nanoseconds since `epoch`, plus one), or
    /// 0 while it waits for records: a write that never returns (a pipe nobody reads, a hung
    /// mount) shows as a batch taken long ago ([`AuditLog::health`]). Stored by the writer
    /// twice per batch; requests never touch it.
    writing_since: AtomicU64,
    epoch: Instant,
}

impl Backlog {
    /// The writer took a batch at `now`.
    fn writing(&self, now: Instant) {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        self.writing_since.store(nanos + 1, Ordering::Release);
    }

    /// The writer's batch is written; it waits for the next.
    fn written(&self) {
        self.writing_since.store(0, Ordering::Release);
    }

    /// How long the batch being written has been in hand, if one is.
    fn writing_for(&self) -> Option<Duration> {
        let since = self.writing_since.load(Ordering::Acquire).checked_sub(1)?;
        Some(
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(since)),
        )
    }
}

// The records stay in the boxes their guards held: unboxed, each would be copied in.
#[allow(clippy::vec_box)]
#[derive(Debug, Default)]
struct Deferred {
    records: Vec<Box<AuditRecord>>,
    /// The list the last [`Submitter`] emptied, kept for the next turn's records: made anew,
    /// it cost a grow and a `realloc` a turn (counted with `fec3865`, which dropped it, and
    /// undone in `e79f85e`; about eight requests a turn in the instruction benchmark).
    emptied: Vec<Box<AuditRecord>>,
    /// A [`Submitter`] is on its way and will take every record here.
    scheduled: bool,
}

/// The longest emptied list of deferred records kept for reuse.
const KEPT_DEFERRED: usize = 64;

/// Submits every deferred record when dropped: when its task runs, or when a runtime that
/// is shutting down drops the task unrun. It holds a handle on the queue, so the writer
/// thread cannot finish while deferred records wait for it.
struct Submitter(AuditLog);

impl Drop for Submitter {
    fn drop(&mut self) {
        let deferred = || {
            self.0
                .0
                .backlog
                .deferred
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        let mut records = {
            let mut deferred = deferred();
            deferred.scheduled = false;
            let emptied = std::mem::take(&mut deferred.emptied);
            std::mem::replace(&mut deferred.records, emptied)
        };
        for record in &records {
            self.0.submit(record);
        }
        records.clear();
        if records.capacity() <= KEPT_DEFERRED {
            let mut deferred = deferred();
            if deferred.emptied.capacity() < records.capacity() {
                deferred.emptied = records;
            }
        }
    }
}

/// Pending once, with its task rescheduled at once: the task goes behind those already
/// queued, without waiting for the I/O driver as `tokio::task::yield_now` does (that would
/// cost a runtime with nothing else to run a poll of the driver per turn).
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Whether the sink takes records, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditHealth {
    Healthy,
    /// A write failed: the queue is closed, every request is refused.
    Failed,
    /// Records are waiting and the writer has been in one write for longer than the
    /// admission timeout (a reader that stopped reading, a hung mount): requests that meet a
    /// full queue are refused after that long. Healthy again once the write completes.
    Stuck {
        /// Since the writer took the batch it is still writing.
        writing_for: Duration,
    },
}

/// How long a request waits for room in a full audit queue before it is refused (503). Also
/// the bound after which a write that has not returned makes the sink not healthy: past it,
/// requests that meet a full queue are refused, so the pod should leave rotation.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The audit queue is closed: the sink failed. Requests must fail closed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("audit sink unavailable")]
pub struct AuditUnavailable;

/// Handle on the writer thread, to wait for the queue to drain at shutdown.
#[derive(Debug)]
pub struct AuditWriter {
    thread: std::thread::JoinHandle<()>,
}

impl AuditWriter {
    /// Waits until every queued record is written (all [`AuditLog`] clones must be dropped).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Finished records waiting for the sink beyond which new requests wait (back-pressure).
const QUEUE_DEPTH: usize = 1024;
/// Group commit: at most one write (and flush) per window. A batch that starts less than a
/// window after the last write waits out the rest of it, gathering what arrives meanwhile; a
/// batch after a quiet spell is written at once. This bounds how late a record reaches the
/// sink, turns one writer wake-up per request under load into one per window (taken on the
/// clock while records keep coming, so no request has to wake the writer), and costs a quiet
/// sidecar no timer wake-up per request.
///
/// 4 ms, not 1: each window costs the writer a wake-up, two context switches on a one-core
/// sidecar and a `write` that starts new page-cache pages; at 4 ms the proxy spent ~0.4 us
/// (2-3%) less CPU per request at full load, lower in 16 of 19 alternating rounds against
/// 1 ms (2 ms took two thirds of that; docs/performance.md). A record still reaches the sink
/// within a few milliseconds, and none is ever dropped: the window only groups them.
const BATCH_WINDOW: Duration = Duration::from_millis(4);
/// A batch never holds more than this many records.
const MAX_BATCH: usize = 256;
/// Serialization buffers kept for reuse, and the largest kept: a record with a large input (a
/// long tool call) is not worth holding its buffer for.
///
/// Twice a batch: at full load a window gathers about a batch of records (4 ms at 67k
/// requests a second is 268), and those serialized while the last batch is being written
/// need buffers too; with one batch's worth, one record in twelve found none. At most 4 KiB
/// each (a usual record is under 1 KiB), so the pool never holds more than 2 MiB, whatever
/// the records of the last busy spell carried.
const SPARE_BUFFERS: usize = 2 * MAX_BATCH;
const SPARE_BUFFER_BYTES: usize = 4 * 1024;
/// The capacity a record's buffer starts with when there is no spare: a record without a
/// user token or protocol context is about 900 bytes.
const RECORD_BYTES: usize = 1024;

/// How long a batch that starts `now` waits before it is written (see [`BATCH_WINDOW`]).
fn batch_wait(last_write: Option<Instant>, now: Instant) -> Option<Duration> {
    let since = now.saturating_duration_since(last_write?);
    BATCH_WINDOW
        .checked_sub(since)
        .filter(|wait| !wait.is_zero())
}

impl AuditLog {
    /// Opens the sink, writes the chain's `start` line, and starts the writer thread.
    /// Fails if the sink cannot be opened or written now: better not to start than to start
    /// unaudited.
    pub fn start(sink: &AuditSink, metrics: Metrics) -> io::Result<(Self, AuditWriter)> {
        Self::start_with_capacity(sink, metrics, QUEUE_DEPTH, None, ADMIT_TIMEOUT)
    }

    /// [`AuditLog::start`], writing signed checkpoints.
    pub fn start_sealed(
        sink: &AuditSink,
        metrics: Metrics,
        checkpoints: Option<Checkpoints>,
    ) -> io::Result<(Self, AuditWriter)> {
        Self::start_with_capacity(sink, metrics, QUEUE_DEPTH, checkpoints, ADMIT_TIMEOUT)
    }

    fn start_with_capacity(
        sink: &AuditSink,
        metrics: Metrics,
        capacity: usize,
        checkpoints: Option<Checkpoints>,
        admit_timeout: Duration,
    ) -> io::Result<(Self, AuditWriter)> {
        let (mut out, last) = Output::open(sink)?;
        let mut start = serde_json::json!({
            "type": "start",
            "time": rfc3339(SystemTime::now()),
            "version": env!("CARGO_PKG_VERSION"),
            // `stdout` for any sink that cannot be read back (stdout, a pipe): its starts
            // begin at genesis.
            "sink": if out.readback { "file" } else { "stdout" },
        });
        if let Some(checkpoints) = &checkpoints {
            start["key_id"] = checkpoints.key.key_id().into();
        }
        let mut chain = Chain {
            prev: last.unwrap_or_else(|| GENESIS.to_owned()),
        };
        let mut first = Lines::default();
        chain.link(&start, &mut first);
        out.write_lines(&first)?;

        let (tx, rx) = mpsc::unbounded_channel::<Entry>();
        let backlog = Arc::new(Backlog {
            queued: AtomicUsize::new(0),
            capacity,
            drained: Notify::new(),
            spare: Mutex::new(Vec::new()),
            deferred: Mutex::new(Deferred::default()),
            writing_since: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        if let Some(checkpoints) = &checkpoints {
            // The clock holds only a weak handle, so it never keeps the writer alive.
            let clock = tx.downgrade();
            let interval = checkpoints.interval;
            std::thread::Builder::new()
                .name("portcullis-audit-clock".to_owned())
                .spawn(move || {
                    loop {
                        std::thread::sleep(interval);
                        match clock.upgrade() {
                            Some(tx) if tx.send(Entry::Checkpoint).is_ok() => {}
                            _ => return,
                        }
                    }
                })?;
        }
        let writer = Writer {
            rx,
            out,
            chain,
            backlog: backlog.clone(),
            metrics: metrics.clone(),
            key: checkpoints.map(|c| c.key),
            unsealed: 1,
        };
        let thread = std::thread::Builder::new()
            .name("portcullis-audit".to_owned())
            .spawn(move || {
                // Woken once per batch, it waits for the serving thread to block or its time
                // slice to end instead of pre-empting it mid-request. On one core at 46k
                // requests a second: 280 batches a second instead of 850, a third of the
                // context switches, 3.4% less CPU per request. Records then reach the sink a
                // few milliseconds after their request ends (about 3.5 ms apart at that
                // rate), and only while the core is saturated.
                if let Err(error) = portcullis_memory::run_as_batch() {
                    tracing::debug!(%error, "audit writer left in the normal scheduling class");
                }
                writer.run();
            })?;
        Ok((
            Self(Arc::new(LogHandle {
                tx,
                backlog,
                metrics,
                admit_timeout,
            })),
            AuditWriter { thread },
        ))
    }

    /// Admits a request before it is served. Immediate while the sink keeps up; waits while
    /// the sink is behind by a full queue of finished records (back-pressure); fails when the
    /// sink has failed, or is stuck beyond the admit timeout.
    pub async fn admit(&self) -> Result<(), AuditUnavailable> {
        if self.has_room()? {
            return Ok(());
        }
        tokio::time::timeout(self.0.admit_timeout, async {
            loop {
                let drained = self.0.backlog.drained.notified();
                tokio::pin!(drained);
                // Registered before the re-check, so a batch written in between is not missed.
                drained.as_mut().enable();
                if self.has_room()? {
                    return Ok(());
                }
                drained.await;
            }
        })
        .await
        .unwrap_or(Err(AuditUnavailable))
    }

    fn has_room(&self) -> Result<bool, AuditUnavailable> {
        if self.0.tx.is_closed() {
            return Err(AuditUnavailable);
        }
        Ok(self.0.backlog.queued.load(Ordering::Acquire) < self.0.backlog.capacity)
    }

    /// Submits a finished record from a task of its own, which runs once the task that
    /// finished the record has yielded and the tasks woken meanwhile have run; outside a
    /// runtime, at once. A guard is dropped while its response is being written: as hyper
    /// takes the body's last frame, before the last bytes (or the whole of a small response)
    /// go out. Serializing the record there and waking the writer thread, which then takes
    /// the core from the serving thread on a one-core sidecar, delayed those bytes by 40-90 us
    /// on a cold request (syscall traces). Over HTTP/2 the body is taken by the stream's own
    /// task, which wakes the connection's task to write the end of the stream only after the
    /// guard is dropped: the submitter, queued first, ran first (the `END_STREAM` frame
    /// went out after the record and the writer thread's turn), so it steps back once
    /// ([`YieldOnce`]). Records finished in the same turn of the runtime share one task.
    fn submit_soon(&self, record: Box<AuditRecord>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.submit(&record);
            return;
        };
        {
            let mut deferred = self
                .0
                .backlog
                .deferred
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            deferred.records.push(record);
            if deferred.scheduled {
                return;
            }
            deferred.scheduled = true;
        }
        let submitter = Submitter(self.clone());
        drop(runtime.spawn(async move {
            YieldOnce(false).await;
            drop(submitter);
        }));
    }

    /// Hands a finished record to the writer. Never waits: the request was admitted when it
    /// started, and the record of a request that was served must not be dropped for lack of
    /// room. If the sink has failed the record is lost, and counted as such.
    ///
    /// The record is serialized here, on a runtime thread (the request's own on a one-core
    /// sidecar): handing the writer the record itself made it free some twenty strings
    /// allocated on another thread per request, which cost glibc's allocator more than the
    /// serializing does.
    fn submit(&self, record: &AuditRecord) {
        let spare = self
            .0
            .backlog
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        // Without a spare (a burst beyond them), a buffer of a usual record's size at once,
        // rather than six doublings to reach it.
        let mut object = spare.unwrap_or_else(|| Vec::with_capacity(RECORD_BYTES));
        json::write_record(&mut object, record);
        self.0.backlog.queued.fetch_add(1, Ordering::AcqRel);
        if self.0.tx.send(Entry::Record(object)).is_err() {
            self.0.backlog.queued.fetch_sub(1, Ordering::AcqRel);
            self.0.metrics.audit_write_failures.inc();
            tracing::error!("audit sink failed; the record of a served request is lost");
        }
    }

    /// Failed when the queue is closed; stuck when records are waiting and the writer has
    /// been in one write for longer than the admission timeout. For `/readyz`, not the
    /// request path: it reads the clock.
    pub fn health(&self) -> AuditHealth {
        if self.0.tx.is_closed() {
            return AuditHealth::Failed;
        }
        let backlog = &self.0.backlog;
        match backlog.writing_for() {
            Some(writing_for)
                if writing_for > self.0.admit_timeout
                    && backlog.queued.load(Ordering::Acquire) > 0 =>
            {
                AuditHealth::Stuck { writing_for }
            }
            _ => AuditHealth::Healthy,
        }
    }
}

/// The writer thread's state: it owns the sink and the chain.
struct Writer {
    rx: mpsc::UnboundedReceiver<Entry>,
    out: Output,
    chain: Chain,
    backlog: Arc<Backlog>,
    metrics: Metrics,
    key: Option<Arc<SigningKey>>,
    /// Lines written since the last checkpoint.
    unsealed: usize,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // One buffer for every batch's lines, kept: serializing into it costs no allocation
        // once it has grown to a batch's size.
        let mut lines = Lines::default();
        let mut done = Vec::with_capacity(MAX_BATCH);
        let mut last_write = None;
        // Whether records keep coming: the last batch held more than one entry; and whether it
        // was cut at `MAX_BATCH`, so that more are likely waiting already (a backlog after the
        // sink stalled is drained at once, as requests may be waiting for room).
        let (mut steady, mut full) = (false, false);
        loop {
            let first = if steady {
                // Under steady load the next batch is waited for on the clock, not on the
                // queue: parked on an empty queue, this thread would be woken by the next
                // request's submission (a futex wake on the serving thread, which this thread
                // then pre-empts) and would then sleep out the window anyway. A window that
                // brings nothing ends the spell.
                if !full && let Some(wait) = batch_wait(last_write, Instant::now()) {
                    std::thread::sleep(wait);
                }
                match self.rx.try_recv() {
                    Ok(entry) => entry,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        steady = false;
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match self.rx.blocking_recv() {
                    Some(entry) => entry,
                    None => break,
                }
            };
            batch.push(first);
            self.gather(&mut batch);
            let now = Instant::now();
            self.backlog.writing(now);
            if batch.len() < MAX_BATCH
                && let Some(wait) = batch_wait(last_write, now)
            {
                std::thread::sleep(wait);
                self.gather(&mut batch);
            }
            (steady, full) = (batch.len() > 1, batch.len() >= MAX_BATCH);
            let mut count = 0;
            lines.clear();
            for entry in batch.drain(..) {
                match entry {
                    Entry::Record(mut object) => {
                        count += 1;
                        self.chain.link_object(&object, &mut lines);
                        self.unsealed += 1;
                        if object.capacity() <= SPARE_BUFFER_BYTES {
                            object.clear();
                            done.push(object);
                        }
                    }
                    Entry::Checkpoint => self.checkpoint(&mut lines),
                }
            }
            self.give_back(&mut done);
            let written = self.out.write_lines(&lines);
            last_write = Some(Instant::now());
            self.backlog.written();
            self.backlog.queued.fetch_sub(count, Ordering::AcqRel);
            self.backlog.drained.notify_waiters();
            if let Err(error) = written {
                self.fail(count, &error);
                return;
            }
        }
        // Every handle is gone (shutdown): seal what was written since the last checkpoint.
        lines.clear();
        self.checkpoint(&mut lines);
        if let Err(error) = self.out.write_lines(&lines) {
            tracing::error!(%error, "audit sink failed writing the final checkpoint");
        }
    }

    /// A signed checkpoint line, if there is a key and anything to seal.
    fn checkpoint(&mut self, lines: &mut Lines) {
        let Some(key) = self.key.as_ref() else {
            return;
        };
        if self.unsealed == 0 {
            return;
        }
        let time = rfc3339(SystemTime::now());
        let signature = key.sign(&self.chain.prev, &time);
        self.chain.link(
            &serde_json::json!({
                "type": "checkpoint",
                "time": time,
                "key_id": key.key_id(),
                "sealed": self.unsealed,
                "signature": signature,
            }),
            lines,
        );
        self.unsealed = 0;
    }

    /// Returns a batch's serialization buffers to the spares, up to [`SPARE_BUFFERS`].
    fn give_back(&self, done: &mut Vec<Vec<u8>>) {
        let mut spare = self
            .backlog
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let keep = done.len().min(SPARE_BUFFERS.saturating_sub(spare.len()));
        spare.extend(done.drain(..keep));
        drop(spare);
        // What did not fit is freed outside the lock.
        done.clear();
    }

    fn gather(&mut self, batch: &mut Vec<Entry>) {
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
    }

    /// The sink failed: closing the queue makes every later request fail closed (503), and
    /// every record not known to be written is counted as lost, never dropped silently.
    fn fail(&mut self, unconfirmed: usize, error: &io::Error) {
        self.rx.close();
        let queued = std::iter::from_fn(|| self.rx.try_recv().ok())
            .filter(|entry| matches!(entry, Entry::Record(_)))
            .count();
        self.backlog.queued.fetch_sub(queued, Ordering::AcqRel);
        self.backlog.drained.notify_waiters();
        let lost = unconfirmed + queued;
        self.metrics
            .audit_write_failures
            .inc_by(u64::try_from(lost).unwrap_or(u64::MAX));
        tracing::error!(%error, lost, "audit sink failed; refusing requests from now on");
    }
}

/// The record of one request under construction; written when dropped.
#[derive(Debug)]
pub struct AuditGuard {
    log: AuditLog,
    started: Instant,
    arrived: SystemTime,
    inventory: Arc<Inventory>,
    pub record: RecordBox,
}

/// A guard's record, boxed: the guard moves with its request (into the response body, then
/// into that body's box) and the record is ~500 bytes, which each move copied (five copies a
/// request with the structs around it, ~630 instructions, against one allocation; it is made
/// in its box, see `pipeline::handle`). Read and written through `Deref`; empty only once the
/// guard has been dropped and the record submitted.
#[derive(Debug)]
pub struct RecordBox(Option<Box<AuditRecord>>);

impl std::ops::Deref for RecordBox {
    type Target = AuditRecord;

    fn deref(&self) -> &AuditRecord {
        // Never empty while the guard can be reached; an empty record rather than a panic.
        static TAKEN: std::sync::OnceLock<AuditRecord> = std::sync::OnceLock::new();
        self.0
            .as_deref()
            .unwrap_or_else(|| TAKEN.get_or_init(AuditRecord::default))
    }
}

impl std::ops::DerefMut for RecordBox {
    fn deref_mut(&mut self) -> &mut AuditRecord {
        self.0.get_or_insert_with(Box::default)
    }
}

impl AuditGuard {
    /// Starts the record of a request that starts now: its `time` is set here, and the same
    /// moment on the monotonic clock times the request ([`Self::started`]).
    pub fn new(log: AuditLog, inventory: Arc<Inventory>, mut record: Box<AuditRecord>) -> Self {
        let arrived = SystemTime::now();
        record.time = rfc3339(arrived);
        Self {
            log,
            started: Instant::now(),
            arrived,
            inventory,
            record: RecordBox(Some(record)),
        }
    }

    /// When the request started, on the monotonic clock.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the request started, on the wall clock (the record's `time`).
    pub fn arrived(&self) -> SystemTime {
        self.arrived
    }
}

thread_local! {
    /// The finished record's resource as `Type::"id"`, for the inventory: written into the
    /// same buffer each time rather than allocated per request.
    static ENTITY_TEXT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let metrics = &self.log.0.metrics;
        metrics.request_duration.observe(elapsed.as_secs_f64());
        self.record.duration_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
        // The inventory is fed from the finished record, exactly as `portcullis inventory`
        // reads it back from audit files, so the two views cannot disagree.
        let record = &self.record;
        if let Some(agent) = &record.agent {
            let agents = ENTITY_TEXT.with_borrow_mut(|text| {
                text.clear();
                if let Some(r) = &record.resource {
                    // Writing to a `String` cannot fail.
                    let _ = portcullis_core::write_entity(text, r.kind, &r.id);
                }
                self.inventory.observe(&Observation {
                    time: &record.time,
                    agent,
                    user: record.user.as_ref().map(|u| u.0.subject.as_str()),
                    action: record.action,
                    resource: record.resource.is_some().then_some(text.as_str()),
                    decision: record.decision,
                })
            });
            metrics
                .agents_seen
                .set(i64::try_from(agents).unwrap_or(i64::MAX));
        }
        if let Some(record) = self.record.0.take() {
            self.log.submit_soon(record);
        }
    }
}

/// The open sink, with size-based rotation for files.
struct Output {
    writer: Box<dyn Write + Send>,
    file: Option<FileTarget>,
    written: u64,
    /// Whether what was written can be read back (a regular file): the next process's
    /// start line links to it.
    readback: bool,
}

struct FileTarget {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    keep: usize,
}

impl Output {
    /// Opens the sink; for a file, also the hash of the last line already in it (or in the
    /// newest rotated file when it is empty), which the new `start` line links to.
    fn open(sink: &AuditSink) -> io::Result<(Self, Option<String>)> {
        match sink {
            AuditSink::Stdout => Ok((
                Self {
                    writer: Box::new(io::stdout()),
                    file: None,
                    written: 0,
                    readback: false,
                },
                None,
            )),
            AuditSink::File {
                path,
                rotate_bytes,
                keep,
            } => {
                // Only a regular file can be read back (a FIFO or device would block or
                // hand out someone else's bytes): anything else starts at genesis, like
                // stdout, and says so in the start line.
                let regular = match std::fs::metadata(path) {
                    Ok(metadata) => metadata.is_file(),
                    Err(_) => true,
                };
                let mut last = None;
                if regular {
                    last = last_line_hash(path)?;
                    if last.is_none() {
                        last = last_line_hash(&numbered(path, 1))?;
                    }
                }
                let mut file = OpenOptions::new().create(true).append(true).open(path)?;
                let mut written = file.metadata().map(|m| m.len()).unwrap_or(0);
                if regular && written > 0 && !ends_with_newline(path)? {
                    // A torn last line (the process died mid-write) stays, as a line of its
                    // own: it is hashed into the chain, and `verify` reports it.
                    file.write_all(b"\n")?;
                    written += 1;
                }
                Ok((
                    Self {
                        writer: Box::new(file),
                        file: Some(FileTarget {
                            path: path.clone(),
                            rotate_bytes: *rotate_bytes,
                            keep: (*keep).max(1),
                        }),
                        written,
                        readback: regular,
                    },
                    last,
                ))
            }
        }
    }

    /// Writes `lines` (each with its newline) and flushes once, rotating first whenever the
    /// next line would not fit. A record is never split across files, and the chain simply
    /// continues in the new file.
    fn write_lines(&mut self, lines: &Lines) -> io::Result<()> {
        let (mut unwritten, mut line_start) = (0, 0);
        for &end in &lines.ends {
            let len = (end - line_start) as u64;
            if self.must_rotate(len) {
                self.writer.write_all(&lines.buf[unwritten..line_start])?;
                unwritten = line_start;
                self.rotate()?;
            }
            self.written += len;
            line_start = end;
        }
        self.writer.write_all(&lines.buf[unwritten..line_start])?;
        self.writer.flush()
    }

    fn must_rotate(&self, len: u64) -> bool {
        matches!(&self.file, Some(FileTarget { rotate_bytes: Some(limit), .. })
            if self.written > 0 && self.written + len > *limit)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let Some(target) = &self.file else {
            return Ok(());
        };
        self.writer.flush()?;
        for index in (1..target.keep).rev() {
            let from = numbered(&target.path, index);
            if from.exists() {
                std::fs::rename(&from, numbered(&target.path, index + 1))?;
            }
        }
        std::fs::rename(&target.path, numbered(&target.path, 1))?;
        self.writer = Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&target.path)?,
        );
        self.written = 0;
        Ok(())
    }
}

/// The SHA-256 of the last line of `path` (without its newline), read from the end; `None`
/// when the file is missing or empty.
fn last_line_hash(path: &std::path::Path) -> io::Result<Option<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let len = file.metadata()?.len();
    let mut tail = Vec::new();
    let mut from = len;
    // Read backwards in growing chunks until the line before the last one ends in view.
    loop {
        let chunk = (tail.len() as u64).max(64 * 1024).min(from);
        from -= chunk;
        file.seek(SeekFrom::Start(from))?;
        let mut buf = vec![0; usize::try_from(chunk).unwrap_or(0)];
        file.read_exact(&mut buf)?;
        buf.extend_from_slice(&tail);
        tail = buf;
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        if let Some(at) = body.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(line_hash(&body[at + 1..])));
        }
        if from == 0 {
            return Ok((!body.is_empty()).then(|| line_hash(body)));
        }
    }
}

fn ends_with_newline(path: &std::path::Path) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

fn numbered(path: &std::path::Path, index: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

/// The first break found by [`verify_trail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub file: PathBuf,
    /// 1-based line number within `file` (0: the file as a whole).
    pub line: usize,
    pub problem: Problem,
}

/// What is wrong at a [`ChainBreak`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The line does not carry the hash of the line before it: lines were deleted, edited,
    /// reordered, or files given out of order.
    Link { expected: String, found: String },
    /// A `start` line claiming to begin a new trail (`genesis`) after other lines: a file
    /// sink's process start links to the line before it, so this one was fabricated or
    /// what came before it belongs to another trail.
    Genesis,
    /// A checkpoint whose signature does not verify with the given key: something before it
    /// was rewritten (chain hashes recomputed), or the key is not this trail's.
    Signature,
    /// A file named on the command line does not exist.
    MissingFile,
    /// The line is not UTF-8 (`valid_up_to` bytes are), and no process start links to it
    /// as to a torn line.
    NotUtf8 { valid_up_to: usize },
    /// The line is not JSON, and no process start links to it as to a torn line.
    NotJson { error: String },
}

/// What [`Problem::NotUtf8`] and [`Problem::NotJson`] add: when such a line is accepted.
const TORN_HINT: &str =
    "a line cut short by a crash is accepted only when the next line, a process start, links to it";

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file.display();
        let line = self.line;
        match &self.problem {
            Problem::Link { expected, found } => write!(
                f,
                "{file}:{line}: chain broken: prev_hash should be {expected} (SHA-256 of the line before), found {found}"
            ),
            Problem::Genesis => write!(
                f,
                "{file}:{line}: chain broken: a start line begins a new chain (genesis) after other records"
            ),
            Problem::Signature => write!(
                f,
                "{file}:{line}: checkpoint signature does not verify: records before it were changed, or the key is not this trail's"
            ),
            Problem::MissingFile => write!(f, "{file}: missing: the file does not exist"),
            Problem::NotUtf8 { valid_up_to } => write!(
                f,
                "{file}:{line}: chain broken: not UTF-8 (invalid bytes after byte {valid_up_to}); {TORN_HINT}"
            ),
            Problem::NotJson { error } => write!(
                f,
                "{file}:{line}: chain broken: not JSON ({error}); {TORN_HINT}"
            ),
        }
    }
}

/// A torn line: the last line a process wrote before it died mid-write (killed, disk full),
/// cut short. The next process start links to it by hash, so the chain goes on through it;
/// its own link to the line before it cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tear {
    pub file: PathBuf,
    /// 1-based line number within `file`.
    pub line: usize,
}

impl std::fmt::Display for Tear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: torn line: a process stopped mid-write (a crash or a full disk); the next process start links to it, so the chain continues",
            self.file.display(),
            self.line
        )
    }
}

/// One process run of a verified trail: its `start` line and the lines up to the next one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunSummary {
    /// The `time` of its start line; `None` for a run whose start is not in the files given
    /// (the trail starts mid-chain).
    pub started: Option<String>,
    /// Its start line says `"sink":"stdout"`: it began at `genesis`, chained to no run before.
    pub stdout: bool,
    pub records: usize,
    /// Checkpoints seen (verified when a key was given).
    pub checkpoints: usize,
    /// Lines after its last verified checkpoint (all its lines when no key was given): a
    /// checkpoint seals its own run only, because a process links its start to whatever it
    /// finds in the file, so what an earlier run left unsealed no later signature covers.
    pub unsigned: usize,
}

/// What a verified trail holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainSummary {
    pub records: usize,
    /// Process starts seen.
    pub starts: usize,
    /// Checkpoints seen (verified when a key was given).
    pub checkpoints: usize,
    /// With a key, the last run's lines after its last verified checkpoint; without one,
    /// every line: the part a truncation could remove without a trace. Earlier runs' are in
    /// `runs`.
    pub unsigned_tail: usize,
    /// The first file does not begin at `genesis` (its older files were pruned): its first
    /// line is taken on trust.
    pub mid_chain: bool,
    /// The trail was written to stdout (or a pipe): every run begins at `genesis`, chained
    /// within itself only.
    pub stdout: bool,
    /// Every run, oldest first.
    pub runs: Vec<RunSummary>,
    /// Torn lines the chain continues through.
    pub tears: Vec<Tear>,
}

/// [`verify_trail`] without a checkpoint key.
pub fn verify_chain(files: &[PathBuf]) -> io::Result<Result<ChainSummary, ChainBreak>> {
    verify_trail(files, None)
}

/// Checks the hash chain across `files`, given oldest first (rotated files continue the
/// chain of the file before them), and with `key` every checkpoint's signature. Every line
/// must carry the SHA-256 of the line before it, process `start` lines included; only the
/// very first line may begin the trail (`genesis`), or, when older files were pruned, be
/// taken as it is (`mid_chain`). On a trail captured from stdout, where a start line cannot
/// link to what came before, `genesis` starts are accepted after a first stdout start.
///
/// Files are read as bytes: a line that is not UTF-8 or not JSON is a torn line (reported
/// in [`ChainSummary::tears`], and verification goes on) when the next line is a process
/// start that links to it by hash (on a stdout trail, any stdout start: it links to nothing),
/// and a break at that line otherwise.
pub fn verify_trail(
    files: &[PathBuf],
    key: Option<&VerifyingKey>,
) -> io::Result<Result<ChainSummary, ChainBreak>> {
    let mut verifier = Verifier {
        key,
        summary: ChainSummary::default(),
        prev: None,
        torn: None,
        lines: 0,
    };
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(Err(ChainBreak {
                    file: file.clone(),
                    line: 0,
                    problem: Problem::MissingFile,
                }));
            }
            Err(error) => return Err(error),
        };
        if bytes.is_empty() {
            continue;
        }
        let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        for (index, line) in body.split(|&b| b == b'\n').enumerate() {
            if let Err(broken) = verifier.line(file, index + 1, line) {
                return Ok(Err(broken));
            }
        }
    }
    Ok(verifier.finish())
}

/// [`verify_trail`]'s state between lines.
struct Verifier<'k> {
    key: Option<&'k VerifyingKey>,
    summary: ChainSummary,
    /// The hash of the line before.
    prev: Option<String>,
    /// A line that is not UTF-8 or JSON, as the break it is unless the next line is a
    /// process start that links to it.
    torn: Option<ChainBreak>,
    lines: usize,
}

impl Verifier<'_> {
    fn line(
        &mut self,
        file: &std::path::Path,
        number: usize,
        line: &[u8],
    ) -> Result<(), ChainBreak> {
        let at = |problem| ChainBreak {
            file: file.to_owned(),
            line: number,
            problem,
        };
        self.lines += 1;
        let value = match parse_line(line) {
            Ok(value) => value,
            Err(problem) => {
                // Two in a row: the first is not torn, whatever the second is.
                if let Some(torn) = self.torn.take() {
                    return Err(torn);
                }
                if self.prev.is_none() {
                    self.summary.mid_chain = true;
                }
                self.torn = Some(at(problem));
                self.run().unsigned += 1;
                self.prev = Some(line_hash(line));
                return Ok(());
            }
        };
        let found = value["prev_hash"].as_str().unwrap_or("(none)").to_owned();
        let kind = value["type"].as_str().unwrap_or("");
        let stdout_start = kind == "start" && value["sink"] == "stdout";
        if let Some(torn) = self.torn.take() {
            // A start links to the torn line before it; on a stdout trail a start cannot link
            // to anything (it begins at genesis), so the torn end of the run before is taken
            // as such there.
            let links = self.prev.as_deref() == Some(found.as_str())
                || (self.summary.stdout && stdout_start && found == GENESIS);
            if kind == "start" && links {
                self.summary.tears.push(Tear {
                    file: torn.file,
                    line: torn.line,
                });
            } else {
                return Err(torn);
            }
        }
        match &self.prev {
            None => {
                if kind == "start" && found == GENESIS {
                    self.summary.stdout = stdout_start;
                } else {
                    self.summary.mid_chain = true;
                }
            }
            Some(_) if kind == "start" && found == GENESIS => {
                if !(self.summary.stdout && stdout_start) {
                    return Err(at(Problem::Genesis));
                }
            }
            Some(expected) if *expected != found => {
                return Err(at(Problem::Link {
                    expected: expected.clone(),
                    found,
                }));
            }
            Some(_) => {}
        }
        if kind == "start" {
            self.summary.starts += 1;
            self.summary.runs.push(RunSummary {
                started: Some(value["time"].as_str().unwrap_or("?").to_owned()),
                stdout: stdout_start,
                ..RunSummary::default()
            });
        }
        let key = self.key;
        let run = self.run();
        run.unsigned += 1;
        match kind {
            "start" => {}
            "checkpoint" => {
                run.checkpoints += 1;
                if let Some(key) = key {
                    let time = value["time"].as_str().unwrap_or("");
                    let signature = value["signature"].as_str().unwrap_or("");
                    if !key.verifies(&found, time, signature) {
                        return Err(at(Problem::Signature));
                    }
                    run.unsigned = 0;
                }
                self.summary.checkpoints += 1;
            }
            _ => {
                run.records += 1;
                self.summary.records += 1;
            }
        }
        self.prev = Some(line_hash(line));
        Ok(())
    }

    /// The run the current line belongs to: the last one started, or, before the first
    /// start line of a trail that starts mid-chain, one whose start is not in view.
    fn run(&mut self) -> &mut RunSummary {
        if self.summary.runs.is_empty() {
            self.summary.runs.push(RunSummary::default());
        }
        let last = self.summary.runs.len() - 1;
        &mut self.summary.runs[last]
    }

    fn finish(mut self) -> Result<ChainSummary, ChainBreak> {
        // A last line that is not JSON, with no start after it: torn perhaps, but nothing
        // links to it yet.
        if let Some(torn) = self.torn {
            return Err(torn);
        }
        self.summary.unsigned_tail = match self.key {
            Some(_) => self.summary.runs.last().map_or(0, |run| run.unsigned),
            None => self.lines,
        };
        Ok(self.summary)
    }
}

/// One line of a trail as JSON, or why it is not.
fn parse_line(line: &[u8]) -> Result<serde_json::Value, Problem> {
    let text = std::str::from_utf8(line).map_err(|error| Problem::NotUtf8 {
        valid_up_to: error.valid_up_to(),
    })?;
    serde_json::from_str(text).map_err(|error| Problem::NotJson {
        error: error.to_string(),
    })
}

/// The hash chain: every line names the SHA-256 of the line before it.
#[derive(Debug)]
struct Chain {
    prev: String,
}

impl Chain {
    /// `value` (a JSON object) with `prev_hash` added last, serialized as one line (with its
    /// newline). Appending to the serialized object saves building a JSON tree per record.
    fn link(&mut self, value: &impl Serialize, lines: &mut Lines) {
        let start = lines.buf.len();
        write_object(&mut lines.buf, value);
        self.close(start, lines);
    }

    /// [`Chain::link`] for an object already serialized (a record, see [`AuditLog::submit`]).
    fn link_object(&mut self, object: &[u8], lines: &mut Lines) {
        let start = lines.buf.len();
        lines.buf.extend_from_slice(object);
        self.close(start, lines);
    }

    /// Adds `prev_hash` to the object from `start` on, ends the line, and moves the chain on.
    fn close(&mut self, start: usize, lines: &mut Lines) {
        let buf = &mut lines.buf;
        if buf.len() > start && buf.last() == Some(&b'}') {
            buf.pop();
            if buf.len() - start > 1 {
                buf.push(b',');
            }
            buf.extend_from_slice(b"\"prev_hash\":\"");
            buf.extend_from_slice(self.prev.as_bytes());
            buf.extend_from_slice(b"\"}");
        }
        // Into the previous hash's own buffer: a line costs the writer no allocation here.
        self.prev.clear();
        crate::pipeline::push_hex(&mut self.prev, &Sha256::digest(&buf[start..]));
        buf.push(b'\n');
        lines.ends.push(buf.len());
    }
}

/// Appends `value` (a JSON object) to `buf`. A value that fails to serialize (not expected:
/// nothing audited has a map with non-string keys) is written as `{}`: every request gets a
/// line, and an empty object still links into the chain.
fn write_object(buf: &mut Vec<u8>, value: &impl Serialize) {
    let start = buf.len();
    if serde_json::to_writer(&mut *buf, value).is_err() {
        buf.truncate(start);
        buf.extend_from_slice(b"{}");
    }
}

/// Lines to write together: their bytes, newlines included, and where each ends.
#[derive(Debug, Default)]
struct Lines {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl Lines {
    fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }
}

/// SHA-256 (hex) of one audit line, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// RFC 3339 UTC with milliseconds.
///
/// Every request's record is stamped: the part up to the second is formatted once per second
/// and thread (as hyper does for its `Date` header), the milliseconds appended.
pub fn rfc3339(at: SystemTime) -> String {
    thread_local! {
        /// The last second formatted, and its text up to and including the `.`.
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((0, String::new())) };
    }
    let Ok(since_epoch) = at.duration_since(SystemTime::UNIX_EPOCH) else {
        return rfc3339_formatted(at);
    };
    let second = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    SECOND.with_borrow_mut(|(last, text)| {
        if *last != second || text.is_empty() {
            let at = time::OffsetDateTime::from(at);
            let format =
                time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].");
            *text = at.format(&format).unwrap_or_default();
            *last = second;
        }
        let mut out = String::with_capacity(text.len() + 4);
        out.push_str(text);
        for digit in [millis / 100, millis / 10 % 10, millis % 10] {
            out.push(char::from_digit(digit, 10).unwrap_or('0'));
        }
        out.push('Z');
        out
    })
}

/// [`rfc3339`] formatted whole, for times before 1970.
fn rfc3339_formatted(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-second shortcut writes exactly what formatting the whole time does, across
    /// second, day, month, year and leap-day boundaries, before 1970 and in any order.
    #[test]
    fn timestamps_match_the_full_format() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let mut times: Vec<SystemTime> = [
            0,
            999,
            1_000,
            59_999,
            951_782_399_999, // 2000-02-28T23:59:59.999
            951_782_400_000, // 2000-02-29 (a leap day)
            1_704_067_199_999,
            1_704_067_200_000,
            1_764_892_800_123,
            253_402_300_799_999, // 9999-12-31T23:59:59.999
        ]
        .into_iter()
        .map(at)
        .collect();
        times.extend((0..2_000).map(|i| at(1_764_892_799_000 + i * 7)));
        times.push(SystemTime::UNIX_EPOCH - Duration::from_millis(1));
        times.push(SystemTime::UNIX_EPOCH - Duration::from_secs(86_400 * 365));
        // Back in time too: the remembered second must not leak into an earlier one.
        times.extend((0..50).map(|i| at(1_764_892_900_000 - i * 333)));
        for time in times {
            assert_eq!(rfc3339(time), rfc3339_formatted(time), "{time:?}");
        }
        assert_eq!(rfc3339(at(951_782_400_042)), "2000-02-29T00:00:00.042Z");
    }

    /// A directory for one test's audit file, and the file's path in it.
    fn audit_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        (dir, path)
    }

    fn file_sink(path: &std::path::Path) -> AuditSink {
        AuditSink::File {
            path: path.to_owned(),
            rotate_bytes: None,
            keep: 1,
        }
    }

    /// Group commit paces writes instead of delaying each batch: after a quiet spell (or
    /// before the first write) a batch goes out at once; within a window of the last write it
    /// waits out the rest of that window.
    #[test]
    fn a_batch_waits_only_within_a_window_of_the_last_write() {
        let now = Instant::now();
        assert_eq!(batch_wait(None, now), None);
        let long_ago = now.checked_sub(BATCH_WINDOW * 5).unwrap_or(now);
        assert_eq!(batch_wait(Some(long_ago), now), None);
        let exactly = now.checked_sub(BATCH_WINDOW).unwrap_or(now);
        assert_eq!(batch_wait(Some(exactly), now), None);
        let quarter = BATCH_WINDOW / 4;
        assert_eq!(
            batch_wait(Some(now.checked_sub(quarter).unwrap_or(now)), now),
            Some(BATCH_WINDOW - quarter)
        );
        assert_eq!(batch_wait(Some(now), now), Some(BATCH_WINDOW));
        // A `now` before the last write (not expected of a monotonic clock) waits it all.
        assert_eq!(batch_wait(Some(now + quarter), now), Some(BATCH_WINDOW));
    }

    /// The `request_id` of every record in an audit file, in order (after the `start` line).
    fn written_ids(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .skip(1)
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .map(|record| record["request_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Guards dropped on a runtime hand their records to a task that runs once the dropping
    /// task yields; records dropped in the same turn share one task. None is lost, even when
    /// the runtime is dropped with that task unrun (a shutdown): the writer thread waits
    /// for it, and dropping it submits them.
    #[test]
    fn records_deferred_to_a_task_are_written_even_if_it_never_runs() {
        let (_dir, path) = audit_dir();
        let (log, writer) = AuditLog::start(&file_sink(&path), Metrics::new()).unwrap();
        let inventory = Arc::new(Inventory::new());
        let guard = |id: &str| {
            let record = AuditRecord {
                request_id: id.to_owned().into(),
                ..AuditRecord::default()
            };
            AuditGuard::new(log.clone(), inventory.clone(), Box::new(record))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            drop(guard("ran-1"));
            drop(guard("ran-2"));
            let deferred = log.0.backlog.deferred.lock().unwrap().records.len();
            assert_eq!(deferred, 2, "submitted before the task yielded");
            tokio::task::yield_now().await;
            assert!(log.0.backlog.deferred.lock().unwrap().records.is_empty());
        });
        runtime.block_on(async {
            drop(guard("unrun"));
        });
        assert!(log.0.backlog.deferred.lock().unwrap().scheduled);
        drop(runtime);
        // Outside a runtime a record is submitted at once.
        drop(guard("outside"));
        drop(log);
        writer.join();

        let ids = written_ids(&path);
        assert_eq!(ids, ["ran-1", "ran-2", "unrun", "outside"]);
        assert_eq!(verify_chain(&[path]).unwrap().unwrap().records, 4);
    }

    /// Under steady load the writer waits for its next batch on the clock, not on the queue
    /// (`Writer::run`). Records must come through that mode, a backlog of several full
    /// batches, its end after a window with nothing, the park on the queue that follows, and
    /// a shutdown in the middle of a steady spell: all written, in order, on one chain.
    #[test]
    fn steady_and_quiet_spells_lose_nothing() {
        let (_dir, path) = audit_dir();
        let (log, writer) = AuditLog::start(&file_sink(&path), Metrics::new()).unwrap();
        let mut submitted = 0;
        let mut burst = |log: &AuditLog, records: usize| {
            for _ in 0..records {
                log.submit(&AuditRecord {
                    request_id: submitted.to_string().into(),
                    ..AuditRecord::default()
                });
                submitted += 1;
            }
        };
        for _ in 0..20 {
            burst(&log, 5);
            std::thread::sleep(BATCH_WINDOW / 4);
        }
        burst(&log, MAX_BATCH * 3 + 1);
        std::thread::sleep(BATCH_WINDOW * 20);
        burst(&log, 1);
        std::thread::sleep(BATCH_WINDOW * 20);
        for _ in 0..5 {
            burst(&log, 5);
            std::thread::sleep(BATCH_WINDOW / 4);
        }
        drop(log);
        writer.join();

        let ids = written_ids(&path);
        let expected: Vec<String> = (0..submitted).map(|id| id.to_string()).collect();
        assert_eq!(ids, expected);
        assert_eq!(verify_chain(&[path]).unwrap().unwrap().records, submitted);
    }

    /// A record too large for the pool (a long tool call's input) is written, and its buffer
    /// freed rather than kept: the pool stays within `SPARE_BUFFERS * SPARE_BUFFER_BYTES`.
    #[test]
    fn large_buffers_are_not_kept_for_reuse() {
        let (_dir, path) = audit_dir();
        let (log, writer) = AuditLog::start(&file_sink(&path), Metrics::new()).unwrap();
        let long = format!("/{}", "x".repeat(2 * SPARE_BUFFER_BYTES));
        // The long one first: the short one's buffer, made afresh, is then the only spare.
        for (index, request_path) in [long.as_str(), "/short"].iter().enumerate() {
            log.submit(&AuditRecord {
                request_id: index.to_string().into(),
                path: (*request_path).into(),
                ..AuditRecord::default()
            });
            while log.0.backlog.queued.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let spare = log.0.backlog.spare.lock().unwrap();
        let capacities: Vec<usize> = spare.iter().map(Vec::capacity).collect();
        drop(spare);
        assert_eq!(
            capacities.len(),
            1,
            "the short record's buffer only: {capacities:?}"
        );
        assert!(capacities[0] <= SPARE_BUFFER_BYTES, "{capacities:?}");
        drop(log);
        writer.join();
        assert_eq!(written_ids(&path), ["0", "1"]);
    }

    /// Each request serializes its record into a buffer the writer gave back: every line
    /// must still be exactly its own record, whatever the record before it in that buffer.
    #[test]
    fn reused_buffers_carry_nothing_from_earlier_records() {
        let (_dir, path) = audit_dir();
        let (log, writer) = AuditLog::start(&file_sink(&path), Metrics::new()).unwrap();
        // Long paths first, then shorter ones: a buffer not emptied before reuse would show.
        let paths: Vec<String> = (0..40)
            .map(|i| format!("/{}", "x".repeat(200 - i * 5)))
            .collect();
        for (index, request_path) in paths.iter().enumerate() {
            log.submit(&AuditRecord {
                request_id: index.to_string().into(),
                path: request_path.as_str().into(),
                ..AuditRecord::default()
            });
            // Written before the next is submitted: one record per batch, so every record
            // after the first is serialized into a buffer an earlier one used.
            while log.0.backlog.queued.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let spares = log.0.backlog.spare.lock().unwrap().len();
        assert!(spares >= 1, "no buffer was given back");
        drop(log);
        writer.join();

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + paths.len());
        for (index, line) in lines[1..].iter().enumerate() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["request_id"], index.to_string());
            assert_eq!(record["path"], paths[index].as_str());
        }
        let summary = verify_chain(&[path]).unwrap().unwrap();
        assert_eq!(summary.records, paths.len());
    }

    /// Submits a record per id, then shuts the writer down (a clean stop).
    fn run_once(sink: &AuditSink, checkpoints: Option<Checkpoints>, ids: &[&str]) {
        let (log, writer) = AuditLog::start_sealed(sink, Metrics::new(), checkpoints).unwrap();
        for id in ids {
            log.submit(&AuditRecord {
                request_id: (*id).to_owned().into(),
                ..AuditRecord::default()
            });
        }
        drop(log);
        writer.join();
    }

    /// The lines of `path` as bytes, without their newlines.
    fn byte_lines(path: &std::path::Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        body.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn write_lines(path: &std::path::Path, lines: &[Vec<u8>], newline_at_end: bool) {
        let mut bytes = lines.join(&b'\n');
        if newline_at_end {
            bytes.push(b'\n');
        }
        std::fs::write(path, bytes).unwrap();
    }

    /// A process that died mid-write left a torn last line; the next process keeps it as a
    /// line and links its start to it. `verify` reports the tear and checks everything after
    /// it, whether the tear split a UTF-8 character or not and whether the start went to the
    /// next (rotated) file; a line that is not JSON or UTF-8 and that no start links to is a
    /// break at its own line.
    #[test]
    fn a_torn_line_the_next_start_links_to_is_reported_and_verification_goes_on() {
        let torn_utf8: &[u8] = b"{\"time\":\"2026-01-01T00:00:00.000Z\",\"request_id\":\"caf\xc3";
        let torn_ascii: &[u8] = b"{\"time\":\"2026-01-01T00:00:00.000Z\",\"request_id\":\"ca";
        for torn in [torn_utf8, torn_ascii] {
            let (dir, path) = audit_dir();
            run_once(&file_sink(&path), None, &["1", "2"]);
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            file.write_all(torn).unwrap();
            drop(file);
            run_once(&file_sink(&path), None, &["3", "4", "5"]);

            let lines = byte_lines(&path);
            assert_eq!(lines[3], torn);
            let summary = verify_chain(std::slice::from_ref(&path)).unwrap().unwrap();
            assert_eq!(summary.records, 5);
            assert_eq!(summary.starts, 2);
            assert_eq!(
                summary.tears,
                [Tear {
                    file: path.clone(),
                    line: 4
                }]
            );

            // The start in the next file: the tear is still one.
            let (older, newer) = (dir.path().join("a.1"), dir.path().join("a"));
            write_lines(&older, &lines[..4], false);
            write_lines(&newer, &lines[4..], true);
            let summary = verify_chain(&[older.clone(), newer]).unwrap().unwrap();
            assert_eq!((summary.records, summary.tears.len()), (5, 1));
            assert_eq!(summary.tears[0].file, older);

            let not_json = |problem: &Problem| match problem {
                Problem::NotUtf8 { .. } => torn == torn_utf8,
                Problem::NotJson { .. } => torn == torn_ascii,
                _ => false,
            };
            // The trail ends at the torn line (no process started since): nothing links to it.
            let copy = dir.path().join("copy");
            write_lines(&copy, &lines[..4], false);
            let broken = verify_chain(std::slice::from_ref(&copy))
                .unwrap()
                .unwrap_err();
            assert_eq!(broken.line, 4);
            assert!(not_json(&broken.problem), "{broken}");
            // A record after it instead of a start.
            let mut no_start = lines.clone();
            no_start.remove(4);
            write_lines(&copy, &no_start, true);
            let broken = verify_chain(std::slice::from_ref(&copy))
                .unwrap()
                .unwrap_err();
            assert_eq!(broken.line, 4);
            assert!(not_json(&broken.problem), "{broken}");
            assert!(
                broken.to_string().contains("copy:4: chain broken"),
                "{broken}"
            );
        }

        // A line in the middle replaced by something that is not JSON.
        let (dir, path) = audit_dir();
        run_once(&file_sink(&path), None, &["1", "2", "3"]);
        let mut lines = byte_lines(&path);
        lines[2] = b"not json".to_vec();
        let copy = dir.path().join("copy");
        write_lines(&copy, &lines, true);
        let broken = verify_chain(&[copy]).unwrap().unwrap_err();
        assert_eq!(broken.line, 3);
        assert!(
            matches!(broken.problem, Problem::NotJson { .. }),
            "{broken}"
        );
    }

    fn test_keys() -> (Arc<SigningKey>, VerifyingKey) {
        let (private, public) = SigningKey::generate().unwrap();
        (
            Arc::new(SigningKey::from_pem(private.as_bytes()).unwrap()),
            VerifyingKey::from_pem(public.as_bytes()).unwrap(),
        )
    }

    /// A checkpoint seals its own run: a process links its start to whatever it finds in
    /// the file, so the lines a crashed run left after its last checkpoint are that run's
    /// unsigned tail, not covered by the next run's checkpoints.
    #[test]
    fn each_run_keeps_its_own_unsigned_tail() {
        let (dir, path) = audit_dir();
        let (key, verifying) = test_keys();
        let checkpoints = Checkpoints {
            key,
            interval: Duration::from_secs(3600),
        };
        // Run 1: two records, a checkpoint, three records, then killed before its final
        // checkpoint (it is cut off: what a crash leaves).
        let (log, writer) =
            AuditLog::start_sealed(&file_sink(&path), Metrics::new(), Some(checkpoints.clone()))
                .unwrap();
        for id in ["1", "2"] {
            log.submit(&AuditRecord {
                request_id: id.into(),
                ..AuditRecord::default()
            });
        }
        log.0.tx.send(Entry::Checkpoint).unwrap();
        for id in ["3", "4", "5"] {
            log.submit(&AuditRecord {
                request_id: id.into(),
                ..AuditRecord::default()
            });
        }
        drop(log);
        writer.join();
        let mut lines = byte_lines(&path);
        assert!(lines.pop().unwrap().starts_with(br#"{"type":"checkpoint""#));
        write_lines(&path, &lines, true);
        // Run 2: two records, and a clean stop.
        run_once(&file_sink(&path), Some(checkpoints), &["6", "7"]);

        let summary = verify_trail(std::slice::from_ref(&path), Some(&verifying))
            .unwrap()
            .unwrap();
        assert_eq!(summary.records, 7);
        assert_eq!(summary.checkpoints, 2);
        assert_eq!(summary.runs.len(), 2);
        assert_eq!((summary.runs[0].records, summary.runs[0].unsigned), (5, 3));
        assert_eq!((summary.runs[1].records, summary.runs[1].unsigned), (2, 0));
        assert_eq!(summary.unsigned_tail, 0, "the last run's");
        let start: serde_json::Value = serde_json::from_slice(&lines[0]).unwrap();
        assert_eq!(summary.runs[0].started.as_deref(), start["time"].as_str());

        // The last run crashed too: its start and records are the tail.
        let mut lines = byte_lines(&path);
        lines.pop();
        let copy = dir.path().join("copy");
        write_lines(&copy, &lines, true);
        let summary = verify_trail(std::slice::from_ref(&copy), Some(&verifying))
            .unwrap()
            .unwrap();
        assert_eq!(summary.unsigned_tail, 3);
        assert_eq!(summary.runs[0].unsigned, 3);
        // Without a key every line is unsigned.
        let summary = verify_chain(&[copy]).unwrap().unwrap();
        assert_eq!(summary.unsigned_tail, lines.len());
    }

    /// Every run of a stdout trail begins at genesis: each is verified on its own, and the
    /// summary lists them with their start times.
    #[test]
    fn a_stdout_trail_is_verified_run_by_run() {
        let (_dir, path) = audit_dir();
        let mut lines = Lines::default();
        for run in 0..3 {
            let mut chain = Chain {
                prev: GENESIS.to_owned(),
            };
            let start = serde_json::json!({
                "type": "start",
                "time": format!("2026-01-0{}T00:00:00.000Z", run + 1),
                "version": "0",
                "sink": "stdout",
            });
            chain.link(&start, &mut lines);
            for id in 0..=run {
                chain.link(&serde_json::json!({ "request_id": id }), &mut lines);
            }
        }
        std::fs::write(&path, &lines.buf).unwrap();
        let summary = verify_chain(std::slice::from_ref(&path)).unwrap().unwrap();
        assert!(summary.stdout);
        assert!(summary.tears.is_empty());
        assert!(!summary.mid_chain);
        assert_eq!((summary.starts, summary.records), (3, 6));
        let runs: Vec<(Option<&str>, usize)> = summary
            .runs
            .iter()
            .map(|run| (run.started.as_deref(), run.records))
            .collect();
        assert_eq!(
            runs,
            [
                (Some("2026-01-01T00:00:00.000Z"), 1),
                (Some("2026-01-02T00:00:00.000Z"), 2),
                (Some("2026-01-03T00:00:00.000Z"), 3),
            ]
        );
    }

    /// A process writing to stdout that died mid-line left a torn line; the next run's start
    /// begins at genesis (a stdout start links to nothing), so the tear is reported and the
    /// runs verified. On a file trail a genesis start after a torn line stays a break.
    #[test]
    fn a_torn_line_before_a_stdout_start_is_a_tear() {
        let (_dir, path) = audit_dir();
        let run = |lines: &mut Lines, day: u32, sink: &str| {
            let mut chain = Chain {
                prev: GENESIS.to_owned(),
            };
            let start = serde_json::json!({
                "type": "start",
                "time": format!("2026-01-0{day}T00:00:00.000Z"),
                "version": "0",
                "sink": sink,
            });
            chain.link(&start, lines);
            chain.link(&serde_json::json!({ "request_id": day }), lines);
        };
        let torn: &[u8] = b"{\"time\":\"2026-01-01T00:00:01.000Z\",\"request_id\":\"caf\xc3";
        for sink in ["stdout", "/var/log/portcullis/audit.jsonl"] {
            let mut lines = Lines::default();
            run(&mut lines, 1, sink);
            lines.buf.extend_from_slice(torn);
            lines.buf.push(b'\n');
            run(&mut lines, 2, sink);
            std::fs::write(&path, &lines.buf).unwrap();
            let verified = verify_chain(std::slice::from_ref(&path)).unwrap();
            if sink == "stdout" {
                let summary = verified.unwrap();
                assert_eq!((summary.starts, summary.records), (2, 2));
                assert_eq!(
                    summary.tears,
                    [Tear {
                        file: path.clone(),
                        line: 3
                    }]
                );
            } else {
                let broken = verified.unwrap_err();
                assert_eq!(broken.line, 3, "{broken}");
                assert!(
                    matches!(broken.problem, Problem::NotUtf8 { .. }),
                    "{broken}"
                );
            }
        }
    }

    /// A writer blocked in `write` (a pipe whose reader stopped reading) keeps the queue
    /// open, so the sink has not failed; with records waiting past the admission timeout it
    /// is stuck (not healthy), and healthy again once writes complete.
    #[test]
    fn a_write_that_does_not_return_makes_the_sink_stuck_until_it_does() {
        use std::io::Read as _;
        let (_dir, path) = audit_dir();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let (resume, resumed) = std::sync::mpsc::channel::<()>();
        let reader_path = path.clone();
        let reader = std::thread::spawn(move || {
            let mut pipe = std::fs::File::open(reader_path).unwrap();
            let mut first = [0u8; 64];
            let _ = pipe.read(&mut first);
            let _ = resumed.recv();
            let mut rest = Vec::new();
            let _ = pipe.read_to_end(&mut rest);
        });
        let (log, writer) = AuditLog::start_with_capacity(
            &file_sink(&path),
            Metrics::new(),
            QUEUE_DEPTH,
            None,
            Duration::from_millis(20),
        )
        .unwrap();
        assert_eq!(log.health(), AuditHealth::Healthy);
        // Far more than a pipe's buffer holds (64 KiB).
        let long = format!("/{}", "x".repeat(2000));
        for id in 0..200 {
            log.submit(&AuditRecord {
                request_id: id.to_string().into(),
                path: long.as_str().into(),
                ..AuditRecord::default()
            });
        }
        let wait_for = |healthy: bool| {
            for _ in 0..3000 {
                if (log.health() == AuditHealth::Healthy) == healthy {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        };
        assert!(wait_for(false), "{:?}", log.health());
        assert!(matches!(log.health(), AuditHealth::Stuck { .. }));
        resume.send(()).unwrap();
        assert!(wait_for(true), "{:?}", log.health());
        drop(log);
        writer.join();
        reader.join().unwrap();
    }
}
