//! One partition's consumer: an event loop over key-ordered lanes.
//!
//! Fetched messages are hashed by key into lanes (keyless ones round robin). Each lane runs one
//! job at a time through the instance pool, in offset order, so messages with one key are
//! handled in order while other lanes go on. When a lane's front message fails with a retry, only
//! that lane waits out the backoff (`blocking` mode), or the message is republished to the retry
//! topic and acked (`requeue` mode). Completions arrive out of order; the [`OffsetTracker`]
//! gives the offset below which everything finished, and each commit writes that offset with
//! the outputs and dead letters of what finished since the last one, atomically.

mod commit;
mod fail;
mod job;
mod screen;

use super::claims::Held;
use super::dlq;
use super::offsets::OffsetTracker;
use super::{Ctx, DeliveryMode as Mode, EngineError, now_ms};
use crate::source::{Commit, Delivery, Settle, SourceError};
use commit::{InFlight, Later, Pending};
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A message waiting in a lane, with what the host knows of its history.
struct Work {
    /// The message as the handler sees it (for a retry-topic message: its origin).
    msg: Delivery,
    /// Its offset in the partition this task consumes (what the tracker tracks).
    at: u64,
    attempt: u32,
    not_before: Option<Instant>,
    first_failure_ms: Option<u64>,
    /// Its idempotency key, when dedupe is on and it has one.
    dedupe_key: Option<Vec<u8>>,
    /// Whether this message holds the in-flight claim on its idempotency key.
    claimed: bool,
    /// It failed here and waits to run again: it then runs in a call without first attempts.
    /// (With later messages in one call, that call's outputs would belong to offsets far apart,
    /// and on a log they would wait for everything between: see `commit::Later`.)
    again: bool,
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Work>,
    busy: bool,
}

/// A lane's finished job.
struct Done {
    lane: usize,
    meta: Vec<Work>,
    result: Result<(Vec<Delivery>, job::Ran), EngineError>,
}

fn lane_of(d: &Delivery, lanes: usize, round_robin: &mut usize) -> usize {
    match &d.record.key {
        Some(k) => {
            // Not the partitioner's hash: with it, every key of a partition could share a lane.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.hash(&mut h);
            (h.finish() % lanes as u64) as usize
        }
        None => {
            *round_robin = (*round_robin + 1) % lanes;
            *round_robin
        }
    }
}

/// This partition's share of the run's gauges (busy lanes, messages in flight) and its entry
/// in the set of live partitions; taken back when the task ends, however it ends.
struct Gauges {
    ctx: Arc<Ctx>,
    key: (Arc<str>, u32),
    lanes: usize,
    in_flight: usize,
    paused: bool,
}

impl Gauges {
    fn new(ctx: &Arc<Ctx>, topic: &Arc<str>, partition: u32) -> Gauges {
        let key = (topic.clone(), partition);
        ctx.live
            .lock()
            .expect("live partitions")
            .insert(key.clone());
        Gauges {
            ctx: ctx.clone(),
            key,
            lanes: 0,
            in_flight: 0,
            paused: false,
        }
    }

    /// `full`: fetching waits at a bound (messages or bytes in flight).
    fn set(&mut self, lanes: usize, in_flight: usize, full: bool) {
        let s = &self.ctx.stats;
        if lanes != self.lanes {
            s.busy_lanes.fetch_add(lanes, Ordering::Relaxed);
            s.busy_lanes.fetch_sub(self.lanes, Ordering::Relaxed);
            self.lanes = lanes;
        }
        if in_flight != self.in_flight {
            s.in_flight.fetch_add(in_flight, Ordering::Relaxed);
            s.in_flight.fetch_sub(self.in_flight, Ordering::Relaxed);
            self.in_flight = in_flight;
        }
        let paused = in_flight > 0 && full;
        if paused != self.paused {
            if paused {
                s.paused_partitions.fetch_add(1, Ordering::Relaxed);
            } else {
                s.paused_partitions.fetch_sub(1, Ordering::Relaxed);
            }
            self.paused = paused;
        }
    }
}

impl Drop for Gauges {
    fn drop(&mut self) {
        self.set(0, 0, false);
        if let Ok(mut live) = self.ctx.live.lock() {
            live.remove(&self.key);
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Join(e.to_string()))?
        .map_err(EngineError::from)
}

pub(super) async fn consume(
    ctx: Arc<Ctx>,
    topic: Arc<str>,
    partition: u32,
    shutdown: watch::Receiver<bool>,
) -> Result<(), EngineError> {
    let mut writing = None;
    let r = run(ctx, topic, partition, shutdown, &mut writing).await;
    if r.is_err()
        && let Some(mut w) = writing.take()
    {
        // The commit being written finishes (or fails) before the partition is gone: one
        // started again in its place (a lost broker link) must not meet it half-way.
        let _ = w.wait().await;
    }
    r
}

/// The partition loop; `writing` is the commit being written, there for the caller to wait
/// for when the loop ends on an error.
async fn run(
    ctx: Arc<Ctx>,
    topic: Arc<str>,
    partition: u32,
    mut shutdown: watch::Receiver<bool>,
    writing: &mut Option<InFlight>,
) -> Result<(), EngineError> {
    let cfg = &ctx.cfg;
    let (src, group, t) = (ctx.source.clone(), cfg.group.clone(), topic.clone());
    let start = blocking(move || src.committed(&group, &t, partition)).await?;
    // Messages of a retry topic are their origin topic's; the dead letters go to the origin's DLQ.
    let retry_origin: Option<Arc<str>> = cfg
        .retry_topics
        .iter()
        .find(|(_, r)| **r == *topic)
        .map(|(origin, _)| origin.clone());
    let is_retry_topic = retry_origin.is_some();
    let per_message = ctx.source.capabilities().settle == Settle::PerMessage;
    let mut tracker = if per_message {
        OffsetTracker::per_message(start)
    } else {
        OffsetTracker::new(start)
    };
    let mut committed = start;
    let mut next = start;
    let lanes_n = cfg.lanes.max(1);
    let mut lanes: Vec<Lane> = (0..lanes_n).map(|_| Lane::default()).collect();
    let mut rr = 0usize;
    // Lane jobs report here; owned by this task, one sender clone per running job.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut running = 0usize;
    let mut stopping = *shutdown.borrow();
    // `empty`: the last fetch found nothing new; `caught_up`: and the partition has nothing
    // more below its end (asked of the source only with --drain).
    let mut empty = false;
    let mut caught_up = false;
    let mut pending = Pending::default();
    let mut gauges = Gauges::new(&ctx, &topic, partition);
    let mut held = Held::new(&ctx);
    let signal = ctx.source.append_signal();
    // `writing`: the commit being written while the loop goes on (one at a time).
    loop {
        // 1. Fetch while there is room in flight.
        let bytes_in_flight = tracker.bytes_in_flight() as usize;
        if !stopping
            && tracker.in_flight() < cfg.max_in_flight
            && bytes_in_flight < cfg.max_in_flight_bytes
        {
            let room = (cfg.max_in_flight - tracker.in_flight()).min(cfg.batch_size * lanes_n);
            let room_bytes = cfg.max_in_flight_bytes - bytes_in_flight;
            let (src, t) = (ctx.source.clone(), topic.clone());
            let batch = blocking(move || src.fetch(&t, partition, next, room, room_bytes)).await?;
            empty = batch.is_empty();
            caught_up = empty
                && (!cfg.drain || {
                    let (src, t) = (ctx.source.clone(), topic.clone());
                    blocking(move || src.at_end(&t, partition, next)).await?
                });
            if let Some(last) = batch.last() {
                next = last.offset + 1;
            }
            let at_most_once = cfg.delivery == Mode::AtMostOnce && !batch.is_empty();
            for d in batch {
                let at = d.offset;
                tracker.dispatch_sized(at, crate::source::wire_size(&d.record) as u64);
                let mut work = match &retry_origin {
                    Some(origin) => {
                        let now = now_ms();
                        let max_wait = cfg.backoff.max.as_millis() as u64;
                        let copy = dlq::from_retry_topic(&d, origin, now, max_wait);
                        let wait = Duration::from_millis(copy.not_before_ms.saturating_sub(now));
                        Work {
                            msg: copy.msg,
                            at,
                            attempt: copy.attempt,
                            not_before: Some(Instant::now() + wait),
                            first_failure_ms: Some(copy.first_failure_ms),
                            dedupe_key: None,
                            claimed: false,
                            again: false,
                        }
                    }
                    None => Work {
                        attempt: d.redeliveries.saturating_add(1),
                        msg: d,
                        at,
                        not_before: None,
                        first_failure_ms: None,
                        dedupe_key: None,
                        claimed: false,
                        again: false,
                    },
                };
                work.dedupe_key = cfg.dedupe.as_ref().and_then(|c| c.key_of(&work.msg));
                let lane = lane_of(&work.msg, lanes_n, &mut rr);
                lanes[lane].queue.push_back(work);
            }
            if at_most_once {
                // Ack before invoking: what is fetched is committed now and never redelivered
                // (after the commit in flight, so offsets only move forward).
                if let Some(mut f) = writing.take() {
                    let (point, p) = f.wait().await?;
                    commit::finish(&ctx, &topic, point, p, &mut committed, &mut held);
                }
                let (src, group, t) = (ctx.source.clone(), cfg.group.clone(), topic.clone());
                let commit = Commit {
                    offsets: vec![(t, partition, next)],
                    ..Default::default()
                };
                blocking(move || src.commit(&group, commit)).await?;
                committed = next;
            }
        }

        // 2. Start every idle lane whose front message may run now.
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        // At-most-once acked what it fetched: a clean stop still runs it (only a crash loses it).
        let starting = !stopping || cfg.delivery == Mode::AtMostOnce;
        for (i, lane) in lanes.iter_mut().enumerate() {
            if !starting || lane.busy || lane.queue.is_empty() {
                continue;
            }
            screen::screen(&ctx, lane, &mut tracker, &mut pending, &mut held, now).await?;
            let mut meta = take_run(&mut lane.queue, cfg.batch_size, now, &mut wake);
            if meta.is_empty() {
                continue;
            }
            let msgs: Vec<Delivery> = meta
                .iter_mut()
                .map(|w| std::mem::replace(&mut w.msg, placeholder()))
                .collect();
            let attempts: Vec<u32> = meta.iter().map(|w| w.attempt).collect();
            lane.busy = true;
            running += 1;
            let (ctx2, tx) = (ctx.clone(), done_tx.clone());
            // Waits for the pool while this loop goes on with other lanes; reports on `done_tx`.
            tokio::spawn(async move {
                let result = job::run(&ctx2.pool, msgs, attempts).await;
                let _ = tx.send(Done {
                    lane: i,
                    meta,
                    result,
                });
            });
        }

        gauges.set(
            lanes
                .iter()
                .filter(|l| l.busy || !l.queue.is_empty())
                .count(),
            tracker.in_flight(),
            tracker.in_flight() >= cfg.max_in_flight
                || tracker.bytes_in_flight() as usize >= cfg.max_in_flight_bytes,
        );

        // 3. Done? (once the commit in flight is written)
        if running == 0 && writing.is_none() {
            let idle = lanes.iter().all(|l| l.queue.is_empty());
            if (stopping && (idle || !starting)) || (cfg.drain && caught_up && idle) {
                commit::now(
                    &ctx,
                    &topic,
                    partition,
                    &mut tracker,
                    &mut committed,
                    &mut pending,
                    &mut held,
                )
                .await?;
                return Ok(());
            }
        }

        // 4. Wait for a lane to finish, a backoff to end, new messages, or shutdown.
        let full = tracker.in_flight() >= cfg.max_in_flight
            || tracker.bytes_in_flight() as usize >= cfg.max_in_flight_bytes;
        let poll = if empty || full {
            cfg.idle_poll
        } else {
            Duration::ZERO
        };
        let until = wake.map_or(Instant::now() + poll, |w| w.min(Instant::now() + poll));
        tokio::select! {
            Some(done) = done_rx.recv() => {
                handle(&ctx, &topic, is_retry_topic, &mut lanes, &mut tracker, &mut pending, done)?;
                running -= 1;
                // Take every other finished job too, so one commit covers them all.
                while let Ok(done) = done_rx.try_recv() {
                    handle(&ctx, &topic, is_retry_topic, &mut lanes, &mut tracker, &mut pending, done)?;
                    running -= 1;
                }
            }
            _ = tokio::time::sleep_until(until), if running == 0 || poll.is_zero() || wake.is_some() || !empty => {}
            // New messages: fetch now rather than at the next poll.
            _ = async {
                match &signal {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            }, if empty && !stopping => {}
            written = commit::wait(writing) => {
                *writing = None;
                let (point, p) = written?;
                commit::finish(&ctx, &topic, point, p, &mut committed, &mut held);
            }
            _ = shutdown.changed(), if !stopping => {
                // Finish the calls in flight and commit; backing-off messages stay uncommitted
                // and are redelivered on the next start.
                stopping = true;
            }
        }
        if writing.is_none() {
            *writing = commit::start(
                &ctx,
                &topic,
                partition,
                &mut tracker,
                committed,
                &mut pending,
            );
        }
    }
}

/// Takes the next run of a lane: messages that may run now, in queue order, up to `max`.
///
/// A message waiting out a backoff blocks its key, not the lane: it is skipped, and so is every
/// later message with the same key, so per-key order holds while other keys go on. (Keyless
/// messages carry no order and are never blocked by others.) `wake` learns the earliest
/// backoff end among the messages looked at.
///
/// It looks only as far as it takes: a failed message at the front of a lane puts the rest of
/// its run back, so this runs once per failure, and a pass over the whole lane each time made
/// 7% retries CPU-bound. When a run is taken, what lies behind it is looked at again once the
/// run finishes (the loop goes round on every finished run); when none is, everything was
/// looked at and `wake` is complete.
fn take_run(
    queue: &mut VecDeque<Work>,
    max: usize,
    now: Instant,
    wake: &mut Option<Instant>,
) -> Vec<Work> {
    let n = max.min(queue.len());
    // The common case: nothing at the front waits (so nothing there is blocked either), and
    // nothing there runs again after a failure.
    if queue
        .iter()
        .take(n)
        .all(|w| w.not_before.is_none_or(|nb| nb <= now) && !w.again)
    {
        return queue.drain(..n).collect();
    }
    let mut blocked: Vec<Vec<u8>> = Vec::new();
    let mut take = Vec::new();
    let mut keep = Vec::new();
    while take.len() < max {
        let Some(w) = queue.pop_front() else { break };
        let key = w.msg.record.key.as_deref();
        let waiting = w.not_before.filter(|nb| *nb > now);
        if let Some(nb) = waiting {
            *wake = Some(wake.map_or(nb, |x| x.min(nb)));
        }
        let key_blocked = key.is_some_and(|k| blocked.iter().any(|b| b.as_slice() == k));
        if waiting.is_some() || key_blocked {
            if let Some(k) = key
                && !key_blocked
            {
                blocked.push(k.to_vec());
            }
            keep.push(w);
            continue;
        }
        // Messages that failed here run apart from the others: a run of them, or a run
        // without them.
        if take.first().is_some_and(|t: &Work| t.again != w.again) {
            keep.push(w);
            break;
        }
        take.push(w);
    }
    // The skipped go back in front, in their order.
    for w in keep.into_iter().rev() {
        queue.push_front(w);
    }
    take
}

/// What stands in a [`Work`] for its message while a job has it: one shared empty topic name,
/// so the stand-in costs no allocation (a run is taken again after every failure in it).
fn placeholder() -> Delivery {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    Delivery {
        topic: EMPTY.clone(),
        partition: 0,
        offset: 0,
        record: Default::default(),
        redeliveries: 0,
    }
}

/// Takes a lane's finished job: what was done is finished in the tracker and its outputs go
/// to the next commit; each failure is retried, requeued or dead-lettered; what waits (a retry
/// in place, the messages its key held back) goes back to the front of the lane, in order.
fn handle(
    ctx: &Ctx,
    topic: &Arc<str>,
    is_retry_topic: bool,
    lanes: &mut [Lane],
    tracker: &mut OffsetTracker,
    pending: &mut Pending,
    done: Done,
) -> Result<(), EngineError> {
    let Done { lane, meta, result } = done;
    let (msgs, ran) = result?;
    let lane = &mut lanes[lane];
    lane.busy = false;
    for (done, outputs) in ran.outputs {
        // A lane's messages need not be in offset order (a keyless message that waited out a
        // backoff runs after later ones): the span is the lowest and highest offset done.
        let ats = done.iter().map(|&i| meta[i].at);
        let (first, last) = (ats.clone().min(), ats.max());
        let (Some(first), Some(last)) = (first, last) else {
            continue;
        };
        for o in outputs {
            pending.hold(first, last, Later::Output(o));
        }
    }
    let expires = ctx
        .cfg
        .dedupe
        .as_ref()
        .map(|d| now_ms() + d.window.as_millis() as u64);
    let shared = ctx.cfg.dedupe.as_ref().is_some_and(|d| d.store.is_some());
    let settle = ctx.source.capabilities().settle;
    let mut back = Vec::new();
    for ((mut w, msg), fate) in meta.into_iter().zip(msgs).zip(ran.fates) {
        w.msg = msg;
        match fate {
            job::Fate::Done => {
                tracker.finish(w.at);
                pending.acked += 1;
                pending.acked_at.extend(w.msg.record.timestamp_ms);
                if let Some(expires) = expires
                    && w.claimed
                    && let Some(key) = w.dedupe_key.take()
                {
                    ctx.claims.lock().expect("claims lock").finish(&key);
                    if shared && settle == Settle::Watermark {
                        let place = screen::place(&w.msg.topic, w.msg.partition, w.msg.offset);
                        pending.finished(key.clone(), place);
                    }
                    pending.hold(w.at, w.at, Later::Mark(key.clone(), expires));
                    pending.hold(w.at, w.at, Later::Release(key));
                }
            }
            job::Fate::Failed(stop) => {
                if let Some(w) = fail::fail(ctx, topic, is_retry_topic, tracker, pending, w, stop) {
                    back.push(w);
                }
            }
            job::Fate::Held => back.push(w),
        }
    }
    for w in back.into_iter().rev() {
        lane.queue.push_front(w);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Record;

    fn work(offset: u64, key: Option<&str>, waiting: bool, now: Instant) -> Work {
        Work {
            msg: Delivery {
                topic: Arc::from("t"),
                partition: 0,
                offset,
                redeliveries: 0,
                record: Record {
                    key: key.map(|k| k.as_bytes().to_vec()),
                    ..Record::default()
                },
            },
            at: offset,
            attempt: 1,
            not_before: waiting.then(|| now + Duration::from_secs(1)),
            first_failure_ms: None,
            dedupe_key: None,
            claimed: false,
            again: false,
        }
    }

    fn offsets(v: &[Work]) -> Vec<u64> {
        v.iter().map(|w| w.at).collect()
    }

    #[test]
    fn a_backing_off_key_blocks_only_itself() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = [
            work(0, Some("a"), true, now),
            work(1, Some("b"), false, now),
            work(2, Some("a"), false, now),
            work(3, None, false, now),
            work(4, Some("b"), false, now),
        ]
        .into_iter()
        .collect();
        let mut wake = None;
        let run = take_run(&mut q, 10, now, &mut wake);
        assert_eq!(offsets(&run), vec![1, 3, 4], "b and keyless go on; a waits");
        assert_eq!(q.iter().map(|w| w.at).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(wake, Some(now + Duration::from_secs(1)));
    }

    #[test]
    fn a_run_behind_a_waiting_message_stops_at_the_batch_size() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = [
            work(0, Some("a"), true, now),
            work(1, Some("b"), false, now),
            work(2, Some("c"), false, now),
            work(3, Some("d"), false, now),
            work(4, Some("a"), false, now),
        ]
        .into_iter()
        .collect();
        let mut wake = None;
        let run = take_run(&mut q, 2, now, &mut wake);
        assert_eq!(offsets(&run), vec![1, 2]);
        // The waiting one back in front, then what was not looked at, in order.
        assert_eq!(q.iter().map(|w| w.at).collect::<Vec<_>>(), vec![0, 3, 4]);
        assert_eq!(wake, Some(now + Duration::from_secs(1)));
        // Once it is due, it leads again, and its key follows in order.
        let later = now + Duration::from_secs(2);
        let run = take_run(&mut q, 9, later, &mut wake);
        assert_eq!(offsets(&run), vec![0, 3, 4]);
    }

    #[test]
    fn messages_that_failed_here_run_apart_from_first_attempts() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = (0..6).map(|o| work(o, None, false, now)).collect();
        for i in [0, 1, 4] {
            q[i].again = true;
        }
        let mut wake = None;
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![0, 1]);
        // A run of first attempts stops before the next retry, which then runs apart.
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![2, 3]);
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![4]);
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![5]);
    }

    #[test]
    fn runs_respect_the_batch_size_and_keep_queue_order() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = (0..5).map(|o| work(o, Some("k"), false, now)).collect();
        let mut wake = None;
        assert_eq!(offsets(&take_run(&mut q, 2, now, &mut wake)), vec![0, 1]);
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![2, 3, 4]);
        assert!(q.is_empty() && wake.is_none());
    }
}
