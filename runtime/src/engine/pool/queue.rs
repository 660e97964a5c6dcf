//! The pool's jobs, waiting for an idle instance, by priority level (`--priority`).
//!
//! Strict: an instance takes the oldest job of the highest level that has one. Weighted
//! (`--priority-weights`): it takes from the level that has had the least service for its
//! weight, counted in messages (start-time fair queueing: a level that was idle starts at the
//! current virtual time, so it cannot bank a burst while it had nothing to do). With one level
//! both are a plain FIFO.
//!
//! Not flume's channel (the pool used one): a channel has one order, and an instance here must
//! choose between levels at the moment it becomes idle.

use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

pub(super) struct Jobs<J> {
    state: Mutex<State<J>>,
    ready: Notify,
    /// Instances waiting in [`Jobs::take`]: a waiting job goes to one of them without any
    /// running job giving way.
    idle: std::sync::atomic::AtomicUsize,
}

struct State<J> {
    levels: Vec<VecDeque<(J, usize)>>,
    /// Per level: messages served, divided by the level's weight (weighted mode).
    served: Vec<f64>,
    weights: Option<Vec<u32>>,
    /// The served figure of the last level taken from: where a level that was idle resumes.
    clock: f64,
    closed: bool,
}

/// The pool is stopping: no more jobs.
#[derive(Debug)]
pub(super) struct Closed;

impl<J> Jobs<J> {
    /// `levels` levels (at least one); `weights`, one per level, for weighted sharing.
    pub(super) fn new(levels: usize, weights: Option<Vec<u32>>) -> Jobs<J> {
        let levels = levels.max(1);
        Jobs {
            state: Mutex::new(State {
                levels: (0..levels).map(|_| VecDeque::new()).collect(),
                served: vec![0.0; levels],
                weights,
                clock: 0.0,
                closed: false,
            }),
            ready: Notify::new(),
            idle: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Queues `job` of `size` messages at `level` (the last level if beyond it).
    pub(super) fn push(&self, level: usize, job: J, size: usize) -> Result<(), Closed> {
        {
            let mut st = self.state.lock().expect("jobs lock");
            if st.closed {
                return Err(Closed);
            }
            let level = level.min(st.levels.len() - 1);
            if st.levels[level].is_empty() {
                st.served[level] = st.served[level].max(st.clock);
            }
            st.levels[level].push_back((job, size));
        }
        self.ready.notify_one();
        Ok(())
    }

    /// The next job by the policy, if one waits.
    pub(super) fn try_take(&self) -> Option<J> {
        let mut st = self.state.lock().expect("jobs lock");
        let nonempty: Vec<bool> = st.levels.iter().map(|l| !l.is_empty()).collect();
        let l = pick(&nonempty, &st.served, st.weights.is_some())?;
        let (job, size) = st.levels[l].pop_front().expect("picked a level with a job");
        if let Some(w) = &st.weights {
            let w = f64::from(w.get(l).copied().unwrap_or(1).max(1));
            st.clock = st.served[l];
            st.served[l] += size.max(1) as f64 / w;
        }
        let more = st.levels.iter().any(|l| !l.is_empty());
        drop(st);
        // A Notify keeps one permit: wake the next idle instance for what is left.
        if more {
            self.ready.notify_one();
        }
        Some(job)
    }

    /// Waits for the next job; `None` once closed and empty.
    pub(super) async fn take(&self) -> Option<J> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(j) = self.try_take() {
                return Some(j);
            }
            if self.state.lock().expect("jobs lock").closed {
                return None;
            }
            use std::sync::atomic::Ordering::Relaxed;
            self.idle.fetch_add(1, Relaxed);
            // Counted down however the wait ends (a job, or the caller's timeout dropping it).
            struct Idle<'a>(&'a std::sync::atomic::AtomicUsize);
            impl Drop for Idle<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Relaxed);
                }
            }
            let _idle = Idle(&self.idle);
            notified.await;
        }
    }

    /// Whether jobs are served strictly by level (no weights).
    pub(super) fn strict(&self) -> bool {
        self.state.lock().expect("jobs lock").weights.is_none()
    }

    /// Whether a job of a level above `level` waits with no idle instance to take it.
    pub(super) fn waiting_above(&self, level: usize) -> bool {
        if self.idle.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return false;
        }
        let st = self.state.lock().expect("jobs lock");
        st.levels[..level.min(st.levels.len())]
            .iter()
            .any(|l| !l.is_empty())
    }

    /// Takes no more jobs; those queued are still handed out.
    pub(super) fn close(&self) {
        self.state.lock().expect("jobs lock").closed = true;
        self.ready.notify_waiters();
    }
}

/// The level to take from: the first with a job (strict), or of those with a job the one with
/// the least weighted service (ties to the higher level).
fn pick(nonempty: &[bool], served: &[f64], weighted: bool) -> Option<usize> {
    let mut ready = (0..nonempty.len()).filter(|&l| nonempty[l]);
    if !weighted {
        return ready.next();
    }
    ready.min_by(|&a, &b| served[a].total_cmp(&served[b]).then(a.cmp(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks() {
        type Case<'a> = (&'a [bool], &'a [f64], bool, Option<usize>);
        let cases: [Case; 7] = [
            (&[false, false], &[0.0, 0.0], false, None),
            (&[true, true], &[9.0, 0.0], false, Some(0)),
            (&[false, true], &[0.0, 0.0], false, Some(1)),
            (&[true, true], &[9.0, 0.0], true, Some(1)),
            (&[true, true], &[1.0, 1.0], true, Some(0)),
            (&[true, false, true], &[5.0, 0.0, 4.0], true, Some(2)),
            (&[false, false], &[0.0, 0.0], true, None),
        ];
        for (nonempty, served, weighted, want) in cases {
            assert_eq!(
                pick(nonempty, served, weighted),
                want,
                "{nonempty:?} {served:?} {weighted}"
            );
        }
    }

    /// Both levels always have work: strict serves only the first; weights 3:1 share 3:1 by
    /// messages, whatever the job sizes.
    #[test]
    fn shares_follow_the_mode() {
        for (weights, sizes, want) in [
            (None, [10, 10], [400, 0]),
            (Some(vec![3, 1]), [10, 10], [300, 100]),
            (Some(vec![3, 1]), [30, 10], [300, 100]),
        ] {
            let jobs: Jobs<usize> = Jobs::new(2, weights.clone());
            let mut served = [0usize; 2];
            for (l, &size) in sizes.iter().enumerate() {
                for _ in 0..100 {
                    jobs.push(l, l, size).unwrap();
                }
            }
            while served.iter().sum::<usize>() < 400 {
                let l = jobs.try_take().unwrap();
                served[l] += sizes[l];
                jobs.push(l, l, sizes[l]).unwrap();
            }
            for l in 0..2 {
                let got = served[l] as f64;
                assert!(
                    (got - want[l] as f64).abs() <= sizes[l] as f64,
                    "{weights:?} {sizes:?}: served {served:?}, wanted {want:?}"
                );
            }
        }
    }

    /// A level that had nothing to do does not bank service: when it comes back it shares
    /// from then on rather than taking everything until it catches up.
    #[test]
    fn an_idle_level_does_not_bank_a_burst() {
        let jobs: Jobs<usize> = Jobs::new(2, Some(vec![1, 1]));
        for _ in 0..100 {
            jobs.push(1, 1, 1).unwrap();
        }
        for _ in 0..50 {
            assert_eq!(jobs.try_take(), Some(1));
        }
        for _ in 0..10 {
            jobs.push(0, 0, 1).unwrap();
        }
        let next: Vec<usize> = (0..10).map(|_| jobs.try_take().unwrap()).collect();
        let zeros = next.iter().filter(|&&l| l == 0).count();
        assert!((4..=6).contains(&zeros), "{next:?}");
    }

    #[test]
    fn a_closed_queue_hands_out_what_it_holds_then_ends() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let jobs: Jobs<u32> = Jobs::new(1, None);
        jobs.push(0, 7, 1).unwrap();
        jobs.close();
        assert!(jobs.push(0, 8, 1).is_err());
        rt.block_on(async {
            assert_eq!(jobs.take().await, Some(7));
            assert_eq!(jobs.take().await, None);
        });
    }
}
