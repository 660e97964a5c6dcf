//! The idempotency-key claims of a run.
//!
//! A message claims its key before it runs (in this process, and in a shared dedupe store), so
//! that no copy of it runs at the same time; the claim goes once its outcome is committed.
//! Between the two, a message can be done while its done mark waits for the commit point (on a
//! log, outputs and marks go with the offset that passes their message, which may wait for an
//! earlier message). Such a claim is [`State::Finished`]: a copy of it is a duplicate at once.
//! Were the copy to wait for the claim instead, two partitions could wait on each other forever:
//! each holding a done copy whose mark waits for an earlier message of its partition, which
//! waits for the other's claim. (Safe: if the finished message's partition stops before its mark
//! is written, the message itself was not committed either, so it is delivered and runs again.)
//!
//! A partition can also stop with claimed messages queued or in flight (a revoke, a shutdown, an
//! error, an abandoned revoke): [`Held`] lets those claims go when the task ends, however it
//! ends, rather than leave the key stalled until a shared claim expires (minutes).

use super::Ctx;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Where a claimed key stands in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its message is queued or running.
    Running,
    /// Its message is done; the done mark waits to be written.
    Finished,
}

/// What a copy of a key finds in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Local {
    /// Nobody here holds the key: it is the caller's now.
    Claimed,
    /// Another message here holds it and is not done: look again shortly.
    Busy,
    /// Another message here is done with it: the copy is a duplicate.
    Duplicate,
}

/// The claims of every partition of a run.
#[derive(Debug, Default)]
pub(super) struct Claims(HashMap<Vec<u8>, State>);

impl Claims {
    /// Claims `key` unless another message holds it.
    pub(super) fn claim(&mut self, key: &[u8]) -> Local {
        match self.0.get(key) {
            None => {
                self.0.insert(key.to_vec(), State::Running);
                Local::Claimed
            }
            Some(State::Running) => Local::Busy,
            Some(State::Finished) => Local::Duplicate,
        }
    }

    /// The message holding `key` is done; its mark is not written yet.
    pub(super) fn finish(&mut self, key: &[u8]) {
        if let Some(s) = self.0.get_mut(key) {
            *s = State::Finished;
        }
    }

    pub(super) fn remove(&mut self, key: &[u8]) {
        self.0.remove(key);
    }
}

pub(super) struct Held {
    ctx: Arc<Ctx>,
    /// Keys this partition claimed and has not let go yet.
    keys: HashSet<Vec<u8>>,
}

impl Held {
    pub(super) fn new(ctx: &Arc<Ctx>) -> Held {
        Held {
            ctx: ctx.clone(),
            keys: HashSet::new(),
        }
    }

    /// Records a claim this partition now holds.
    pub(super) fn hold(&mut self, key: &[u8]) {
        self.keys.insert(key.to_vec());
    }

    /// Records a claim let go the ordinary way (after its message's outcome was committed).
    pub(super) fn let_go(&mut self, key: &[u8]) {
        self.keys.remove(key);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        if let Ok(mut claims) = self.ctx.claims.lock() {
            for key in &self.keys {
                claims.remove(key);
            }
        }
        let Some(store) = self.ctx.cfg.dedupe.as_ref().and_then(|d| d.store.clone()) else {
            return;
        };
        let keys: Vec<Vec<u8>> = self.keys.drain().collect();
        let (group, token) = (self.ctx.cfg.group.clone(), self.ctx.token.clone());
        let release = move || {
            if let Err(e) = store.release(&group, &keys, &token) {
                tracing::debug!(error = %e, "releasing the claims of a stopped partition failed; they expire");
            }
        };
        // A release in a store is a network call: off the async threads where there are some.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(release)),
            Err(_) => release(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_waits_for_a_running_claim_and_is_a_duplicate_of_a_finished_one() {
        let mut c = Claims::default();
        // (step, key, what a claim finds right after the step)
        let steps: &[(&str, &[u8], Local)] = &[
            ("claim", b"a", Local::Busy),
            ("finish", b"a", Local::Duplicate),
            ("remove", b"a", Local::Claimed),
            ("finish", b"b", Local::Claimed), // finishing a key nobody holds claims nothing
            ("claim", b"c", Local::Busy),
            ("remove", b"c", Local::Claimed),
        ];
        for (step, key, want) in steps {
            match *step {
                "claim" => assert_eq!(c.claim(key), Local::Claimed),
                "finish" => c.finish(key),
                _ => c.remove(key),
            }
            assert_eq!(
                c.claim(key),
                *want,
                "after {step} {}",
                String::from_utf8_lossy(key)
            );
        }
    }
}
