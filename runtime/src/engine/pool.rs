//! The instance pool: worker threads that each own one handler instance.
//!
//! Calls into wasm are synchronous and CPU-bound, so they run on these threads rather than on
//! tokio's. A job is a run of messages of one lane; any free worker takes the next job.

use super::{EngineError, Stats};
use crate::host::{Instance, Module, Outcome, RunResult};
use crate::source::Delivery;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    pub(super) fn start(module: &Module, instances: usize, stats: Arc<Stats>) -> Pool {
        // Unbounded: the number of jobs is bounded by the lanes (one job per lane at a time).
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
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
                            // The lane may be gone (shutdown); nothing to do then.
                            let _ = job.reply.send((job.msgs, result));
                        }
                    })
                    .expect("spawn an instance worker thread")
            })
            .collect();
        Pool { jobs: tx, workers }
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
