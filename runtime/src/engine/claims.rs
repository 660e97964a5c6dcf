//! The idempotency-key claims one partition task holds.
//!
//! A message claims its key before it runs (in this process, and in a shared dedupe store), so
//! that no copy of it runs at the same time; the claim goes once its outcome is committed. A
//! partition can also stop with claimed messages queued or in flight (a revoke, a shutdown, an
//! error, an abandoned revoke): [`Held`] lets those claims go when the task ends, however it
//! ends, rather than leave the key stalled until a shared claim expires (minutes).

use super::Ctx;
use std::collections::HashSet;
use std::sync::Arc;

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
