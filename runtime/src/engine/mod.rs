//! The consume loop: the way of one message through the host.
//!
//! ```text
//! source ──fetch──▶ partition task ──job──▶ instance pool ──result──▶ partition task ──commit──▶ source
//!                   (key-ordered lanes,     (worker threads,          (outputs + DLQ copies + offset,
//!                    bounded in flight,      one instance each,        one atomic, durable write)
//!                    backoff per lane)       replaced on a fault)
//! ```
//!
//! - [`partition`]: one task per partition; lanes, retries, dead letters, commits.
//! - [`pool`]: the worker threads that own the wasm instances.
//! - [`offsets`]: the pure commit-point tracker. [`retry`]: the pure backoff policy.
//! - [`dlq`]: the dead-letter envelope and the retry-topic headers.
//!
//! At-least-once: an offset is committed only together with the outputs of every message
//! below it (or their dead letters), so a crash at any point redelivers what was in flight and
//! loses nothing.

mod claims;
pub mod dedupe;
mod group;
pub use weir_core::dlq;
pub mod metrics;
pub mod offsets;
mod partition;
mod pool;
pub use weir_core::retry;
pub mod scaler;
#[cfg(test)]
mod settle_tests;
#[cfg(test)]
mod tests;

use crate::host::Handler;
use crate::source::{Source, SourceError};
use pool::Pool;
use retry::Backoff;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

pub use weir_core::config::{DeliveryMode, RetryMode};

/// Settings of one `weir run`, validated.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub group: String,
    pub topics: Vec<String>,
    /// Which topics' messages an idle instance takes first; `None`: all alike.
    pub priority: Option<weir_core::config::Priority>,
    /// Messages fetched and handed to an instance at once.
    pub batch_size: usize,
    /// Handler instances (worker threads).
    pub instances: usize,
    /// Key-ordered lanes per partition: how many jobs of one partition may run at once.
    pub lanes: usize,
    /// Messages fetched and not yet finished, per partition; fetching pauses at this bound.
    pub max_in_flight: usize,
    /// Their bytes (key, payload, headers), per partition; fetching pauses at this bound too.
    pub max_in_flight_bytes: usize,
    /// Stop once every partition is consumed to its end and nothing is in flight.
    pub drain: bool,
    pub backoff: Backoff,
    pub retry_mode: RetryMode,
    pub delivery: DeliveryMode,
    /// The dead-letter topic of a topic: `{topic}` in it is replaced by the topic's name.
    pub dlq_topic: String,
    /// The retry topic of a topic (requeue mode), likewise.
    pub retry_topic: String,
    /// How often an idle partition looks for new messages.
    pub idle_poll: Duration,
    /// Idempotent dedupe, if on.
    pub dedupe: Option<dedupe::DedupeConfig>,
    /// (topic, its retry topic) pairs consumed in requeue mode; filled in by [`run`].
    pub retry_topics: Vec<(Arc<str>, Arc<str>)>,
    /// How long revoked partitions may take to finish their in-flight messages and commit
    /// before they are let go regardless (group-managed sources).
    pub revoke_timeout: Duration,
    /// Scale the instances against lag between these bounds; `None`: `instances`, fixed.
    pub autoscale: Option<scaler::ScalerConfig>,
}

impl EngineConfig {
    pub fn dlq_for(&self, topic: &str) -> String {
        self.dlq_topic.replace("{topic}", topic)
    }
    pub fn retry_for(&self, topic: &str) -> String {
        self.retry_topic.replace("{topic}", topic)
    }
}

/// Counters of a run, shared by all partition tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages the handler succeeded on (acked).
    pub processed: AtomicU64,
    /// Outputs published (not counting DLQ and retry copies).
    pub emitted: AtomicU64,
    /// Messages written to a dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
    /// Instances lost to a trap, timeout or memory fault.
    pub faults: AtomicU64,
    /// Duplicates acked without running the handler (idempotency key already done).
    pub deduped: AtomicU64,
    /// Handler instances running now.
    pub instances: AtomicUsize,
    /// What the scaler asks for (the fixed count without scaling).
    pub desired_instances: AtomicUsize,
    /// The most instances that ran at once.
    pub instances_peak: AtomicUsize,
    /// Key-ordered lanes with messages waiting or running, over all partitions.
    pub busy_lanes: AtomicUsize,
    /// Messages fetched and not finished, over all partitions.
    pub in_flight: AtomicUsize,
    /// Consumer lag (messages below the end not yet committed), as the scaler last saw it.
    pub lag: AtomicU64,
    /// Partitions whose fetching is paused (at --max-in-flight).
    pub paused_partitions: AtomicUsize,
    /// Set once the run has started consuming (the admin server's /readyz).
    pub ready: std::sync::atomic::AtomicBool,
    /// Per-topic counters and latency histograms.
    pub metrics: metrics::Metrics,
    /// The handler running now; replaced by a reload.
    pub module: ModuleSlot,
}

/// The handler a run uses, replaceable while it runs (hot reload): a worker finishes the job it
/// has on the instance it has, and takes the new handler for its next job.
#[derive(Debug, Default)]
pub struct ModuleSlot {
    current: std::sync::RwLock<Option<Handler>>,
    generation: AtomicU64,
    loaded_ms: AtomicU64,
    /// Reloads done, and refused (the old handler kept running).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl ModuleSlot {
    /// Puts `h` in place; the workers pick it up at their next job.
    pub fn set(&self, h: Handler) {
        *self.current.write().expect("module lock") = Some(h);
        self.loaded_ms.store(now_ms(), Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn get(&self) -> Option<Handler> {
        self.current.read().expect("module lock").clone()
    }

    /// Bumped by every [`ModuleSlot::set`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// When the current handler was put in place (ms since the epoch).
    pub fn loaded_ms(&self) -> u64 {
        self.loaded_ms.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub processed: u64,
    pub emitted: u64,
    pub dead_lettered: u64,
    pub retries: u64,
    pub faults: u64,
    pub deduped: u64,
    /// The most handler instances that ran at once.
    pub instances_peak: usize,
}

impl Stats {
    pub fn summary(&self) -> Summary {
        Summary {
            processed: self.processed.load(Ordering::Relaxed),
            emitted: self.emitted.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            deduped: self.deduped.load(Ordering::Relaxed),
            instances_peak: self.instances_peak.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the instance pool stopped (a worker thread died); see the log above")]
    PoolGone,
    #[error("a blocking task panicked: {0}")]
    Join(String),
    #[error("{0}")]
    Dedupe(String),
}

/// How long `--drain` asks a broker that does not answer before the run stops on it.
pub(crate) const DRAIN_UNANSWERED: Duration = Duration::from_secs(60);

/// How often expired dedupe marks are looked for.
const DEDUPE_EVICT_EVERY: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything a partition task needs, shared.
struct Ctx {
    source: Arc<dyn Source>,
    /// The handler the run started with (the current one is `stats.module`).
    module: Handler,
    pool: Pool,
    cfg: EngineConfig,
    stats: Arc<Stats>,
    /// Idempotency keys of messages in flight, across all partitions of this run: a second copy
    /// of a key waits until the first is done (then it is a duplicate) or has failed.
    claims: std::sync::Mutex<claims::Claims>,
    /// This run's token for claims in a shared dedupe store.
    token: String,
    /// Until when the shared dedupe store counts as down (no keyed message runs until then).
    store_down_until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The run's shutdown flag (a commit waiting for the dedupe store gives up on it).
    shutdown: watch::Receiver<bool>,
    /// The partitions being consumed now (the scaler's lag is theirs).
    live: std::sync::Mutex<HashSet<(Arc<str>, u32)>>,
}

/// Consumes `cfg.topics` with `module` until `shutdown` turns true (or, with `drain`, until
/// nothing is left). Returns the run's counters; `stats` may be read while it runs.
pub async fn run(
    source: Arc<dyn Source>,
    module: impl Into<Handler>,
    mut cfg: EngineConfig,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<Summary, EngineError> {
    let caps = source.capabilities();
    let per_message = caps.settle == crate::source::Settle::PerMessage;
    // A broker's delay without its delivery count would make every attempt the first (never
    // dead-lettered), and on a log a message given back would be skipped by the offset.
    if (caps.delayed_retry && !(per_message && caps.delivery_count))
        || (caps.lease.is_some() && !per_message)
    {
        return Err(EngineError::Source(SourceError::Invalid(format!(
            "the source declares {caps:?}: a delayed redelivery needs per-message settling \
             and a delivery count, and a lease per-message settling"
        ))));
    }
    let mut partitions = Vec::new();
    let mut consumed = cfg.topics.clone();
    for t in &cfg.topics {
        let n = source.partitions(t)?;
        source.ensure_topic(&cfg.dlq_for(t), n)?;
        // Where the broker delays a redelivery itself, requeue mode gives the message back
        // with its delay ([`crate::source::Commit::delayed`]) and needs no retry topic.
        if cfg.retry_mode == RetryMode::Requeue && !caps.delayed_retry {
            let r = cfg.retry_for(t);
            source.ensure_topic(&r, n)?;
            cfg.retry_topics
                .push((Arc::from(t.as_str()), Arc::from(r.as_str())));
            consumed.push(r);
        }
    }
    for t in &consumed {
        let n = source.partitions(t)?;
        partitions.extend((0..n).map(|p| (Arc::<str>::from(t.as_str()), p)));
    }
    let module: Handler = module.into();
    if stats.module.get().is_none() {
        stats.module.set(module.clone());
    }
    let (levels, weights) = cfg.priority.as_ref().map_or((1, None), |p| {
        let weights = p
            .weights
            .as_ref()
            .map(|_| (0..p.levels()).map(|l| p.weight(l).unwrap_or(1)).collect());
        (p.levels(), weights)
    });
    let pool = Pool::start(cfg.instances.max(1), stats.clone(), levels, weights);
    let ctx = Arc::new(Ctx {
        source,
        module,
        pool,
        cfg,
        stats: stats.clone(),
        claims: Default::default(),
        token: format!("weir-{}-{:016x}", std::process::id(), rand::random::<u64>()),
        store_down_until: Default::default(),
        shutdown: shutdown.clone(),
        live: Default::default(),
    });
    ctx.stats
        .desired_instances
        .store(ctx.pool.size(), Ordering::Relaxed);
    let scaling = ctx
        .cfg
        .autoscale
        .clone()
        .map(|c| tokio::spawn(scale(ctx.clone(), c, shutdown.clone())));
    // Evicts expired dedupe marks now and then, off the consume path; ends with the run.
    let evictor = ctx.cfg.dedupe.is_some().then(|| {
        let source = ctx.source.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DEDUPE_EVICT_EVERY);
            loop {
                tick.tick().await;
                let source = source.clone();
                let evicted = tokio::task::spawn_blocking(move || source.evict_dedupe(now_ms(), 50_000)).await;
                match evicted {
                    Ok(Ok(n)) if n > 0 => tracing::debug!(evicted = n, "expired dedupe marks evicted"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "evicting expired dedupe marks failed; will try again"),
                    _ => {}
                }
            }
        })
    });
    tracing::info!(
        module = ctx.module.name(), digest = ctx.module.digest(), batch = ctx.module.is_batch(),
        partitions = partitions.len(), instances = ctx.cfg.instances, lanes = ctx.cfg.lanes,
        group = %ctx.cfg.group, "consuming"
    );
    let events = {
        let (src, group, topics, t) = (
            ctx.source.clone(),
            ctx.cfg.group.clone(),
            consumed.clone(),
            ctx.cfg.revoke_timeout,
        );
        tokio::task::spawn_blocking(move || src.join_group(&group, &topics, t))
            .await
            .map_err(|e| EngineError::Join(e.to_string()))??
    };
    stats.ready.store(true, Ordering::Relaxed);
    let result = match events {
        None => every_partition(&ctx, &partitions, shutdown).await,
        Some(events) => {
            let r = group::assigned_partitions(&ctx, &partitions, events, shutdown).await;
            let src = ctx.source.clone();
            let left = tokio::task::spawn_blocking(move || src.leave_group())
                .await
                .map_err(|e| EngineError::Join(e.to_string()))?;
            r.and(left.map_err(EngineError::from))
        }
    };
    if let Some(e) = evictor {
        e.abort();
    }
    if let Some(s) = scaling {
        s.abort();
        let _ = s.await;
    }
    stats.ready.store(false, Ordering::Relaxed);
    match Arc::into_inner(ctx) {
        Some(ctx) => ctx.pool.stop().await,
        // Calls are still in flight (a partition failed, or a revoked one was abandoned at its
        // deadline): their tasks hold the context, and the pool stops when the last of them
        // ends. What stopped the run is what matters now.
        None => tracing::debug!("stopping with handler calls in flight; their results are dropped"),
    }
    result.map(|()| stats.summary())
}

/// How often the scaler looks at lag and throughput.
const SCALE_EVERY: Duration = Duration::from_millis(500);
/// How soon the scaler looks again after probing (lag, but no service rate measured yet).
const SCALE_PROBE: Duration = Duration::from_millis(100);
/// How soon the scaler looks again while no partition is being consumed yet.
const SCALE_FIRST_LOOK: Duration = Duration::from_millis(20);

/// Scales the instance pool against lag until the run ends: each tick observes lag (over the
/// partitions consumed now), what was handled and what failed, asks the [`scaler::Scaler`] for a
/// count, and resizes the pool.
async fn scale(ctx: Arc<Ctx>, cfg: scaler::ScalerConfig, shutdown: watch::Receiver<bool>) {
    let started = tokio::time::Instant::now();
    let mut scaler = scaler::Scaler::new(cfg);
    let mut tick = tokio::time::interval(SCALE_EVERY);
    let handled = |s: &Stats| {
        s.processed.load(Ordering::Relaxed)
            + s.dead_lettered.load(Ordering::Relaxed)
            + s.deduped.load(Ordering::Relaxed)
    };
    let (mut last_handled, mut last_failed) = (handled(&ctx.stats), 0u64);
    loop {
        tick.tick().await;
        if *shutdown.borrow() {
            return;
        }
        let parts: Vec<(Arc<str>, u32)> = ctx
            .live
            .lock()
            .expect("live partitions")
            .iter()
            .cloned()
            .collect();
        if parts.is_empty() {
            // The partitions are still starting (or not yet assigned): look again soon, so a
            // run that starts on a backlog scales up within its first moments, not a tick later.
            tick.reset_after(SCALE_FIRST_LOOK);
            continue;
        }
        let (src, group) = (ctx.source.clone(), ctx.cfg.group.clone());
        let lag = tokio::task::spawn_blocking(move || {
            let mut lag = 0u64;
            for (t, p) in parts {
                let end = src.end_offset(&t, p)?;
                let committed = src.committed(&group, &t, p)?;
                lag += end.saturating_sub(committed);
            }
            Ok::<u64, SourceError>(lag)
        })
        .await;
        let lag = match lag {
            Ok(Ok(lag)) => lag,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the scaler could not read the lag; keeping the count");
                continue;
            }
            Err(_) => return,
        };
        ctx.stats.lag.store(lag, Ordering::Relaxed);
        let now_handled = handled(&ctx.stats);
        let now_failed = ctx.stats.retries.load(Ordering::Relaxed);
        let current = ctx.pool.size();
        let d = scaler.decide(scaler::Observation {
            now: started.elapsed(),
            lag,
            handled: now_handled.saturating_sub(last_handled),
            failed: now_failed.saturating_sub(last_failed),
            current,
            busy_lanes: ctx.stats.busy_lanes.load(Ordering::Relaxed),
        });
        (last_handled, last_failed) = (now_handled, now_failed);
        ctx.stats
            .desired_instances
            .store(d.desired, Ordering::Relaxed);
        if d.desired != current {
            tracing::info!(
                instances = d.desired,
                was = current,
                lag,
                reason = ?d.reason,
                rate_per_instance = d.rate_per_instance.map(|r| r.round()),
                "scaling"
            );
            ctx.pool.resize(d.desired);
        }
        if lag > 0 && ctx.stats.busy_lanes.load(Ordering::Relaxed) == 0 {
            // A backlog the lanes have not picked up yet (the run is starting): look again
            // as soon as they have, since the count is capped at the lanes with work.
            tick.reset_after(SCALE_FIRST_LOOK);
        } else if d.reason == scaler::Reason::Probing {
            // No service rate yet: measure one over a short interval rather than a whole tick.
            tick.reset_after(SCALE_PROBE);
        }
    }
}

/// Consumes every partition of the consumed topics (a source without consumer groups).
async fn every_partition(
    ctx: &Arc<Ctx>,
    partitions: &[(Arc<str>, u32)],
    shutdown: watch::Receiver<bool>,
) -> Result<(), EngineError> {
    loop {
        // One task per partition; the set lets one failing partition stop the others.
        let mut tasks = tokio::task::JoinSet::new();
        let mut of: HashMap<tokio::task::Id, (Arc<str>, u32)> = HashMap::new();
        let spawn = |tasks: &mut tokio::task::JoinSet<_>, t: &Arc<str>, p: u32| {
            tasks
                .spawn(partition::consume(
                    ctx.clone(),
                    t.clone(),
                    p,
                    shutdown.clone(),
                ))
                .id()
        };
        for (t, p) in partitions {
            of.insert(spawn(&mut tasks, t, *p), (t.clone(), *p));
        }
        let mut failed = None;
        while let Some(r) = tasks.join_next_with_id().await {
            let (id, r) = match r {
                Ok((id, r)) => (id, r),
                Err(e) => (e.id(), Err(EngineError::Join(e.to_string()))),
            };
            let key = of.remove(&id);
            match r {
                Ok(()) => {}
                // The link its messages came on broke: they come again on the next one, so the
                // partition starts over with nothing of the old link's (the source voided it).
                // (Stopping, it just ends: the next run gets them.)
                Err(EngineError::Source(SourceError::Lost { .. })) if failed.is_none() => {
                    if let Some((t, p)) = key.filter(|_| !*shutdown.borrow()) {
                        tracing::warn!(topic = %t, partition = p, "the broker link was lost; the partition starts again (its unsettled messages are delivered again)");
                        let (src, topic) = (ctx.source.clone(), t.clone());
                        let _ = tokio::task::spawn_blocking(move || src.release(&topic, p)).await;
                        of.insert(spawn(&mut tasks, &t, p), (t, p));
                    }
                }
                Err(e) => {
                    // One partition failing (a storage error) stops the run: nothing more is
                    // acked.
                    failed.get_or_insert(e);
                    tasks.abort_all();
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if !ctx.cfg.drain || *shutdown.borrow() {
            break Ok(());
        }
        // Every partition was drained once; outputs or requeued retries may have landed in a
        // topic we consume, so go again until a whole round finds nothing.
        // On the blocking pool: a broker may be waited for (a reconnect) before it answers.
        let (src, group, parts) = (
            ctx.source.clone(),
            ctx.cfg.group.clone(),
            partitions.to_vec(),
        );
        // `at_end`, not the end offset: a queue's depth may count other consumers' unacked
        // messages (RabbitMQ's management API), which this process cannot drain.
        let behind = tokio::task::spawn_blocking(move || {
            for (t, p) in &parts {
                let next = src.committed(&group, t, *p)?;
                if !src.at_end(t, *p, next)? {
                    return Ok(true);
                }
            }
            Ok::<_, SourceError>(false)
        })
        .await
        .map_err(|e| EngineError::Join(e.to_string()))??;
        if !behind {
            break Ok(());
        }
    }
}
