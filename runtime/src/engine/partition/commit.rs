//! Committing a partition's finished work: outputs, dead letters, dedupe marks and the offset.
//!
//! A commit runs beside the partition loop, not in it: the loop starts one ([`start`]), goes on
//! fetching, running lanes and collecting what finishes, and applies the commit's effects once
//! it is durable ([`finish`]). One commit per partition is in flight at a time, so offsets only
//! move forward; what finishes meanwhile goes into the next. On a broker whose produce and
//! commit round trip takes 100 ms, a loop that waited for every commit stood still for 100 ms
//! each time a retry or a rejection split a run of messages into smaller commits.

use super::{Held, blocking, screen};
use crate::engine::dedupe::{SharedStore, StoreError};
use crate::engine::offsets::OffsetTracker;
use crate::engine::{Ctx, EngineError, now_ms};
use crate::source::{Commit, Output, Settle};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;

/// What finished since the last commit: what to write, what to count once it is written, and
/// which idempotency-key claims to release once it is durable (releasing earlier would let a
/// copy of the message run before the done mark is on disk).
#[derive(Default)]
pub(super) struct Pending {
    pub commit: Commit,
    pub release: Vec<Vec<u8>>,
    pub acked: u64,
    /// When each acked message was appended (ms), for the end-to-end latency.
    pub acked_at: Vec<u64>,
    pub emitted: u64,
    pub dead: u64,
    pub deduped: u64,
    /// Records retention deleted before this group read them, which this commit passes.
    pub skipped: u64,
    /// What finished messages leave to write, until the commit point passes them.
    held: Waiting,
    /// The offsets this commit settles or gives back (per-message sources), for the tracker
    /// to let go of once it is written.
    settling: Vec<u64>,
    /// For each of `commit.outputs`, the offset of the message it came from (if one message).
    origins: Vec<Option<u64>>,
    /// Error answers to failed requests, each with its message's offset (see [`Later::Answer`]).
    answers: Vec<(Output, u64)>,
}

/// What finished messages leave to write (see [`Later`]). Each item belongs to a span of
/// messages (one message, or the messages of one handler call, whose outputs are not told
/// apart; a lane's messages need not run in offset order, so a span can be wide). A commit
/// writes the items of the spans wholly below its offset, and its offset passes no message of
/// a span it does not write: each message's outputs go out with the offset that passes it.
#[derive(Default)]
struct Waiting {
    /// By the span's highest offset: (the span's lowest, the item).
    by_offset: BTreeMap<u64, Vec<(u64, Later)>>,
    /// Idempotency keys whose done marks wait.
    done_keys: HashSet<Vec<u8>>,
    /// Keys done since the last commit started, with their message's place: a commit tells a
    /// shared store of those whose marks still wait (see `claims`).
    finished: Vec<(Vec<u8>, String)>,
    /// The last `release`: the point it was given and the offset it returned, while nothing
    /// was held since (the loop asks after every finished job; the walk is not free).
    last: Option<(u64, u64)>,
}

/// What a finished message leaves to write. On a log a commit writes an offset and, with it,
/// the outputs of the messages below it: an output of a message above the offset written then
/// (it finished before an earlier message of another key) would be written again when that
/// message runs again after a crash or a storage error, although outputs and offset went in
/// one atomic write. So each waits until the commit's offset passes its message. On a queue
/// each message settles by itself, and nothing waits.
pub(super) enum Later {
    /// A handler's output (counted as emitted).
    Output(Output),
    /// A dead letter or a copy for the retry topic.
    Letter(Output),
    /// The error answer to a request that failed for good: written only if its reply-to topic
    /// exists (looked up with the commit, off the partition loop).
    Answer(Output),
    /// An idempotency key marked done, with when the mark expires.
    Mark(Vec<u8>, u64),
    /// Records retention deleted before the group read them: the span they took (a fetch
    /// found the next record further on); counted with the offset that passes them.
    Skipped(u64),
    /// The claim of a message done with an idempotency key, let go once its mark is written.
    /// (A failed message's claim goes with the next commit, straight through `release`: a copy
    /// that runs meanwhile publishes nothing that its failure did not.)
    Release(Vec<u8>),
}

impl Pending {
    /// Keeps `item` of the messages at offsets `first..=last` for the commit that passes them.
    pub fn hold(&mut self, first: u64, last: u64, item: Later) {
        if let Later::Mark(key, _) = &item {
            self.held.done_keys.insert(key.clone());
        }
        self.held.last = None;
        self.held
            .by_offset
            .entry(last)
            .or_default()
            .push((first, item));
    }

    /// Notes that the message at `place` (see `screen::place`) is done with `key`, for a
    /// shared store to learn at the next commit if its mark still waits then.
    pub fn finished(&mut self, key: Vec<u8>, place: String) {
        self.held.finished.push((key, place));
    }

    /// The keys done since the last call whose marks still wait, with their places.
    fn take_finished(&mut self) -> Vec<(Vec<u8>, String)> {
        let mut f = std::mem::take(&mut self.held.finished);
        f.retain(|(k, _)| self.held.done_keys.contains(k));
        f
    }

    /// Moves into the commit what may go with an offset at most `point` (everything below it
    /// finished), and returns the offset to write: `point`, lowered below every span that
    /// must wait. A span waits when its highest offset is not below the offset; walking the
    /// spans from the highest down, each one that waits lowers the offset to its lowest, until
    /// the next one lies wholly below.
    fn release(&mut self, point: u64) -> u64 {
        if let Some((p, cap)) = self.held.last
            && p == point
        {
            return cap;
        }
        let mut cap = point;
        for (&last, items) in self.held.by_offset.iter().rev() {
            if last < cap {
                break;
            }
            cap = items.iter().fold(cap, |c, (first, _)| c.min(*first));
        }
        let above = self.held.by_offset.split_off(&cap);
        let below = std::mem::replace(&mut self.held.by_offset, above);
        for (last, items) in below {
            for (first, item) in items {
                // The message an output came from, where its span is one message.
                let origin = (first == last).then_some(first);
                match item {
                    Later::Output(o) => {
                        self.emitted += 1;
                        self.commit.outputs.push(o);
                        self.origins.push(origin);
                    }
                    Later::Letter(o) => {
                        self.commit.outputs.push(o);
                        self.origins.push(origin);
                    }
                    Later::Answer(o) => self.answers.push((o, first)),
                    Later::Mark(key, expires) => {
                        self.held.done_keys.remove(&key);
                        self.commit.dedupe_done.push((key, expires));
                    }
                    Later::Release(key) => self.release.push(key),
                    Later::Skipped(n) => self.skipped += n,
                }
            }
        }
        self.held.last = Some((point, cap));
        cap
    }

    pub fn any(&self) -> bool {
        !self.commit.outputs.is_empty()
            || !self.answers.is_empty()
            || !self.commit.dedupe_done.is_empty()
            || !self.commit.delayed.is_empty()
            || !self.release.is_empty()
            || self.acked + self.dead + self.deduped + self.skipped > 0
    }
}

/// How long a commit waits for the shared store to let go of failed messages' claims.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// A commit on its way: its task, and the offset it commits once it is done.
pub(super) struct InFlight {
    task: JoinHandle<Result<Pending, EngineError>>,
    point: u64,
}

impl InFlight {
    /// Waits for the write; the pending it wrote, to [`finish`].
    pub async fn wait(&mut self) -> Result<(u64, Pending), EngineError> {
        let p = (&mut self.task)
            .await
            .map_err(|e| EngineError::Join(e.to_string()))??;
        Ok((self.point, p))
    }
}

/// Waits for `inflight` when there is one; never returns otherwise (for a `select!` branch).
pub(super) async fn wait(inflight: &mut Option<InFlight>) -> Result<(u64, Pending), EngineError> {
    match inflight {
        Some(f) => f.wait().await,
        None => std::future::pending().await,
    }
}

/// Starts writing what finished since the last commit, unless nothing did.
pub(super) fn start(
    ctx: &Arc<Ctx>,
    topic: &Arc<str>,
    partition: u32,
    tracker: &mut OffsetTracker,
    committed: u64,
    pending: &mut Pending,
) -> Option<InFlight> {
    // In at-most-once mode the offset already moved past everything fetched: never back.
    let point = tracker.commit_point().max(committed);
    let point = match ctx.source.capabilities().settle {
        Settle::Watermark => pending.release(point).max(committed),
        Settle::PerMessage => {
            pending.release(u64::MAX);
            point
        }
    };
    // Done keys whose marks wait for this partition's commit point: a shared store learns
    // they are finished, so copies in other processes are duplicates rather than wait.
    let announce = pending.take_finished();
    // Anything to commit?
    if !pending.any() && point == committed && announce.is_empty() {
        return None;
    }
    let held = std::mem::take(&mut pending.held);
    let mut p = std::mem::take(pending);
    pending.held = held;
    let mut c = std::mem::take(&mut p.commit);
    c.settled = tracker
        .take_settled()
        .into_iter()
        .map(|o| (topic.clone(), partition, o))
        .collect();
    c.offsets.push((topic.clone(), partition, point));
    if p.skipped > 0 {
        c.skipped.push((topic.clone(), partition, p.skipped));
    }
    c.origins = p
        .origins
        .drain(..)
        .map(|o| o.map(|o| (topic.clone(), o)))
        .collect();
    p.settling = c.settled.iter().map(|(_, _, o)| *o).collect();
    p.settling.extend(c.delayed.iter().map(|(_, _, o, _)| *o));
    let answers = std::mem::take(&mut p.answers);
    let answered_topic = topic.clone();
    let ctx = ctx.clone();
    let task = tokio::spawn(async move {
        if !announce.is_empty() {
            announce_finished(&ctx, announce).await?;
        }
        if !answers.is_empty() {
            // A reply-to naming no topic costs the caller its answer, not the commit.
            let src = ctx.source.clone();
            let kept = blocking(move || {
                Ok(answers
                    .into_iter()
                    .filter(|(a, _)| src.topic_exists(&a.topic))
                    .collect::<Vec<_>>())
            })
            .await?;
            for (a, at) in kept {
                c.outputs.push(a);
                c.origins.push(Some((answered_topic.clone(), at)));
            }
        }
        write(&ctx, c, &p.release).await?;
        Ok(p)
    });
    Some(InFlight { task, point })
}

/// Starts a commit and waits for it (the last one of a partition, and at-most-once's).
pub(super) async fn now(
    ctx: &Arc<Ctx>,
    topic: &Arc<str>,
    partition: u32,
    tracker: &mut OffsetTracker,
    committed: &mut u64,
    pending: &mut Pending,
    held: &mut Held,
) -> Result<(), EngineError> {
    if let Some(mut f) = start(ctx, topic, partition, tracker, *committed, pending) {
        let (point, p) = f.wait().await?;
        finish(ctx, topic, point, p, tracker, committed, held);
    }
    Ok(())
}

/// The write itself: one commit, or with a shared dedupe store, outputs, then the done marks,
/// then the offsets.
async fn write(ctx: &Arc<Ctx>, mut c: Commit, release: &[Vec<u8>]) -> Result<(), EngineError> {
    let (src, group) = (ctx.source.clone(), ctx.cfg.group.clone());
    let store = ctx.cfg.dedupe.as_ref().and_then(|d| d.store.clone());
    // Claims to drop in the shared store: the keys that are not being marked done (their
    // messages failed or were given up).
    let undone: Vec<Vec<u8>> = if store.is_some() {
        let done: HashSet<&[u8]> = c.dedupe_done.iter().map(|(k, _)| k.as_slice()).collect();
        release
            .iter()
            .filter(|k| !done.contains(k.as_slice()))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    match &store {
        Some(store) if !c.dedupe_done.is_empty() && src.transactional() => {
            // Outputs and settling in one transaction, then the marks: a crash before the
            // transaction redelivers and reruns the messages (nothing was published); one
            // after it leaves them settled, so only another copy of one (from a producer)
            // arriving in that moment could run again.
            let keys: Vec<Vec<u8>> = c.dedupe_done.drain(..).map(|(k, _)| k).collect();
            let (src2, group2) = (src.clone(), group.clone());
            blocking(move || src2.commit(&group2, c)).await?;
            mark_until_stored(ctx, store, keys).await?;
        }
        Some(store) if !c.dedupe_done.is_empty() => {
            // Outputs first, then the done marks, then the offsets: a crash in between
            // redelivers the messages, which then find their marks (outputs published once).
            let keys: Vec<Vec<u8>> = c.dedupe_done.drain(..).map(|(k, _)| k).collect();
            let offsets = std::mem::take(&mut c.offsets);
            let settled = std::mem::take(&mut c.settled);
            let delayed = std::mem::take(&mut c.delayed);
            let (src2, group2) = (src.clone(), group.clone());
            blocking(move || src2.commit(&group2, c)).await?;
            mark_until_stored(ctx, store, keys).await?;
            let c = Commit {
                offsets,
                settled,
                delayed,
                ..Default::default()
            };
            blocking(move || src.commit(&group, c)).await?;
        }
        _ => blocking(move || src.commit(&group, c)).await?,
    }
    if let Some(store) = store.filter(|_| !undone.is_empty()) {
        // A failed (or, at a stop, unrun) message's claim goes, so another copy may run. Best
        // effort, a claim also expires by itself; but waited for (a little), so a stopping
        // process does not exit before it is sent (seen under load: claims left for minutes).
        let (group, token) = (ctx.cfg.group.clone(), ctx.token.clone());
        let release = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.release(&group, &undone, &token) {
                tracing::debug!(error = %e, "releasing dedupe claims failed; they expire");
            }
        });
        if tokio::time::timeout(RELEASE_WAIT, release).await.is_err() {
            tracing::debug!("releasing dedupe claims is slow; going on (they expire)");
        }
    }
    Ok(())
}

/// Applies a durable commit: the offset moves, claims go, and what it wrote is counted.
pub(super) fn finish(
    ctx: &Ctx,
    topic: &Arc<str>,
    point: u64,
    p: Pending,
    tracker: &mut OffsetTracker,
    committed: &mut u64,
    held: &mut Held,
) {
    *committed = point.max(*committed);
    tracker.settled_done(&p.settling);
    if !p.release.is_empty() {
        let mut claims = ctx.claims.lock().expect("claims lock");
        for key in &p.release {
            claims.remove(key);
            held.let_go(key);
        }
    }
    let s = &ctx.stats;
    let m = &s.metrics;
    m.count(topic, "ok", p.acked);
    m.count(topic, "deduped", p.deduped);
    m.count(topic, "dlq", p.dead);
    m.count(topic, "skipped-by-retention", p.skipped);
    // Messages appended together share a timestamp: one histogram update per run of them.
    let now = now_ms();
    for run in p.acked_at.chunk_by(|a, b| a == b) {
        m.end_to_end
            .observe_n(now.saturating_sub(run[0]) as f64 / 1e3, run.len() as u64);
    }
    s.processed.fetch_add(p.acked, Ordering::Relaxed);
    s.emitted.fetch_add(p.emitted, Ordering::Relaxed);
    s.dead_lettered.fetch_add(p.dead, Ordering::Relaxed);
    s.deduped.fetch_add(p.deduped, Ordering::Relaxed);
}

/// Writes done marks to the shared store, trying again while it does not answer: no offset moves
/// past a message whose mark is not stored (so acking stops, and the log says why). Gives up
/// only when the run is shutting down.
async fn mark_until_stored(
    ctx: &Arc<Ctx>,
    store: &Arc<dyn SharedStore>,
    keys: Vec<Vec<u8>>,
) -> Result<(), EngineError> {
    let window = ctx.cfg.dedupe.as_ref().map_or(Duration::ZERO, |d| d.window);
    let (store, group, n) = (store.clone(), ctx.cfg.group.clone(), keys.len());
    let keys = Arc::new(keys);
    until_stored(ctx, n, move || store.mark_done(&group, &keys, window)).await
}

/// Tells the shared store which claims are finished (done, marks waiting), trying again while
/// it does not answer, like the marks: copies in other processes wait for them meanwhile.
async fn announce_finished(
    ctx: &Arc<Ctx>,
    keys: Vec<(Vec<u8>, String)>,
) -> Result<(), EngineError> {
    let Some(d) = ctx.cfg.dedupe.as_ref() else {
        return Ok(());
    };
    let Some(store) = d.store.clone() else {
        return Ok(());
    };
    // Longer than a claim: the mark may wait for an earlier message's retries too.
    let ttl = d.claim_ttl * 2;
    let (group, token, n) = (ctx.cfg.group.clone(), ctx.token.clone(), keys.len());
    let keys = Arc::new(keys);
    until_stored(ctx, n, move || store.finish(&group, &keys, &token, ttl)).await
}

/// Runs `call` (a blocking store call about `n` keys) until it succeeds or the run shuts down.
async fn until_stored(
    ctx: &Arc<Ctx>,
    n: usize,
    call: impl Fn() -> Result<(), StoreError> + Send + Sync + 'static,
) -> Result<(), EngineError> {
    let call = Arc::new(call);
    let mut warned = false;
    loop {
        let c = call.clone();
        let r = tokio::task::spawn_blocking(move || c())
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?;
        match r {
            Ok(()) => {
                if warned {
                    tracing::info!("the dedupe store answers again; acking resumes");
                }
                return Ok(());
            }
            Err(e) if *ctx.shutdown.borrow() => {
                return Err(EngineError::Dedupe(format!(
                    "{e}; stopping with {n} handled message(s) unacked (they will be redelivered)"
                )));
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot mark handled messages done; acking stops until the dedupe store answers");
                    warned = true;
                }
                tokio::time::sleep(screen::STORE_DOWN_WAIT).await;
            }
        }
    }
}
