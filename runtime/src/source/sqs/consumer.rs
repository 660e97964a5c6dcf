//! What `weir run` consumes through on SQS: background receivers that long poll each consumed
//! queue into a buffer (never more held and buffered than `--max-in-flight`), per-message
//! settling by receipt handle.

mod hand;

use super::client::{self, Outgoing, RETRY_FOR};
use super::receive::{Queue, Topic, group_id, receiver};
use super::{SqsConfig, error};
use crate::source::connect::ConsumerOptions;
use crate::source::rt::Rt;
use crate::source::{Capabilities, Commit, Delivery, Output, Record, Source, SourceError};
use aws_sdk_sqs::Client;
use sha2::Digest;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Receipt handles outlive a connection: one generation.
const GEN: u64 = 0;

/// How long `fetch` waits for a receiver when nothing is buffered: the engine's loop waits in
/// it, so a long wait would hold up its finished jobs and commits.
const FETCH_WAIT: Duration = Duration::from_millis(100);

pub struct SqsSource {
    cfg: SqsConfig,
    opts: ConsumerOptions,
    rt: Rt,
    client: Client,
    topics: HashMap<String, Arc<Topic>>,
    /// Queue URLs of topics (outputs, dead letters) by topic.
    urls: Mutex<HashMap<String, String>>,
    lease: Duration,
    stop: Arc<AtomicBool>,
    /// Each queue's depth, as last read, and when: read at most once a second (a drain asks
    /// after every empty fetch; SQS's counts are approximate anyway, and each call costs).
    depths: Mutex<HashMap<String, (Instant, u64)>>,
}

/// How long a queue's depth is reused.
const DEPTH_FOR: Duration = Duration::from_secs(1);

impl SqsSource {
    /// Connects, finds every consumed queue (its URL and visibility timeout: the lease) and
    /// starts its receivers. (Requeue mode needs no retry queue: a retry is a visibility change.)
    pub fn start(cfg: SqsConfig, opts: &ConsumerOptions) -> Result<SqsSource, SourceError> {
        let rt = Rt::new("weir-sqs").map_err(|e| error("starting the SQS runtime", e))?;
        let c = cfg.clone();
        let client = rt.run(async move { client::connect(&c).await })?;
        let mut topics = HashMap::new();
        let mut urls = HashMap::new();
        let mut lease = Duration::from_secs(12 * 3600);
        for t in &opts.topics {
            let (cl, name, topic) = (client.clone(), cfg.queue(t), t.clone());
            let (url, attrs) = rt.run(async move {
                let url = client::queue_url(&cl, &name)
                    .await?
                    .ok_or(SourceError::UnknownTopic(topic))?;
                let attrs = client::attributes(&cl, &url).await?;
                Ok::<_, SourceError>((url, attrs))
            })?;
            let visibility = attrs
                .get("VisibilityTimeout")
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(Duration::from_secs(30), Duration::from_secs);
            lease = lease.min(visibility.max(Duration::from_secs(1)));
            if let Some(p) = attrs.get("RedrivePolicy") {
                tracing::info!(queue = %cfg.queue(t), policy = %p, "the queue has a redrive policy: SQS moves a message to its dead-letter queue after maxReceiveCount receives, whatever weir's --max-attempts says; keep it above --max-attempts, as a safety net");
            }
            urls.insert(t.clone(), url.clone());
            topics.insert(
                t.clone(),
                Arc::new(Topic {
                    url,
                    state: Mutex::new(Queue::default()),
                    reserved: AtomicUsize::new(0),
                    arrived: tokio::sync::Notify::new(),
                    room: tokio::sync::Notify::new(),
                    failing: Mutex::new(None),
                }),
            );
        }
        let s = SqsSource {
            cfg,
            opts: opts.clone(),
            rt,
            client,
            topics,
            urls: Mutex::new(urls),
            lease,
            stop: Arc::new(AtomicBool::new(false)),
            depths: Mutex::new(HashMap::new()),
        };
        for t in s.topics.values() {
            for _ in 0..s.cfg.receivers {
                s.rt.handle().spawn(receiver(
                    s.client.clone(),
                    t.clone(),
                    s.opts.prefetch.max(10),
                    s.cfg.wait,
                    lease,
                    s.stop.clone(),
                ));
            }
        }
        Ok(s)
    }

    fn topic(&self, topic: &str) -> Result<&Arc<Topic>, SourceError> {
        self.topics
            .get(topic)
            .ok_or_else(|| SourceError::Invalid(format!("`{topic}` is not a consumed queue")))
    }

    /// The URL of `topic`'s queue, looked up once.
    fn url(&self, topic: &str) -> Result<String, SourceError> {
        if let Some(u) = self.urls.lock().expect("urls").get(topic) {
            return Ok(u.clone());
        }
        let (cl, name) = (self.client.clone(), self.cfg.queue(topic));
        let url = self
            .rt
            .run(async move { client::queue_url(&cl, &name).await })?
            .ok_or_else(|| SourceError::UnknownTopic(topic.to_string()))?;
        // A caller's reply queue lives for one call: not kept.
        if !super::request::is_reply_queue(topic) {
            self.urls
                .lock()
                .expect("urls")
                .insert(topic.to_string(), url.clone());
        }
        Ok(url)
    }

    /// A FIFO output's group (its key, where SQS takes it as one) and deduplication id (from
    /// the input message it came from and its place among that message's outputs, so a
    /// republished output is dropped by SQS within its 5-minute window).
    fn fifo_ids(&self, outputs: &[Output], origins: &[Option<(Arc<str>, u64)>]) -> Vec<Outgoing> {
        let mut nth: HashMap<(&str, u64), usize> = HashMap::new();
        outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let message = super::encode(&o.record);
                if !self.cfg.fifo {
                    return Outgoing {
                        message,
                        group: None,
                        dedupe_id: None,
                    };
                }
                let origin = origins
                    .get(i)
                    .and_then(|o| o.as_ref())
                    .and_then(|(t, off)| {
                        let n = nth.entry((t, *off)).or_default();
                        let place = *n;
                        *n += 1;
                        let q = self.topics.get(&**t)?.state.lock().expect("state");
                        let id = q.receipts.peek(GEN, &[*off]).pop()?.1.id;
                        Some(format!("{}:{t}:{id}:{place}", self.opts.group))
                    });
                let dedupe = match origin {
                    Some(o) => hex::encode(sha2::Sha256::digest(o.as_bytes())),
                    None => hex::encode(rand::random::<[u8; 16]>()),
                };
                Outgoing {
                    group: Some(group_id(o.record.key.as_deref()).unwrap_or(dedupe.clone())),
                    dedupe_id: Some(dedupe),
                    message,
                }
            })
            .collect()
    }
}

impl Source for SqsSource {
    fn capabilities(&self) -> Capabilities {
        self.cfg.capabilities(self.lease)
    }

    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        self.url(topic).map(|_| 1)
    }

    fn committed(&self, _group: &str, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        Ok(self
            .topics
            .get(topic)
            .map_or(0, |t| t.state.lock().expect("state").receipts.committed()))
    }

    /// This process's deliveries and buffer, plus what waits in the queue (visible, in flight
    /// elsewhere, delayed; SQS's approximate counts).
    fn end_offset(&self, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let cached = self
            .depths
            .lock()
            .expect("depths")
            .get(topic)
            .filter(|(at, _)| at.elapsed() < DEPTH_FOR)
            .map(|(_, d)| *d);
        let depth = match cached {
            Some(d) => d,
            None => {
                let url = self.url(topic)?;
                let cl = self.client.clone();
                let attrs = self
                    .rt
                    .run(async move { client::attributes(&cl, &url).await })?;
                let d = client::depth(&attrs);
                self.depths
                    .lock()
                    .expect("depths")
                    .insert(topic.to_string(), (Instant::now(), d));
                d
            }
        };
        let (handed, mine) = self.topics.get(topic).map_or((0, 0), |t| {
            let q = t.state.lock().expect("state");
            // (A receive in flight is not counted as this process's: what it takes is in
            // flight in the queue's count until it is buffered, so a drain waits for it.)
            let b = q.buffer.len() as u64;
            (q.receipts.next_seq() + b, q.receipts.held() as u64 + b)
        });
        Ok(handed + depth.saturating_sub(mine))
    }

    fn fetch(
        &self,
        topic: &str,
        _partition: u32,
        _from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let t = self.topic(topic)?.clone();
        {
            let mut q = t.state.lock().expect("state");
            if q.receipts.check(GEN).is_err() {
                return Err(SourceError::Lost {
                    topic: topic.to_string(),
                });
            }
            if q.buffer.is_empty() {
                drop(q);
                let w = t.clone();
                self.rt.run(async move {
                    let _ = tokio::time::timeout(FETCH_WAIT, w.arrived.notified()).await;
                });
            }
        }
        let taken = self.take(&t, max.max(1), max_bytes);
        let out = self.issue(topic, &t, self.prepare(&t, taken)?);
        if out.is_empty()
            && let Some((since, e, transient)) = t.failing.lock().expect("failing").clone()
            && (!transient || since.elapsed() >= RETRY_FOR)
        {
            return Err(error(
                &format!("receiving from {}", self.cfg.queue(topic)),
                e,
            ));
        }
        Ok(out)
    }

    fn commit(&self, _group: &str, commit: Commit) -> Result<(), SourceError> {
        if !commit.replayed.is_empty() || !commit.dedupe_done.is_empty() {
            return Err(SourceError::Invalid(
                "replay marks and dedupe marks are not kept on SQS".into(),
            ));
        }
        // Per consumed topic: the sequence numbers settled, their handles, and the delayed ones.
        type Settling = (Vec<u64>, Vec<String>, Vec<(String, Duration)>);
        let mut settle: BTreeMap<String, Settling> = BTreeMap::new();
        if !self.opts.at_most_once {
            let mut by: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
            for (t, _, seq) in &commit.settled {
                by.entry(t).or_default().push(*seq);
            }
            for (t, seqs) in by {
                let r = self
                    .topic(t)?
                    .state
                    .lock()
                    .expect("state")
                    .receipts
                    .get(GEN, &seqs)
                    .map_err(|_| SourceError::Lost {
                        topic: t.to_string(),
                    })?;
                let e = settle.entry(t.to_string()).or_default();
                e.1.extend(r.into_iter().map(|(_, r)| r.handle));
                e.0.extend(seqs);
            }
            for (t, _, seq, delay) in &commit.delayed {
                let r = self
                    .topic(t)?
                    .state
                    .lock()
                    .expect("state")
                    .receipts
                    .get(GEN, &[*seq])
                    .map_err(|_| SourceError::Lost {
                        topic: t.to_string(),
                    })?;
                let e = settle.entry(t.to_string()).or_default();
                e.2.extend(r.into_iter().map(|(_, r)| (r.handle, *delay)));
                e.0.push(*seq);
            }
        }
        // The outputs by destination queue, in order.
        let outgoing = self.fifo_ids(&commit.outputs, &commit.origins);
        // (url, messages, whether a failure drops them: an answer to a caller's reply queue,
        // which the caller deletes when it stops waiting; a caller that gave up costs its
        // answer, never the commit.)
        let mut by_queue: Vec<(String, Vec<Outgoing>, bool)> = Vec::new();
        for (o, m) in commit.outputs.iter().zip(outgoing) {
            let reply = super::request::is_reply_queue(&o.topic);
            let url = match self.url(&o.topic) {
                Ok(u) => u,
                Err(SourceError::UnknownTopic(_)) if reply => {
                    tracing::warn!(queue = %o.topic, "SQS: the caller's reply queue is gone (it stopped waiting): answer dropped");
                    continue;
                }
                Err(e) => return Err(e),
            };
            match by_queue.iter_mut().find(|(u, _, _)| *u == url) {
                Some((_, v, _)) => v.push(m),
                None => by_queue.push((url, vec![m], reply)),
            }
        }
        // Per queue URL: the handles to delete and those to delay.
        type Deleting = (String, Vec<String>, Vec<(String, Duration)>);
        let settling: Vec<Deleting> = settle
            .iter()
            .map(|(t, (_, h, d))| Ok((self.topic(t)?.url.clone(), h.clone(), d.clone())))
            .collect::<Result<_, SourceError>>()?;
        // Marked as settling before any call: a renewal meanwhile must not reset a delayed
        // message's visibility to a whole lease after the commit set it to the backoff.
        for (t, (seqs, _, _)) in &settle {
            let mut q = self.topic(t)?.state.lock().expect("state");
            q.settling.extend(seqs.iter().copied());
        }
        let cl = self.client.clone();
        let begun = Instant::now();
        let (n_out, n_settle) = (commit.outputs.len(), commit.settled.len());
        // Outputs first, each batch accepted before any input is deleted.
        let sent = self.rt.run(async move {
            for (url, msgs, reply) in &by_queue {
                match client::send(&cl, url, msgs).await {
                    Ok(()) => {}
                    Err(e) if *reply => {
                        tracing::warn!(error = %e, "SQS: an answer to a caller's reply queue was not sent (the caller stopped waiting?): dropped");
                    }
                    Err(e) => return Err(e),
                }
            }
            for (url, handles, delayed) in &settling {
                let refused = client::delete(&cl, url, handles).await?;
                if !refused.is_empty() {
                    tracing::warn!(refused = ?refused, "SQS did not delete some handled messages (their visibility ran out and they were received again): they run again");
                }
                let refused = client::change_visibility(&cl, url, delayed).await?;
                if !refused.is_empty() {
                    tracing::warn!(refused = ?refused, "SQS did not delay some retries; they come back after the queue's visibility timeout");
                }
            }
            Ok::<_, SourceError>(())
        });
        tracing::debug!(outputs = n_out, settled = n_settle, took = ?begun.elapsed(), "SQS commit");
        for (t, (seqs, _, _)) in settle {
            let t = self.topic(&t)?;
            let mut q = t.state.lock().expect("state");
            for s in &seqs {
                q.until.remove(s);
                q.settling.remove(s);
            }
            if sent.is_ok() {
                q.receipts.settle(seqs);
            }
            drop(q);
            t.room.notify_waiters();
        }
        sent
    }

    fn topic_exists(&self, topic: &str) -> bool {
        self.url(topic).is_ok()
    }

    fn fits(&self, record: &Record) -> Result<(), String> {
        super::check(record)
    }

    fn ensure_topic(&self, topic: &str, _partitions: u32) -> Result<(), SourceError> {
        if self.topic_exists(topic) {
            return Ok(());
        }
        let (cl, name, vis) = (
            self.client.clone(),
            self.cfg.queue(topic),
            self.cfg.visibility,
        );
        self.rt
            .run(async move { client::create_queue(&cl, &name, vis).await })?;
        Ok(())
    }

    fn dedupe_done(&self, _group: &str, _key: &[u8], _now_ms: u64) -> Result<bool, SourceError> {
        Err(SourceError::Invalid(
            "--dedupe on SQS needs a shared store: add --dedupe-store redis://host:port".into(),
        ))
    }

    fn evict_dedupe(&self, _now_ms: u64, _max: usize) -> Result<usize, SourceError> {
        Ok(0)
    }

    fn lag_note(&self) -> Option<String> {
        Some("SQS's message counts are approximate (on AWS they can trail by a minute)".into())
    }

    /// Makes what the ended partition held or buffered visible again at once, for this
    /// process or another.
    fn release(&self, topic: &str, _partition: u32) {
        let Some(t) = self.topics.get(topic) else {
            return;
        };
        let back: Vec<(String, Duration)> = {
            let mut q = t.state.lock().expect("state");
            q.until.clear();
            let mut back: Vec<String> = q
                .receipts
                .release(GEN)
                .into_iter()
                .map(|r| r.handle)
                .collect();
            back.extend(q.buffer.drain(..).map(|b| b.msg.handle));
            back.into_iter().map(|h| (h, Duration::ZERO)).collect()
        };
        t.room.notify_waiters();
        // (At-most-once holds nothing: what it handed over was deleted.)
        if back.is_empty() {
            return;
        }
        let (cl, url) = (self.client.clone(), t.url.clone());
        if let Err(e) = self
            .rt
            .run(async move { client::change_visibility(&cl, &url, &back).await })
        {
            tracing::warn!(topic, error = %e, "handing back held messages failed; they return after the visibility timeout");
        }
    }

    /// Extends the visibility of the held messages, and of those buffered, by the lease; those
    /// with more than two thirds of one left are skipped (the engine asks every third of it:
    /// each message is extended about once a lease rather than three times, and each call
    /// costs), and so are those a commit is settling.
    fn extend(&self, topic: &str, _partition: u32, offsets: &[u64]) -> Result<(), SourceError> {
        let Some(t) = self.topics.get(topic) else {
            return Ok(());
        };
        let lease = self.lease;
        let now = Instant::now();
        let due = |until: Instant| until.saturating_duration_since(now) <= lease * 2 / 3;
        // (sequence number or None for a buffered one, handle)
        let (which, handles): (Vec<Option<u64>>, Vec<(String, Duration)>) = {
            let q = t.state.lock().expect("state");
            let mut which = Vec::new();
            let mut h = Vec::new();
            for (seq, r) in q.receipts.peek(GEN, offsets) {
                let until = q.until.get(&seq).copied().unwrap_or(now);
                if due(until) && !q.settling.contains(&seq) {
                    which.push(Some(seq));
                    h.push((r.handle, lease));
                }
            }
            for b in q.buffer.iter() {
                if due(b.visible_until) {
                    which.push(None);
                    h.push((b.msg.handle.clone(), lease));
                }
            }
            (which, h)
        };
        if handles.is_empty() {
            return Ok(());
        }
        let (cl, url) = (self.client.clone(), t.url.clone());
        let sent: Vec<String> = handles.iter().map(|(h, _)| h.clone()).collect();
        let refused = self
            .rt
            .run(async move { client::change_visibility(&cl, &url, &handles).await })?;
        let failed: HashSet<usize> = refused.iter().map(|(i, _)| *i).collect();
        if !refused.is_empty() {
            // A message settled meanwhile (its handle gone with it), or one whose visibility
            // ran out (it comes back, and runs again).
            tracing::debug!(topic, refused = refused.len(), first = ?refused.first(), "SQS did not extend the visibility of some held messages");
        }
        // Only what was extended counts as extended.
        let mut q = t.state.lock().expect("state");
        let until = now + lease;
        let done: HashSet<&str> = sent
            .iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains(i))
            .map(|(_, h)| h.as_str())
            .collect();
        for (i, w) in which.iter().enumerate() {
            if let Some(seq) = w
                && !failed.contains(&i)
                && let Some(u) = q.until.get_mut(seq)
            {
                *u = until;
            }
        }
        for b in q.buffer.iter_mut() {
            if done.contains(b.msg.handle.as_str()) {
                b.visible_until = until;
            }
        }
        Ok(())
    }
}

impl Drop for SqsSource {
    /// Stops the receivers and makes what they buffered visible again.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for topic in self.topics.keys().cloned().collect::<Vec<_>>() {
            self.release(&topic, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_group_ids() {
        assert_eq!(group_id(None), None);
        assert_eq!(group_id(Some(b"customer-7")).as_deref(), Some("customer-7"));
        let odd = group_id(Some("ä b".as_bytes())).unwrap();
        assert!(odd.starts_with("k-") && odd.len() == 66, "{odd}");
        assert_ne!(odd, group_id(Some(b"a b")).unwrap());
        assert!(group_id(Some(&[b'a'; 129])).unwrap().starts_with("k-"));
    }
}
