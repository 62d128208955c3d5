//! The SPIFFE Workload API as a source of this workload's identity: the X509-SVID it serves
//! with and every trust bundle it accepts, streamed from the local agent (SPIRE, or any
//! implementation of the API) over a Unix socket.
//!
//! [`spawn`] keeps one `FetchX509SVID` stream open and publishes each update, validated, on a
//! `watch` channel as an [`X509Context`]; [`X509Context::server_config`] turns one into the
//! rustls configuration. Updates are full state: a trust domain missing from an update is no
//! longer trusted. An update that cannot be used (no SVID, key not matching the certificate,
//! no bundle for the SVID's own trust domain, undecodable) is rejected and reported, and the
//! last good state stays. A failed or closed stream is reopened with bounded, jittered
//! exponential backoff; the last good state stays meanwhile.
//!
//! The wire protocol (gRPC, the `workload.spiffe.io` metadata, the protobuf messages and the
//! X509-SVID checks on decoding) is the `spiffe` crate's. This module adds what the proxy needs
//! on top: validation against rustls, the conversion to [`ServerIdentity`] and
//! [`TrustBundles`], reconnection, and the channel.
//!
//! [`feed`] makes the source a producer of the proxy's live identity ([`crate::live`]), beside
//! the files ([`crate::files`]); the acceptor that consumes it never knows which one it has.
//!
//! [`ServerIdentity`]: crate::server::ServerIdentity
//! [`TrustBundles`]: crate::bundle::TrustBundles

mod backoff;
mod client;
mod feed;
mod update;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use backoff::BackoffPolicy;
pub use client::StreamError;
pub use feed::{FeedError, feed};
pub use update::{UpdateError, X509Context};

/// The latest accepted state; `None` until the first update arrives.
pub type Updates = watch::Receiver<Option<Arc<X509Context>>>;

/// The Workload API's address, `unix:///path/to/agent.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{0}")]
    Syntax(#[source] spiffe::transport::EndpointError),
    /// The Workload API hands out private keys: only a local socket, whose peer the agent
    /// attests by its process credentials, may carry them. A TCP endpoint would send keys in
    /// the clear and let any process that can reach it claim to be this workload.
    #[error("only unix:// endpoints are accepted: the Workload API sends private keys")]
    NotUnix,
}

impl Endpoint {
    /// Parses the address as the SPIFFE Workload Endpoint spec writes it (`unix:///path` or
    /// `unix:/path`); anything but a Unix socket is refused.
    pub fn parse(input: &str) -> Result<Self, EndpointError> {
        match spiffe::transport::Endpoint::parse(input).map_err(EndpointError::Syntax)? {
            spiffe::transport::Endpoint::Unix(socket) => Ok(Self { socket }),
            // `Tcp`, and any transport a later `spiffe` adds (the enum is non-exhaustive).
            _ => Err(EndpointError::NotUnix),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn to_spiffe(&self) -> spiffe::transport::Endpoint {
        spiffe::transport::Endpoint::Unix(self.socket.clone())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix://{}", self.socket.display())
    }
}

/// What happened to the source, for metrics and tests. Logging is done already.
#[derive(Debug)]
pub enum SourceEvent<'a> {
    /// A new state was published.
    Applied(&'a X509Context),
    /// An update arrived but was refused; the previous state stays.
    Rejected(&'a UpdateError),
    /// The stream is down (or could not be opened); a reconnect follows after a backoff.
    Disconnected(&'a StreamError),
}

/// Called on every [`SourceEvent`], from the source's task: keep it short (count, forward).
pub type EventHook = Arc<dyn Fn(&SourceEvent<'_>) + Send + Sync>;

#[derive(Clone, Default)]
pub struct Options {
    pub backoff: BackoffPolicy,
    pub on_event: Option<EventHook>,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("backoff", &self.backoff)
            .field("on_event", &self.on_event.is_some())
            .finish()
    }
}

/// A running source: the channel of states and the task that feeds it.
#[derive(Debug)]
pub struct WorkloadApiSource {
    endpoint: Endpoint,
    updates: Updates,
    last_error: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

/// The source could not give a first identity: startup must not go on without one.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "no usable X509-SVID from the SPIFFE Workload API at {endpoint} within {waited:?}{}",
        .last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    Timeout {
        endpoint: String,
        waited: Duration,
        last_error: Option<String>,
    },
    #[error("the Workload API source for {endpoint} stopped")]
    Stopped { endpoint: String },
}

/// Starts streaming from `endpoint` on the current tokio runtime. The task runs until every
/// [`Updates`] receiver (the source's included) is dropped, or [`WorkloadApiSource::stop`].
pub fn spawn(endpoint: Endpoint, options: Options) -> WorkloadApiSource {
    let (sender, updates) = watch::channel(None);
    let last_error = Arc::new(Mutex::new(None));
    let task = client::Task {
        endpoint: endpoint.clone(),
        options,
        updates: sender,
        last_error: last_error.clone(),
        provider: crate::server::crypto_provider(),
    };
    WorkloadApiSource {
        endpoint,
        updates,
        last_error,
        task: tokio::spawn(task.run()),
    }
}

impl WorkloadApiSource {
    /// A receiver of every accepted state, for the TLS side.
    pub fn subscribe(&self) -> Updates {
        self.updates.clone()
    }

    /// The state in force now, if any update was accepted yet.
    pub fn current(&self) -> Option<Arc<X509Context>> {
        self.updates.borrow().clone()
    }

    /// Waits for the first accepted update, at most `timeout`. Startup calls this and stops
    /// with the error when the agent never answers (or only sends unusable updates).
    pub async fn first_update(&self, timeout: Duration) -> Result<Arc<X509Context>, StartupError> {
        let mut updates = self.updates.clone();
        match tokio::time::timeout(timeout, updates.wait_for(Option::is_some)).await {
            Ok(Ok(state)) => match &*state {
                Some(context) => Ok(context.clone()),
                None => Err(self.stopped()),
            },
            Ok(Err(_)) => Err(self.stopped()),
            Err(_) => Err(StartupError::Timeout {
                endpoint: self.endpoint.to_string(),
                waited: timeout,
                last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            }),
        }
    }

    /// Stops the task; receivers keep the last state.
    pub fn stop(self) {
        self.task.abort();
    }

    fn stopped(&self) -> StartupError {
        StartupError::Stopped {
            endpoint: self.endpoint.to_string(),
        }
    }
}
