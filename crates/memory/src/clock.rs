//! [`coarse_now`]: the monotonic clock as of the kernel's last tick, for deadlines and ages
//! where a millisecond or a few do not matter, read on every request.
//!
//! A precise read (`Instant::now()`, `CLOCK_MONOTONIC` through the vDSO) costs 20-40 ns on a
//! virtual machine's clock source; a proxied request made about a dozen. Several of them stamp
//! things measured in seconds: when a request head started and when a connection fell idle
//! (deadlines of 10 s and more, kept in milliseconds), when an upstream connection went back
//! to the pool (expired after 90 s), when the user-token keys last refreshed (stale after
//! minutes). `CLOCK_MONOTONIC_COARSE` is the same timeline as of the last tick: ~5 ns a read
//! (measured here: 4.9-5.5 against 29-41 for a precise read, ticks 4 ms apart).

use std::time::Instant;

/// Now, to within one kernel tick (1-10 ms; 4 ms at the usual `HZ=250`), either side.
///
/// The coarse clock reads the time of the last tick, so it lags the precise one by up to a
/// tick. It is turned into an [`Instant`] through an anchor, a coarse and a precise read taken
/// together once, whose own lag offsets every later reading: a reading can also be up to a
/// tick ahead of a precise read made just before it. Callers compare such readings with
/// precise ones only against deadlines much longer than a tick, and never report one as a
/// duration. Elsewhere than Linux with glibc this is `Instant::now()`.
pub fn coarse_now() -> Instant {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::OnceLock;
        use std::time::Duration;

        /// A coarse and a precise reading of the same moment (within a tick).
        static ANCHOR: OnceLock<Option<(Duration, Instant)>> = OnceLock::new();
        if let Some((coarse, precise)) =
            ANCHOR.get_or_init(|| linux::coarse().map(|coarse| (coarse, Instant::now())))
            && let Some(now) = linux::coarse()
        {
            return *precise + now.saturating_sub(*coarse);
        }
    }
    Instant::now()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod linux {
    use std::time::Duration;

    /// `CLOCK_MONOTONIC_COARSE` (Linux 2.6.32 and later); `None` if the kernel refuses it.
    pub(super) fn coarse() -> Option<Duration> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        #[allow(unsafe_code)]
        // SAFETY: `now` is a valid, writable `timespec` for the duration of the call, which
        // writes only it. glibc serves this clock from the vDSO, without a system call.
        let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
        if result != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(now.tv_sec).ok()?,
            u32::try_from(now.tv_nsec).ok()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The kernel tick can be as long as 10 ms (`HZ=100`); the anchor's error and the
    /// reading's add up to two.
    const TWO_TICKS: Duration = Duration::from_millis(20);

    #[test]
    fn follows_the_precise_clock_within_ticks() {
        for _ in 0..200 {
            let before = Instant::now();
            let coarse = coarse_now();
            let after = Instant::now();
            assert!(coarse + TWO_TICKS >= before, "{coarse:?} behind {before:?}");
            assert!(coarse <= after + TWO_TICKS, "{coarse:?} ahead of {after:?}");
            std::thread::sleep(Duration::from_micros(300));
        }
    }

    #[test]
    fn never_goes_back() {
        let mut last = coarse_now();
        let until = Instant::now() + Duration::from_millis(50);
        let mut advanced = false;
        while Instant::now() < until {
            let now = coarse_now();
            assert!(now >= last, "{now:?} before {last:?}");
            advanced |= now > last;
            last = now;
        }
        assert!(advanced, "the coarse clock did not move in 50 ms");
    }
}
