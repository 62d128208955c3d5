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

/// How long the wait for a root's expiry may be at most before it is measured again against
/// the wall clock: the timer runs on the monotonic clock, which stands still while the host
/// is suspended.
const EXPIRY_RECHECK: Duration = Duration::from_secs(60);

/// Applies each accepted update after `in_force` until the source stops, and drops each root
/// of the bundles in force when it expires. An update replaces every bundle, so between two
/// updates nothing else would: webpki never reads a trust anchor's validity, and a root the
/// agent stopped refreshing would anchor callers' chains for as long as no update came.
async fn follow(
    source: WorkloadApiSource,
    mut in_force: Arc<X509Context>,
    sender: watch::Sender<Arc<LiveIdentity>>,
    observer: Arc<dyn ReloadObserver>,
) {
    let mut updates = source.subscribe();
    // What the live identity was built from: the last update applied, less the roots that
    // expired since.
    let mut applied = snapshot(&in_force);
    // Set when dropping expired roots failed: tried again after a pause, not in a busy loop.
    let mut retry_later = false;
    loop {
        let expiry = if retry_later {
            Some(EXPIRY_RECHECK)
        } else {
            applied.bundles.next_expiry().map(until_expired)
        };
        let changed = tokio::select! {
            changed = updates.changed() => changed,
            () = tokio::time::sleep(expiry.unwrap_or_default()), if expiry.is_some() => {
                retry_later = !drop_expired(&mut applied, &sender, observer.as_ref());
                continue;
            }
        };
        if changed.is_err() {
            return;
        }
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
                applied = snapshot(&context);
                retry_later = false;
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    spiffe_id = %context.spiffe_id,
                    "Workload API update cannot serve; keeping the last good SVID"
                );
                observer.reloaded(ReloadKind::WorkloadApi, false);
                // Its bundles apply all the same, with the SVID in force: a trust domain the
                // update unloads, or a root it removes, must stop being trusted whatever is
                // wrong with the SVID that came with them.
                let bundles_only = IdentitySnapshot {
                    identity: applied.identity.clone(),
                    bundles: context.bundles.clone(),
                };
                if let Ok(live) = LiveIdentity::build(bundles_only.clone()) {
                    tracing::warn!(
                        trust_domains = ?live.trust_domains,
                        "bundles of the refused Workload API update applied"
                    );
                    sender.send_replace(Arc::new(live));
                    applied = bundles_only;
                }
            }
        }
        in_force = context;
    }
}

/// How long until a root whose `notAfter` is `not_after` (unix seconds) has expired (a
/// certificate is valid through its `notAfter` second), at most [`EXPIRY_RECHECK`].
fn until_expired(not_after: i64) -> Duration {
    let expired_at = u64::try_from(not_after.saturating_add(1)).unwrap_or(0);
    (SystemTime::UNIX_EPOCH + Duration::from_secs(expired_at))
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .min(EXPIRY_RECHECK)
}

/// Rebuilds the identity in force without the roots expired now, if any has; `false` when
/// that failed (the identity in force stays, expired roots included). The SVID is the one in
/// force, so it is not judged again: even an SVID that expired meanwhile must not keep an
/// expired root trusted. Counted as an update carrying the same state would be now
/// ([`super::update`]): a federated trust domain left without roots is no longer trusted and
/// the reload succeeds; our own left without roots refuses our callers (fails closed) and
/// counts as a failure.
fn drop_expired(
    applied: &mut IdentitySnapshot,
    sender: &watch::Sender<Arc<LiveIdentity>>,
    observer: &dyn ReloadObserver,
) -> bool {
    let now = crate::serving::unix(SystemTime::now());
    let Some((bundles, dropped)) = applied.bundles.without_expired(now) else {
        return true;
    };
    let candidate = IdentitySnapshot {
        identity: applied.identity.clone(),
        bundles,
    };
    match LiveIdentity::build(candidate.clone()) {
        Ok(live) => {
            let own = live.serving.id.trust_domain_name();
            let mut own_emptied = false;
            for (trust_domain, subjects) in &dropped {
                let left = candidate
                    .bundles
                    .get(trust_domain.as_str())
                    .map_or(0, |bundle| bundle.roots.len());
                own_emptied |= left == 0 && trust_domain.as_str() == own;
                tracing::warn!(
                    %trust_domain,
                    ?subjects,
                    roots_left = left,
                    "Workload API bundle root expired: dropped, new handshakes no longer chain to it"
                );
            }
            if own_emptied {
                tracing::error!(
                    trust_domain = own,
                    "every root of our own trust domain has expired: its callers are refused until an update brings a root"
                );
            }
            sender.send_replace(Arc::new(live));
            observer.reloaded(ReloadKind::WorkloadApi, !own_emptied);
            *applied = candidate;
            true
        }
        Err(error) => {
            tracing::error!(%error, "cannot drop expired Workload API roots; tried again in a minute or at the next update");
            observer.reloaded(ReloadKind::WorkloadApi, false);
            false
        }
    }
}

fn snapshot(context: &X509Context) -> IdentitySnapshot {
    IdentitySnapshot {
        identity: context.server_identity(),
        bundles: context.bundles.clone(),
    }
}
