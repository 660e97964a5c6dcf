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

/// A Prometheus histogram with fixed buckets; lock-free to observe.
#[derive(Debug)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// The sum, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
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
        self.sum_ns
            .fetch_add((seconds * 1e9) as u64 * n, Ordering::Relaxed);
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

    /// The value below which `q` of the observations fall (the bucket's upper bound), if any.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let (buckets, total, _) = self.snapshot();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil() as u64;
        Some(
            buckets
                .iter()
                .find(|(_, c)| *c >= want)
                .map_or(f64::INFINITY, |(b, _)| *b),
        )
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
        h.observe_n(100.0, 1);
        let (b, total, sum) = h.snapshot();
        assert_eq!(total, 100);
        assert_eq!(b[0], (0.000_05, 0));
        assert_eq!(b[1], (0.000_1, 90));
        assert_eq!(b[5], (0.002, 90));
        assert_eq!(b[6], (0.003, 99));
        assert_eq!(b.last().unwrap().1, 99, "100 s is past the last bucket");
        assert!((sum - (90.0 * 0.000_07 + 9.0 * 0.003 + 100.0)).abs() < 1e-6);
        assert_eq!(h.quantile(0.5), Some(0.000_1));
        assert_eq!(h.quantile(0.99), Some(0.003));
        assert_eq!(h.quantile(1.0), Some(f64::INFINITY));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
