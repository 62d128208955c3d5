//! Reconnect delays: exponential, capped, with full jitter.

use std::time::Duration;

/// How long to wait between attempts to reach the Workload API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// No delay is ever longer than this: an agent that comes back is seen within `max`.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    /// SPIRE agents restart in seconds; an SVID lives about an hour. Waiting at most 30 s
    /// between attempts keeps a restarted agent's first update well inside that hour while
    /// a thousand sidecars on a node do not hammer it.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

/// The delay sequence of one outage. "Full jitter" (a uniform draw in `[ceiling/2, ceiling]`)
/// spreads the sidecars of a node whose agent restarted, so they do not reconnect in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: BackoffPolicy,
    ceiling: Duration,
}

impl Backoff {
    pub(crate) fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            ceiling: policy.initial.min(policy.max),
        }
    }

    /// The next delay; each call doubles the ceiling up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(self.policy.max);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(fastrand::u64(0..=spread))
    }

    /// After a stream delivered a good update the next outage starts small again.
    pub(crate) fn reset(&mut self) {
        self.ceiling = self.policy.initial.min(self.policy.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }

    #[test]
    fn delays_grow_then_stay_bounded_by_max() {
        let mut backoff = Backoff::new(policy());
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        for (attempt, delay) in delays.iter().enumerate() {
            let ceiling = (Duration::from_millis(100) * 2u32.pow(attempt as u32)).min(policy().max);
            assert!(
                *delay >= ceiling / 2 && *delay <= ceiling,
                "attempt {attempt}: {delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        assert!(delays.iter().all(|d| *d <= policy().max));
        assert!(delays[11] >= policy().max / 2, "the ceiling reached max");
    }

    #[test]
    fn delays_are_jittered() {
        let mut backoff = Backoff::new(BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(1),
        });
        let distinct: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| backoff.next_delay()).collect();
        assert!(distinct.len() > 1, "50 draws gave one value: no jitter");
    }

    #[test]
    fn reset_starts_the_sequence_again() {
        let mut backoff = Backoff::new(policy());
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
