//! Micro-benchmarks of weir's pure parts (`cargo bench -p weir`): the commit-point tracker, the
//! backoff policy, the scaler's decision, and the idempotency-key lookup dedupe does per
//! message.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use weir::engine::dedupe::{DedupeConfig, KeySource};
use weir::engine::offsets::OffsetTracker;
use weir::engine::retry::Backoff;
use weir::engine::scaler::{Observation, Scaler, ScalerConfig};
use weir::source::{Delivery, Record};

fn offsets(c: &mut Criterion) {
    // 256 messages dispatched, finished in an interleaved order (two lanes), then committed.
    c.bench_function(
        "offset tracker: 256 dispatched, finished out of order",
        |b| {
            let mut start = 0u64;
            b.iter(|| {
                let mut t = OffsetTracker::new(start);
                for o in start..start + 256 {
                    t.dispatch(o);
                }
                for o in (start..start + 256).step_by(2) {
                    t.finish(o + 1);
                }
                for o in (start..start + 256).step_by(2) {
                    t.finish(o);
                }
                start += 256;
                black_box(t.commit_point())
            })
        },
    );
}

fn backoff(c: &mut Criterion) {
    let b = Backoff::default();
    c.bench_function("backoff: delay of attempt 4 with full jitter", |bench| {
        bench.iter(|| black_box(b.delay(black_box(4), None, black_box(0.37))))
    });
}

fn scaler(c: &mut Criterion) {
    c.bench_function("scaler: one decision", |b| {
        let mut s = Scaler::new(ScalerConfig::default());
        let mut t = 0u64;
        b.iter(|| {
            t += 500;
            black_box(s.decide(Observation {
                now: Duration::from_millis(t),
                lag: 10_000 - (t % 10_000),
                handled: 1_000,
                failed: 3,
                current: 8,
                busy_lanes: 64,
            }))
        })
    });
}

fn dedupe_key(c: &mut Criterion) {
    let d = Delivery {
        topic: Arc::from("orders"),
        partition: 0,
        offset: 7,
        record: Record {
            key: Some(b"m-7".to_vec()),
            payload: vec![b'x'; 100],
            headers: vec![
                ("trace".into(), b"abc".to_vec()),
                ("idempotency-key".into(), b"m-7".to_vec()),
            ],
            timestamp_ms: None,
        },
        redeliveries: 0,
    };
    let cfg = |source| DedupeConfig {
        source,
        window: Duration::from_secs(86_400),
        store: None,
        claim_ttl: Duration::from_secs(60),
    };
    let header = cfg(KeySource::Header("idempotency-key".into()));
    let payload = cfg(KeySource::PayloadHash);
    c.bench_function("dedupe key: from a header", |b| {
        b.iter(|| black_box(header.key_of(black_box(&d))))
    });
    c.bench_function("dedupe key: SHA-256 of a 100-byte payload", |b| {
        b.iter(|| black_box(payload.key_of(black_box(&d))))
    });
}

criterion_group!(benches, offsets, backoff, scaler, dedupe_key);
criterion_main!(benches);
