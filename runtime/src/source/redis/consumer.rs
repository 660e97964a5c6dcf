//! What `weir run` consumes through on Redis: one consumer of the group, per-entry settling.
//!
//! Each consumed stream reads on a connection of its own (`XREADGROUP ... BLOCK`); commits,
//! renewals and counts share a few others. Per stream, in this order on each fetch:
//! - once, the entries this consumer name already holds (`XREADGROUP ... 0`: a restart under a
//!   fixed `consumer=` name);
//! - every quarter of `claim-idle`, entries any consumer of the group held longer than
//!   `claim-idle` (`XAUTOCLAIM`: a killed process's, or ones given back);
//! - new entries (`XREADGROUP ... >`), waiting up to `block` for one.
//!
//! Entries read but beyond what the engine asked for wait in a buffer; they are this
//! consumer's (pending) already.

use super::conns::Conns;
use super::{RedisConfig, error, scripts};
use crate::source::connect::ConsumerOptions;
use crate::source::receipts::Receipts;
use crate::source::{Capabilities, Commit, Delivery, Record, Source, SourceError};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Receipts of Redis outlive a connection (an entry stays pending to its consumer name): one
/// generation.
pub(super) const GEN: u64 = 0;

/// Where Redis cannot say a group's lag, weir counts undelivered entries up to this many.
const LAG_COUNT_BOUND: usize = 10_000;

pub(super) struct Stream {
    pub(super) receipts: Receipts<String>,
    /// Read, pending to this consumer, not handed to the engine yet: (id, deliveries, record).
    pub(super) buffer: VecDeque<(String, u32, Record)>,
    /// When `XAUTOCLAIM` last ran, and where the next one starts.
    pub(super) claimed_at: Option<Instant>,
    pub(super) claim_cursor: String,
    /// The entries this consumer name holds already are to be read, after this id (`0`: all);
    /// `None` once they were.
    pub(super) history_after: Option<String>,
}

impl Default for Stream {
    fn default() -> Stream {
        Stream {
            receipts: Receipts::default(),
            buffer: VecDeque::new(),
            claimed_at: None,
            claim_cursor: "0-0".into(),
            history_after: Some("0".into()),
        }
    }
}

pub struct RedisSource {
    pub(super) cfg: RedisConfig,
    pub(super) group: String,
    pub(super) opts: ConsumerOptions,
    pub(super) conns: Conns,
    /// Per stream, the connection its blocking reads use.
    pub(super) readers: Mutex<HashMap<String, Arc<Mutex<Option<redis::Connection>>>>>,
    pub(super) streams: Mutex<HashMap<String, Stream>>,
    /// Streams known to exist.
    known: Mutex<HashSet<String>>,
    /// Topics `maxlen` does not cap: dead-letter and retry topics.
    uncapped: HashSet<String>,
    /// Set once `XINFO GROUPS` had no `lag` (entries deleted, or Redis before 7).
    lag_unknown: std::sync::atomic::AtomicBool,
    commit: redis::Script,
    touch: redis::Script,
}

impl RedisSource {
    /// Connects, and creates the group on every consumed stream where it is missing (reading
    /// from the stream's first entry). A consumed topic must exist; retry topics are created.
    pub fn start(cfg: RedisConfig, opts: &ConsumerOptions) -> Result<RedisSource, SourceError> {
        let conns = Conns::new(
            &cfg,
            format!("weir:{}{}", cfg.prefix, cfg.consumer).replace(' ', "_"),
        )?;
        let s = RedisSource {
            group: opts.group.clone(),
            opts: opts.clone(),
            conns,
            readers: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            known: Mutex::new(HashSet::new()),
            lag_unknown: Default::default(),
            uncapped: opts
                .retry_topics
                .iter()
                .chain(&opts.dlq_topics)
                .cloned()
                .collect(),
            commit: redis::Script::new(scripts::COMMIT),
            touch: redis::Script::new(scripts::TOUCH),
            cfg,
        };
        for t in &opts.retry_topics {
            s.ensure_topic(t, 1)?;
        }
        for t in opts.topics.iter().chain(&opts.retry_topics) {
            s.create_group(t)?;
        }
        tracing::info!(consumer = %s.cfg.consumer, group = %s.group, claim_idle = ?s.cfg.claim_idle, "consuming Redis streams");
        Ok(s)
    }

    fn create_group(&self, topic: &str) -> Result<(), SourceError> {
        let key = self.cfg.key(topic);
        let r = self.conns.with("creating the consumer group", |c| {
            match redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg(&self.group)
                .arg("0")
                .query::<()>(c)
            {
                Err(e) if e.code() == Some("BUSYGROUP") => Ok(true),
                Err(e) if e.to_string().contains("requires the key to exist") => Ok(false),
                Err(e) => Err(e),
                Ok(()) => Ok(true),
            }
        })?;
        if !r {
            return Err(SourceError::UnknownTopic(topic.to_string()));
        }
        self.known.lock().expect("known").insert(topic.to_string());
        self.forget_dead_consumers(&key);
        Ok(())
    }

    /// Removes consumers of the group that weir named after a process (`weir-<host>-<pid>`)
    /// which hold nothing and were idle for ten minutes: processes gone, whose names would
    /// otherwise pile up in `XINFO CONSUMERS`. A consumer with pending entries stays (they are
    /// taken over after claim-idle, and it can go next time).
    fn forget_dead_consumers(&self, key: &str) {
        const IDLE_MS: i64 = 10 * 60 * 1000;
        let consumers: Result<Vec<HashMap<String, redis::Value>>, _> =
            self.conns.with("listing consumers", |c| {
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(key)
                    .arg(&self.group)
                    .query(c)
            });
        for c in consumers.unwrap_or_default() {
            let int = |f: &str| match c.get(f) {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            };
            let Some(name) = c.get("name").cloned().and_then(|n| super::text(n).ok()) else {
                continue;
            };
            if name != self.cfg.consumer
                && name.starts_with("weir-")
                && int("pending") == 0
                && int("idle") > IDLE_MS
            {
                let _ = self.conns.with("removing a consumer that is gone", |x| {
                    redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(key)
                        .arg(&self.group)
                        .arg(&name)
                        .query::<i64>(x)
                });
            }
        }
    }

    pub(super) fn held(&self, key: &str) -> usize {
        let topic = key.strip_prefix(&self.cfg.prefix).unwrap_or(key);
        let st = self.streams.lock().expect("streams");
        st.get(topic)
            .map_or(0, |s| s.receipts.held() + s.buffer.len())
    }

    /// (lag: entries not delivered to the group yet, pending: entries delivered and not
    /// acked, by any consumer) of `topic`, from `XINFO GROUPS`.
    fn group_depth(&self, topic: &str) -> Result<(u64, u64), SourceError> {
        let key = self.cfg.key(topic);
        let groups: Vec<HashMap<String, redis::Value>> =
            self.conns.with("reading the group's depth", |c| {
                redis::cmd("XINFO").arg("GROUPS").arg(&key).query(c)
            })?;
        let num = |g: &HashMap<String, redis::Value>, f: &str| match g.get(f) {
            Some(redis::Value::Int(n)) => Some((*n).max(0) as u64),
            _ => None,
        };
        let Some(g) = groups.iter().find(|g| {
            g.get("name")
                .cloned()
                .and_then(|n| super::text(n).ok())
                .is_some_and(|n| n == self.group)
        }) else {
            return Err(SourceError::UnknownTopic(topic.to_string()));
        };
        let pending = num(g, "pending").unwrap_or(0);
        let lag = match num(g, "lag") {
            Some(lag) => lag,
            None => {
                // Redis cannot say after deletions (or before 7.0): count the entries after
                // the group's last delivered one, up to a bound.
                self.lag_unknown
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let last = g
                    .get("last-delivered-id")
                    .cloned()
                    .and_then(|v| super::text(v).ok())
                    .unwrap_or_else(|| "0-0".into());
                let ids: Vec<redis::Value> =
                    self.conns.with("counting undelivered entries", |c| {
                        redis::cmd("XRANGE")
                            .arg(&key)
                            .arg(format!("({last}"))
                            .arg("+")
                            .arg("COUNT")
                            .arg(LAG_COUNT_BOUND)
                            .query(c)
                    })?;
                ids.len() as u64
            }
        };
        Ok((lag, pending))
    }

    /// Renews (`idle` 0) or gives back (`idle` = claim-idle) entries this consumer owns.
    fn touch(&self, topic: &str, ids: &[String], idle_ms: u64) -> Result<u64, SourceError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let key = self.cfg.key(topic);
        self.conns.with("renewing held entries", |c| {
            self.touch
                .key(&key)
                .arg(&self.group)
                .arg(&self.cfg.consumer)
                .arg(idle_ms)
                .arg(ids)
                .invoke(c)
        })
    }
}

impl Source for RedisSource {
    fn capabilities(&self) -> Capabilities {
        self.cfg.capabilities()
    }

    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        if self.known.lock().expect("known").contains(topic) {
            return Ok(1);
        }
        self.create_group(topic).map(|()| 1)
    }

    fn committed(&self, _group: &str, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let st = self.streams.lock().expect("streams");
        Ok(st.get(topic).map_or(0, |s| s.receipts.committed()))
    }

    /// This process's deliveries and buffer, plus what waits in the group: entries not
    /// delivered yet and every other consumer's pending ones.
    fn end_offset(&self, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let (lag, pending) = self.group_depth(topic)?;
        let st = self.streams.lock().expect("streams");
        let (handed, mine) = st.get(topic).map_or((0, 0), |s| {
            let buffered = s.buffer.len() as u64;
            (
                s.receipts.next_seq() + buffered,
                s.receipts.held() as u64 + buffered,
            )
        });
        Ok(handed + lag + pending.saturating_sub(mine))
    }

    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        _from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let lost = || SourceError::Lost {
            topic: topic.to_string(),
        };
        {
            let mut st = self.streams.lock().expect("streams");
            let s = st.entry(topic.to_string()).or_default();
            if s.receipts.check(GEN).is_err() {
                return Err(lost());
            }
            if s.buffer.is_empty() {
                drop(st);
                self.fill(topic, max.max(1))?;
            }
        }
        let name: Arc<str> = Arc::from(topic);
        let mut st = self.streams.lock().expect("streams");
        let s = st.entry(topic.to_string()).or_default();
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max && (out.is_empty() || bytes < max_bytes) {
            let Some((id, n, record)) = s.buffer.pop_front() else {
                break;
            };
            bytes += crate::source::wire_size(&record);
            let seq = if self.opts.at_most_once {
                s.receipts.issue_settled()
            } else {
                s.receipts.issue(GEN, id)
            };
            out.push(Delivery {
                topic: name.clone(),
                partition,
                offset: seq,
                record,
                redeliveries: n.saturating_sub(1),
            });
        }
        Ok(out)
    }

    fn transactional(&self) -> bool {
        // Every commit is one script: outputs and acks together.
        true
    }

    fn commit(&self, _group: &str, commit: Commit) -> Result<(), SourceError> {
        if !commit.replayed.is_empty()
            || !commit.dedupe_done.is_empty()
            || !commit.delayed.is_empty()
        {
            return Err(SourceError::Invalid(
                "replay marks, dedupe marks and delayed retries are not kept on Redis".into(),
            ));
        }
        if commit.outputs.is_empty() && commit.settled.is_empty() {
            return Ok(());
        }
        // The entries to ack, per stream; one this process no longer holds fails the commit.
        // At-most-once read them with NOACK: nothing to ack, only outputs to write.
        let mut settled: BTreeMap<String, (Vec<u64>, Vec<String>)> = BTreeMap::new();
        if !self.opts.at_most_once {
            let mut by: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
            for (t, _, seq) in &commit.settled {
                by.entry(t).or_default().push(*seq);
            }
            let mut st = self.streams.lock().expect("streams");
            for (t, seqs) in by {
                let s = st.entry(t.to_string()).or_default();
                let r = s.receipts.get(GEN, &seqs).map_err(|_| SourceError::Lost {
                    topic: t.to_string(),
                })?;
                settled.insert(
                    t.to_string(),
                    (seqs, r.into_iter().map(|(_, id)| id).collect()),
                );
            }
        }
        let mut keys: Vec<String> = settled.keys().map(|t| self.cfg.key(t)).collect();
        let mut out_index: HashMap<&str, usize> = HashMap::new();
        for o in &commit.outputs {
            if !out_index.contains_key(o.topic.as_str()) {
                keys.push(self.cfg.key(&o.topic));
                out_index.insert(&o.topic, keys.len());
            }
        }
        let mut inv = self.commit.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(&self.group)
            .arg(&self.cfg.consumer)
            .arg(self.cfg.maxlen.map_or(String::new(), |n| n.to_string()))
            .arg(settled.len());
        for (_, ids) in settled.values() {
            inv.arg(ids.len()).arg(ids);
        }
        inv.arg(commit.outputs.len());
        for o in &commit.outputs {
            let f = super::fields(&o.record);
            // maxlen caps outputs, not the dead letters and retries weir must keep.
            let capped = !self.uncapped.contains(o.topic.as_str());
            inv.arg(out_index[o.topic.as_str()])
                .arg(if capped { "1" } else { "0" })
                .arg(f.len());
            for (n, v) in f {
                inv.arg(n).arg(v);
            }
        }
        // Safe to run again after a lost answer when it settles entries: the script checks
        // ownership before it writes, and one that went through acked them all (code 2). Outputs
        // alone (at-most-once) are sent once: a retry could write them twice.
        let (done, which): (i64, i64) = if settled.is_empty() {
            self.conns
                .once(&mut |c| inv.invoke(c))
                .map_err(|e| error("committing outputs", e))?
        } else {
            self.conns
                .with("committing (outputs and acks)", |c| inv.invoke(c))?
        };
        let mut st = self.streams.lock().expect("streams");
        match done {
            1 | 2 => {
                for (t, (seqs, _)) in settled {
                    st.entry(t).or_default().receipts.settle(seqs);
                }
                Ok(())
            }
            0 => {
                // Another consumer took one of the entries over (this one stalled past
                // claim-idle), or an earlier try of this commit went through: nothing was
                // written; the partition starts over.
                let topic = settled
                    .keys()
                    .nth((which - 1).max(0) as usize)
                    .cloned()
                    .unwrap_or_default();
                let back = st.entry(topic.clone()).or_default().receipts.lost(GEN);
                drop(st);
                tracing::warn!(topic = %topic, held = back.len(), "an entry of this commit is no longer this consumer's; the partition starts over");
                if let Err(e) = self.touch(&topic, &back, self.cfg.claim_idle.as_millis() as u64) {
                    tracing::warn!(error = %e, "giving back held entries failed; they return after claim-idle");
                }
                Err(SourceError::Lost { topic })
            }
            _ => Err(error(
                "committing",
                format!(
                    "`{}` is not a stream; outputs go to streams",
                    keys.get((which - 1).max(0) as usize)
                        .cloned()
                        .unwrap_or_default()
                ),
            )),
        }
    }

    fn topic_exists(&self, topic: &str) -> bool {
        if self.known.lock().expect("known").contains(topic) {
            return true;
        }
        let key = self.cfg.key(topic);
        let t: Result<String, _> = self.conns.with("looking up a stream", |c| {
            redis::cmd("TYPE").arg(&key).query(c)
        });
        let ok = t.is_ok_and(|t| t == "stream");
        if ok {
            self.known.lock().expect("known").insert(topic.to_string());
        }
        ok
    }

    fn fits(&self, record: &Record) -> Result<(), String> {
        super::fits(record)
    }

    fn ensure_topic(&self, topic: &str, _partitions: u32) -> Result<(), SourceError> {
        if self.topic_exists(topic) {
            return Ok(());
        }
        super::broker::create_stream(&self.conns, &self.cfg.key(topic), true)?;
        self.known.lock().expect("known").insert(topic.to_string());
        Ok(())
    }

    fn dedupe_done(&self, _group: &str, _key: &[u8], _now_ms: u64) -> Result<bool, SourceError> {
        Err(SourceError::Invalid(
            "--dedupe on Redis Streams needs a shared store: add --dedupe-store redis://host:port"
                .into(),
        ))
    }

    fn evict_dedupe(&self, _now_ms: u64, _max: usize) -> Result<usize, SourceError> {
        Ok(0)
    }

    /// Gives back what the ended partition held and what its buffer read: their idle time set
    /// to `claim-idle`, so the next `XAUTOCLAIM` of any consumer takes them at once.
    fn release(&self, topic: &str, _partition: u32) {
        let ids: Vec<String> = {
            let mut st = self.streams.lock().expect("streams");
            let s = st.entry(topic.to_string()).or_default();
            let mut ids = s.receipts.release(GEN);
            ids.extend(s.buffer.drain(..).map(|(id, ..)| id));
            s.claimed_at = None;
            s.claim_cursor = "0-0".into();
            ids
        };
        if self.opts.at_most_once {
            return;
        }
        match self.touch(topic, &ids, self.cfg.claim_idle.as_millis() as u64) {
            Ok(n) => tracing::debug!(topic, given_back = n, "released held entries"),
            Err(e) => {
                tracing::warn!(topic, error = %e, "giving back held entries failed; they return after claim-idle")
            }
        }
    }

    /// Renews the entries the engine holds, and those read but not handed to it yet.
    fn extend(&self, topic: &str, _partition: u32, offsets: &[u64]) -> Result<(), SourceError> {
        let ids: Vec<String> = {
            let st = self.streams.lock().expect("streams");
            st.get(topic).map_or(Vec::new(), |s| {
                s.receipts
                    .peek(GEN, offsets)
                    .into_iter()
                    .map(|(_, id)| id)
                    .chain(s.buffer.iter().map(|(id, ..)| id.clone()))
                    .collect()
            })
        };
        self.touch(topic, &ids, 0).map(|_| ())
    }

    fn lag_note(&self) -> Option<String> {
        let mut note = "lag counts the group's undelivered entries and every consumer's pending ones (XINFO GROUPS)".to_string();
        if self.lag_unknown.load(std::sync::atomic::Ordering::Relaxed) {
            note.push_str("; Redis could not say the lag (entries were deleted): weir counts the entries after the group's last delivered one, up to 10,000");
        }
        Some(note)
    }
}
