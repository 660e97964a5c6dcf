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
mod lanes;
mod screen;

use super::claims::Held;
use super::dlq;
use super::offsets::OffsetTracker;
use super::{Ctx, DRAIN_UNANSWERED, DeliveryMode as Mode, EngineError, now_ms};
use crate::source::{Commit, Delivery, Settle, SourceError};
use commit::{InFlight, Later, Pending};
use lanes::{lane_of, take_run};
use std::collections::VecDeque;
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
    // Its jobs' priority level: a retry topic's is its origin's.
    let level = cfg
        .priority
        .as_ref()
        .map_or(0, |p| p.level_of(retry_origin.as_deref().unwrap_or(&topic)));
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
    let mut leases = Leases::new(ctx.source.capabilities().lease);
    // Since when `--drain`'s question to the broker (is the partition at its end?) has had no
    // answer: asked again at each empty fetch, for up to DRAIN_UNANSWERED.
    let mut unanswered: Option<Instant> = None;
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
                    match blocking(move || src.at_end(&t, partition, next)).await {
                        Ok(at_end) => {
                            unanswered = None;
                            at_end
                        }
                        // The broker does not answer (a lost link): not known to be at the
                        // end; asked again at the next empty fetch.
                        Err(EngineError::Source(e @ SourceError::Broker { .. }))
                            if unanswered.get_or_insert_with(Instant::now).elapsed()
                                < DRAIN_UNANSWERED =>
                        {
                            tracing::debug!(error = %e, "--drain: the end is not known yet");
                            false
                        }
                        Err(e) => return Err(e),
                    }
                });
            // Records retention deleted before this group read them (at most once: counted
            // with the commit made at fetch, below).
            let mut skipped = 0;
            if let Some(first) = batch.first()
                && first.offset > next
                && ctx.source.capabilities().dense_offsets
            {
                // Offsets are dense: what lies between was deleted by retention before this
                // group read it. Counted with the commit that passes it (exactly once).
                tracing::warn!(
                    topic = %topic,
                    partition,
                    from = next,
                    to = first.offset,
                    "retention deleted {} record(s) this group had not read; going on from the oldest kept",
                    first.offset - next
                );
                skipped = first.offset - next;
                if cfg.delivery != Mode::AtMostOnce {
                    pending.hold(next, first.offset - 1, Later::Skipped(skipped));
                }
            }
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
                    commit::finish(
                        &ctx,
                        &topic,
                        point,
                        p,
                        &mut tracker,
                        &mut committed,
                        &mut held,
                    );
                }
                let (src, group, t) = (ctx.source.clone(), cfg.group.clone(), topic.clone());
                let commit = Commit {
                    skipped: (skipped > 0)
                        .then(|| (t.clone(), partition, skipped))
                        .into_iter()
                        .collect(),
                    offsets: vec![(t, partition, next)],
                    ..Default::default()
                };
                blocking(move || src.commit(&group, commit)).await?;
                committed = next;
                ctx.stats
                    .metrics
                    .count(&topic, "skipped-by-retention", skipped);
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
                let result = job::run(&ctx2.pool, level, msgs, attempts).await;
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
                if per_message {
                    // Stopped or revoked with messages it did not run (waiting out a
                    // backoff, or behind one, or read by the source and not handed over yet):
                    // the broker gets them back now, for this process or another, rather than
                    // when a lease or the link runs out.
                    let (src, t) = (ctx.source.clone(), topic.clone());
                    blocking(move || {
                        src.release(&t, partition);
                        Ok(())
                    })
                    .await?;
                }
                return Ok(());
            }
        }
        leases
            .renew(&ctx, &topic, partition, &tracker, &mut wake)
            .await?;

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
                commit::finish(&ctx, &topic, point, p, &mut tracker, &mut committed, &mut held);
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

/// Renews the broker's lease ([`crate::source::Capabilities::lease`]) of the messages a
/// partition holds, every third of a lease: each message held at the previous renewal is
/// extended, so none is held past two thirds of a lease without one.
struct Leases {
    every: Option<Duration>,
    at: Instant,
    before: Vec<u64>,
}

impl Leases {
    fn new(lease: Option<Duration>) -> Leases {
        let every = lease.map(|l| (l / 3).max(Duration::from_millis(10)));
        Leases {
            every,
            at: Instant::now() + every.unwrap_or_default(),
            before: Vec::new(),
        }
    }

    /// Extends what is due now; otherwise makes `wake` no later than the next renewal while
    /// messages are held (a long call wakes the loop for it).
    async fn renew(
        &mut self,
        ctx: &Arc<Ctx>,
        topic: &Arc<str>,
        partition: u32,
        tracker: &OffsetTracker,
        wake: &mut Option<Instant>,
    ) -> Result<(), EngineError> {
        let Some(every) = self.every else {
            return Ok(());
        };
        let now = Instant::now();
        if now >= self.at {
            let held = tracker.held();
            let due: Vec<u64> = held
                .iter()
                .copied()
                .filter(|o| self.before.binary_search(o).is_ok())
                .collect();
            self.before = held;
            self.at = now + every;
            if !due.is_empty() {
                let (src, t) = (ctx.source.clone(), topic.clone());
                match blocking(move || src.extend(&t, partition, &due)).await {
                    Ok(()) => {}
                    Err(e @ EngineError::Source(SourceError::Lost { .. })) => return Err(e),
                    // A renewal that fails costs at worst a redelivery (a lease that runs
                    // out), not the run: the next one tries again.
                    Err(e) => {
                        tracing::warn!(topic = %topic, partition, error = %e, "could not extend the lease of held messages")
                    }
                }
            }
        }
        if tracker.in_flight() > 0 || !self.before.is_empty() {
            *wake = Some(wake.map_or(self.at, |w| w.min(self.at)));
        }
        Ok(())
    }
}
