//! The instance pool: worker threads that each own one handler instance.
//!
//! Calls into wasm are synchronous and CPU-bound, so they run on these threads rather than on
//! tokio's. A job is a run of messages of one lane; any free worker takes the next job. The
//! number of workers can change while jobs run ([`Pool::resize`], driven by the scaler).

use super::{EngineError, Stats};
use crate::host::{Handler, HandlerInstance, Outcome, RunResult};
use crate::source::Delivery;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::oneshot;

/// A run of messages for an instance, and where to send the result back.
struct Job {
    msgs: Vec<Delivery>,
    attempts: Vec<u32>,
    reply: oneshot::Sender<(Vec<Delivery>, RunResult)>,
}

pub(super) struct Pool {
    /// Jobs from all lanes of all partitions; any free worker takes the next one.
    jobs: crossbeam_channel::Sender<Job>,
    rx: crossbeam_channel::Receiver<Job>,
    workers: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    stats: Arc<Stats>,
    /// How many workers there should be; a worker above it exits after its current job.
    desired: Arc<AtomicUsize>,
    /// How many workers there are.
    alive: Arc<AtomicUsize>,
    /// Workers ever started (names them).
    started: AtomicUsize,
}

/// How often an idle worker checks whether it should retire.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl Pool {
    /// Starts `instances` workers running the handler in `stats.module`.
    pub(super) fn start(instances: usize, stats: Arc<Stats>) -> Pool {
        // Unbounded: the number of jobs is bounded by the lanes (one job per lane at a time).
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let pool = Pool {
            jobs: tx,
            rx,
            workers: Default::default(),
            stats,
            desired: Arc::new(AtomicUsize::new(0)),
            alive: Arc::new(AtomicUsize::new(0)),
            started: AtomicUsize::new(0),
        };
        pool.resize(instances.max(1));
        pool
    }

    /// Instances running now.
    pub(super) fn size(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    /// Grows to `n` workers at once; shrinks as workers above `n` finish their current job
    /// (their instances are dropped with them).
    pub(super) fn resize(&self, n: usize) {
        let n = n.max(1);
        self.desired.store(n, Ordering::Relaxed);
        let mut workers = self.workers.lock().expect("pool lock");
        workers.retain(|w| !w.is_finished());
        while self.alive.load(Ordering::Relaxed) < n {
            self.alive.fetch_add(1, Ordering::Relaxed);
            let i = self.started.fetch_add(1, Ordering::Relaxed);
            let rx = self.rx.clone();
            let stats = self.stats.clone();
            let (desired, alive) = (self.desired.clone(), self.alive.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("weir-instance-{i}"))
                    .spawn(move || worker(rx, stats, desired, alive))
                    .expect("spawn an instance worker thread"),
            );
        }
        self.stats.instances.store(self.size(), Ordering::Relaxed);
        self.stats
            .instances_peak
            .fetch_max(self.size(), Ordering::Relaxed);
    }

    pub(super) async fn run(
        &self,
        msgs: Vec<Delivery>,
        attempts: Vec<u32>,
    ) -> Result<(Vec<Delivery>, RunResult), EngineError> {
        // The worker answers on this; the caller awaits it without holding a thread.
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                msgs,
                attempts,
                reply,
            })
            .map_err(|_| EngineError::PoolGone)?;
        rx.await.map_err(|_| EngineError::PoolGone)
    }

    pub(super) fn stop(self) {
        self.desired.store(0, Ordering::Relaxed);
        drop(self.jobs);
        drop(self.rx);
        for w in self.workers.into_inner().expect("pool lock") {
            let _ = w.join();
        }
    }
}

fn worker(
    rx: crossbeam_channel::Receiver<Job>,
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
        // Retire if there are more workers than wanted (one at a time, by compare-exchange).
        let now = alive.load(Ordering::Relaxed);
        if now > desired.load(Ordering::Relaxed)
            && alive
                .compare_exchange(now, now - 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            stats.instances.store(now - 1, Ordering::Relaxed);
            return;
        }
        match rx.recv_timeout(IDLE_CHECK) {
            Ok(mut job) => {
                // A reload: this job and the next run on the new handler's instances.
                let now = stats.module.generation();
                if now != generation
                    && let Some(m) = stats.module.get()
                {
                    (module, instance, generation) = (m, None, now);
                }
                let result = serve(&module, &mut instance, &mut job.msgs, &job.attempts, &stats);
                // The lane may be gone (shutdown); nothing to do then.
                let _ = job.reply.send((job.msgs, result));
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                alive.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Runs a job on a worker's instance, replacing the instance after a fault. When a batch call
/// faults, the culprit is unknown: the remaining messages run one at a time on fresh instances,
/// so that only the faulty message is charged with the fault.
fn serve(
    module: &Handler,
    slot: &mut Option<HandlerInstance>,
    msgs: &mut [Delivery],
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
        let started = std::time::Instant::now();
        let r = instance.run(&mut msgs[from..end], &attempts[from..end]);
        let ran = (r.done + usize::from(r.stop.is_some())).max(1);
        stats
            .metrics
            .handler
            .observe_n(started.elapsed().as_secs_f64() / ran as f64, ran as u64);
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
