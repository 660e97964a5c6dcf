//! The per-message settle path on an in-memory queue that leases, counts, delays and takes
//! back messages as SQS and JetStream do, in tokio's paused time: a retry the broker delays,
//! a message held past its lease, and what a stopped or revoked partition gives back.

use super::retry::{Backoff, Jitter};
use super::tests::{config, drain, order, orders_twin, until};
use super::*;
use crate::host::native::Native;
use crate::source::memory_queue::MemQueue;
use crate::source::{Capabilities, GroupEvent, Record};
use std::future::Future;
use tokio::sync::mpsc::UnboundedSender;

/// `n` orders, every fifth one asking for one retry.
fn orders(q: &MemQueue, n: u64) {
    q.create("in");
    q.create("out");
    q.send("in", (0..n).map(|k| order(k, k.is_multiple_of(5))));
}

/// The order ids confirmed on `out`, sorted.
fn confirmed(q: &MemQueue) -> Vec<String> {
    let mut ids: Vec<String> = q
        .waiting("out")
        .iter()
        .map(|(r, _): &(Record, u32)| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            v["order_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids
}

fn busy() -> Handler {
    Handler::Native {
        twin: Native::Busy,
        output_topic: Arc::from("out"),
    }
}

/// A backoff of 30 s, exactly: longer than the queue's 10 s lease.
fn long_backoff(cfg: &mut EngineConfig) {
    cfg.backoff = Backoff {
        base: Duration::from_secs(30),
        max: Duration::from_secs(60),
        jitter: Jitter::None,
        max_attempts: 5,
        ..Default::default()
    };
}

#[tokio::test(start_paused = true)]
async fn a_retry_the_broker_delays_comes_back_with_its_delivery_count() {
    let q = MemQueue::new(
        Duration::from_secs(60),
        Capabilities {
            delayed_retry: true,
            delivery_count: true,
            ..Capabilities::LOG
        },
    );
    orders(&q, 50);
    let mut cfg = config("in");
    cfg.retry_mode = RetryMode::Requeue;
    let s = drain(q.clone(), orders_twin(), cfg).await;
    // Each transient order went back to the queue with its 10 ms delay and came back as
    // delivery 2, which the twin takes as attempt 2 and confirms. (Were the broker's count not
    // read, every delivery would be attempt 1: retried to the end and dead-lettered.)
    assert_eq!((s.processed, s.retries, s.dead_lettered), (50, 10, 0));
    let c = q.counts();
    assert_eq!(c.delayed, vec![Duration::from_millis(10); 10]);
    assert_eq!((c.delivered, c.stale, c.expired), (60, 0, 0));
    assert!(
        !q.topic_exists("in.retry"),
        "no retry topic where the broker delays"
    );
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..50).map(|k| format!("m-{k}")).collect();
        v.sort();
        v
    };
    assert_eq!(confirmed(&q), want, "each order confirmed once");
}

#[tokio::test(start_paused = true)]
async fn a_message_held_past_its_lease_is_extended_and_runs_once() {
    // (whether the engine is told of the lease, expected: extended, handed out again)
    for told in [true, false] {
        let lease = Duration::from_secs(10);
        let q = MemQueue::new(
            lease,
            Capabilities {
                lease: told.then_some(lease),
                delivery_count: true,
                ..Capabilities::LOG
            },
        );
        q.create("in");
        q.create("out");
        q.send("in", (0..5).map(|k| order(k, false)));
        let mut cfg = config("in");
        long_backoff(&mut cfg);
        let s = drain(q.clone(), busy(), cfg).await;
        let c = q.counts();
        if told {
            // Each message waits 30 s for its second attempt, three leases: renewed while it
            // waits, it is never handed to anyone else.
            assert_eq!((s.processed, c.delivered), (5, 5), "{c:?}");
            assert_eq!((c.expired, c.stale), (0, 0), "{c:?}");
            assert!(c.extended >= 5 * 2, "{c:?}");
        } else {
            // The control: unrenewed, each lease runs out while the message waits; the queue
            // hands it out again, and the first holder's ack comes too late.
            assert!(c.expired >= 5 && c.stale >= 1, "{c:?}");
            assert_eq!(c.extended, 0);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_in_a_long_call_has_its_lease_extended() {
    use crate::host::native::gate;
    // (whether the engine is told of the lease)
    for told in [true, false] {
        gate::close();
        let lease = Duration::from_secs(10);
        let q = MemQueue::new(
            lease,
            Capabilities {
                lease: told.then_some(lease),
                delivery_count: true,
                ..Capabilities::LOG
            },
        );
        q.create("in");
        q.create("out");
        q.send("in", [order(0, false)]);
        let mut cfg = config("in");
        (cfg.batch_size, cfg.instances, cfg.lanes) = (1, 1, 1);
        let gated = Handler::Native {
            twin: Native::Gated,
            output_topic: Arc::from("out"),
        };
        let (_stop, stop_rx) = watch::channel(false);
        let run = tokio::spawn(run(
            q.clone(),
            gated,
            cfg,
            stop_rx,
            Arc::new(Stats::default()),
        ));
        until("the call is running", || gate::waiting() == 1).await;
        // The call runs for 60 s of the loop's clock, six leases, while the test moves the
        // clock a second at a time and lets the loop take its timers (a renewal goes out on
        // the blocking pool, in real time) before the next second.
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let settle = std::time::Instant::now() + Duration::from_millis(50);
            while std::time::Instant::now() < settle {
                tokio::task::yield_now().await;
            }
        }
        gate::open();
        until("the run ends", || run.is_finished()).await;
        let s = run.await.unwrap().unwrap();
        let c = q.counts();
        if told {
            // Renewed all along: handed to no one else, acked once.
            assert_eq!((c.delivered, c.expired, c.stale), (1, 0, 0), "{c:?}");
            assert!(c.extended >= 10, "{c:?}");
            assert_eq!(s.processed, 1);
        } else {
            // The control: the lease ran out under the call; the queue handed the message out
            // again, and the first call's ack came too late.
            assert!(c.expired >= 1 && c.stale >= 1, "{c:?}");
        }
    }
}

/// Runs `busy` on five messages with a 30 s backoff until every one failed once and waits;
/// then `let_go` stops or revokes; returns the queue once the run ended.
async fn held_then<F, Fut>(grouped: bool, let_go: F) -> Arc<MemQueue>
where
    F: FnOnce(Option<UnboundedSender<GroupEvent>>, watch::Sender<bool>) -> Fut,
    Fut: Future<Output = (watch::Sender<bool>, Option<UnboundedSender<GroupEvent>>)>,
{
    let caps = Capabilities {
        delivery_count: true,
        ..Capabilities::LOG
    };
    let (q, group) = if grouped {
        let (q, g) = MemQueue::grouped(Duration::from_secs(600), caps);
        (q, Some(g))
    } else {
        (MemQueue::new(Duration::from_secs(600), caps), None)
    };
    q.create("in");
    q.create("out");
    q.send("in", (0..5).map(|k| order(k, false)));
    let mut cfg = config("in");
    cfg.drain = false;
    long_backoff(&mut cfg);
    let (stop, stop_rx) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let run = tokio::spawn(run(q.clone(), busy(), cfg, stop_rx, stats.clone()));
    if let Some(g) = &group {
        g.send(GroupEvent::Assigned(vec![(Arc::from("in"), 0)]))
            .unwrap();
    }
    until("every message failed once", || {
        stats.retries.load(Ordering::Relaxed) == 5
    })
    .await;
    // (The group's sender is kept: dropped, it ends the group and the run.)
    let (stop, _group) = let_go(group, stop).await;
    stop.send(true).unwrap();
    until("the run ends", || run.is_finished()).await;
    let s = run.await.unwrap().unwrap();
    // Nothing ran a second attempt: the run did not wait out the backoff.
    assert_eq!(s.processed, 0);
    q
}

fn given_back(q: &MemQueue) {
    let c = q.counts();
    assert_eq!((c.released, c.delivered, c.stale), (5, 5, 0), "{c:?}");
    // Back in the queue, in order, each counted as delivered once.
    let waiting = q.waiting("in");
    let want: Vec<(Record, u32)> = (0..5).map(|k| (order(k, false), 1)).collect();
    assert_eq!(waiting, want);
    assert_eq!(q.committed("g", "in", 0).unwrap(), 5, "all numbers voided");
}

#[tokio::test(start_paused = true)]
async fn a_stopped_partition_gives_back_what_it_did_not_run() {
    let q = held_then(false, |group, stop| async move { (stop, group) }).await;
    given_back(&q);
}

#[tokio::test(start_paused = true)]
async fn a_revoked_partition_gives_back_what_it_did_not_run() {
    let q = held_then(true, |group, stop| async move {
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let group = group.expect("grouped");
        group
            .send(GroupEvent::Revoked {
                partitions: vec![(Arc::from("in"), 0)],
                done: done_tx,
            })
            .unwrap();
        tokio::task::spawn_blocking(move || done_rx.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("the engine answers the revocation");
        (stop, Some(group))
    })
    .await;
    given_back(&q);
}
