//! The task that keeps one `FetchX509SVID` stream open and publishes what it receives.
//!
//! Stages, in order: connect → open the stream → for each message: decode (`spiffe`) →
//! [`update::accept`] → publish; when the stream ends or fails: back off → connect again. The
//! last good state stays published throughout an outage.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use spiffe::{WorkloadApiClient, WorkloadApiError};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use super::backoff::Backoff;
use super::update::{self, UpdateError};
use super::{Endpoint, Options, SourceEvent, X509Context};

/// Why the stream to the Workload API is not (or no longer) delivering updates.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot connect: {0}")]
    Connect(#[source] WorkloadApiError),
    #[error("FetchX509SVID refused: {0}")]
    Open(#[source] WorkloadApiError),
    #[error("stream failed: {0}")]
    Broken(#[source] WorkloadApiError),
    #[error("the agent closed the stream")]
    Ended,
}

pub(super) struct Task {
    pub(super) endpoint: Endpoint,
    pub(super) options: Options,
    pub(super) updates: watch::Sender<Option<Arc<X509Context>>>,
    pub(super) last_error: Arc<Mutex<Option<String>>>,
    pub(super) provider: Arc<CryptoProvider>,
}

impl Task {
    /// Runs until every receiver of the updates is gone.
    pub(super) async fn run(self) {
        let mut backoff = Backoff::new(self.options.backoff);
        loop {
            let mut delivered = false;
            let error = tokio::select! {
                error = self.stream_once(&mut delivered) => error,
                () = self.updates.closed() => return,
            };
            self.report(SourceEvent::Disconnected(&error));
            if delivered {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(endpoint = %self.endpoint, %error, retry_in = ?delay, "SPIFFE Workload API stream down; keeping the last identity");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.updates.closed() => return,
            }
        }
    }

    /// One connection: returns why it stopped delivering. `delivered` tells whether it
    /// applied at least one update (a healthy stream, so the backoff starts over).
    async fn stream_once(&self, delivered: &mut bool) -> StreamError {
        let client = match WorkloadApiClient::connect(self.endpoint.to_spiffe()).await {
            Ok(client) => client,
            Err(error) => return StreamError::Connect(error),
        };
        // `spiffe` adds the mandatory `workload.spiffe.io: true` metadata to every call.
        let mut stream = match client.stream_x509_contexts().await {
            Ok(stream) => stream,
            Err(error) => return StreamError::Open(error),
        };
        while let Some(message) = stream.next().await {
            match message {
                Ok(update) => *delivered |= self.apply(&update),
                Err(error) if is_bad_content(&error) => {
                    self.reject(&UpdateError::Malformed(error));
                }
                Err(error) => return StreamError::Broken(error),
            }
        }
        StreamError::Ended
    }

    /// Validates and publishes one update; a rejected one leaves the previous state in force.
    fn apply(&self, update: &spiffe::X509Context) -> bool {
        match update::accept(update, &self.provider, SystemTime::now()) {
            Ok(context) => {
                tracing::info!(
                    spiffe_id = %context.spiffe_id,
                    trust_domains = context.bundles.iter().count(),
                    "identity updated from the SPIFFE Workload API"
                );
                let context = Arc::new(context);
                self.report(SourceEvent::Applied(&context));
                self.updates.send_replace(Some(context));
                true
            }
            Err(error) => {
                self.reject(&error);
                false
            }
        }
    }

    fn reject(&self, error: &UpdateError) {
        tracing::warn!(endpoint = %self.endpoint, %error, "Workload API update rejected; keeping the last identity");
        self.report(SourceEvent::Rejected(error));
    }

    fn report(&self, event: SourceEvent<'_>) {
        // Kept for the startup error: "no identity within 10s" alone would not say why.
        let last_error = match &event {
            SourceEvent::Applied(_) => None,
            SourceEvent::Rejected(error) => Some(error.to_string()),
            SourceEvent::Disconnected(error) => Some(error.to_string()),
        };
        if let Ok(mut last) = self.last_error.lock() {
            *last = last_error;
        }
        if let Some(on_event) = &self.options.on_event {
            on_event(&event);
        }
    }
}

/// A message that arrived but does not hold a usable identity: the stream itself is fine and
/// keeps going. Everything else (transport failures, gRPC statuses such as "no identity
/// issued") ends the stream. `WorkloadApiError` is `#[non_exhaustive]`, so a variant added
/// upstream lands in the conservative arm: reconnect.
fn is_bad_content(error: &WorkloadApiError) -> bool {
    matches!(
        error,
        WorkloadApiError::MissingRequiredField { .. }
            | WorkloadApiError::InvalidResponseField { .. }
            | WorkloadApiError::X509Svid(_)
            | WorkloadApiError::X509Bundle(_)
            | WorkloadApiError::SpiffeId(_)
    )
}
