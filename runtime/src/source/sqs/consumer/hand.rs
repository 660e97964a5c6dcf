//! Handing buffered messages to the engine: which to take, extending or deleting them first,
//! and numbering them.

use super::{GEN, SqsSource};
use crate::source::sqs::client;
use crate::source::sqs::receive::{Buffered, Receipt, Topic};
use crate::source::{Delivery, SourceError};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl SqsSource {
    /// Takes up to `max` messages (and `max_bytes`, at least one) off the buffer, in order. One
    /// whose visibility is about to run out is let go (SQS may hand it to another consumer; it
    /// comes back), and on a FIFO queue so is the rest of its group that is buffered, so the
    /// group keeps its order.
    pub(super) fn take(&self, t: &Topic, max: usize, max_bytes: usize) -> Vec<Buffered> {
        let mut q = t.state.lock().expect("state");
        let now = Instant::now();
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut let_go: HashSet<String> = HashSet::new();
        while out.len() < max && (out.is_empty() || bytes < max_bytes) {
            let Some(b) = q.buffer.pop_front() else { break };
            let late = b.visible_until.saturating_duration_since(now) < self.lease / 3;
            let behind = b.msg.group.as_ref().is_some_and(|g| let_go.contains(g));
            if late || behind {
                if let Some(g) = &b.msg.group {
                    let_go.insert(g.clone());
                }
                continue;
            }
            bytes += crate::source::wire_size(&b.msg.record);
            out.push(b);
        }
        if !let_go.is_empty() {
            q.buffer
                .retain(|b| b.msg.group.as_ref().is_none_or(|g| !let_go.contains(g)));
        }
        out
    }

    /// Makes `taken` ready to run. At-least-once: those with less than two thirds of the lease
    /// left get a whole one now (the engine's first renewal can come two thirds of a lease
    /// after the hand-out). At-most-once: they are deleted first, and those SQS did not delete
    /// are not run here (they come back).
    pub(super) fn prepare(
        &self,
        t: &Topic,
        mut taken: Vec<Buffered>,
    ) -> Result<Vec<Buffered>, SourceError> {
        if taken.is_empty() {
            return Ok(taken);
        }
        let now = Instant::now();
        let lease = self.lease;
        let (cl, url) = (self.client.clone(), t.url.clone());
        if self.opts.at_most_once {
            let handles: Vec<String> = taken.iter().map(|b| b.msg.handle.clone()).collect();
            let refused = self
                .rt
                .run(async move { client::delete(&cl, &url, &handles).await })?;
            if !refused.is_empty() {
                tracing::warn!(refused = ?refused, "at-most-once: SQS did not delete some messages; they are not run here");
            }
            let gone: HashSet<usize> = refused.into_iter().map(|(i, _)| i).collect();
            return Ok(taken
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !gone.contains(i))
                .map(|(_, b)| b)
                .collect());
        }
        let due: Vec<usize> = (0..taken.len())
            .filter(|&i| taken[i].visible_until.saturating_duration_since(now) < lease * 2 / 3)
            .collect();
        if due.is_empty() {
            return Ok(taken);
        }
        let handles: Vec<(String, Duration)> = due
            .iter()
            .map(|&i| (taken[i].msg.handle.clone(), lease))
            .collect();
        let refused = self
            .rt
            .run(async move { client::change_visibility(&cl, &url, &handles).await })?;
        let failed: HashSet<usize> = refused.into_iter().map(|(i, _)| due[i]).collect();
        for &i in &due {
            if !failed.contains(&i) {
                taken[i].visible_until = now + lease;
            }
        }
        Ok(taken)
    }

    /// Numbers the messages and keeps their receipts (at-most-once: settled already).
    pub(super) fn issue(&self, topic: &str, t: &Topic, taken: Vec<Buffered>) -> Vec<Delivery> {
        let name: Arc<str> = Arc::from(topic);
        let mut q = t.state.lock().expect("state");
        let out = taken
            .into_iter()
            .map(|b| {
                let m = b.msg;
                let seq = if self.opts.at_most_once {
                    q.receipts.issue_settled()
                } else {
                    let seq = q.receipts.issue(
                        GEN,
                        Receipt {
                            handle: m.handle,
                            id: m.id,
                        },
                    );
                    q.until.insert(seq, b.visible_until);
                    seq
                };
                Delivery {
                    topic: name.clone(),
                    partition: 0,
                    offset: seq,
                    record: m.record,
                    redeliveries: m.receive_count - 1,
                }
            })
            .collect();
        drop(q);
        if self.opts.at_most_once {
            t.room.notify_waiters();
        }
        out
    }
}
