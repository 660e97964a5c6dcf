//! Group commit: the writers whose batches were committed while an fsync ran share the next one.
//!
//! fjall holds its journal's lock for the whole of an fsync (`Database::persist`), so a batch
//! cannot even enter the journal meanwhile, and before this each writer (every partition's
//! commit, every producer's append) then ran an fsync of its own, one after another. Now a
//! writer takes a ticket once its batch is in the journal and waits until an fsync that began
//! after that has ended; the first writer to find none running runs it for everyone waiting
//! (the leader), so one fsync covers every batch committed before it began.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    /// Tickets handed out: batches in the journal.
    committed: u64,
    /// Every ticket up to this one is covered by an fsync that succeeded.
    synced: u64,
    /// An fsync is running.
    syncing: bool,
}

#[derive(Default)]
pub(super) struct GroupSync {
    state: Mutex<State>,
    done: Condvar,
    /// fsyncs run, for the tests and the bench.
    syncs: AtomicU64,
}

impl GroupSync {
    /// The ticket of a batch just committed to the journal (call it after the commit returns).
    pub fn ticket(&self) -> u64 {
        let mut s = self.state.lock().expect("group sync lock");
        s.committed += 1;
        s.committed
    }

    /// Returns once the batch of `ticket` is durable: an fsync (`fsync`, run here or by another
    /// writer) that began after the ticket was taken has succeeded. If the fsync this writer
    /// runs fails, its error; a writer whose leader's fsync failed runs one itself (fjall then
    /// refuses at once: a failed fsync poisons it), so every writer it covered sees a failure.
    pub fn wait<E>(&self, ticket: u64, fsync: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut s = self.state.lock().expect("group sync lock");
        loop {
            if s.synced >= ticket {
                return Ok(());
            }
            if !s.syncing {
                s.syncing = true;
                let target = s.committed;
                drop(s);
                let r = fsync();
                self.syncs.fetch_add(1, Ordering::Relaxed);
                let mut s = self.state.lock().expect("group sync lock");
                s.syncing = false;
                if r.is_ok() {
                    s.synced = s.synced.max(target);
                }
                drop(s);
                self.done.notify_all();
                return r;
            }
            s = self.done.wait(s).expect("group sync lock");
        }
    }

    /// fsyncs run so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;

    /// Two writers that commit while a third one's fsync runs share the next fsync: three
    /// batches, two fsyncs. A writer whose batch an fsync already covered runs none.
    #[test]
    fn batches_committed_during_an_fsync_share_the_next() {
        let g = Arc::new(GroupSync::default());
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let first = g.ticket();
        let leader = {
            let g = g.clone();
            std::thread::spawn(move || {
                g.wait(first, || -> Result<(), ()> {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok(())
                })
            })
        };
        started_rx.recv().unwrap();
        // Committed while the first fsync runs: it cannot cover them.
        let (second, third) = (g.ticket(), g.ticket());
        let waiters: Vec<_> = [second, third]
            .into_iter()
            .map(|t| {
                let g = g.clone();
                std::thread::spawn(move || g.wait(t, || -> Result<(), ()> { Ok(()) }))
            })
            .collect();
        release_tx.send(()).unwrap();
        assert_eq!(leader.join().unwrap(), Ok(()));
        for w in waiters {
            assert_eq!(w.join().unwrap(), Ok(()));
        }
        assert_eq!(
            g.syncs(),
            2,
            "three batches: the first fsync, then one for both others"
        );
        // Already covered: no fsync.
        assert_eq!(g.wait(third, || -> Result<(), ()> { Err(()) }), Ok(()));
        assert_eq!(g.syncs(), 2);
    }

    /// A failed fsync covers nothing: the next writer runs its own and sees its failure.
    #[test]
    fn a_failed_fsync_covers_nothing() {
        let g = GroupSync::default();
        let (a, b) = (g.ticket(), g.ticket());
        assert_eq!(g.wait(a, || Err("eio")), Err("eio"));
        assert_eq!(g.wait(b, || Err("poisoned")), Err("poisoned"));
        assert_eq!(g.wait(b, || Ok::<(), &str>(())), Ok(()));
        assert_eq!(g.syncs(), 3);
    }
}
