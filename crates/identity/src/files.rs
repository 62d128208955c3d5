//! Identity from files: `tls.cert`, `tls.key` and every `tls.trust_bundles` file, re-read
//! when their content changes.
//!
//! The files are read and hashed (SHA-256) when a file event arrives from the directory of any
//! of them (inotify: a write, a rename over the file, Kubernetes' `..data` symlink swap), and
//! every `reload_interval` as a backstop for filesystems without events. Reading through the
//! path follows the symlink swap, and a file replaced in any other way (rename, truncate and
//! write, a new inode) changes the hash just the same. A changed pair is used
//! once it parses, its key matches and its leaf is a valid X509-SVID; until then the last good
//! pair stays, and the next check tries again (a certificate written before its key is
//! picked up as soon as the key lands). A changed bundle replaces that trust domain's roots;
//! one that cannot be read or does not parse keeps the last good roots. One that parses but
//! holds no usable root (no certificate, a SPIFFE bundle without `x509-svid` keys, only
//! expired roots) removed them all, and is applied as such: that trust domain's callers are
//! refused until it has a root again. Each outcome is counted once per distinct content, not
//! once per check; a failure only once two consecutive checks saw it, so a file caught
//! mid-write is not reported.
//!
//! A root that expires while loaded is dropped at the first check after its `notAfter`, with
//! no file change: webpki never reads a trust anchor's validity, so it would otherwise anchor
//! callers' chains for as long as the file stays the same. That applies as a reload of the
//! bundle (counted, logged), and a bundle left without roots fails closed as above. The roots
//! kept while a changed file does not parse are dropped the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis_core::TrustDomain;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::bundle::{self, Bundle, BundleError};
use crate::live::{IdentityFeed, IdentitySnapshot, LiveIdentity, ReloadKind, ReloadObserver};
use crate::server::{ServerIdentity, ServerIdentityError, crypto_provider};
use crate::serving::{self, ServingProblem};

/// The files identity is read from.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundles: Vec<(TrustDomain, PathBuf)>,
}

type Fingerprint = [u8; 32];

#[derive(Debug, thiserror::Error)]
enum PairError {
    #[error(transparent)]
    Parse(#[from] ServerIdentityError),
    #[error(transparent)]
    Check(#[from] ServingProblem),
}

impl IdentityFiles {
    /// A feed that starts from `initial` (what the configuration loaded and checked) and
    /// follows the files every `interval` once the proxy starts its producer.
    pub fn feed(
        self,
        initial: IdentitySnapshot,
        interval: Duration,
    ) -> Result<IdentityFeed, crate::live::LiveIdentityError> {
        let live = LiveIdentity::build(initial.clone())?;
        let (sender, current) = watch::channel(Arc::new(live));
        let watcher = Watcher::new(self, initial, sender);
        Ok(IdentityFeed {
            current,
            producer: Some(Box::new(move |observer| {
                tokio::spawn(watcher.run(interval, observer))
            })),
        })
    }

    fn serving_fingerprint(&self) -> Fingerprint {
        fingerprint(&[&self.cert, &self.key])
    }
}

/// SHA-256 over the contents of `paths` (a missing or unreadable file hashes as its error, so
/// its reappearance is a change).
fn fingerprint(paths: &[&PathBuf]) -> Fingerprint {
    let mut hasher = Sha256::new();
    for path in paths {
        match std::fs::read(path) {
            Ok(bytes) => {
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(&bytes);
            }
            Err(error) => hasher.update(format!("unreadable: {}", error.kind())),
        }
    }
    hasher.finalize().into()
}

struct Watcher {
    files: IdentityFiles,
    current: IdentitySnapshot,
    serving_applied: Fingerprint,
    serving_failed: Failing,
    bundles_applied: Vec<Fingerprint>,
    bundles_failed: Vec<Failing>,
    sender: watch::Sender<Arc<LiveIdentity>>,
}

/// Failing content of one file (or pair), reported once it has been seen by two consecutive
/// checks: a file caught mid-write (a certificate whose key is not written yet) is not a
/// failure, and a failure is reported once, not at every check.
#[derive(Debug, Clone, Default)]
struct Failing {
    seen: Option<Fingerprint>,
    reported: bool,
}

impl Failing {
    fn report(&mut self, print: Fingerprint) -> bool {
        if self.seen != Some(print) {
            self.seen = Some(print);
            self.reported = false;
            return false;
        }
        !std::mem::replace(&mut self.reported, true)
    }
}

/// What one check found changed and usable.
#[derive(Default)]
struct Changes {
    serving: Option<(ServerIdentity, Fingerprint)>,
    bundles: Vec<BundleChange>,
}

/// A changed bundle file that is to replace its trust domain's roots, or roots in force that
/// expired.
struct BundleChange {
    /// Index into `IdentityFiles::bundles`.
    index: usize,
    bundle: Bundle,
    /// The content `bundle` was read from; `None` when it is the bundle in force without its
    /// expired roots (the file's content in force, and any failure of a newer one, stay).
    print: Option<Fingerprint>,
    /// Why the file left no usable root, when it did (`bundle` then has none).
    no_root: Option<BundleError>,
    /// Subjects of the roots in force dropped for having expired.
    expired: Vec<String>,
}

/// How long a burst of file events (a certificate, then its key; a symlink swap's several
/// renames) is left to settle before the files are read.
const EVENT_SETTLE: Duration = Duration::from_millis(50);

/// Watches the directory of every identity file (not the files: a symlink swap or a rename
/// over a file replaces the entry in its directory) and wakes `wake` on an event that names
/// one of the files, or an entry of Kubernetes' atomic writer (`..data`, `..2026_…`: a
/// mounted Secret's files are symlinks through them). Events for other entries of the same
/// directory (an audit log written beside the certificates) wake nothing. `None`, with a
/// warning, where the platform or filesystem has no events: the poll still runs.
fn watch_directories(
    files: &IdentityFiles,
    wake: Arc<tokio::sync::Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let watched: std::collections::BTreeSet<PathBuf> = [&files.cert, &files.key]
        .into_iter()
        .chain(files.bundles.iter().map(|(_, path)| path))
        .map(|path| absolute(path))
        .collect();
    let directories: std::collections::BTreeSet<PathBuf> = watched
        .iter()
        .filter_map(|path| path.parent().map(Path::to_path_buf))
        .collect();
    let relevant = move |path: &Path| {
        watched.contains(path)
            || path
                .file_name()
                .is_some_and(|name| name.as_encoded_bytes().starts_with(b".."))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let wanted = match event {
            // Our own reads are access events; only a change to an entry is worth a check.
            Ok(event) => {
                !event.kind.is_access()
                    && (event.paths.is_empty() || event.paths.iter().any(|p| relevant(p)))
            }
            // Events may have been lost (a queue overflow): check.
            Err(_) => true,
        };
        if wanted {
            wake.notify_one();
        }
    })
    .map_err(|error| tracing::warn!(%error, "no file events; certificates are polled only"))
    .ok()?;
    for directory in directories {
        if let Err(error) = watcher.watch(&directory, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(%error, directory = %directory.display(), "no file events for this directory; it is polled only");
        }
    }
    Some(watcher)
}

/// `path` made absolute against the working directory, as notify reports event paths.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

impl Watcher {
    /// A watcher of `files`, whose current content `initial` was read from.
    fn new(
        files: IdentityFiles,
        initial: IdentitySnapshot,
        sender: watch::Sender<Arc<LiveIdentity>>,
    ) -> Self {
        Self {
            serving_applied: files.serving_fingerprint(),
            serving_failed: Failing::default(),
            bundles_applied: files
                .bundles
                .iter()
                .map(|(_, p)| fingerprint(&[p]))
                .collect(),
            bundles_failed: vec![Failing::default(); files.bundles.len()],
            files,
            current: initial,
            sender,
        }
    }

    async fn run(mut self, interval: Duration, observer: Arc<dyn ReloadObserver>) {
        let wake = Arc::new(tokio::sync::Notify::new());
        // Dropped (and the directories unwatched) when this task ends.
        let _events = watch_directories(&self.files, wake.clone());
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: a file replaced between loading the configuration and
        // watching its directory (no event for it) is checked right away.
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = wake.notified() => tokio::time::sleep(EVENT_SETTLE).await,
                // Every receiver is gone: the proxy has stopped.
                () = self.sender.closed() => return,
            }
            let observer = observer.clone();
            // File reads and certificate parsing stay off the async workers.
            self = match tokio::task::spawn_blocking(move || {
                self.check(observer.as_ref(), SystemTime::now());
                self
            })
            .await
            {
                Ok(watcher) => watcher,
                Err(_) => return,
            };
        }
    }

    /// One check of every file, and of the roots in force against `now`.
    fn check(&mut self, observer: &dyn ReloadObserver, now: SystemTime) {
        let changes = Changes {
            serving: self.changed_pair(observer, now),
            bundles: self.changed_bundles(observer, now),
        };
        if changes.serving.is_none() && changes.bundles.is_empty() {
            return;
        }
        let mut candidate = self.current.clone();
        if let Some((identity, _)) = &changes.serving {
            candidate.identity = identity.clone();
        }
        for change in &changes.bundles {
            if let Some((domain, _)) = self.files.bundles.get(change.index) {
                candidate
                    .bundles
                    .insert(domain.clone(), change.bundle.clone());
            }
        }
        match LiveIdentity::build(candidate.clone()) {
            Ok(live) => {
                let live = Arc::new(live);
                if let Some((_, print)) = changes.serving {
                    self.serving_applied = print;
                    self.serving_failed = Failing::default();
                    observer.reloaded(ReloadKind::Serving, true);
                    tracing::info!(
                        spiffe_id = %live.serving.id,
                        not_after = live.serving.not_after,
                        "serving certificate reloaded"
                    );
                }
                for change in changes.bundles {
                    if let Some(print) = change.print {
                        self.bundles_applied[change.index] = print;
                        self.bundles_failed[change.index] = Failing::default();
                    }
                    // Counted as a failure: the file was not usable as a bundle, and what it
                    // did (remove every root) is what an operator must see.
                    observer.reloaded(ReloadKind::Bundle, change.no_root.is_none());
                    let Some((domain, path)) = self.files.bundles.get(change.index) else {
                        continue;
                    };
                    if !change.expired.is_empty() {
                        tracing::warn!(
                            trust_domain = %domain,
                            path = %path.display(),
                            subjects = ?change.expired,
                            "trust bundle root expired: dropped, new handshakes no longer chain to it"
                        );
                    }
                    match change.no_root {
                        None => tracing::info!(trust_domain = %domain, "trust bundle reloaded"),
                        Some(error) => tracing::error!(
                            trust_domain = %domain,
                            path = %path.display(),
                            %error,
                            "trust bundle holds no usable root: new handshakes from this trust domain are refused until it has one"
                        ),
                    }
                }
                if let Err(problem) = live.chain_at(now) {
                    tracing::error!(%problem, "serving certificate in force does not chain to its own trust bundle; not ready");
                }
                self.current = candidate;
                self.sender.send_replace(live);
            }
            Err(error) => {
                // Each part parsed on its own but they do not make a config together.
                if let Some((_, print)) = changes.serving {
                    self.fail_serving(print, &error.to_string(), observer);
                }
                for change in changes.bundles {
                    let print = change.print.unwrap_or(self.bundles_applied[change.index]);
                    self.fail_bundle(change.index, print, &error.to_string(), observer);
                }
            }
        }
    }

    fn changed_pair(
        &mut self,
        observer: &dyn ReloadObserver,
        now: SystemTime,
    ) -> Option<(ServerIdentity, Fingerprint)> {
        let print = self.files.serving_fingerprint();
        if print == self.serving_applied {
            self.serving_failed = Failing::default();
            return None;
        }
        let loaded = load_pair(&self.files.cert, &self.files.key, now);
        // Replaced again while it was read (the key, then the certificate, say): what was
        // read may be newer than `print`, and applied under it the same pair would be
        // reloaded (and counted) again at the next check. That check reads it settled.
        if self.files.serving_fingerprint() != print {
            return None;
        }
        match loaded {
            Ok(identity) => Some((identity, print)),
            Err(error) => {
                self.fail_serving(print, &error.to_string(), observer);
                None
            }
        }
    }

    fn changed_bundles(
        &mut self,
        observer: &dyn ReloadObserver,
        now: SystemTime,
    ) -> Vec<BundleChange> {
        let mut changed = Vec::new();
        let paths: Vec<PathBuf> = self.files.bundles.iter().map(|(_, p)| p.clone()).collect();
        for (index, path) in paths.iter().enumerate() {
            let print = fingerprint(&[path]);
            if print == self.bundles_applied[index] {
                self.bundles_failed[index] = Failing::default();
                changed.extend(self.expired_roots(index, now));
                continue;
            }
            match bundle::read_bundle(path, now) {
                Ok(bundle) => changed.push(BundleChange {
                    index,
                    bundle,
                    print: Some(print),
                    no_root: None,
                    expired: Vec::new(),
                }),
                // DESIGN: a removed root stops new handshakes at once. A file that reads and
                // parses but leaves no usable root has removed every root, so it applies (the
                // trust domain fails closed); keeping the old roots would trust them for ever.
                Err(error @ (BundleError::Empty { .. } | BundleError::AllExpired { .. })) => {
                    changed.push(BundleChange {
                        index,
                        bundle: Bundle::default(),
                        print: Some(print),
                        no_root: Some(error),
                        expired: Vec::new(),
                    });
                }
                // Unreadable, malformed, or caught mid-write: the last good roots stay, but
                // not past their own expiry.
                Err(
                    error @ (BundleError::Io { .. }
                    | BundleError::Json { .. }
                    | BundleError::Read { .. }
                    | BundleError::Malformed { .. }),
                ) => {
                    self.fail_bundle(index, print, &error.to_string(), observer);
                    changed.extend(self.expired_roots(index, now));
                }
            }
        }
        changed
    }

    /// The bundle in force for `IdentityFiles::bundles[index]` without its roots expired at
    /// `now`, when any has. The same as reading the applied file again (a read drops expired
    /// roots), without reading it: the file may have changed since, or no longer parse. Left
    /// without roots, the trust domain fails closed like a file that holds none.
    fn expired_roots(&self, index: usize, now: SystemTime) -> Option<BundleChange> {
        let (domain, path) = self.files.bundles.get(index)?;
        let in_force = self.current.bundles.get(domain.as_str())?;
        let (bundle, expired) = in_force.without_expired(crate::serving::unix(now))?;
        let no_root = bundle
            .roots
            .is_empty()
            .then(|| BundleError::AllExpired { path: path.clone() });
        Some(BundleChange {
            index,
            bundle,
            print: None,
            no_root,
            expired,
        })
    }

    fn fail_serving(&mut self, print: Fingerprint, error: &str, observer: &dyn ReloadObserver) {
        if self.serving_failed.report(print) {
            observer.reloaded(ReloadKind::Serving, false);
            tracing::warn!(
                cert = %self.files.cert.display(),
                key = %self.files.key.display(),
                %error,
                "new serving certificate rejected; keeping the last good one (retried on the next change)"
            );
        }
    }

    fn fail_bundle(
        &mut self,
        index: usize,
        print: Fingerprint,
        error: &str,
        observer: &dyn ReloadObserver,
    ) {
        if self.bundles_failed[index].report(print) {
            observer.reloaded(ReloadKind::Bundle, false);
            if let Some((domain, path)) = self.files.bundles.get(index) {
                tracing::warn!(
                    trust_domain = %domain,
                    path = %path.display(),
                    %error,
                    "new trust bundle rejected; keeping the last good one"
                );
            }
        }
    }
}

/// A replacement pair must parse, match, be an X509-SVID and be valid now: otherwise the
/// pair in force is no worse, and is kept.
fn load_pair(cert: &Path, key: &Path, now: SystemTime) -> Result<ServerIdentity, PairError> {
    let identity = ServerIdentity::load(cert, key)?;
    let leaf = serving::check_pair(&identity, &crypto_provider())?;
    serving::check_validity(&leaf, now)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, SystemTime};

    use portcullis_core::TrustDomain;
    use portcullis_test_support::pki::{Ca, LeafSpec};
    use time::OffsetDateTime;
    use tokio::sync::watch;

    use super::{Failing, IdentityFiles, Watcher};
    use crate::bundle::TrustBundles;
    use crate::live::{IdentitySnapshot, LiveIdentity, ReloadKind, ReloadObserver};
    use crate::server::ServerIdentity;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    #[derive(Debug, Default)]
    struct Outcomes(Mutex<Vec<(ReloadKind, bool)>>);

    impl ReloadObserver for Outcomes {
        fn reloaded(&self, kind: ReloadKind, success: bool) {
            self.0.lock().unwrap().push((kind, success));
        }
    }

    impl Outcomes {
        fn take(&self) -> Vec<(ReloadKind, bool)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// A watcher of a serving SVID and the bundle of its trust domain, written in `dir`, and
    /// the receiver of what it publishes.
    fn watcher(dir: &Path, ca: &Ca) -> TestResult<(Watcher, watch::Receiver<Arc<LiveIdentity>>)> {
        watcher_with_bundle(dir, ca, &ca.cert_pem())
    }

    /// As [`watcher`], with `bundle` as the trust domain's bundle file.
    fn watcher_with_bundle(
        dir: &Path,
        ca: &Ca,
        bundle: &str,
    ) -> TestResult<(Watcher, watch::Receiver<Arc<LiveIdentity>>)> {
        let svid = ca.leaf(&LeafSpec::server("spiffe://td.example/ns/edge/sa/sidecar"))?;
        std::fs::write(dir.join("ca.pem"), bundle)?;
        std::fs::write(dir.join("server.pem"), &svid.cert_pem)?;
        std::fs::write(dir.join("server-key.pem"), &svid.key_pem)?;
        let files = IdentityFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            bundles: vec![(TrustDomain::parse("td.example")?, dir.join("ca.pem"))],
        };
        let mut bundles = TrustBundles::new();
        bundles.load(TrustDomain::parse("td.example")?, &dir.join("ca.pem"))?;
        let initial = IdentitySnapshot {
            identity: ServerIdentity::load(&files.cert, &files.key)?,
            bundles,
        };
        let (sender, current) = watch::channel(Arc::new(LiveIdentity::build(initial.clone())?));
        Ok((Watcher::new(files, initial, sender), current))
    }

    fn roots(watcher: &Watcher) -> usize {
        watcher
            .current
            .bundles
            .get("td.example")
            .map_or(0, |bundle| bundle.roots.len())
    }

    #[test]
    fn a_reloaded_bundle_without_a_usable_root_removes_every_root() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("td.example")?;
        let (mut watcher, current) = watcher(dir.path(), &ca)?;
        let outcomes = Outcomes::default();
        let now = OffsetDateTime::now_utc();
        let expired = Ca::with_validity(
            "td.example",
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )?;
        let no_root = [
            ("a PEM file without certificates", String::new()),
            ("a SPIFFE bundle with no keys", r#"{"keys": []}"#.to_owned()),
            (
                "a SPIFFE bundle with JWT keys only",
                r#"{"keys": [{"use": "jwt-svid", "kty": "EC"}]}"#.to_owned(),
            ),
            ("expired roots only", expired.cert_pem()),
        ];
        for (case, contents) in no_root {
            std::fs::write(dir.path().join("ca.pem"), contents)?;
            watcher.check(&outcomes, SystemTime::now());
            assert_eq!(
                roots(&watcher),
                0,
                "{case}: the old roots are still trusted"
            );
            assert_eq!(outcomes.take(), [(ReloadKind::Bundle, false)], "{case}");
            let live = current.borrow().clone();
            assert!(live.trust_domains.is_empty(), "{case}");
            assert!(
                live.readiness(std::time::SystemTime::now()).is_err(),
                "{case}"
            );
            // Seen again: nothing new to count.
            watcher.check(&outcomes, SystemTime::now());
            assert_eq!(outcomes.take(), [], "{case}");

            std::fs::write(dir.path().join("ca.pem"), ca.cert_pem())?;
            watcher.check(&outcomes, SystemTime::now());
            assert_eq!(roots(&watcher), 1, "{case}");
            assert_eq!(outcomes.take(), [(ReloadKind::Bundle, true)], "{case}");
            assert_eq!(
                current.borrow().readiness(std::time::SystemTime::now()),
                Ok(())
            );
        }
        Ok(())
    }

    /// A root that ends while loaded (the file unchanged) is dropped at the next check, as a
    /// counted reload; one check later nothing is left to do.
    #[test]
    fn a_root_that_expires_while_loaded_is_dropped_without_a_file_change() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("td.example")?;
        let now = OffsetDateTime::now_utc();
        let short = Ca::with_validity(
            "td.example",
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )?;
        let (mut watcher, current) = watcher_with_bundle(
            dir.path(),
            &ca,
            &format!("{}{}", ca.cert_pem(), short.cert_pem()),
        )?;
        let outcomes = Outcomes::default();
        watcher.check(&outcomes, SystemTime::now());
        assert_eq!((roots(&watcher), outcomes.take()), (2, vec![]));

        let later = SystemTime::now() + Duration::from_secs(2 * 3600);
        watcher.check(&outcomes, later);
        assert_eq!(
            watcher
                .current
                .bundles
                .get("td.example")
                .map(|b| b.roots.clone()),
            Some(vec![ca.cert_der()]),
            "the expired root is still trusted"
        );
        assert_eq!(outcomes.take(), [(ReloadKind::Bundle, true)]);
        let live = current.borrow().clone();
        assert_eq!(live.trust_domains, ["td.example"]);
        assert_eq!(
            live.certificates
                .iter()
                .filter(|c| c.kind == "bundle:td.example")
                .count(),
            1,
            "the expiry gauge still shows the dropped root"
        );
        watcher.check(&outcomes, later);
        assert_eq!(outcomes.take(), []);
        Ok(())
    }

    /// The only root expiring leaves the trust domain without roots: it fails closed, as a
    /// file holding none does, counted as a failure.
    #[test]
    fn a_bundle_whose_only_root_expires_refuses_its_trust_domain() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("td.example")?;
        let (mut watcher, current) = watcher(dir.path(), &ca)?;
        let outcomes = Outcomes::default();
        let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
        watcher.check(&outcomes, later);
        assert_eq!(roots(&watcher), 0);
        assert_eq!(outcomes.take(), [(ReloadKind::Bundle, false)]);
        assert!(current.borrow().trust_domains.is_empty());
        watcher.check(&outcomes, later);
        assert_eq!(outcomes.take(), []);
        Ok(())
    }

    /// The roots kept while a changed file does not parse do not outlive their expiry either.
    #[test]
    fn roots_kept_over_an_unparsable_file_are_dropped_when_they_expire() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("td.example")?;
        let now = OffsetDateTime::now_utc();
        let short = Ca::with_validity(
            "td.example",
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )?;
        let both = format!("{}{}", ca.cert_pem(), short.cert_pem());
        let (mut watcher, _current) = watcher_with_bundle(dir.path(), &ca, &both)?;
        let outcomes = Outcomes::default();
        std::fs::write(dir.path().join("ca.pem"), "{\"keys\": [")?;
        watcher.check(&outcomes, SystemTime::now());
        watcher.check(&outcomes, SystemTime::now());
        assert_eq!(
            (roots(&watcher), outcomes.take()),
            (2, vec![(ReloadKind::Bundle, false)])
        );

        let later = SystemTime::now() + Duration::from_secs(2 * 3600);
        watcher.check(&outcomes, later);
        assert_eq!(roots(&watcher), 1, "the expired root outlived its end");
        // The broken file's failure was reported already: only the drop is new.
        assert_eq!(outcomes.take(), [(ReloadKind::Bundle, true)]);
        watcher.check(&outcomes, later);
        assert_eq!(outcomes.take(), []);

        // Put back as it was: the content in force, nothing to reload, and the expired root
        // does not come back with it.
        std::fs::write(dir.path().join("ca.pem"), &both)?;
        watcher.check(&outcomes, later);
        assert_eq!((roots(&watcher), outcomes.take()), (1, vec![]));
        Ok(())
    }

    #[test]
    fn an_unreadable_or_unparsable_bundle_keeps_the_last_good_roots() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("td.example")?;
        let (mut watcher, current) = watcher(dir.path(), &ca)?;
        let outcomes = Outcomes::default();
        let path = dir.path().join("ca.pem");
        let broken: [(&str, &dyn Fn() -> std::io::Result<()>); 3] = [
            ("malformed JSON", &|| std::fs::write(&path, "{\"keys\": [")),
            ("a PEM block cut short", &|| {
                std::fs::write(&path, &ca.cert_pem()[..40])
            }),
            ("a missing file", &|| std::fs::remove_file(&path)),
        ];
        for (case, break_it) in broken {
            break_it()?;
            // Once (as a file caught mid-write), then again: reported once, roots kept.
            watcher.check(&outcomes, SystemTime::now());
            watcher.check(&outcomes, SystemTime::now());
            watcher.check(&outcomes, SystemTime::now());
            assert_eq!(roots(&watcher), 1, "{case}");
            assert_eq!(outcomes.take(), [(ReloadKind::Bundle, false)], "{case}");
            assert_eq!(
                current.borrow().readiness(std::time::SystemTime::now()),
                Ok(()),
                "{case}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_failure_is_reported_once_after_two_consecutive_sightings() {
        let mut failing = Failing::default();
        let (mid_write, broken) = ([1; 32], [2; 32]);
        // A file caught mid-write, then completed into something else: never reported.
        assert!(!failing.report(mid_write));
        assert!(!failing.report(broken));
        // The same broken content at the next check: reported, once.
        assert!(failing.report(broken));
        assert!(!failing.report(broken));
        assert!(!failing.report(mid_write));
    }
}
