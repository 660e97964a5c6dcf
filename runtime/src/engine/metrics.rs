//! What a run counts beyond [`super::Stats`]'s totals: messages per topic and outcome, and the
//! latency histograms. Written by the partition tasks and the pool, read by the admin server.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket bounds in seconds, shared by both histograms: 50 µs to 30 s, finer around the
/// milliseconds where latency targets sit.
pub const BUCKETS: [f64; 24] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.025,
    0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];

/// Sub-buckets per power of two of the fine histogram: a quantile is read within 1/16 (6.25%)
/// of the true value, from 1 ns to [`FINE_MAX_NS`].
const SUB: u64 = 16;
const SUB_BITS: u32 = 4;
/// Values past this (about 18 minutes) count in the last fine bucket.
const FINE_MAX_NS: u64 = 1 << 40;
const FINE_LEN: usize = fine_index(FINE_MAX_NS) + 1;

/// The fine bucket of `ns`: linear below [`SUB`], then [`SUB`] buckets per power of two
/// (log-linear, as HDR histograms lay them out).
const fn fine_index(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let ns = if ns > FINE_MAX_NS { FINE_MAX_NS } else { ns };
    let exp = 63 - ns.leading_zeros(); // >= SUB_BITS
    let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The largest value in fine bucket `i`, in nanoseconds.
fn fine_upper_ns(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let exp = (i / SUB) as u32 - 1 + SUB_BITS;
    let sub = i % SUB;
    ((SUB + sub + 1) << (exp - SUB_BITS)) - 1
}

/// A Prometheus histogram with fixed buckets, and beside it a log-linear one fine enough to tell
/// 1 ms from 1.1 ms, which quantiles read; lock-free to observe.
///
/// Not the `hdrhistogram` crate: recording there takes `&mut self`, so every partition task and
/// instance would need its own recorder and a thread to merge them, or a lock on the hot path;
/// two arrays of atomics give the same log-linear buckets without either.
#[derive(Debug)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// Per fine bucket (see [`fine_index`]).
    fine: Box<[AtomicU64; FINE_LEN]>,
    /// The sum, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            fine: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records `n` observations of `seconds`.
    pub fn observe_n(&self, seconds: f64, n: u64) {
        if n == 0 || !seconds.is_finite() {
            return;
        }
        let seconds = seconds.max(0.0);
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(n, Ordering::Relaxed);
        let ns = (seconds * 1e9) as u64;
        self.fine[fine_index(ns)].fetch_add(n, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns * n, Ordering::Relaxed);
    }

    /// (cumulative counts per bucket bound, +Inf count, sum in seconds).
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(BUCKETS.len());
        for (i, b) in BUCKETS.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            out.push((*b, acc));
        }
        acc += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        (out, acc, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }

    /// The value below which `q` of the observations fall, in seconds, read from the fine
    /// buckets (the upper end of the bucket it falls in: at most 1/16 over), if any.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .fine
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut acc = 0;
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                if i + 1 == FINE_LEN {
                    return Some(f64::INFINITY);
                }
                return Some(fine_upper_ns(i) as f64 / 1e9);
            }
        }
        Some(f64::INFINITY)
    }
}

/// Per-topic counters and the histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (topic, outcome) -> messages. Outcomes: `ok`, `deduped`, `dlq` (final), and one per
    /// failed attempt: `retry`, `rejected`, `trap`, `timeout`, `memory`, `invalid-output`.
    messages: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Time in the handler per message (a batch call's time divided among its messages).
    pub handler: Histogram,
    /// From the message's timestamp (when it was appended) to its ack.
    pub end_to_end: Histogram,
}

impl Metrics {
    pub fn count(&self, topic: &str, outcome: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        let mut m = self.messages.lock().expect("metrics lock");
        *m.entry((topic.to_string(), outcome)).or_default() += n;
    }

    pub fn messages(&self) -> Vec<((String, &'static str), u64)> {
        let m = self.messages.lock().expect("metrics lock");
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_quantiles_read_them() {
        let h = Histogram::default();
        h.observe_n(0.000_07, 90);
        h.observe_n(0.003, 9);
        h.observe_n(100_000.0, 1);
        let (b, total, sum) = h.snapshot();
        assert_eq!(total, 100);
        assert_eq!(b[0], (0.000_05, 0));
        assert_eq!(b[1], (0.000_1, 90));
        assert_eq!(b[5], (0.002, 90));
        assert_eq!(b[6], (0.003, 99));
        assert_eq!(b.last().unwrap().1, 99, "100,000 s is past the last bucket");
        assert!((sum - (90.0 * 0.000_07 + 9.0 * 0.003 + 100_000.0)).abs() < 1e-3);
        let near = |got: Option<f64>, want: f64| {
            let got = got.unwrap();
            assert!(
                got >= want && got <= want * (1.0 + 1.0 / 16.0),
                "{got} for {want}"
            );
        };
        near(h.quantile(0.5), 0.000_07);
        near(h.quantile(0.9), 0.000_07);
        near(h.quantile(0.99), 0.003);
        assert_eq!(h.quantile(1.0), Some(f64::INFINITY));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    /// The fine buckets tell 1 ms from 1.1 ms and 5 ms, which the Prometheus buckets cannot.
    #[test]
    fn fine_quantiles_tell_close_latencies_apart() {
        // (name, observations as (seconds, count), quantile, value it should read)
        type Case<'a> = (&'a str, &'a [(f64, u64)], f64, f64);
        let cases: &[Case] = &[
            ("1 ms", &[(0.001, 100)], 0.99, 0.001),
            ("1.1 ms", &[(0.0011, 100)], 0.99, 0.0011),
            ("5 ms", &[(0.005, 100)], 0.99, 0.005),
            (
                "tail of 1 in 100 at 8 ms",
                &[(0.001, 99), (0.008, 1)],
                0.99,
                0.001,
            ),
            (
                "tail of 2 in 100 at 8 ms",
                &[(0.001, 98), (0.008, 2)],
                0.99,
                0.008,
            ),
            ("one microsecond", &[(0.000_001, 10)], 0.5, 0.000_001),
            (
                "below 16 ns, exact",
                &[(0.000_000_009, 3)],
                0.5,
                0.000_000_009,
            ),
            ("zero", &[(0.0, 3)], 0.5, 0.0),
        ];
        for (name, obs, q, want) in cases {
            let h = Histogram::default();
            for (s, n) in obs.iter() {
                h.observe_n(*s, *n);
            }
            let got = h.quantile(*q).unwrap();
            assert!(
                got >= want * 0.999_999 && got <= want * (1.0 + 1.0 / 16.0) + 1e-9,
                "{name}: {got} for {want}"
            );
        }
    }

    /// Every value falls in a bucket whose upper end is at or above it and within 1/16 of it,
    /// and the buckets are contiguous.
    #[test]
    fn fine_buckets_cover_the_range_without_gaps() {
        for i in 1..FINE_LEN {
            assert_eq!(
                fine_upper_ns(i - 1) + 1,
                lower(i),
                "between {} and {i}",
                i - 1
            );
        }
        for ns in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            1000,
            1_000_000,
            999_999_999,
            1 << 39,
        ] {
            let i = fine_index(ns);
            assert!(
                lower(i) <= ns && ns <= fine_upper_ns(i),
                "{ns} in bucket {i}"
            );
            assert!(
                fine_upper_ns(i) - ns <= ns / 16,
                "{ns}: bucket {i} too wide"
            );
        }
        assert_eq!(fine_index(u64::MAX), FINE_LEN - 1);
    }

    fn lower(i: usize) -> u64 {
        if i == 0 { 0 } else { fine_upper_ns(i - 1) + 1 }
    }
}
