//! The partition loop on the in-memory source, in tokio's paused time: retry timing, the commit
//! point under out-of-order completion (watermark and per-message: outputs wait for the offset
//! that passes their message), and revocation while a
//! handler call is running. The handler is a native twin, so no component is built.
//!
//! The instance pool runs on a runtime of its own in real time; while the loop waits for it,
//! the paused clock may jump to the loop's next timer. So the bounds below are on virtual time
//! the loop itself waited: a retry never runs before its backoff, and a run with many retries
//! takes about one backoff, not one per retry.

use super::*;
use crate::host::native::Native;
use crate::source::memory::Memory;
use crate::source::{GroupEvent, Record, Source};
use tokio::time::Instant;

pub(super) fn config(topic: &str) -> EngineConfig {
    EngineConfig {
        priority: None,
        group: "g".into(),
        topics: vec![topic.into()],
        batch_size: 8,
        instances: 2,
        lanes: 4,
        max_in_flight: 1000,
        max_in_flight_bytes: 64 << 20,
        drain: true,
        backoff: Backoff {
            base: Duration::from_millis(100),
            max_attempts: 5,
            ..Default::default()
        },
        retry_mode: RetryMode::Blocking,
        delivery: DeliveryMode::AtLeastOnce,
        dlq_topic: "{topic}.dlq".into(),
        retry_topic: "{topic}.retry".into(),
        idle_poll: Duration::from_millis(20),
        dedupe: None,
        retry_topics: Vec::new(),
        revoke_timeout: Duration::from_secs(10),
        autoscale: None,
    }
}

/// Order `n`, keyed by its id; `transient` ones ask for one 10 ms retry.
pub(super) fn order(n: u64, transient: bool) -> Record {
    let id = format!("m-{n}");
    Record {
        key: Some(id.clone().into_bytes()),
        payload: format!(
            r#"{{"id":"{id}","customer":"c","amount_cents":{},"transient":{transient}}}"#,
            n + 1
        )
        .into_bytes(),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

pub(super) fn orders_twin() -> Handler {
    Handler::Native {
        twin: Native::Orders,
        output_topic: Arc::from("out"),
    }
}

/// The order ids in `outputs`, as the twin's confirmations name them.
pub(super) fn ids(outputs: &[crate::source::Output]) -> Vec<String> {
    outputs
        .iter()
        .map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.record.payload).unwrap();
            v["order_id"].as_str().unwrap().to_string()
        })
        .collect()
}

pub(super) async fn drain(source: Arc<dyn Source>, handler: Handler, cfg: EngineConfig) -> Summary {
    let (_stop, stop_rx) = watch::channel(false);
    run(source, handler, cfg, stop_rx, Arc::new(Stats::default()))
        .await
        .expect("the run")
}

/// Every order once, 50 of them with 10 retries among them; order 0 retries.
fn input(m: &Memory) -> u64 {
    m.create("in", 1);
    m.create("out", 1);
    let records = (0..50).map(|n| order(n, n.is_multiple_of(5))).collect();
    m.append("in", 0, records);
    50
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_its_backoff_and_holds_back_only_its_key() {
    let m = Memory::log();
    let n = input(&m);
    let started = Instant::now();
    let s = drain(m.clone(), orders_twin(), config("in")).await;
    let elapsed = started.elapsed();
    assert_eq!((s.processed, s.retries, s.dead_lettered), (n, 10, 0));
    let commits = m.commits();
    // Each transient order's confirmation is committed no earlier than its 10 ms retry.
    for c in &commits {
        for id in ids(&c.outputs) {
            let k: u64 = id[2..].parse().unwrap();
            if k.is_multiple_of(5) {
                assert!(
                    c.at - started >= Duration::from_millis(10),
                    "{id} at {:?}",
                    c.at - started
                );
            }
        }
    }
    // Ten retries of 10 ms on different keys wait side by side: about one backoff in all, not
    // ten (a loop that waited per retry, or per commit, took that long and more).
    assert!(
        elapsed < Duration::from_millis(60),
        "the run took {elapsed:?} of virtual time"
    );
    // And nothing is lost or doubled: every order confirmed once (counted, not deduplicated
    // first), the offset at the end.
    let mut all: Vec<String> = commits.iter().flat_map(|c| ids(&c.outputs)).collect();
    all.sort();
    let mut want: Vec<String> = (0..n).map(|k| format!("m-{k}")).collect();
    want.sort();
    assert_eq!(all, want, "each order confirmed exactly once");
    assert_eq!(m.offset("g", "in", 0), n);
}

#[tokio::test(start_paused = true)]
async fn outputs_are_written_with_the_offset_that_passes_their_message() {
    let m = Memory::log();
    let n = input(&m);
    drain(m.clone(), orders_twin(), config("in")).await;
    // Order 0 retries while later orders finish. A commit writes an offset and outputs in one
    // atomic write; an output of a message at or above that offset would be written again when
    // the message runs again after a crash. So later orders' confirmations wait for m-0.
    // Nor may an offset pass a message whose output is not written with it or before: a crash
    // then would lose it.
    let commits = m.commits();
    let mut written = HashSet::new();
    for c in &commits {
        let point = c.offsets[0].2;
        for id in ids(&c.outputs) {
            let k: u64 = id[2..].parse().unwrap();
            assert!(k < point, "{id} written with offset {point}");
            written.insert(k);
        }
        for k in 0..point {
            assert!(
                written.contains(&k),
                "offset {point} passed m-{k}, not written"
            );
        }
    }
    let first = commits
        .iter()
        .position(|c| ids(&c.outputs).contains(&"m-0".to_string()))
        .expect("m-0 confirmed");
    assert!(
        ids(&commits[first].outputs).len() > 1,
        "the orders that finished while m-0 waited are written with it"
    );
    assert_eq!(
        commits.last().unwrap().offsets,
        vec![(Arc::from("in"), 0, n)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_per_message_source_settles_each_message_as_it_finishes() {
    let m = Memory::per_message();
    let n = input(&m);
    drain(m.clone(), orders_twin(), config("in")).await;
    let commits = m.commits();
    // Settled offsets: each once, all of them, and the retried order 0 after others.
    let settled: Vec<u64> = commits
        .iter()
        .flat_map(|c| c.settled.iter().map(|(_, _, o)| *o))
        .collect();
    let mut sorted = settled.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..n).collect::<Vec<_>>(),
        "each message settled once"
    );
    let zero = settled.iter().position(|&o| o == 0).unwrap();
    assert!(
        zero > 0,
        "order 0 retried, so others were settled before it: {settled:?}"
    );
    // Each message's settle goes with its own output: no commit settles a message whose
    // confirmation is not in it or an earlier one.
    let mut confirmed = HashSet::new();
    for c in &commits {
        confirmed.extend(ids(&c.outputs));
        for (_, _, o) in &c.settled {
            assert!(
                confirmed.contains(&format!("m-{o}")),
                "m-{o} settled before confirmed"
            );
        }
    }
}

/// Polls `cond` against a deadline (virtual time runs while the loop waits for the pool).
pub(super) async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_revoked_partition_finishes_its_call_commits_and_lets_go() {
    let (m, group) = Memory::grouped();
    m.create("in", 1);
    let n = 20u64;
    m.append("in", 0, (0..n).map(|k| order(k, false)).collect());
    let mut cfg = config("in");
    (cfg.drain, cfg.lanes, cfg.batch_size, cfg.instances) = (false, 1, 1, 1);
    let (stop, stop_rx) = watch::channel(false);
    let handler = Handler::Native {
        twin: Native::Slow,
        output_topic: Arc::from("out"),
    };
    let run = tokio::spawn(run(
        m.clone(),
        handler,
        cfg,
        stop_rx,
        Arc::new(Stats::default()),
    ));
    let part = vec![(Arc::<str>::from("in"), 0u32)];
    group.send(GroupEvent::Assigned(part.clone())).unwrap();
    // A call of 20 ms each, one at a time: revoke once a few are done and one is running.
    until("three commits", || m.offset("g", "in", 0) >= 3).await;
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
    group
        .send(GroupEvent::Revoked {
            partitions: part.clone(),
            done: done_tx,
        })
        .unwrap();
    tokio::task::spawn_blocking(move || done_rx.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the engine answers the revocation");
    // Let go: what finished is committed (the call running at the revocation too), nothing
    // more runs, and the offset does not move again.
    let at_revoke = m.offset("g", "in", 0);
    assert!(
        (3..n).contains(&at_revoke),
        "committed {at_revoke} at the revocation"
    );
    let commits = m.commits().len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        m.commits().len(),
        commits,
        "a commit after the partition was let go"
    );
    // Assigned again, it goes on from the committed offset to the end.
    group.send(GroupEvent::Assigned(part)).unwrap();
    until("the rest", || m.offset("g", "in", 0) == n).await;
    stop.send(true).unwrap();
    let s = run.await.unwrap().unwrap();
    assert_eq!(
        s.processed, n,
        "each message handled once across the revocation"
    );
}

/// Three copies of each order id, spread over four partitions so that each partition sees the
/// ids in another order, with dedupe on: every id runs once and the run ends. (Before the
/// claims knew "done, its outputs waiting for the commit point", two partitions could each
/// hold a copy's claim while their earlier messages waited for the other's: a deadlock, seen
/// in CI as a Kafka group that never committed.)
#[tokio::test(start_paused = true)]
async fn copies_across_partitions_run_once_and_never_wait_on_each_other() {
    const IDS: u64 = 300;
    let m = Memory::log();
    m.create("in", 4);
    m.create("out", 1);
    for copy in 0..3u64 {
        for p in 0..4u64 {
            let records = (0..IDS)
                .filter(|id| (id * 7 + copy) % 4 == p)
                .map(|id| {
                    let mut r = order(id, false);
                    // Keyless, as a producer without keys sends them: lanes spread the copies.
                    r.key = None;
                    r.headers = vec![("idempotency-key".into(), format!("id-{id}").into_bytes())];
                    r
                })
                .collect();
            m.append("in", p as u32, records);
        }
    }
    let mut cfg = config("in");
    cfg.dedupe = Some(dedupe::DedupeConfig {
        source: dedupe::KeySource::Header("idempotency-key".into()),
        window: Duration::from_secs(600),
        store: None,
        claim_ttl: Duration::from_secs(60),
    });
    (cfg.batch_size, cfg.lanes) = (4, 8);
    // A real-time deadline: the paused clock jumps while the loop waits for the pool.
    let run = tokio::spawn(drain(m.clone(), orders_twin(), cfg));
    until(
        "the run to end (no partition waiting forever on another's claim)",
        || run.is_finished(),
    )
    .await;
    let s = run.await.unwrap();
    assert_eq!((s.processed, s.deduped), (IDS, 2 * IDS));
    let mut all: Vec<String> = m.commits().iter().flat_map(|c| ids(&c.outputs)).collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(
        (n, all.len()),
        (IDS as usize, IDS as usize),
        "each id confirmed once"
    );
}
