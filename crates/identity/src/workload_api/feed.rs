//! The Workload API as a producer of the live identity: the same [`IdentityFeed`] the files
//! produce, so the proxy's acceptor, readiness and metrics treat both alike.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{Endpoint, Options, SourceEvent, StartupError, WorkloadApiSource, X509Context, spawn};
use crate::live::{
    IdentityFeed, IdentitySnapshot, LiveIdentity, LiveIdentityError, ReloadKind, ReloadObserver,
};
use crate::serving::{self, ServingProblem};

/// Why the Workload API gave no identity to start with. Startup stops on any of these.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("the X509-SVID from the Workload API cannot serve: {0}")]
    Unusable(#[from] LiveIdentityError),
    #[error("the X509-SVID from the Workload API cannot serve: {0}")]
    NotReady(ServingProblem),
}

/// Connects to `endpoint`, waits at most `first_update` for an identity that can serve now
/// (the same checks `validate` applies to files), and returns the feed whose producer applies
/// every later update: each is a full state, so a trust domain missing from it is no longer
/// trusted from the next handshake on. An update that cannot serve keeps the last good one.
pub async fn feed(endpoint: Endpoint, first_update: Duration) -> Result<IdentityFeed, FeedError> {
    // The proxy hands over its observer only when it starts the producer; updates the source
    // refuses before then (there can be none counted yet) are logged by the source itself.
    let observer: Arc<OnceLock<Arc<dyn ReloadObserver>>> = Arc::default();
    let hook_observer = observer.clone();
    let options = Options {
        on_event: Some(Arc::new(move |event: &SourceEvent<'_>| {
            if let (SourceEvent::Rejected(_), Some(observer)) = (event, hook_observer.get()) {
                observer.reloaded(ReloadKind::WorkloadApi, false);
            }
        })),
        ..Options::default()
    };
    let source = spawn(endpoint, options);
    let first = source.first_update(first_update).await?;
    let live = LiveIdentity::build(snapshot(&first))?;
    live.readiness(SystemTime::now())
        .map_err(FeedError::NotReady)?;
    let (sender, current) = watch::channel(Arc::new(live));
    Ok(IdentityFeed {
        current,
        producer: Some(Box::new(move |reload_observer| {
            // Set once: this closure runs once.
            let _ = observer.set(reload_observer.clone());
            tokio::spawn(follow(source, first, sender, reload_observer))
        })),
    })
}

/// Applies each accepted update after `in_force` until the source stops.
async fn follow(
    source: WorkloadApiSource,
    mut in_force: Arc<X509Context>,
    sender: watch::Sender<Arc<LiveIdentity>>,
    observer: Arc<dyn ReloadObserver>,
) {
    let mut updates = source.subscribe();
    while updates.changed().await.is_ok() {
        let Some(context) = updates.borrow_and_update().clone() else {
            continue;
        };
        if Arc::ptr_eq(&context, &in_force) {
            continue;
        }
        // As with files, an SVID outside its validity window is not put in force; one that
        // does not chain (a bundle mid-rotation) is, and readiness reports it.
        let built = LiveIdentity::build(snapshot(&context)).map_err(FeedError::from);
        match built.and_then(|live| {
            serving::check_validity(&live.serving, SystemTime::now())
                .map(|()| live)
                .map_err(FeedError::NotReady)
        }) {
            Ok(live) => {
                tracing::info!(
                    spiffe_id = %context.spiffe_id,
                    trust_domains = ?live.trust_domains,
                    "identity updated from the Workload API"
                );
                sender.send_replace(Arc::new(live));
                observer.reloaded(ReloadKind::WorkloadApi, true);
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    spiffe_id = %context.spiffe_id,
                    "Workload API update cannot serve; keeping the last good identity"
                );
                observer.reloaded(ReloadKind::WorkloadApi, false);
            }
        }
        in_force = context;
    }
}

fn snapshot(context: &X509Context) -> IdentitySnapshot {
    IdentitySnapshot {
        identity: context.server_identity(),
        bundles: context.bundles.clone(),
    }
}
