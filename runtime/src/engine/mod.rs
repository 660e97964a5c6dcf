//! The consume loop: the way of one message through the host.
//!
//! ```text
//! source ──fetch──▶ partition task ──job──▶ instance pool ──result──▶ partition task ──commit──▶ source
//!                   (one per partition,     (worker threads,          (outputs + DLQ copies + offset,
//!                    in order, blocking      one instance each,        one atomic, durable write)
//!                    retry with backoff)     replaced on a fault)
//! ```
//!
//! Each partition is consumed by one task, in offset order. A batch goes to whichever worker is
//! free; the worker runs it through its instance and stops at the first message that does not
//! succeed. The task then commits what succeeded (its outputs and the new offset together), and
//! retries the failed message after a backoff, or dead-letters it when it was rejected or ran out
//! of attempts. Later messages of the partition wait: order is kept (per-key lanes, which let
//! other keys go on, are the next step).
//!
//! At-least-once: an offset is committed only with the outputs of every message below it, so a
//! crash at any point redelivers what was in flight and loses nothing.

pub mod offsets;
pub mod retry;

use crate::host::{Instance, Module, Outcome, RunResult};
use crate::source::{Commit, Delivery, Output, Record, Source, SourceError};
use offsets::OffsetTracker;
use retry::Backoff;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, watch};

/// Settings of one `weir run`, validated.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub group: String,
    pub topics: Vec<String>,
    /// Messages fetched and handed to an instance at once.
    pub batch_size: usize,
    /// Handler instances (worker threads).
    pub instances: usize,
    /// Stop once every partition is consumed to its end and nothing is in flight.
    pub drain: bool,
    pub backoff: Backoff,
    /// The dead-letter topic of a topic: `{topic}` in it is replaced by the topic's name.
    pub dlq_topic: String,
    /// How often an idle partition looks for new messages.
    pub idle_poll: Duration,
}

impl EngineConfig {
    pub fn dlq_for(&self, topic: &str) -> String {
        self.dlq_topic.replace("{topic}", topic)
    }
}

/// Counters of a run, shared by all partition tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages the handler succeeded on (acked).
    pub processed: AtomicU64,
    /// Outputs published (not counting DLQ copies).
    pub emitted: AtomicU64,
    /// Messages written to a dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
    /// Instances lost to a trap, timeout or memory fault.
    pub faults: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub processed: u64,
    pub emitted: u64,
    pub dead_lettered: u64,
    pub retries: u64,
    pub faults: u64,
}

impl Stats {
    pub fn summary(&self) -> Summary {
        Summary {
            processed: self.processed.load(Ordering::Relaxed),
            emitted: self.emitted.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
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
}

/// A run of messages for an instance, and where to send the result back.
struct Job {
    msgs: Vec<Delivery>,
    attempts: Vec<u32>,
    reply: oneshot::Sender<(Vec<Delivery>, RunResult)>,
}

/// Worker threads that each own one handler instance. Calls into wasm are synchronous and
/// CPU-bound, so they run here rather than on tokio's threads.
struct Pool {
    /// Jobs from all partition tasks; any free worker takes the next one.
    jobs: crossbeam_channel::Sender<Job>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    fn start(module: &Module, instances: usize, stats: Arc<Stats>) -> Pool {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(instances * 2);
        let workers = (0..instances)
            .map(|i| {
                let rx = rx.clone();
                let module = module.clone();
                let stats = stats.clone();
                std::thread::Builder::new()
                    .name(format!("weir-instance-{i}"))
                    .spawn(move || {
                        let mut instance = None;
                        while let Ok(job) = rx.recv() {
                            let result =
                                serve(&module, &mut instance, &job.msgs, &job.attempts, &stats);
                            // The partition task may be gone (shutdown); nothing to do then.
                            let _ = job.reply.send((job.msgs, result));
                        }
                    })
                    .expect("spawn an instance worker thread")
            })
            .collect();
        Pool { jobs: tx, workers }
    }

    async fn run(
        &self,
        msgs: Vec<Delivery>,
        attempts: Vec<u32>,
    ) -> Result<(Vec<Delivery>, RunResult), EngineError> {
        let (reply, rx) = oneshot::channel();
        let jobs = self.jobs.clone();
        let job = Job {
            msgs,
            attempts,
            reply,
        };
        // `send` blocks while every worker is busy and the queue is full: that is backpressure.
        tokio::task::spawn_blocking(move || jobs.send(job))
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?
            .map_err(|_| EngineError::PoolGone)?;
        rx.await.map_err(|_| EngineError::PoolGone)
    }

    fn stop(self) {
        drop(self.jobs);
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// Runs a job on a worker's instance, replacing the instance after a fault. When a batch call
/// faults, the culprit is unknown: the remaining messages run one at a time on fresh instances,
/// so that only the faulty message is charged with the fault.
fn serve(
    module: &Module,
    slot: &mut Option<Instance>,
    msgs: &[Delivery],
    attempts: &[u32],
    stats: &Stats,
) -> RunResult {
    let mut out = RunResult::default();
    let mut one_by_one = false;
    let mut from = 0;
    while from < msgs.len() {
        let instance = match slot {
            Some(i) => i,
            None => match module.instantiate() {
                Ok(i) => slot.insert(i),
                Err(fault) => {
                    stats.faults.fetch_add(1, Ordering::Relaxed);
                    out.stop = Some(fault);
                    return out;
                }
            },
        };
        let end = if one_by_one { from + 1 } else { msgs.len() };
        let r = instance.run(&msgs[from..end], &attempts[from..end]);
        out.done += r.done;
        out.outputs.extend(r.outputs);
        from += r.done;
        match r.stop {
            None => {}
            Some(Outcome::Fault { kind, detail }) => {
                *slot = None;
                stats.faults.fetch_add(1, Ordering::Relaxed);
                // A single-message entry point stops exactly at the culprit; a batch call does not.
                if module.is_batch() && !one_by_one && msgs.len() - from > 1 {
                    tracing::debug!(
                        kind = kind.as_str(),
                        "a batch call faulted; running its messages one by one"
                    );
                    one_by_one = true;
                    continue;
                }
                out.stop = Some(Outcome::Fault { kind, detail });
                return out;
            }
            stop => {
                out.stop = stop;
                return out;
            }
        }
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Header names of the dead-letter envelope.
pub mod dlq_headers {
    pub const TOPIC: &str = "weir.dlq.topic";
    pub const PARTITION: &str = "weir.dlq.partition";
    pub const OFFSET: &str = "weir.dlq.offset";
    pub const ATTEMPTS: &str = "weir.dlq.attempts";
    pub const ERROR_KIND: &str = "weir.dlq.error-kind";
    pub const ERROR: &str = "weir.dlq.error";
    pub const MODULE: &str = "weir.dlq.module";
    pub const MODULE_DIGEST: &str = "weir.dlq.module-digest";
    pub const FIRST_FAILURE_MS: &str = "weir.dlq.first-failure-ms";
    pub const LAST_FAILURE_MS: &str = "weir.dlq.last-failure-ms";
}

/// What went wrong with a message, as the log and the DLQ envelope name it.
fn failure_kind(stop: &Outcome, exhausted: bool) -> (&'static str, String) {
    match stop {
        Outcome::Reject { reason } => ("rejected", reason.clone()),
        Outcome::Retry { reason, .. } if exhausted => ("retries-exhausted", reason.clone()),
        Outcome::Retry { reason, .. } => ("retry", reason.clone()),
        Outcome::Fault { kind, detail } => (kind.as_str(), detail.clone()),
        Outcome::Ok => ("ok", String::new()),
    }
}

struct Failures {
    first_ms: u64,
}

fn dead_letter(
    d: &Delivery,
    attempts: u32,
    kind: &str,
    error: &str,
    module: &Module,
    dlq: String,
    failures: &Failures,
) -> Output {
    use dlq_headers as h;
    let mut headers = d.record.headers.clone();
    let now = now_ms().to_string();
    for (name, value) in [
        (h::TOPIC, d.topic.to_string()),
        (h::PARTITION, d.partition.to_string()),
        (h::OFFSET, d.offset.to_string()),
        (h::ATTEMPTS, attempts.to_string()),
        (h::ERROR_KIND, kind.to_string()),
        (h::ERROR, error.to_string()),
        (h::MODULE, module.name().to_string()),
        (h::MODULE_DIGEST, module.digest().to_string()),
        (h::FIRST_FAILURE_MS, failures.first_ms.to_string()),
        (h::LAST_FAILURE_MS, now),
    ] {
        headers.push((name.to_string(), value.into_bytes()));
    }
    let record = Record {
        key: d.record.key.clone(),
        payload: d.record.payload.clone(),
        headers,
        timestamp_ms: None,
    };
    Output { topic: dlq, record }
}

/// Everything a partition task needs, shared.
struct Ctx {
    source: Arc<dyn Source>,
    module: Module,
    pool: Pool,
    cfg: EngineConfig,
    stats: Arc<Stats>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Join(e.to_string()))?
        .map_err(EngineError::from)
}

/// Waits for `d`, or for shutdown; returns false on shutdown.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.changed() => false,
    }
}

async fn consume_partition(
    ctx: Arc<Ctx>,
    topic: Arc<str>,
    partition: u32,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), EngineError> {
    let (src, group, t) = (ctx.source.clone(), ctx.cfg.group.clone(), topic.clone());
    let start = blocking(move || src.committed(&group, &t, partition)).await?;
    let mut tracker = OffsetTracker::new(start);
    let mut next = start;
    let dlq = ctx.cfg.dlq_for(&topic);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let (src, t, max) = (ctx.source.clone(), topic.clone(), ctx.cfg.batch_size);
        let batch = blocking(move || src.fetch(&t, partition, next, max)).await?;
        let Some(last) = batch.last() else {
            if ctx.cfg.drain {
                return Ok(());
            }
            pause(ctx.cfg.idle_poll, &mut shutdown).await;
            continue;
        };
        next = last.offset + 1;
        batch.iter().for_each(|d| tracker.dispatch(d.offset));
        let mut attempts = vec![1u32; batch.len()];
        let mut pending = batch;
        let mut failures: Option<Failures> = None;
        while !pending.is_empty() {
            let (msgs, result) = ctx.pool.run(pending, attempts.clone()).await?;
            pending = msgs;
            let done = result.done;
            pending[..done]
                .iter()
                .for_each(|d| tracker.finish(d.offset));
            let emitted = result.outputs.len() as u64;
            let mut commit = Commit {
                outputs: result.outputs,
                offsets: Vec::new(),
            };
            let mut dead = 0;
            let mut wait = None;
            if done > 0 {
                failures = None;
            }
            if let Some(stop) = result.stop {
                let d = &pending[done];
                let attempt = attempts[done];
                let now = now_ms();
                let f = failures.get_or_insert(Failures { first_ms: now });
                let retryable = matches!(stop, Outcome::Retry { .. } | Outcome::Fault { .. });
                let exhausted = retryable && !ctx.cfg.backoff.may_retry(attempt);
                let (kind, error) = failure_kind(&stop, exhausted);
                let key = d.record.key.as_deref().map(String::from_utf8_lossy);
                tracing::warn!(
                    topic = %d.topic, partition = d.partition, offset = d.offset, key = key.as_deref().unwrap_or(""),
                    attempt, kind, error = %error, "message failed"
                );
                if retryable && !exhausted {
                    let requested = match &stop {
                        Outcome::Retry { delay, .. } => *delay,
                        _ => None,
                    };
                    wait = Some(
                        ctx.cfg
                            .backoff
                            .delay(attempt, requested, rand::random::<f64>()),
                    );
                    ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
                } else {
                    commit.outputs.push(dead_letter(
                        d,
                        attempt,
                        kind,
                        &error,
                        &ctx.module,
                        dlq.clone(),
                        f,
                    ));
                    tracker.finish(d.offset);
                    dead = 1;
                }
            }
            commit
                .offsets
                .push((topic.clone(), partition, tracker.commit_point()));
            let src = ctx.source.clone();
            let group = ctx.cfg.group.clone();
            blocking(move || src.commit(&group, commit)).await?;
            ctx.stats
                .processed
                .fetch_add(done as u64, Ordering::Relaxed);
            ctx.stats.emitted.fetch_add(emitted, Ordering::Relaxed);
            ctx.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
            pending.drain(..done + dead as usize);
            attempts.drain(..done + dead as usize);
            if dead == 1 {
                failures = None;
            }
            if let Some(w) = wait {
                attempts[0] += 1;
                if !pause(w, &mut shutdown).await {
                    // Shutdown while backing off: what finished is committed; the failed
                    // message and those after it are redelivered on the next start.
                    return Ok(());
                }
            }
        }
    }
}

/// Consumes `cfg.topics` with `module` until `shutdown` turns true (or, with `drain`, until
/// nothing is left). Returns the run's counters.
pub async fn run(
    source: Arc<dyn Source>,
    module: Module,
    cfg: EngineConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<Summary, EngineError> {
    let mut partitions = Vec::new();
    for t in &cfg.topics {
        let n = source.partitions(t)?;
        source.ensure_topic(&cfg.dlq_for(t), n)?;
        partitions.extend((0..n).map(|p| (Arc::<str>::from(t.as_str()), p)));
    }
    let stats = Arc::new(Stats::default());
    let pool = Pool::start(&module, cfg.instances.max(1), stats.clone());
    let ctx = Arc::new(Ctx {
        source,
        module,
        pool,
        cfg,
        stats: stats.clone(),
    });
    tracing::info!(
        module = ctx.module.name(), digest = ctx.module.digest(), batch = ctx.module.is_batch(),
        partitions = partitions.len(), instances = ctx.cfg.instances, group = %ctx.cfg.group, "consuming"
    );
    let result = loop {
        let mut tasks = tokio::task::JoinSet::new();
        for (t, p) in &partitions {
            tasks.spawn(consume_partition(
                ctx.clone(),
                t.clone(),
                *p,
                shutdown.clone(),
            ));
        }
        let mut failed = None;
        while let Some(r) = tasks.join_next().await {
            let r = r
                .map_err(|e| EngineError::Join(e.to_string()))
                .and_then(|r| r);
            if let Err(e) = r {
                // One partition failing (storage error) stops the run: nothing more is acked.
                failed.get_or_insert(e);
                tasks.abort_all();
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if !ctx.cfg.drain || *shutdown.borrow() {
            break Ok(());
        }
        // Drained every partition once; outputs may have landed in a topic we consume (a
        // handler feeding itself), so go again until a whole round finds nothing.
        let mut behind = false;
        for (t, p) in &partitions {
            if ctx.source.committed(&ctx.cfg.group, t, *p)? < ctx.source.end_offset(t, *p)? {
                behind = true;
            }
        }
        if !behind {
            break Ok(());
        }
    };
    let ctx = Arc::into_inner(ctx).expect("every partition task has ended");
    ctx.pool.stop();
    result.map(|()| stats.summary())
}
