//! A histogram for the request path, observed without atomic read-modify-writes.
//!
//! prometheus's [`prometheus::Histogram::observe`] makes four locked instructions per
//! observation (its hot-shard counter, the bucket, the sum's compare-and-swap, the count), so
//! that any number of threads can observe and a scrape can read a consistent snapshot. Two
//! histograms are observed per request, on the serving thread. Here each thread that observes
//! owns a shard of the counts: it is the shard's only writer, so an update is a load and a
//! store (plain `mov`s on x86-64 and arm64), and a scrape adds the shards up. A thread's shard
//! is handed back when the thread ends and taken by the next thread that needs one, so the
//! counts of every thread that ever observed stay in the sums.
//!
//! What a scrape reads is the same exposition as prometheus's histogram (a test renders both
//! from the same observations): cumulative buckets, `+Inf` as the count, and the sum. A
//! scrape racing an observation may see its count without its bucket (the count is written
//! first and the bucket published after it), never a bucket above the count, so the
//! cumulative buckets never decrease into `+Inf`; the sum may lag by that observation.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus::core::{Collector, Desc, Describer};
use prometheus::{HistogramOpts, proto};

/// A histogram without labels whose observations are per-thread (see the module's notes).
/// Clones share the counts.
#[derive(Clone, Debug)]
pub struct ShardedHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Tells this histogram's shard apart in a thread's list ([`HELD`]); never reused, as an
    /// address could be once a histogram is dropped.
    id: usize,
    desc: Desc,
    upper_bounds: Box<[f64]>,
    /// Every shard ever handed out, held or free.
    shards: Mutex<Vec<Arc<Shard>>>,
}

#[derive(Debug)]
struct Shard {
    /// Held by a living thread, the only one that writes the counts below.
    held: AtomicBool,
    count: AtomicU64,
    /// An `f64`'s bits.
    sum: AtomicU64,
    /// Observations per bucket (not cumulative); those above every bound are only counted.
    buckets: Box<[AtomicU64]>,
}

/// A thread's shard of one histogram, handed back when the thread ends.
struct Held {
    histogram: usize,
    shard: Arc<Shard>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Publishes this thread's last writes to whichever thread takes the shard next.
        self.shard.held.store(false, Ordering::Release);
    }
}

thread_local! {
    /// This thread's shards, one per histogram it has observed (two in the proxy).
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl ShardedHistogram {
    /// A histogram with these bucket upper bounds (strictly increasing and finite; `+Inf` is
    /// implied).
    ///
    /// # Errors
    /// An invalid name or help (prometheus's rules), or bounds that are not as above.
    pub fn new(name: &str, help: &str, upper_bounds: Vec<f64>) -> prometheus::Result<Self> {
        let desc = HistogramOpts::new(name, help).describe()?;
        if upper_bounds.is_empty()
            || upper_bounds.iter().any(|bound| !bound.is_finite())
            || upper_bounds.windows(2).any(|pair| pair[0] >= pair[1])
        {
            return Err(prometheus::Error::Msg(format!(
                "{name}: bucket bounds must be finite and strictly increasing: {upper_bounds:?}"
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                desc,
                upper_bounds: upper_bounds.into(),
                shards: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Adds an observation, in the first bucket whose bound is at least `value`, as
    /// prometheus does.
    pub fn observe(&self, value: f64) {
        let bucket = self
            .inner
            .upper_bounds
            .iter()
            .position(|&bound| value <= bound);
        let recorded = HELD.try_with(|held| {
            let mut held = held.borrow_mut();
            let position = held.iter().position(|h| h.histogram == self.inner.id);
            let position = position.unwrap_or_else(|| {
                held.push(Held {
                    histogram: self.inner.id,
                    shard: self.inner.take_shard(),
                });
                held.len() - 1
            });
            held[position].shard.record(bucket, value);
        });
        if recorded.is_err() {
            // This thread's list is gone (an observation from another thread-local's
            // destructor): a shard held for this one observation.
            let held = Held {
                histogram: self.inner.id,
                shard: self.inner.take_shard(),
            };
            held.shard.record(bucket, value);
        }
    }
}

impl Inner {
    fn shards(&self) -> MutexGuard<'_, Vec<Arc<Shard>>> {
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A free shard, or a new one: held by the caller from now on.
    fn take_shard(&self) -> Arc<Shard> {
        let mut shards = self.shards();
        let free = shards.iter().find(|shard| {
            // Acquire: sees every count its last holder wrote.
            shard
                .held
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        });
        if let Some(free) = free {
            return free.clone();
        }
        let shard = Arc::new(Shard {
            held: AtomicBool::new(true),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
            buckets: self
                .upper_bounds
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
        });
        shards.push(shard.clone());
        shard
    }
}

impl Shard {
    /// Called only by the thread holding the shard: nothing else writes these counts, so a
    /// load and a store are the whole update.
    fn record(&self, bucket: Option<usize>, value: f64) {
        let count = self.count.load(Ordering::Relaxed);
        self.count.store(count + 1, Ordering::Relaxed);
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        self.sum.store((sum + value).to_bits(), Ordering::Relaxed);
        if let Some(bucket) = bucket {
            let counter = &self.buckets[bucket];
            // Release: a scrape that reads this bucket (Acquire) reads the count above too.
            counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Release);
        }
    }
}

impl Collector for ShardedHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let inner = &*self.inner;
        let mut per_bucket = vec![0u64; inner.upper_bounds.len()];
        let (mut count, mut sum) = (0u64, 0f64);
        for shard in inner.shards().iter() {
            // The buckets before the count: the count read is at least their total.
            for (total, bucket) in per_bucket.iter_mut().zip(shard.buckets.iter()) {
                *total += bucket.load(Ordering::Acquire);
            }
            count += shard.count.load(Ordering::Relaxed);
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
        }
        let mut cumulative = 0;
        let buckets = inner
            .upper_bounds
            .iter()
            .zip(per_bucket)
            .map(|(&bound, in_bucket)| {
                cumulative += in_bucket;
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_count(count);
        histogram.set_sample_sum(sum);
        histogram.set_bucket(buckets);
        let mut metric = proto::Metric::default();
        metric.set_histogram(histogram);
        let mut family = proto::MetricFamily::default();
        family.set_name(inner.desc.fq_name.clone());
        family.set_help(inner.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(vec![metric]);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, Histogram, HistogramOpts, Registry, TextEncoder};

    use super::ShardedHistogram;

    /// Powers of two, so that sums are exact in any order.
    const BOUNDS: [f64; 4] = [0.0009765625, 0.00390625, 0.03125, 0.125];

    fn render(registry: &Registry) -> String {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        String::from_utf8(text).unwrap()
    }

    /// Observations from eight threads, some of which end and hand their shards on (and
    /// values on bounds, under the lowest, above the highest), render exactly as prometheus's
    /// histogram renders the same observations.
    #[test]
    fn renders_as_prometheus_does_with_every_threads_observations() {
        let (ours, theirs) = (Registry::new(), Registry::new());
        let sharded = ShardedHistogram::new("t_seconds", "Help.", BOUNDS.to_vec()).unwrap();
        let reference =
            Histogram::with_opts(HistogramOpts::new("t_seconds", "Help.").buckets(BOUNDS.to_vec()))
                .unwrap();
        ours.register(Box::new(sharded.clone())).unwrap();
        theirs.register(Box::new(reference.clone())).unwrap();
        // Exact in binary (so the sums add up to the same bits in any order): zero, under the
        // lowest bound, on bounds, between them, above the highest.
        let values = [
            0.0,
            0.00048828125,
            0.0009765625,
            0.00390625,
            0.015625,
            0.125,
            0.5,
            4.0,
        ];
        for round in 0..3 {
            // All eight observe at once, so shared counts would lose updates.
            let start = std::sync::Arc::new(std::sync::Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let (sharded, reference) = (sharded.clone(), reference.clone());
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        for i in 0..20_000 {
                            let value = values[(i + t + round) % values.len()];
                            sharded.observe(value);
                            reference.observe(value);
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            assert_eq!(render(&ours), render(&theirs), "after round {round}");
        }
        // Shards of ended threads were taken again: no more than one round's threads' worth.
        assert!(sharded.inner.shards().len() <= 8);
        let text = render(&ours);
        assert!(text.contains("t_seconds_count 480000\n"), "{text}");
        assert!(
            text.contains("t_seconds_bucket{le=\"0.0009765625\"} 180000\n"),
            "{text}"
        );
    }

    /// A scrape while threads observe never reads a bucket above the count, or a bucket
    /// below the one before it.
    #[test]
    fn a_scrape_during_observations_is_monotonic() {
        let sharded = ShardedHistogram::new("r_seconds", "Help.", BOUNDS.to_vec()).unwrap();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let sharded = sharded.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000_000 {
                        sharded.observe(BOUNDS[(i + t) % BOUNDS.len()]);
                    }
                })
            })
            .collect();
        let mut scrapes = 0;
        while !threads.iter().all(std::thread::JoinHandle::is_finished) || scrapes == 0 {
            let family = prometheus::core::Collector::collect(&sharded);
            let histogram = family[0].get_metric()[0].get_histogram();
            let mut previous = 0;
            for bucket in histogram.get_bucket() {
                assert!(bucket.cumulative_count() >= previous);
                previous = bucket.cumulative_count();
            }
            assert!(histogram.get_sample_count() >= previous);
            scrapes += 1;
        }
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn bounds_must_increase() {
        assert!(ShardedHistogram::new("a", "h", vec![]).is_err());
        assert!(ShardedHistogram::new("a", "h", vec![1.0, 1.0]).is_err());
        assert!(ShardedHistogram::new("a", "h", vec![1.0, f64::INFINITY]).is_err());
        assert!(ShardedHistogram::new("a b", "h", vec![1.0]).is_err());
    }
}
