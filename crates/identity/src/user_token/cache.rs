//! A bounded map from SHA-256(token) to the result of its signature and static claim checks,
//! so an agent re-sending the same token does not cost a signature verification per request.
//!
//! It caches only successes, and only what does not depend on time or caller: the verifier
//! re-runs the per-call checks on every hit. Entries die with the token's `exp` and with the
//! key set generation they were verified under.
//!
//! [`TokenMemo`] sits in front of it, one per connection: the token the connection's caller
//! sent last, matched by its bytes, so the token an agent re-sends on every call for its
//! user is not hashed for the map each time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::claims::CheckedToken;

pub(crate) type TokenHash = [u8; 32];

pub(crate) struct TokenCache {
    /// Unique in the process: what a [`TokenMemo`] names the cache it remembers for.
    id: u64,
    capacity: usize,
    entries: Mutex<HashMap<TokenHash, Entry>>,
}

#[derive(Debug)]
struct Entry {
    token: Arc<CheckedToken>,
    generation: u64,
    /// Unix seconds after which the token is expired even with the skew allowance.
    expires: u64,
}

/// Sizes only: the entries hold users' claims, which have no business in a debug dump.
impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl TokenCache {
    /// Unique in the process (see [`TokenMemo::verified_by`]).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn new(capacity: usize) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        TokenCache {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The cached result for this token under this key set generation. An expired entry is
    /// still returned: the caller's per-call checks reject it as expired without spending
    /// a signature check on it; expired entries are swept when the cache fills.
    pub(crate) fn get(&self, key: &TokenHash, generation: u64) -> Option<Arc<CheckedToken>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .filter(|entry| entry.generation == generation)
            .map(|entry| Arc::clone(&entry.token))
    }

    pub(crate) fn insert(
        &self,
        key: TokenHash,
        token: Arc<CheckedToken>,
        generation: u64,
        expires: u64,
        now: u64,
    ) {
        if self.capacity == 0 || expires <= now {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, e| e.generation == generation && now < e.expires);
            // Still full of live entries: drop a tenth of them (arbitrary ones; the map's
            // iteration order is randomised per process) so the O(n) sweep above runs once
            // per many inserts, not on every insert.
            if entries.len() >= self.capacity {
                let drop = (self.capacity / 10).max(1);
                let victims: Vec<TokenHash> = entries.keys().take(drop).copied().collect();
                for victim in victims {
                    entries.remove(&victim);
                }
            }
        }
        entries.insert(
            key,
            Entry {
                token,
                generation,
                expires,
            },
        );
    }

    pub(crate) fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One connection's last verified token and the result of its checks: a caller re-sending
/// the token it sent last (an agent acting for one user sends the same token on every call)
/// is matched by comparing its bytes, which costs a fraction of hashing them for
/// [`TokenCache`] (SHA-256 of a typical 0.5-1 KiB token: 0.3-0.6 us). It holds what a
/// cache hit would give, under the same rules: the same verifier, the same key set
/// generation, and the per-call checks run again on every hit. One token at most (within
/// `max_token_bytes`), replaced by the next one verified, and dropped with the connection.
#[derive(Default)]
pub struct TokenMemo(Mutex<Option<Remembered>>);

struct Remembered {
    /// [`TokenCache::id`] of the verifier's cache that produced it.
    cache: u64,
    generation: u64,
    token: Box<str>,
    checked: Arc<CheckedToken>,
}

impl Remembered {
    /// Whether `token` is the one remembered, compared in constant time.
    fn holds(&self, token: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.token.as_bytes(), token.as_bytes())
            .is_ok()
    }
}

/// Whether a token is held only: it is a credential, and its claims are a user's.
impl std::fmt::Debug for TokenMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("TokenMemo").field("held", &held).finish()
    }
}

impl TokenMemo {
    /// The checked token if `token` is the one remembered, by this cache under this key set
    /// generation. The bytes are compared in constant time: a connection may carry several
    /// users' tokens (an agent gateway), and how long a comparison took must not tell one
    /// caller how much of its token matches the one remembered.
    pub(crate) fn get(
        &self,
        cache: &TokenCache,
        generation: u64,
        token: &str,
    ) -> Option<Arc<CheckedToken>> {
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.as_ref()
            .filter(|r| r.cache == cache.id && r.generation == generation)
            .filter(|r| r.holds(token))
            .map(|r| Arc::clone(&r.checked))
    }

    /// The [`id`](super::UserTokenVerifier::id) of the verifier that remembered `token`, if
    /// it is the token remembered (compared in constant time, as [`get`](Self::get) does).
    /// The same bytes claim the same issuer, so where each issuer has its own key set the
    /// verifier that took a token once is the one its `iss` would choose again: a repeat
    /// need not have its payload decoded to find it.
    pub fn verified_by(&self, token: &str) -> Option<u64> {
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.as_ref().filter(|r| r.holds(token)).map(|r| r.cache)
    }

    /// Remembers `token`, unless the cache is off: with `cache_capacity: 0` every call's
    /// signature is verified, remembered or not.
    pub(crate) fn remember(
        &self,
        cache: &TokenCache,
        generation: u64,
        token: &str,
        checked: &Arc<CheckedToken>,
    ) {
        if cache.capacity == 0 {
            return;
        }
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Remembered {
            cache: cache.id,
            generation,
            token: token.into(),
            checked: Arc::clone(checked),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user_token::claims::{ClaimRules, parse_claims};
    use base64::Engine as _;

    fn token(exp: u64) -> Arc<CheckedToken> {
        let rules = ClaimRules {
            issuers: vec!["i".to_owned()],
            audiences: vec!["a".to_owned()],
            max_lifetime_secs: u64::MAX,
            skew_secs: 0,
            groups_claim: "groups".to_owned(),
            require_actor_binding: false,
            max_actor_depth: 1,
        };
        let claims =
            serde_json::json!({ "iss": "i", "aud": "a", "sub": "s", "iat": 0, "exp": exp });
        let segment = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
        Arc::new(parse_claims(&segment, &rules).unwrap())
    }

    #[test]
    fn bounded_by_capacity() {
        let cache = TokenCache::new(100);
        for i in 0..1000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            cache.insert(key, token(100), 1, 100, 10);
            assert!(cache.len() <= 100);
        }
        // The last insert is always present.
        let mut last = [0u8; 32];
        last[..4].copy_from_slice(&999u32.to_be_bytes());
        assert!(cache.get(&last, 1).is_some());
    }

    #[test]
    fn expired_and_other_generation_entries_go_first() {
        let cache = TokenCache::new(2);
        cache.insert([1; 32], token(50), 1, 50, 10);
        cache.insert([2; 32], token(100), 1, 100, 10);
        cache.insert([3; 32], token(100), 1, 100, 60);
        assert!(cache.get(&[1; 32], 1).is_none());
        assert!(cache.get(&[2; 32], 1).is_some());
        assert!(cache.get(&[3; 32], 1).is_some());
        assert!(cache.get(&[3; 32], 2).is_none());
    }

    #[test]
    fn memo_names_the_cache_of_the_token_it_holds_only() {
        let (first, second) = (TokenCache::new(10), TokenCache::new(10));
        assert_ne!(first.id(), second.id());
        let memo = TokenMemo::default();
        assert_eq!(memo.verified_by("a.b.c"), None);
        memo.remember(&second, 1, "a.b.c", &token(100));
        assert_eq!(memo.verified_by("a.b.c"), Some(second.id()));
        // Whatever the generation: the choice of verifier does not depend on it.
        assert!(memo.get(&second, 2, "a.b.c").is_none());
        assert_eq!(memo.verified_by("a.b.c"), Some(second.id()));
        for other in ["a.b.d", "a.b.c.", "a.b", ""] {
            assert_eq!(memo.verified_by(other), None, "{other:?}");
        }
        memo.remember(&first, 1, "x.y.z", &token(100));
        assert_eq!(memo.verified_by("x.y.z"), Some(first.id()));
        assert_eq!(memo.verified_by("a.b.c"), None);
        // A cache that is off remembers nothing for anyone.
        let off = TokenCache::new(0);
        memo.remember(&off, 1, "p.q.r", &token(100));
        assert_eq!(memo.verified_by("p.q.r"), None);
    }

    #[test]
    fn nothing_is_stored_when_disabled_or_already_expired() {
        let cache = TokenCache::new(0);
        cache.insert([1; 32], token(100), 1, 100, 10);
        assert_eq!(cache.len(), 0);
        let cache = TokenCache::new(10);
        cache.insert([1; 32], token(100), 1, 100, 100);
        assert_eq!(cache.len(), 0);
    }
}
