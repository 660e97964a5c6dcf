//! The instance pool: tasks that each own one handler instance, on a runtime of their own.
//!
//! A call into wasm is asynchronous: while a handler waits (a WASI timer, an HTTP request), its
//! task is suspended and the runtime's threads serve other instances; while it computes, it
//! yields at every epoch tick. So the number of instances is not bounded by threads: hundreds
//! can wait at once on two cores. The runtime has one thread per core and is separate from the
//! one that runs partitions and I/O, so a busy handler never delays an ack or a fetch.
//!
//! A job is a run of messages of one lane; any idle instance takes the next job. The number of
//! instances can change while jobs run ([`Pool::resize`], driven by the scaler).

use super::{EngineError, Stats};
use crate::host::{Handler, HandlerInstance, Outcome, RunResult};
use crate::source::Delivery;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::oneshot;

/// A run of messages for an instance, and where to send the result back.
struct Job {
    /// Its priority level (0 first).
    level: usize,
    msgs: Vec<Delivery>,
    attempts: Vec<u32>,
    reply: oneshot::Sender<(Vec<Delivery>, RunResult)>,
}

mod queue;

use queue::Jobs;

pub(super) struct Pool {
    /// Jobs from all lanes of all partitions; any idle instance takes the next one (by
    /// priority level, see [`queue`]).
    jobs: Arc<Jobs<Job>>,
    runtime: InstanceRuntime,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stats: Arc<Stats>,
    /// How many instances there should be; one above it exits after its current job.
    desired: Arc<AtomicUsize>,
    /// How many instances there are.
    alive: Arc<AtomicUsize>,
}

/// Messages a lower-priority job runs before it looks whether a higher one waits.
const SLICE: usize = 16;

/// How often an idle instance checks whether it should retire.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// The runtime the instances run on. Shut down without waiting when dropped, so that dropping
/// a pool inside another runtime's task does not panic (a runtime may not block there).
struct InstanceRuntime(Option<tokio::runtime::Runtime>);

impl InstanceRuntime {
    fn start() -> InstanceRuntime {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        InstanceRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .thread_name("weir-instance")
                .build()
                .expect("start the instances' tokio runtime"),
        ))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives as long as the pool")
            .handle()
    }
}

impl Drop for InstanceRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Pool {
    /// Starts `instances` instances of the handler in `stats.module`, taking jobs from
    /// `levels` priority levels (weighted by `weights`, or strictly).
    pub(super) fn start(
        instances: usize,
        stats: Arc<Stats>,
        levels: usize,
        weights: Option<Vec<u32>>,
    ) -> Pool {
        // Unbounded: the number of jobs is bounded by the lanes (one job per lane at a time).
        let pool = Pool {
            jobs: Arc::new(Jobs::new(levels, weights)),
            runtime: InstanceRuntime::start(),
            tasks: Default::default(),
            stats,
            desired: Arc::new(AtomicUsize::new(0)),
            alive: Arc::new(AtomicUsize::new(0)),
        };
        pool.resize(instances.max(1));
        pool
    }

    /// Instances running now.
    pub(super) fn size(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    /// Grows to `n` instances at once; shrinks as instances above `n` finish their current job.
    pub(super) fn resize(&self, n: usize) {
        let n = n.max(1);
        self.desired.store(n, Ordering::Relaxed);
        let mut tasks = self.tasks.lock().expect("pool lock");
        tasks.retain(|t| !t.is_finished());
        while self.alive.load(Ordering::Relaxed) < n {
            self.alive.fetch_add(1, Ordering::Relaxed);
            let rx = self.jobs.clone();
            let stats = self.stats.clone();
            let (desired, alive) = (self.desired.clone(), self.alive.clone());
            tasks.push(
                self.runtime
                    .handle()
                    .spawn(instance_task(rx, stats, desired, alive)),
            );
        }
        self.stats.instances.store(self.size(), Ordering::Relaxed);
        self.stats
            .instances_peak
            .fetch_max(self.size(), Ordering::Relaxed);
    }

    /// Runs `msgs` on an instance, queued at priority `level`.
    pub(super) async fn run(
        &self,
        level: usize,
        msgs: Vec<Delivery>,
        attempts: Vec<u32>,
    ) -> Result<(Vec<Delivery>, RunResult), EngineError> {
        let (reply, rx) = oneshot::channel();
        let size = msgs.len();
        self.jobs
            .push(
                level,
                Job {
                    level,
                    msgs,
                    attempts,
                    reply,
                },
                size,
            )
            .map_err(|_| EngineError::PoolGone)?;
        rx.await.map_err(|_| EngineError::PoolGone)
    }

    /// Lets every instance finish its job and end, then stops the runtime.
    pub(super) async fn stop(self) {
        self.desired.store(0, Ordering::Relaxed);
        self.jobs.close();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("pool lock"));
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn instance_task(
    rx: Arc<Jobs<Job>>,
    stats: Arc<Stats>,
    desired: Arc<AtomicUsize>,
    alive: Arc<AtomicUsize>,
) {
    let mut instance = None;
    let mut generation = stats.module.generation();
    let Some(mut module) = stats.module.get() else {
        alive.fetch_sub(1, Ordering::Relaxed);
        return;
    };
    loop {
        // Retire if there are more instances than wanted (one at a time, by compare-exchange).
        let now = alive.load(Ordering::Relaxed);
        if now > desired.load(Ordering::Relaxed)
            && alive
                .compare_exchange(now, now - 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            stats.instances.store(now - 1, Ordering::Relaxed);
            return;
        }
        match tokio::time::timeout(IDLE_CHECK, rx.take()).await {
            Ok(Some(mut job)) => {
                // A reload: this job and the next run on the new handler's instances.
                let now = stats.module.generation();
                if now != generation
                    && let Some(m) = stats.module.get()
                {
                    (module, instance, generation) = (m, None, now);
                }
                let result = serve(&module, &mut instance, &mut job, &rx, &stats).await;
                // The lane may be gone (shutdown); nothing to do then.
                let _ = job.reply.send((job.msgs, result));
            }
            Ok(None) => {
                alive.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            Err(_idle) => {}
        }
    }
}

/// Runs a job on a worker's instance, replacing the instance after a fault. When a batch call
/// faults, the culprit is unknown: the remaining messages run one at a time on fresh instances,
/// so that only the faulty message is charged with the fault.
///
/// A job below the highest priority level gives way: with strict priority, a single-message
/// handler runs it [`SLICE`] messages at a time and stops between slices once a higher level's
/// job waits; what it did not run goes back to its lane (a batch call is not cut).
async fn serve(
    module: &Handler,
    slot: &mut Option<HandlerInstance>,
    job: &mut Job,
    jobs: &Jobs<Job>,
    stats: &Stats,
) -> RunResult {
    let (msgs, attempts) = (&mut job.msgs[..], &job.attempts[..]);
    let yields = job.level > 0 && jobs.strict() && !module.is_batch();
    let mut out = RunResult {
        ends: Some(Vec::new()),
        ..RunResult::default()
    };
    let mut one_by_one = false;
    let mut from = 0;
    while from < msgs.len() {
        let instance = match slot {
            Some(i) => i,
            None => match module.instantiate().await {
                Ok(i) => slot.insert(i),
                Err(fault) => {
                    stats.faults.fetch_add(1, Ordering::Relaxed);
                    out.stop = Some(fault);
                    return out;
                }
            },
        };
        let end = if one_by_one {
            from + 1
        } else if yields {
            (from + SLICE).min(msgs.len())
        } else {
            msgs.len()
        };
        let started = std::time::Instant::now();
        let r = instance
            .run(&mut msgs[from..end], &attempts[from..end])
            .await;
        let ran = (r.done + usize::from(r.stop.is_some())).max(1);
        stats
            .metrics
            .handler
            .observe_n(started.elapsed().as_secs_f64() / ran as f64, ran as u64);
        out.done += r.done;
        // Each message's outputs stay told apart only if every part of the job told them.
        out.ends = match (out.ends.take(), r.ends) {
            (Some(mut ends), Some(more)) => {
                let base = out.outputs.len();
                ends.extend(more.into_iter().map(|e| base + e));
                Some(ends)
            }
            _ => None,
        };
        out.outputs.extend(r.outputs);
        from += r.done;
        match r.stop {
            None if yields && from < msgs.len() && jobs.waiting_above(job.level) => return out,
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
