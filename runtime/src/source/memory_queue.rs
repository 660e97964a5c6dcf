//! An in-memory queue for the engine's tests of the per-message settle path, in tokio's paused
//! time: each message is leased to the consumer when fetched (and handed out again when its
//! lease runs out unextended, as SQS and JetStream do), counted on every delivery, settled by
//! its receipt, given back on release, and, where the test asks for it, delivered again after
//! a delay the engine gives ([`Capabilities::delayed_retry`]).

use super::receipts::Receipts;
use super::{Capabilities, Commit, Delivery, GroupEvent, Record, Settle, Source, SourceError};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A message and how often it was delivered.
#[derive(Debug, Clone)]
struct Msg {
    record: Record,
    deliveries: u32,
}

/// What happened to the queue's messages, as a test reads it.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Handed out, first deliveries and later ones.
    pub delivered: u64,
    /// Handed out again because a lease ran out while the engine held the message.
    pub expired: u64,
    /// Settles (acks) of a message whose lease had run out (another consumer may have it).
    pub stale: u64,
    /// Lease renewals.
    pub extended: u64,
    /// Messages given back by [`Source::release`].
    pub released: u64,
    /// Messages given back with a delay, with the delay.
    pub delayed: Vec<Duration>,
}

#[derive(Default)]
struct State {
    ready: HashMap<String, VecDeque<Msg>>,
    /// Given back with a delay: (due, topic, message).
    later: Vec<(Instant, String, Msg)>,
    receipts: HashMap<String, Receipts<u64>>,
    /// Lease id to (topic, message, lease end).
    leased: HashMap<u64, (String, Msg, Instant)>,
    next_lease: u64,
    counts: Counts,
}

pub struct MemQueue {
    caps: Capabilities,
    /// How long the queue waits for a settle before it hands a message out again.
    lease: Duration,
    state: Mutex<State>,
    group: Option<Mutex<Option<mpsc::UnboundedReceiver<GroupEvent>>>>,
}

impl MemQueue {
    /// A queue that takes a message back after `lease` unsettled; `caps` say what the engine
    /// is told (a test may hide the lease from it, to see what it costs).
    pub fn new(lease: Duration, caps: Capabilities) -> Arc<MemQueue> {
        Arc::new(MemQueue {
            caps: Capabilities {
                settle: Settle::PerMessage,
                ..caps
            },
            lease,
            state: Default::default(),
            group: None,
        })
    }

    /// [`MemQueue::new`] whose queues the test assigns and revokes through the sender.
    pub fn grouped(
        lease: Duration,
        caps: Capabilities,
    ) -> (Arc<MemQueue>, mpsc::UnboundedSender<GroupEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let q = MemQueue {
            caps: Capabilities {
                settle: Settle::PerMessage,
                groups: true,
                ..caps
            },
            lease,
            state: Default::default(),
            group: Some(Mutex::new(Some(rx))),
        };
        (Arc::new(q), tx)
    }

    pub fn create(&self, topic: &str) {
        self.state
            .lock()
            .unwrap()
            .ready
            .entry(topic.into())
            .or_default();
    }

    pub fn send(&self, topic: &str, records: impl IntoIterator<Item = Record>) {
        let mut s = self.state.lock().unwrap();
        let q = s.ready.get_mut(topic).expect("topic");
        q.extend(records.into_iter().map(|record| Msg {
            record,
            deliveries: 0,
        }));
    }

    /// The messages waiting in `topic` (ready or delayed), with their delivery counts.
    pub fn waiting(&self, topic: &str) -> Vec<(Record, u32)> {
        let s = self.state.lock().unwrap();
        let ready = s.ready.get(topic).into_iter().flatten();
        let later = s
            .later
            .iter()
            .filter(|(_, t, _)| t == topic)
            .map(|(_, _, m)| m);
        ready
            .chain(later)
            .map(|m| (m.record.clone(), m.deliveries))
            .collect()
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts.clone()
    }
}

fn missing(topic: &str) -> SourceError {
    SourceError::UnknownTopic(topic.to_string())
}

impl State {
    /// Moves what is due back to the front of its queue: delayed messages whose delay passed,
    /// and leased ones whose lease ran out.
    fn due(&mut self, now: Instant) {
        let later = std::mem::take(&mut self.later);
        for (at, t, m) in later {
            if at <= now {
                self.ready.entry(t).or_default().push_back(m);
            } else {
                self.later.push((at, t, m));
            }
        }
        let expired: Vec<u64> = self
            .leased
            .iter()
            .filter(|(_, (_, _, until))| *until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let (t, m, _) = self.leased.remove(&id).expect("leased");
            self.counts.expired += 1;
            self.ready.entry(t).or_default().push_front(m);
        }
    }
}

impl Source for MemQueue {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        let s = self.state.lock().unwrap();
        s.ready.get(topic).map(|_| 1).ok_or_else(|| missing(topic))
    }

    fn committed(&self, _: &str, topic: &str, _: u32) -> Result<u64, SourceError> {
        let s = self.state.lock().unwrap();
        Ok(s.receipts.get(topic).map_or(0, |r| r.committed()))
    }

    fn end_offset(&self, topic: &str, _: u32) -> Result<u64, SourceError> {
        let s = self.state.lock().unwrap();
        let handed = s.receipts.get(topic).map_or(0, |r| r.next_seq());
        let ready = s.ready.get(topic).map_or(0, |q| q.len());
        let later = s.later.iter().filter(|(_, t, _)| t == topic).count();
        Ok(handed + (ready + later) as u64)
    }

    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        _from: u64,
        max: usize,
        _max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap();
        s.due(now);
        let name: Arc<str> = Arc::from(topic);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(mut m) = s
                .ready
                .get_mut(topic)
                .ok_or_else(|| missing(topic))?
                .pop_front()
            else {
                break;
            };
            m.deliveries += 1;
            s.counts.delivered += 1;
            let id = s.next_lease;
            s.next_lease += 1;
            let seq = s.receipts.entry(topic.into()).or_default().issue(0, id);
            out.push(Delivery {
                topic: name.clone(),
                partition,
                offset: seq,
                record: m.record.clone(),
                redeliveries: m.deliveries - 1,
            });
            s.leased.insert(id, (topic.into(), m, now + self.lease));
        }
        Ok(out)
    }

    fn commit(&self, _group: &str, c: Commit) -> Result<(), SourceError> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap();
        // A lease that ran out is the queue's again before any late settle of it.
        s.due(now);
        for o in &c.outputs {
            if !s.ready.contains_key(&o.topic) {
                return Err(missing(&o.topic));
            }
        }
        for o in c.outputs {
            s.ready.get_mut(&o.topic).expect("checked").push_back(Msg {
                record: o.record,
                deliveries: 0,
            });
        }
        let settled = c.settled.iter().map(|(t, _, seq)| (t, *seq, None));
        let delayed = c.delayed.iter().map(|(t, _, seq, d)| (t, *seq, Some(*d)));
        for (topic, seq, delay) in settled.chain(delayed) {
            let receipts = s.receipts.entry(topic.to_string()).or_default();
            let Ok(r) = receipts.get(0, &[seq]) else {
                return Err(SourceError::Invalid(format!(
                    "no receipt for {topic}/{seq}"
                )));
            };
            receipts.settle([seq]);
            let id = r[0].1;
            match (s.leased.remove(&id), delay) {
                (Some(_), None) => {}
                (Some((t, m, _)), Some(d)) => {
                    s.counts.delayed.push(d);
                    s.later.push((now + d, t, m));
                }
                (None, _) => s.counts.stale += 1,
            }
        }
        Ok(())
    }

    fn topic_exists(&self, topic: &str) -> bool {
        self.state.lock().unwrap().ready.contains_key(topic)
    }

    fn ensure_topic(&self, topic: &str, _: u32) -> Result<(), SourceError> {
        self.create(topic);
        Ok(())
    }

    fn dedupe_done(&self, _: &str, _: &[u8], _: u64) -> Result<bool, SourceError> {
        Err(SourceError::Invalid("no dedupe marks on this queue".into()))
    }

    fn evict_dedupe(&self, _: u64, _: usize) -> Result<usize, SourceError> {
        Ok(0)
    }

    fn join_group(
        &self,
        _group: &str,
        _topics: &[String],
        _revoke_timeout: Duration,
    ) -> Result<Option<mpsc::UnboundedReceiver<GroupEvent>>, SourceError> {
        Ok(self.group.as_ref().and_then(|g| g.lock().unwrap().take()))
    }

    fn release(&self, topic: &str, _: u32) {
        let mut s = self.state.lock().unwrap();
        let ids = s.receipts.entry(topic.into()).or_default().release(0);
        let mut back: Vec<(u64, Msg)> = ids
            .into_iter()
            .filter_map(|id| s.leased.remove(&id).map(|(_, m, _)| (id, m)))
            .collect();
        // In the order they were delivered, in front of what waits.
        back.sort_by_key(|(id, _)| *id);
        s.counts.released += back.len() as u64;
        let q = s.ready.entry(topic.into()).or_default();
        for (_, m) in back.into_iter().rev() {
            q.push_front(m);
        }
    }

    fn extend(&self, topic: &str, _: u32, offsets: &[u64]) -> Result<(), SourceError> {
        let until = Instant::now() + self.lease;
        let mut s = self.state.lock().unwrap();
        s.due(Instant::now());
        let Ok(r) = s.receipts.entry(topic.into()).or_default().get(0, offsets) else {
            return Err(SourceError::Invalid(format!(
                "extending unknown messages of {topic}"
            )));
        };
        for (_, id) in r {
            if let Some(l) = s.leased.get_mut(&id) {
                l.2 = until;
                s.counts.extended += 1;
            }
        }
        Ok(())
    }
}
