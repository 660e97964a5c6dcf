//! An in-memory source for the engine's own tests: partitions as vectors, commits recorded with
//! the (tokio) time they were made, and a consumer group the test drives by hand. With tokio's
//! paused clock the partition loop runs in virtual time, so retries, the commit point and
//! revocation are tested in milliseconds without a process or a disk.

use super::{
    Capabilities, Commit, Delivery, GroupEvent, Output, Record, Settle, Source, SourceError,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A commit as the source saw it.
#[derive(Debug, Clone)]
pub struct Committed {
    pub at: Instant,
    pub offsets: Vec<(Arc<str>, u32, u64)>,
    pub settled: Vec<(Arc<str>, u32, u64)>,
    pub outputs: Vec<Output>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Vec<Vec<Record>>>,
    offsets: HashMap<(String, String, u32), u64>,
    commits: Vec<Committed>,
    /// Offsets fetched, in the order the engine asked for them.
    fetched: Vec<(String, u32, u64)>,
    /// Idempotency keys marked done, per group.
    marks: std::collections::HashSet<(String, Vec<u8>)>,
}

pub struct Memory {
    caps: Capabilities,
    state: Mutex<State>,
    /// The sending side of the group's events, once the engine joined (group mode).
    group: Option<Mutex<Option<mpsc::UnboundedReceiver<GroupEvent>>>>,
}

impl Memory {
    /// A log-like source (watermark commits), every partition consumed.
    pub fn log() -> Arc<Memory> {
        Arc::new(Memory {
            caps: Capabilities::LOG,
            state: Default::default(),
            group: None,
        })
    }

    /// A queue-like source: each message settled on its own.
    pub fn per_message() -> Arc<Memory> {
        Arc::new(Memory {
            caps: Capabilities {
                settle: Settle::PerMessage,
                ..Capabilities::LOG
            },
            state: Default::default(),
            group: None,
        })
    }

    /// A log whose partitions the test assigns and revokes through the returned sender.
    pub fn grouped() -> (Arc<Memory>, mpsc::UnboundedSender<GroupEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let m = Arc::new(Memory {
            caps: Capabilities {
                groups: true,
                ..Capabilities::LOG
            },
            state: Default::default(),
            group: Some(Mutex::new(Some(rx))),
        });
        (m, tx)
    }

    pub fn create(&self, topic: &str, partitions: u32) {
        let mut s = self.state.lock().unwrap();
        s.topics
            .entry(topic.into())
            .or_insert_with(|| vec![Vec::new(); partitions as usize]);
    }

    pub fn append(&self, topic: &str, partition: u32, records: Vec<Record>) {
        let mut s = self.state.lock().unwrap();
        s.topics.get_mut(topic).expect("topic")[partition as usize].extend(records);
    }

    /// Every commit so far.
    pub fn commits(&self) -> Vec<Committed> {
        self.state.lock().unwrap().commits.clone()
    }

    /// The records of a topic's partition (outputs and dead letters land here too).
    pub fn records(&self, topic: &str, partition: u32) -> Vec<Record> {
        let s = self.state.lock().unwrap();
        s.topics
            .get(topic)
            .map_or_else(Vec::new, |t| t[partition as usize].clone())
    }

    /// Every record of a topic, all partitions.
    pub fn all(&self, topic: &str) -> Vec<Record> {
        let s = self.state.lock().unwrap();
        s.topics
            .get(topic)
            .map_or_else(Vec::new, |t| t.iter().flatten().cloned().collect())
    }

    pub fn offset(&self, group: &str, topic: &str, partition: u32) -> u64 {
        let s = self.state.lock().unwrap();
        s.offsets
            .get(&(group.into(), topic.into(), partition))
            .copied()
            .unwrap_or(0)
    }
}

fn missing(topic: &str) -> SourceError {
    SourceError::Invalid(format!("no topic {topic}"))
}

impl Source for Memory {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        let s = self.state.lock().unwrap();
        Ok(s.topics.get(topic).ok_or_else(|| missing(topic))?.len() as u32)
    }

    fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError> {
        Ok(self.offset(group, topic, partition))
    }

    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, SourceError> {
        Ok(self.records(topic, partition).len() as u64)
    }

    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        _max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let mut s = self.state.lock().unwrap();
        let t: Arc<str> = Arc::from(topic);
        let part = &s.topics.get(topic).ok_or_else(|| missing(topic))?[partition as usize];
        let out: Vec<Delivery> = part
            .iter()
            .enumerate()
            .skip(from as usize)
            .take(max)
            .map(|(i, r)| Delivery {
                topic: t.clone(),
                partition,
                offset: i as u64,
                record: r.clone(),
                redeliveries: 0,
            })
            .collect();
        let at: Vec<_> = out
            .iter()
            .map(|d| (topic.to_string(), partition, d.offset))
            .collect();
        s.fetched.extend(at);
        Ok(out)
    }

    fn commit(&self, group: &str, c: Commit) -> Result<(), SourceError> {
        let mut s = self.state.lock().unwrap();
        for o in &c.outputs {
            let parts = s
                .topics
                .get_mut(&o.topic)
                .ok_or_else(|| missing(&o.topic))?;
            parts[0].push(o.record.clone());
        }
        for (key, _) in &c.dedupe_done {
            s.marks.insert((group.to_string(), key.clone()));
        }
        for (t, p, o) in &c.offsets {
            let e = s
                .offsets
                .entry((group.into(), t.to_string(), *p))
                .or_insert(0);
            assert!(*o >= *e, "the offset of {t}/{p} went back from {e} to {o}");
            *e = *o;
        }
        s.commits.push(Committed {
            at: Instant::now(),
            offsets: c.offsets,
            settled: c.settled,
            outputs: c.outputs,
        });
        Ok(())
    }

    fn topic_exists(&self, topic: &str) -> bool {
        self.state.lock().unwrap().topics.contains_key(topic)
    }

    fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), SourceError> {
        self.create(topic, partitions);
        Ok(())
    }

    fn dedupe_done(&self, group: &str, key: &[u8], _: u64) -> Result<bool, SourceError> {
        let s = self.state.lock().unwrap();
        Ok(s.marks.contains(&(group.to_string(), key.to_vec())))
    }

    fn evict_dedupe(&self, _: u64, _: usize) -> Result<usize, SourceError> {
        Ok(0)
    }

    fn join_group(
        &self,
        _group: &str,
        _topics: &[String],
        _revoke_timeout: std::time::Duration,
    ) -> Result<Option<mpsc::UnboundedReceiver<GroupEvent>>, SourceError> {
        Ok(self.group.as_ref().and_then(|g| g.lock().unwrap().take()))
    }
}
