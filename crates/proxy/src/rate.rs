//! `limits.rate`: token buckets per agent, per user and per tool. Over a bucket the request
//! is 429 with `retry-after` (the seconds until a token is back), audited and counted in
//! `portcullis_rate_limited_total{per}`.
//!
//! Where each bucket is taken: the agent's as soon as the request is admitted (the
//! identity is known from the handshake, nothing was read yet), the user's once the token
//! verified, a tool's once the call was permitted (so only tool names the policies allow ever
//! get a bucket, and a caller cannot grow the table with invented names).
//!
//! Memory is bounded per rule: a bucket that has refilled completely is the same as no
//! bucket and is dropped when room is needed; if every bucket is still draining, a new key is
//! refused (429) rather than an existing bucket forgotten, which would hand out its burst
//! again.
//!
//! What it does not: bound concurrency (`admission` does) or share state across replicas
//! (each sidecar limits what passes through it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::Shared;
use crate::audit::AuditGuard;
use crate::error::Refusal;

/// Pipeline stage: one token from `key`'s buckets kept `per` it; over: 429, audited (the
/// refusal is recorded by the caller) and counted here.
pub(crate) fn step(
    shared: &Shared,
    per: RatePer,
    key: &str,
    audit: &mut AuditGuard,
) -> Result<(), Refusal> {
    if shared.rates.is_empty() {
        return Ok(());
    }
    shared.rates.take(per, key).map_err(|(per, refusal)| {
        shared
            .metrics
            .rate_limited
            .with_label_values(&[per.name()])
            .inc();
        audit
            .record
            .errors
            .push(format!("rate limit per {} exceeded", per.name()));
        refusal
    })
}

/// What a bucket is kept per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatePer {
    Agent,
    User,
    Tool,
}

impl RatePer {
    /// The `per` label of `portcullis_rate_limited_total` and the config value.
    pub fn name(self) -> &'static str {
        match self {
            RatePer::Agent => "agent",
            RatePer::User => "user",
            RatePer::Tool => "tool",
        }
    }
}

/// One entry of `limits.rate`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRule {
    pub per: RatePer,
    pub requests_per_minute: u32,
    /// Requests that may come at once after a quiet period (the bucket's size).
    pub burst: u32,
}

/// Buckets kept per rule before new keys are refused.
const MAX_KEYS_PER_RULE: usize = 100_000;

/// Every configured rule with its buckets.
#[derive(Debug)]
pub(crate) struct RateLimits {
    rules: Vec<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    rule: RateRule,
    /// Tokens per second.
    rate: f64,
    capacity: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimits {
    pub(crate) fn new(rules: Vec<RateRule>) -> Self {
        Self::with_capacity(rules, MAX_KEYS_PER_RULE)
    }

    fn with_capacity(rules: Vec<RateRule>, capacity: usize) -> Self {
        Self {
            rules: rules
                .into_iter()
                .map(|rule| Buckets {
                    rate: f64::from(rule.requests_per_minute) / 60.0,
                    rule,
                    capacity,
                    buckets: Mutex::new(HashMap::new()),
                })
                .collect(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Takes one token from `key`'s bucket of every rule kept `per` it.
    pub(crate) fn take(&self, per: RatePer, key: &str) -> Result<(), (RatePer, Refusal)> {
        self.take_at(per, key, Instant::now())
    }

    fn take_at(&self, per: RatePer, key: &str, now: Instant) -> Result<(), (RatePer, Refusal)> {
        for buckets in self.rules.iter().filter(|b| b.rule.per == per) {
            buckets
                .take(key, now)
                .map_err(|seconds| (per, Refusal::RateLimited(seconds)))?;
        }
        Ok(())
    }
}

impl Buckets {
    /// `Err(seconds until a token is back)` when the bucket is empty.
    fn take(&self, key: &str, now: Instant) -> Result<(), u32> {
        let burst = f64::from(self.rule.burst);
        // A poisoned lock means a panic mid-update: refuse (fail closed).
        let Ok(mut buckets) = self.buckets.lock() else {
            return Err(1);
        };
        // A known key is looked up by reference: its name is copied only when it is new.
        if let Some(bucket) = buckets.get_mut(key) {
            return self.spend(bucket, now);
        }
        if buckets.len() >= self.capacity {
            let rate = self.rate;
            buckets.retain(|_, b| b.refilled(now, rate) < burst);
            if buckets.len() >= self.capacity {
                return Err(1);
            }
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        self.spend(bucket, now)
    }

    /// Refills `bucket` to `now` and takes a token from it if it has one.
    fn spend(&self, bucket: &mut Bucket, now: Instant) -> Result<(), u32> {
        let burst = f64::from(self.rule.burst);
        bucket.tokens = bucket.refilled(now, self.rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = if self.rate > 0.0 {
            ((1.0 - bucket.tokens) / self.rate).ceil()
        } else {
            60.0
        };
        // Bounded: at most 60 / requests_per_minute minutes.
        Err(wait.clamp(1.0, f64::from(u32::MAX)) as u32)
    }
}

impl Bucket {
    fn refilled(&self, now: Instant, rate: f64) -> f64 {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(per: RatePer, rpm: u32, burst: u32, capacity: usize) -> RateLimits {
        RateLimits::with_capacity(
            vec![RateRule {
                per,
                requests_per_minute: rpm,
                burst,
            }],
            capacity,
        )
    }

    #[test]
    fn a_key_gets_its_burst_then_waits_for_the_refill() {
        let limits = limits(RatePer::Agent, 60, 2, 10);
        let t0 = Instant::now();
        assert!(limits.take_at(RatePer::Agent, "a", t0).is_ok());
        assert!(limits.take_at(RatePer::Agent, "a", t0).is_ok());
        let (per, refusal) = limits.take_at(RatePer::Agent, "a", t0).unwrap_err();
        assert_eq!(per, RatePer::Agent);
        assert_eq!(refusal, Refusal::RateLimited(1));
        // Another key, and another kind of key, are untouched.
        assert!(limits.take_at(RatePer::Agent, "b", t0).is_ok());
        assert!(limits.take_at(RatePer::User, "a", t0).is_ok());
        // One token a second comes back.
        assert!(
            limits
                .take_at(RatePer::Agent, "a", t0 + Duration::from_secs(1))
                .is_ok()
        );
    }

    #[test]
    fn retry_after_is_the_time_to_the_next_token() {
        let limits = limits(RatePer::Tool, 6, 1, 10);
        let t0 = Instant::now();
        assert!(limits.take_at(RatePer::Tool, "refund", t0).is_ok());
        let (_, refusal) = limits.take_at(RatePer::Tool, "refund", t0).unwrap_err();
        assert_eq!(refusal, Refusal::RateLimited(10));
    }

    #[test]
    fn the_table_is_bounded_and_only_refilled_buckets_are_forgotten() {
        let limits = limits(RatePer::User, 60, 1, 2);
        let t0 = Instant::now();
        assert!(limits.take_at(RatePer::User, "u1", t0).is_ok());
        assert!(limits.take_at(RatePer::User, "u2", t0).is_ok());
        // Both still draining: a third key is refused, u1 is not forgotten.
        assert!(limits.take_at(RatePer::User, "u3", t0).is_err());
        assert!(limits.take_at(RatePer::User, "u1", t0).is_err());
        // Once refilled, they make room.
        let later = t0 + Duration::from_secs(5);
        assert!(limits.take_at(RatePer::User, "u3", later).is_ok());
    }
}
