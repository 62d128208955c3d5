//! The audit trail: one JSON line per request, on its own sink, hash-chained.
//!
//! Each line carries `prev_hash`, the SHA-256 (hex) of the previous line's bytes, so a
//! deleted, reordered or edited line breaks the chain. A process starts its chain with a
//! `start` line whose `prev_hash` is a fresh random genesis value.
//!
//! Writing is off the request path (a dedicated thread, group commit: one write and flush
//! per batch, a batch closes at most [`BATCH_WINDOW`] after its first record) but never
//! lossy. A request is admitted before it is served ([`AuditLog::admit`]): at once while the
//! sink keeps up, after a wait when a full queue of finished records is still unwritten
//! (back-pressure), and refused (503) when the sink has failed. Admission reserves nothing,
//! so requests that wait on their caller or the upstream hold no audit capacity. The record
//! is written exactly once, when the request's [`AuditGuard`] is dropped, whatever the
//! outcome; a record that can no longer be written (the sink failed meanwhile) is counted in
//! `portcullis_audit_write_failures_total`, never dropped silently.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};

use crate::inventory::{Inventory, Observation};
use crate::metrics::Metrics;

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
/// and are a contract like metric names.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub request_id: String,
    pub trace_id: Option<String>,
    pub client_address: String,
    pub agent: Option<String>,
    pub user: Option<AuditUser>,
    pub actor_chain: Vec<String>,
    pub method: String,
    pub path: String,
    pub action: Option<&'static str>,
    pub resource: Option<AuditResource>,
    pub decision: Option<&'static str>,
    /// Why the request was refused or failed, when it was (the caller sees the same reason).
    pub reason: Option<&'static str>,
    pub policies: AuditPolicies,
    pub errors: Vec<String>,
    pub policy_hash: Option<String>,
    pub mode: &'static str,
    pub status: u16,
    /// Time to classify and evaluate, in microseconds.
    pub decision_us: Option<u64>,
    /// Time from request head to the end of the response, in milliseconds.
    pub duration_ms: f64,
    /// False when the response did not finish (caller went away, upstream broke mid-body).
    pub completed: bool,
    /// Long-lived credential headers the caller sent (never forwarded), e.g. `x-api-key`.
    pub standing_credentials: Vec<&'static str>,
    /// The Cedar inputs of the decision (agent, user claims, action, resource, request and
    /// protocol fields, time), so `portcullis replay` can decide it again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<portcullis_policy::tools::Question>,
    /// What the shadow set (`policy.shadow_dir`) decided, when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::shadow::ShadowOutcome>,
    /// A call that needed approval: its challenge digest, and who approved it when a grant
    /// was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<AuditApproval>,
    /// The upstream credential attached after the permit (`file` or `token_exchange`), never
    /// its value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<&'static str>,
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

#[derive(Debug, Clone, Serialize)]
pub struct AuditUser {
    pub sub: String,
    pub iss: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditResource {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
}

/// Determining policy ids per question.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditPolicies {
    pub agent: Vec<String>,
    pub user: Option<Vec<String>>,
}

/// The sending half of the audit queue.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<AuditRecord>,
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
}

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
/// Group commit: the writer lets records gather for at most this long after the first one of
/// a batch arrives, then writes the whole batch with one write and one flush. This bounds
/// how late a record reaches the sink, and turns one writer wake-up per request into one
/// per window.
const BATCH_WINDOW: Duration = Duration::from_millis(1);
/// A batch never holds more than this many records.
const MAX_BATCH: usize = 256;

impl AuditLog {
    /// Opens the sink, writes the chain's `start` line, and starts the writer thread.
    /// Fails if the sink cannot be opened or written now: better not to start than to start
    /// unaudited.
    pub fn start(sink: &AuditSink, metrics: Metrics) -> io::Result<(Self, AuditWriter)> {
        Self::start_with_capacity(sink, metrics, QUEUE_DEPTH)
    }

    fn start_with_capacity(
        sink: &AuditSink,
        metrics: Metrics,
        capacity: usize,
    ) -> io::Result<(Self, AuditWriter)> {
        let mut out = Output::open(sink)?;
        let mut genesis = [0u8; 32];
        aws_lc_rs::rand::fill(&mut genesis).map_err(|_| io::Error::other("no randomness"))?;
        let start = serde_json::json!({
            "type": "start",
            "time": rfc3339(SystemTime::now()),
            "version": env!("CARGO_PKG_VERSION"),
        });
        let mut chain = Chain {
            prev: hex::encode(genesis),
        };
        out.write_lines(&[chain.link(&start)])?;

        let (tx, rx) = mpsc::unbounded_channel::<AuditRecord>();
        let backlog = Arc::new(Backlog {
            queued: AtomicUsize::new(0),
            capacity,
            drained: Notify::new(),
        });
        let writer = Writer {
            rx,
            out,
            chain,
            backlog: backlog.clone(),
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("portcullis-audit".to_owned())
            .spawn(move || writer.run())?;
        Ok((
            Self {
                tx,
                backlog,
                metrics,
                admit_timeout: Duration::from_secs(10),
            },
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
        tokio::time::timeout(self.admit_timeout, async {
            loop {
                let drained = self.backlog.drained.notified();
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
        if self.tx.is_closed() {
            return Err(AuditUnavailable);
        }
        Ok(self.backlog.queued.load(Ordering::Acquire) < self.backlog.capacity)
    }

    /// Hands a finished record to the writer. Never waits: the request was admitted when it
    /// started, and the record of a request that was served must not be dropped for lack of
    /// room. If the sink has failed the record is lost, and counted as such.
    fn submit(&self, record: AuditRecord) {
        self.backlog.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(record).is_err() {
            self.backlog.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.audit_write_failures.inc();
            tracing::error!("audit sink failed; the record of a served request is lost");
        }
    }

    pub fn is_healthy(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// The writer thread's state: it owns the sink and the chain.
struct Writer {
    rx: mpsc::UnboundedReceiver<AuditRecord>,
    out: Output,
    chain: Chain,
    backlog: Arc<Backlog>,
    metrics: Metrics,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = self.rx.blocking_recv() {
            batch.push(first);
            self.gather(&mut batch);
            if batch.len() < MAX_BATCH {
                std::thread::sleep(BATCH_WINDOW);
                self.gather(&mut batch);
            }
            let count = batch.len();
            let lines: Vec<Vec<u8>> = batch.drain(..).map(|r| self.chain.link(&r)).collect();
            let written = self.out.write_lines(&lines);
            self.backlog.queued.fetch_sub(count, Ordering::AcqRel);
            self.backlog.drained.notify_waiters();
            if let Err(error) = written {
                self.fail(count, &error);
                return;
            }
        }
    }

    fn gather(&mut self, batch: &mut Vec<AuditRecord>) {
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
    }

    /// The sink failed: closing the queue makes every later request fail closed (503), and
    /// every record not known to be written is counted as lost, never dropped silently.
    fn fail(&mut self, unconfirmed: usize, error: &io::Error) {
        self.rx.close();
        let queued = std::iter::from_fn(|| self.rx.try_recv().ok()).count();
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
    inventory: Arc<Inventory>,
    pub record: AuditRecord,
}

impl AuditGuard {
    pub fn new(log: AuditLog, inventory: Arc<Inventory>, record: AuditRecord) -> Self {
        Self {
            log,
            started: Instant::now(),
            inventory,
            record,
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let metrics = &self.log.metrics;
        metrics.request_duration.observe(elapsed.as_secs_f64());
        self.record.duration_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
        // The inventory is fed from the finished record, exactly as `portcullis inventory`
        // reads it back from audit files, so the two views cannot disagree.
        let record = &self.record;
        let resource = record
            .resource
            .as_ref()
            .map(|r| format!("{}::{:?}", r.kind, r.id));
        if let Some(agent) = &record.agent {
            self.inventory.observe(&Observation {
                time: &record.time,
                agent,
                user: record.user.as_ref().map(|u| u.sub.as_str()),
                action: record.action,
                resource: resource.as_deref(),
                decision: record.decision,
            });
            metrics.agents_seen.set(self.inventory.len() as i64);
        }
        self.log.submit(std::mem::take(&mut self.record));
    }
}

/// The open sink, with size-based rotation for files.
struct Output {
    writer: Box<dyn Write + Send>,
    file: Option<FileTarget>,
    written: u64,
}

struct FileTarget {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    keep: usize,
}

impl Output {
    fn open(sink: &AuditSink) -> io::Result<Self> {
        match sink {
            AuditSink::Stdout => Ok(Self {
                writer: Box::new(io::stdout()),
                file: None,
                written: 0,
            }),
            AuditSink::File {
                path,
                rotate_bytes,
                keep,
            } => {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                let written = file.metadata().map(|m| m.len()).unwrap_or(0);
                Ok(Self {
                    writer: Box::new(file),
                    file: Some(FileTarget {
                        path: path.clone(),
                        rotate_bytes: *rotate_bytes,
                        keep: (*keep).max(1),
                    }),
                    written,
                })
            }
        }
    }

    /// Writes `lines` (each with its newline) and flushes once, rotating first whenever the
    /// next line would not fit. A record is never split across files, and the chain simply
    /// continues in the new file.
    fn write_lines(&mut self, lines: &[Vec<u8>]) -> io::Result<()> {
        let mut pending: Vec<u8> = Vec::new();
        for line in lines {
            let len = line.len() as u64;
            if self.must_rotate(len) {
                self.writer.write_all(&pending)?;
                pending.clear();
                self.rotate()?;
            }
            pending.extend_from_slice(line);
            self.written += len;
        }
        self.writer.write_all(&pending)?;
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

fn numbered(path: &std::path::Path, index: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

/// The first break found by [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub file: PathBuf,
    /// 1-based line number within `file`.
    pub line: usize,
    pub expected: String,
    pub found: String,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: chain broken: prev_hash should be {} (SHA-256 of the line before), found {}",
            self.file.display(),
            self.line,
            self.expected,
            self.found
        )
    }
}

/// What a verified trail holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainSummary {
    pub records: usize,
    /// Process starts seen (each begins its chain from a fresh genesis value).
    pub starts: usize,
}

/// Checks the hash chain across `files`, given oldest first (rotated files continue the
/// chain of the file before them). Every line must carry the SHA-256 of the line before it,
/// except a `start` line, which begins a new process's chain; anything that is not a JSON
/// object with `prev_hash` is a break.
pub fn verify_chain(files: &[PathBuf]) -> io::Result<Result<ChainSummary, ChainBreak>> {
    let mut summary = ChainSummary::default();
    let mut prev: Option<String> = None;
    for file in files {
        let text = std::fs::read_to_string(file)?;
        for (index, line) in text.lines().enumerate() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let found = value["prev_hash"].as_str().unwrap_or("(none)").to_owned();
            let is_start = value["type"] == "start";
            match &prev {
                _ if is_start => summary.starts += 1,
                Some(expected) if *expected == found => summary.records += 1,
                expected => {
                    return Ok(Err(ChainBreak {
                        file: file.clone(),
                        line: index + 1,
                        expected: expected
                            .clone()
                            .unwrap_or_else(|| "a start line".to_owned()),
                        found,
                    }));
                }
            }
            prev = Some(line_hash(line.as_bytes()));
        }
    }
    Ok(Ok(summary))
}

/// The hash chain: every line names the SHA-256 of the line before it.
#[derive(Debug)]
struct Chain {
    prev: String,
}

impl Chain {
    /// `value` (a JSON object) with `prev_hash` added last, serialized as one line (with its
    /// newline). Appending to the serialized object saves building a JSON tree per record.
    fn link(&mut self, value: &impl Serialize) -> Vec<u8> {
        let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        if line.last() == Some(&b'}') {
            line.pop();
            if line.len() > 1 {
                line.push(b',');
            }
            line.extend_from_slice(b"\"prev_hash\":\"");
            line.extend_from_slice(self.prev.as_bytes());
            line.extend_from_slice(b"\"}");
        }
        self.prev = line_hash(&line);
        line.push(b'\n');
        line
    }
}

/// SHA-256 (hex) of one audit line, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_default()
}
