//! [`UserTokenVerifier`]: verifies a user token for one calling workload, owns the JWKS
//! (file polled, or URL fetched and refreshed) and the verified-token cache.
//!
//! The order in `verify_at` is deliberate: size cap, then cache, then header checks, then
//! key lookup, then the signature, and only then is the payload decoded. Nothing the token
//! says is believed before its signature verified, except what is needed to find the key.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use portcullis_core::{SpiffeId, UserClaims};
use portcullis_memory::clock::coarse_now;
use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::cache::{TokenCache, TokenMemo};
use super::claims::{self, CheckedToken, ClaimRules};
use super::error::{JwksError, TokenRejection};
use super::fetch::UrlFetcher;
use super::jwks::{KeyLookup, KeySet};
use super::settings::{JwksSource, SigningAlgorithm, UserTokenSettings};

/// Verifies user tokens. Cheap to clone (one `Arc`); `Send + Sync`.
#[derive(Debug, Clone)]
pub struct UserTokenVerifier {
    inner: Arc<Inner>,
}

/// Counters of JWKS loading after start, for the proxy's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JwksStats {
    /// Reloads (file changed) or refreshes (URL fetched) that succeeded.
    pub refreshes_ok: u64,
    /// Reloads or refreshes that failed; the last good key set stayed in use.
    pub refreshes_failed: u64,
    /// HTTP fetches of a JWKS URL, including the one at start and on-demand refetches.
    pub fetches: u64,
    /// Keys in the key set in use.
    pub keys: usize,
}

#[derive(Debug)]
struct Inner {
    rules: ClaimRules,
    algorithms: Vec<SigningAlgorithm>,
    allowed_types: Vec<String>,
    max_stale: Duration,
    /// When the key set was last loaded or refreshed successfully (unchanged content counts),
    /// in milliseconds since `origin`, on the coarse clock ([`coarse_now`]): read on every
    /// token request against a bound of minutes, so without a lock and a precise clock read.
    last_success_ms: AtomicU64,
    origin: std::time::Instant,
    max_token_bytes: usize,
    max_jwks_bytes: usize,
    refresh_interval: Duration,
    min_refetch_interval: Duration,
    source: Source,
    keys: ArcSwap<KeySet>,
    next_generation: AtomicU64,
    cache: TokenCache,
    /// Serialises on-demand refetches and remembers when the last one started: concurrent
    /// requests with an unknown `kid` wait for the fetch in flight instead of starting theirs.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    signature_verifications: AtomicU64,
    refreshes_ok: AtomicU64,
    refreshes_failed: AtomicU64,
    fetches: AtomicU64,
}

#[derive(Debug)]
enum Source {
    File {
        path: PathBuf,
        /// What the last poll saw, so a bad file is logged and counted once, not per poll.
        last_seen: Mutex<Seen>,
    },
    Url(Box<UrlFetcher>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Content([u8; 32]),
    /// Content that was read but did not parse into a usable key set.
    Invalid([u8; 32]),
    ReadError,
}

impl UserTokenVerifier {
    /// Loads (file) or fetches (URL) the JWKS; fails unless it holds a usable key.
    pub async fn new(settings: UserTokenSettings) -> Result<Self, JwksError> {
        if settings.issuers.is_empty() || settings.audiences.is_empty() {
            return Err(JwksError::Unconfigured);
        }
        let source = match &settings.jwks {
            JwksSource::File(path) => Source::File {
                path: path.clone(),
                last_seen: Mutex::new(Seen::ReadError),
            },
            JwksSource::Url { url, ca_file } => Source::Url(Box::new(UrlFetcher::new(
                url,
                ca_file.as_deref(),
                settings.jwks_fetch_timeout,
                settings.max_jwks_bytes,
            )?)),
        };
        let fetches = AtomicU64::new(0);
        let bytes = match &source {
            Source::File { path, last_seen } => {
                let bytes = read_capped(path.clone(), settings.max_jwks_bytes).await?;
                *last_seen.lock().unwrap_or_else(PoisonError::into_inner) =
                    Seen::Content(Sha256::digest(&bytes).into());
                bytes
            }
            Source::Url(fetcher) => {
                fetches.fetch_add(1, Ordering::Relaxed);
                fetcher.fetch().await?.to_vec()
            }
        };
        let keys = KeySet::parse(&bytes, &settings.algorithms)?.with_generation(1);
        tracing::info!(keys = keys.len(), source = %source, "jwks loaded");

        let rules = ClaimRules {
            issuers: settings.issuers,
            audiences: settings.audiences,
            max_lifetime_secs: settings.max_lifetime.as_secs(),
            skew_secs: settings.clock_skew.as_secs(),
            groups_claim: settings.groups_claim,
            require_actor_binding: settings.require_actor_binding,
            max_actor_depth: settings.max_actor_depth,
        };
        Ok(UserTokenVerifier {
            inner: Arc::new(Inner {
                rules,
                algorithms: settings.algorithms,
                allowed_types: settings.allowed_types,
                max_stale: settings.jwks_max_stale,
                last_success_ms: AtomicU64::new(0),
                origin: coarse_now(),
                max_token_bytes: settings.max_token_bytes,
                max_jwks_bytes: settings.max_jwks_bytes,
                refresh_interval: settings.jwks_refresh_interval,
                min_refetch_interval: settings.jwks_min_refetch_interval,
                source,
                keys: ArcSwap::from_pointee(keys),
                next_generation: AtomicU64::new(2),
                cache: TokenCache::new(settings.cache_capacity),
                refetch: tokio::sync::Mutex::new(None),
                signature_verifications: AtomicU64::new(0),
                refreshes_ok: AtomicU64::new(0),
                refreshes_failed: AtomicU64::new(0),
                fetches,
            }),
        })
    }

    /// Starts the background JWKS refresh: polls the file (content hash, so Kubernetes
    /// ConfigMap symlink swaps are seen) or refetches the URL every
    /// `jwks_refresh_interval`. The task ends by itself once every clone of this verifier
    /// is dropped; abort the handle to stop it sooner.
    pub fn spawn_refresh(&self) -> JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let period = self.inner.refresh_interval.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                inner.refresh().await;
            }
        })
    }

    /// One refresh now, as the background task would do it (for a reload signal, or tests).
    pub async fn refresh_now(&self) {
        self.inner.refresh().await;
    }

    /// Verifies `token` for a request from `caller`, at the system clock's time. The claims
    /// are shared with the verified-token cache: a repeated token copies none of them.
    pub async fn verify(
        &self,
        token: &str,
        caller: &SpiffeId,
    ) -> Result<Arc<UserClaims>, TokenRejection> {
        self.verify_at(token, caller, system_now()).await
    }

    /// [`verify`](Self::verify) for a request on a connection that keeps a [`TokenMemo`]: a
    /// token the same as the connection's last verified one is matched by its bytes instead
    /// of being hashed for the verified-token cache. Checked exactly as a cache hit is.
    pub async fn verify_remembering(
        &self,
        token: &str,
        caller: &SpiffeId,
        memo: &TokenMemo,
    ) -> Result<Arc<UserClaims>, TokenRejection> {
        self.verify_at_remembering(token, caller, system_now(), memo)
            .await
    }

    /// [`verify`](Self::verify) with the time given, in unix seconds.
    pub async fn verify_at(
        &self,
        token: &str,
        caller: &SpiffeId,
        now: u64,
    ) -> Result<Arc<UserClaims>, TokenRejection> {
        self.checked(token, caller, now, None).await
    }

    /// [`verify_remembering`](Self::verify_remembering) with the time given, in unix seconds.
    pub async fn verify_at_remembering(
        &self,
        token: &str,
        caller: &SpiffeId,
        now: u64,
        memo: &TokenMemo,
    ) -> Result<Arc<UserClaims>, TokenRejection> {
        self.checked(token, caller, now, Some(memo)).await
    }

    async fn checked(
        &self,
        token: &str,
        caller: &SpiffeId,
        now: u64,
        memo: Option<&TokenMemo>,
    ) -> Result<Arc<UserClaims>, TokenRejection> {
        let result = self.inner.verify_at(token, caller, now, memo).await;
        if let Err(rejection) = &result {
            // The token itself is a credential and is never logged.
            tracing::debug!(reason = rejection.reason(), %rejection, caller = %caller.as_str(), "user token rejected");
        }
        result
    }

    /// How long the key set has gone without a successful refresh, when that is longer than
    /// `jwks_max_stale` (tokens are then refused, and `/readyz` says why).
    pub fn stale_for(&self) -> Option<Duration> {
        self.inner.stale_for()
    }

    /// `user_token.jwks_max_stale`.
    pub fn max_stale(&self) -> Duration {
        self.inner.max_stale
    }

    /// Unique in the process: what [`TokenMemo::verified_by`] names this verifier by (its
    /// clones share it).
    pub fn id(&self) -> u64 {
        self.inner.cache.id()
    }

    /// Signatures checked so far; a cache hit does not add one.
    pub fn signature_verifications(&self) -> u64 {
        self.inner.signature_verifications.load(Ordering::Relaxed)
    }

    /// `(ok, failed)` JWKS reloads/refreshes since start.
    pub fn jwks_refreshes(&self) -> (u64, u64) {
        let stats = self.jwks_stats();
        (stats.refreshes_ok, stats.refreshes_failed)
    }

    pub fn jwks_stats(&self) -> JwksStats {
        JwksStats {
            refreshes_ok: self.inner.refreshes_ok.load(Ordering::Relaxed),
            refreshes_failed: self.inner.refreshes_failed.load(Ordering::Relaxed),
            fetches: self.inner.fetches.load(Ordering::Relaxed),
            keys: self.inner.keys.load().len(),
        }
    }
}

impl UserTokenVerifier {
    /// Signature, header and every claim check that does not depend on the caller: the
    /// common part of user tokens and approval grants ([`super::grant`]). Not cached.
    pub(super) async fn verified_claims<'t>(
        &self,
        token: &'t str,
        now: u64,
    ) -> Result<(claims::CheckedToken, &'t str), TokenRejection> {
        let inner = &self.inner;
        if token.len() > inner.max_token_bytes {
            return Err(TokenRejection::TooLarge);
        }
        // As for user tokens: a key the approver's issuer removed must stop signing grants
        // once the removal can no longer be learned.
        if inner.stale_for().is_some() {
            return Err(TokenRejection::JwksStale);
        }
        let (payload, _) = inner
            .verified_payload(token, inner.keys.load_full())
            .await?;
        let checked = claims::parse_claims(payload, &inner.rules)?;
        claims::check_times(&checked, &inner.rules, now)?;
        Ok((checked, payload))
    }
}

/// The system clock in Unix seconds (0 before the epoch).
fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Inner {
    /// Milliseconds since `origin` on the coarse clock.
    fn coarse_ms(&self) -> u64 {
        let elapsed = coarse_now().saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
    }

    fn stale_for(&self) -> Option<Duration> {
        let last = self.last_success_ms.load(Ordering::Relaxed);
        let since = Duration::from_millis(self.coarse_ms().saturating_sub(last));
        (since > self.max_stale).then_some(since)
    }

    fn refreshed(&self) {
        // The latest of concurrent refreshes wins, whichever stores last.
        self.last_success_ms
            .fetch_max(self.coarse_ms(), Ordering::Relaxed);
    }

    async fn verify_at(
        &self,
        token: &str,
        caller: &SpiffeId,
        now: u64,
        memo: Option<&TokenMemo>,
    ) -> Result<Arc<UserClaims>, TokenRejection> {
        // No RFC fixes a size; a cap checked before any decoding bounds the work (base64,
        // JSON, hashing) an unauthenticated caller can make us do.
        if token.len() > self.max_token_bytes {
            return Err(TokenRejection::TooLarge);
        }
        // Checked before the cache: a token verified with a key the issuer has since removed
        // must stop working once the removal can no longer be learned.
        if self.stale_for().is_some() {
            return Err(TokenRejection::JwksStale);
        }
        let keys = self.keys.load_full();
        if let Some(checked) = memo.and_then(|memo| memo.get(&self.cache, keys.generation(), token))
        {
            return claims::check_per_call(&checked, &self.rules, caller, now);
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let remember = |generation, checked: &Arc<CheckedToken>| {
            if let Some(memo) = memo {
                memo.remember(&self.cache, generation, token, checked);
            }
        };
        if let Some(checked) = self.cache.get(&hash, keys.generation()) {
            remember(keys.generation(), &checked);
            return claims::check_per_call(&checked, &self.rules, caller, now);
        }

        let (payload_b64, keys) = self.verified_payload(token, keys).await?;
        let checked = Arc::new(claims::parse_claims(payload_b64, &self.rules)?);
        let expires = checked.user.expires_at.saturating_add(self.rules.skew_secs);
        self.cache
            .insert(hash, Arc::clone(&checked), keys.generation(), expires, now);
        remember(keys.generation(), &checked);
        claims::check_per_call(&checked, &self.rules, caller, now)
    }

    /// Checks the compact form, the JOSE header, finds the key and verifies the signature;
    /// the payload segment (not yet decoded) and the key set it verified against. Shared by
    /// user tokens and approval grants, so both follow the same RFC 8725 rules.
    pub(super) async fn verified_payload<'t>(
        &self,
        token: &'t str,
        keys: Arc<KeySet>,
    ) -> Result<(&'t str, Arc<KeySet>), TokenRejection> {
        // RFC 7515 §7.1 compact serialization: exactly three base64url segments. Five
        // segments would be a JWE, which is not accepted here.
        let mut segments = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(TokenRejection::Malformed("not a compact jws"));
        };
        let header = claims::parse_header(header_b64, &self.algorithms)?;
        if !claims::type_allowed(header.typ.as_deref(), &self.allowed_types) {
            return Err(TokenRejection::WrongType);
        }

        let keys = match keys.select(header.kid.as_deref(), header.alg) {
            KeyLookup::Found(_) => keys,
            KeyLookup::Unknown => self.refetch_for_unknown_key(&keys).await?,
            KeyLookup::WrongAlgorithm => return Err(TokenRejection::AlgorithmNotAllowed),
            KeyLookup::Ambiguous => return Err(TokenRejection::UnknownKey),
        };
        let key = match keys.select(header.kid.as_deref(), header.alg) {
            KeyLookup::Found(key) => key,
            KeyLookup::WrongAlgorithm => return Err(TokenRejection::AlgorithmNotAllowed),
            KeyLookup::Unknown | KeyLookup::Ambiguous => return Err(TokenRejection::UnknownKey),
        };

        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| TokenRejection::Malformed("signature"))?;
        // RFC 7515 §5.2: the signing input is the first two segments as sent, with the dot.
        let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
        self.signature_verifications.fetch_add(1, Ordering::Relaxed);
        key.verify_sig(signing_input.as_bytes(), &signature)
            .map_err(|_| TokenRejection::BadSignature)?;

        Ok((payload_b64, keys))
    }

    /// An unknown `kid` may mean the issuer rotated keys: refetch the URL, at most once per
    /// `min_refetch_interval`, with concurrent callers sharing the fetch in flight. Never a
    /// fetch per request, or any caller could make us hammer the issuer. A file source is
    /// left to its poll.
    async fn refetch_for_unknown_key(&self, seen: &KeySet) -> Result<Arc<KeySet>, TokenRejection> {
        let Source::Url(fetcher) = &self.source else {
            return Err(TokenRejection::UnknownKey);
        };
        let mut last = self.refetch.lock().await;
        let current = self.keys.load_full();
        if current.generation() != seen.generation() {
            // Someone installed a new key set while we waited; look there first.
            return Ok(current);
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refetch_interval) {
            return Err(TokenRejection::UnknownKey);
        }
        *last = Some(Instant::now());
        tracing::debug!("unknown key: refetching jwks");
        match self.refresh_url(fetcher).await {
            Ok(keys) => Ok(keys),
            Err(_) => Err(TokenRejection::JwksUnavailable),
        }
    }

    async fn refresh(&self) {
        match &self.source {
            Source::File { path, last_seen } => self.refresh_file(path, last_seen).await,
            Source::Url(fetcher) => {
                // Periodic refreshes and on-demand refetches share the rate-limit clock, so
                // an unknown `kid` right after a refresh does not fetch again.
                let mut last = self.refetch.lock().await;
                *last = Some(Instant::now());
                let _ = self.refresh_url(fetcher).await;
            }
        }
    }

    async fn refresh_url(&self, fetcher: &UrlFetcher) -> Result<Arc<KeySet>, JwksError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = match fetcher.fetch().await {
            Ok(bytes) => self.install(&bytes),
            Err(error) => Err(error),
        };
        match &result {
            Ok(_) => {
                self.refreshed();
                self.refreshes_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %fetcher.url(), %error, "jwks refresh failed; keeping the last good key set");
            }
        }
        result
    }

    async fn refresh_file(&self, path: &Path, last_seen: &Mutex<Seen>) {
        let read = read_capped(path.to_owned(), self.max_jwks_bytes).await;
        let seen = match &read {
            Ok(bytes) => Seen::Content(Sha256::digest(bytes).into()),
            Err(_) => Seen::ReadError,
        };
        {
            let mut last = last_seen.lock().unwrap_or_else(PoisonError::into_inner);
            match (*last, seen) {
                (Seen::Content(a), Seen::Content(b)) if a == b => {
                    // Read again and unchanged: still current.
                    self.refreshed();
                    return;
                }
                (Seen::Invalid(a), Seen::Content(b)) if a == b => return,
                (Seen::ReadError, Seen::ReadError) => return,
                _ => *last = seen,
            }
        }
        let result = read.and_then(|bytes| self.install(&bytes));
        if result.is_err()
            && let Seen::Content(hash) = seen
        {
            *last_seen.lock().unwrap_or_else(PoisonError::into_inner) = Seen::Invalid(hash);
        }
        match result {
            Ok(keys) => {
                self.refreshed();
                self.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %path.display(), keys = keys.len(), "jwks file reloaded");
            }
            Err(error) => {
                self.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), %error, "jwks file reload failed; keeping the last good key set");
            }
        }
    }

    /// Parses and installs a JWKS unless it is the one in use. A failure leaves the last
    /// good set in place.
    fn install(&self, bytes: &[u8]) -> Result<Arc<KeySet>, JwksError> {
        let current = self.keys.load_full();
        if <[u8; 32]>::from(Sha256::digest(bytes)) == current.digest() {
            return Ok(current);
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let keys = Arc::new(KeySet::parse(bytes, &self.algorithms)?.with_generation(generation));
        self.keys.store(Arc::clone(&keys));
        // Entries verified under the old set are unreachable now (generation mismatch);
        // dropping them frees the memory at once.
        self.cache.clear();
        tracing::info!(keys = keys.len(), "jwks updated");
        Ok(keys)
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { path, .. } => write!(f, "file {}", path.display()),
            Source::Url(fetcher) => write!(f, "url {}", fetcher.url()),
        }
    }
}

/// Reads a JWKS file, refusing more than `limit` bytes. Opened by path on every call, so a
/// ConfigMap's `..data` symlink swap is followed to the new target.
async fn read_capped(path: PathBuf, limit: usize) -> Result<Vec<u8>, JwksError> {
    tokio::task::spawn_blocking(move || {
        let read_error = |source| JwksError::Read {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(read_error)?;
        let mut bytes = Vec::new();
        file.take(limit as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() > limit {
            return Err(JwksError::TooLarge { limit });
        }
        Ok(bytes)
    })
    .await
    .map_err(|join| JwksError::Fetch(join.to_string()))?
}
