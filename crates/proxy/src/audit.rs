//! The audit trail: one JSON line per request, on its own sink, hash-chained.
//!
//! Each line carries `prev_hash`, the SHA-256 (hex) of the previous line's bytes, so a
//! deleted, reordered or edited line breaks the chain. A process starts its chain with a
//! `start` line whose `prev_hash` is a fresh random genesis value.
//!
//! Writing is off the request path (a dedicated thread) but never lossy: a request reserves
//! its slot in the bounded queue before it is served ([`AuditLog::reserve`]), so a slow sink
//! slows requests down (back-pressure) and a failed sink makes them fail closed with 503;
//! the record itself is written exactly once, when the request's [`AuditGuard`] is dropped,
//! whatever the outcome.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::inventory::{Inventory, Observation};
use crate::metrics::Metrics;

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    /// Opened for append; flushed after every record.
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
    tx: mpsc::Sender<AuditRecord>,
    reserve_timeout: Duration,
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

const QUEUE_DEPTH: usize = 1024;

impl AuditLog {
    /// Opens the sink, writes the chain's `start` line, and starts the writer thread.
    /// Fails if the sink cannot be opened or written now: better not to start than to start
    /// unaudited.
    pub fn start(sink: &AuditSink, metrics: Metrics) -> io::Result<(Self, AuditWriter)> {
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
        out.write_line(&chain.link(start))?;

        let (tx, mut rx) = mpsc::channel::<AuditRecord>(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("portcullis-audit".to_owned())
            .spawn(move || {
                while let Some(record) = rx.blocking_recv() {
                    let value = serde_json::to_value(&record).unwrap_or_default();
                    let line = chain.link(value);
                    if let Err(error) = out.write_line(&line) {
                        // Closing the queue makes every later request fail closed (503).
                        rx.close();
                        let lost = 1 + std::iter::from_fn(|| rx.try_recv().ok()).count();
                        metrics
                            .audit_write_failures
                            .inc_by(u64::try_from(lost).unwrap_or(u64::MAX));
                        tracing::error!(%error, lost, "audit sink failed; refusing requests from now on");
                        return;
                    }
                }
            })?;
        Ok((
            Self {
                tx,
                reserve_timeout: Duration::from_secs(10),
            },
            AuditWriter { thread },
        ))
    }

    /// Reserves the slot this request's record will be written to, waiting while the queue is
    /// full. Fails when the sink has failed, or is stuck beyond the reserve timeout.
    pub async fn reserve(&self) -> Result<AuditSlot, AuditUnavailable> {
        match tokio::time::timeout(self.reserve_timeout, self.tx.clone().reserve_owned()).await {
            Ok(Ok(permit)) => Ok(AuditSlot(permit)),
            Ok(Err(_)) | Err(_) => Err(AuditUnavailable),
        }
    }

    pub fn is_healthy(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// A reserved place in the audit queue.
#[derive(Debug)]
pub struct AuditSlot(mpsc::OwnedPermit<AuditRecord>);

/// The record of one request under construction; written when dropped.
#[derive(Debug)]
pub struct AuditGuard {
    slot: Option<AuditSlot>,
    started: Instant,
    metrics: Metrics,
    inventory: Arc<Inventory>,
    pub record: AuditRecord,
}

impl AuditGuard {
    pub fn new(
        slot: AuditSlot,
        metrics: Metrics,
        inventory: Arc<Inventory>,
        record: AuditRecord,
    ) -> Self {
        Self {
            slot: Some(slot),
            started: Instant::now(),
            metrics,
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
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
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
            self.metrics.agents_seen.set(self.inventory.len() as i64);
        }
        if let Some(AuditSlot(permit)) = self.slot.take() {
            permit.send(std::mem::take(&mut self.record));
        }
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

    /// Writes and flushes one line, rotating first if it would not fit. A record is never
    /// split across files, and the chain simply continues in the new file.
    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64;
        if let Some(target) = &self.file
            && let Some(limit) = target.rotate_bytes
            && self.written > 0
            && self.written + len > limit
        {
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
        }
        self.writer.write_all(line.as_bytes())?;
        self.writer.flush()?;
        self.written += len;
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
    /// `value` with `prev_hash` added, serialized as one line (with its newline).
    fn link(&mut self, mut value: serde_json::Value) -> String {
        if let Some(object) = value.as_object_mut() {
            object.insert("prev_hash".to_owned(), self.prev.clone().into());
        }
        let line = value.to_string();
        self.prev = line_hash(line.as_bytes());
        line + "\n"
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
