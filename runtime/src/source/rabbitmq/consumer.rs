//! RabbitMQ as the engine's [`Source`]: one consumer per queue, each on a channel of its own,
//! deliveries buffered until the engine fetches them, each acked by its tag once it finished.
//!
//! ```text
//!  supervisor task ── basic.consume per queue ──▶ buffers ──fetch──▶ engine (seq = offset)
//!   (reconnects; a new link drops what the              │
//!    old one buffered: the broker requeued it)          └─commit──▶ outputs, confirmed
//!                                                                    (or tx), then acks
//! ```
//!
//! - Prefetch (`basic.qos`) is the run's in-flight bound, so the broker never hands over more
//!   than the engine may hold.
//! - A link (connection + channels) has a generation. Receipts of an older generation are never
//!   used: the broker requeued those messages when their channel closed, and another delivery
//!   of each will come. A fetch or a commit that meets one voids every receipt of the lost link
//!   and reports [`SourceError::Lost`]: the engine starts the partition over, and nothing of the
//!   lost link is acked or published (its messages run again, and their outputs are published
//!   once, with them).
//! - Each consumed queue (a partition to the engine, `<topic>.retry` included) has its own
//!   channel, so its delivery tags, acks and transaction are its own: a commit of one queue can
//!   never ack, nor commit, another's messages (a `multiple` ack or a `tx.commit` on a shared
//!   channel did, before their outputs were published).
//! - `--exactly-once`: each queue's channel is in `tx` mode; a commit publishes the outputs and
//!   acks their inputs in one transaction. Outputs are published `mandatory`, and every queue
//!   they go to is looked up before the commit: a queue deleted under the run stops it with
//!   nothing of that commit acked, instead of its outputs dropped and their inputs acked.
//! - At-most-once: each fetch acks what it hands over before the engine runs it (not
//!   auto-ack, which RabbitMQ does not bound by the prefetch); nothing is settled after.

use super::broker::{declare, depth};
use super::fanout;
use super::link::{Buffered, Link, forget, open, supervise};
use super::settle::settle_on;
use super::{AmqpConfig, broker_error};
use crate::source::connect::ConsumerOptions;
use crate::source::receipts::Receipts;
use crate::source::rt::Rt;
use crate::source::{Capabilities, Commit, Delivery, Record, Source, SourceError};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How long a commit waits for the broker to come back before the run stops.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct Queue {
    pub(super) buffer: VecDeque<Buffered>,
    pub(super) buffered_bytes: usize,
    /// Sequence number to delivery tag, per link generation.
    pub(super) receipts: Receipts<u64>,
    /// The tags of the current link's channel for this queue, handed over and not acked.
    pub(super) outstanding: BTreeSet<u64>,
    /// Redelivered messages whose counted copies are being published ([`recount_on`]):
    /// neither ready nor buffered meanwhile, so the queue is not at its end.
    pub(super) recounting: usize,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) queues: HashMap<String, Queue>,
    /// The current link's generation.
    pub(super) generation: u64,
    /// Set when the consumer cannot go on (its queue was deleted): fetch reports it.
    pub(super) failed: Option<String>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) link: watch::Sender<Option<Arc<Link>>>,
    pub(super) signal: Arc<Notify>,
    pub(super) known: Mutex<HashSet<String>>,
    /// The topics known to be fanout exchanges (outputs go to the exchange).
    pub(super) fanouts: Mutex<HashSet<String>>,
    /// The queue each consumed topic is read from where it is not the topic's own: a
    /// fanout topic's group queue.
    pub(super) group_queues: HashMap<String, String>,
    pub(super) stopping: AtomicBool,
    /// A queue's consumer was cancelled by [`Source::release`] (a stop): the supervisor does
    /// not take the end of every consumer for a lost link.
    pub(super) released: AtomicBool,
}

impl Shared {
    /// The queue consumed topic `topic` is read from.
    pub(super) fn queue<'a>(&'a self, topic: &'a str) -> &'a str {
        self.group_queues.get(topic).map_or(topic, String::as_str)
    }
}

/// RabbitMQ as the engine consumes it.
pub struct RabbitSource {
    pub(super) shared: Arc<Shared>,
    cfg: AmqpConfig,
    pub(super) opts: ConsumerOptions,
    // Last: the runtime goes when everything that runs on it has.
    pub(super) rt: Rt,
}

impl RabbitSource {
    /// Connects and starts consuming `opts.topics`; a queue that does not exist is an error.
    pub fn start(cfg: AmqpConfig, opts: &ConsumerOptions) -> Result<RabbitSource, SourceError> {
        let rt = Rt::new("weir-amqp").map_err(|e| broker_error("starting the AMQP runtime", e))?;
        let (queues, fanouts) = {
            let (cfg, opts) = (cfg.clone(), opts.clone());
            rt.run(async move { fanout::group_queues(&cfg, &opts).await })?
        };
        let (link_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            link: link_tx,
            signal: Arc::new(Notify::new()),
            known: Mutex::new(
                opts.topics
                    .iter()
                    .chain(&opts.retry_topics)
                    .cloned()
                    .collect(),
            ),
            fanouts: Mutex::new(fanouts),
            group_queues: queues,
            stopping: AtomicBool::new(false),
            released: AtomicBool::new(false),
        });
        let first = {
            let (cfg, opts, sh) = (cfg.clone(), opts.clone(), shared.clone());
            rt.run(async move { open(&cfg, &opts, &sh.group_queues, 1).await })?
        };
        rt.handle()
            .spawn(supervise(shared.clone(), cfg.clone(), opts.clone(), first));
        Ok(RabbitSource {
            shared,
            cfg,
            opts: opts.clone(),
            rt,
        })
    }

    /// The current link, waiting up to [`RECONNECT_FOR`] for one.
    async fn link(shared: &Shared) -> Result<Arc<Link>, SourceError> {
        let mut rx = shared.link.subscribe();
        let got = tokio::time::timeout(RECONNECT_FOR, rx.wait_for(|l| l.is_some())).await;
        match got {
            Ok(Ok(l)) => Ok(l.clone().expect("waited for Some")),
            _ => Err(broker_error(
                "RabbitMQ",
                format!(
                    "not reachable for {}s; stopping with the unfinished messages unacked (the broker redelivers them)",
                    RECONNECT_FOR.as_secs()
                ),
            )),
        }
    }

    fn ready(&self, queue: &str) -> Result<u64, SourceError> {
        let (shared, q) = (self.shared.clone(), queue.to_string());
        let ready = self.rt.run(async move {
            // A link that breaks under the question is waited out (up to RECONNECT_FOR), not
            // reported: a lost link costs a reconnect, not the run.
            let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
            let q = shared.queue(&q).to_string();
            loop {
                let link = Self::link(&shared).await?;
                match depth(&link.conn, &q).await {
                    Ok(r) => return Ok(r),
                    Err(_)
                        if !link.conn.status().connected()
                            && tokio::time::Instant::now() < deadline =>
                    {
                        forget(&shared, &link);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        })?;
        ready
            .map(u64::from)
            .ok_or_else(|| SourceError::UnknownTopic(queue.to_string()))
    }
}

impl Drop for RabbitSource {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Close the connection politely: the broker requeues what was not acked either way.
        // Not `if let Some(..) = ..borrow().clone()`: that keeps the watch's read guard for the
        // whole block, and the supervisor, seeing the connection close, waits for the write
        // lock on the one thread that would run the close (a deadlock seen in the tests).
        let link = self.shared.link.borrow().clone();
        if let Some(link) = link {
            let _ = self.rt.run(async move {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    link.conn.close(200, "weir stopping".into()),
                )
                .await
            });
        }
    }
}

impl Source for RabbitSource {
    fn capabilities(&self) -> Capabilities {
        super::CAPABILITIES
    }

    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        self.ready(topic).map(|_| 1)
    }

    fn committed(&self, _group: &str, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let st = self.shared.state.lock().expect("state");
        Ok(st.queues.get(topic).map_or(0, |q| q.receipts.committed()))
    }

    fn end_offset(&self, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        if let Some(m) = self.cfg.management.clone() {
            let q = self.shared.queue(topic).to_string();
            match self.rt.run(async move { m.depth(&q).await }) {
                // Every consumer's unacked messages, this process's among them.
                Ok(Some((ready, unacked))) => {
                    return Ok(self.committed("", topic, 0)? + ready + unacked);
                }
                Ok(None) => return Err(SourceError::UnknownTopic(topic.to_string())),
                Err(e) => {
                    tracing::debug!(error = %e, "the management API did not answer; depth from AMQP")
                }
            }
        }
        let ready = self.ready(topic)?;
        let st = self.shared.state.lock().expect("state");
        Ok(st
            .queues
            .get(topic)
            .map_or(0, |q| q.receipts.next_seq() + q.buffer.len() as u64)
            + ready)
    }

    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        _from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let mut st = self.shared.state.lock().expect("state");
        if let Some(why) = &st.failed {
            return Err(broker_error("consuming", why));
        }
        let name: Arc<str> = Arc::from(topic);
        let generation = st.generation;
        let q = st.queues.entry(topic.to_string()).or_default();
        // The partition holds messages of a link that is gone: it must start over before it
        // gets any of the new link's, or one commit could mix the two.
        if q.receipts.check(generation).is_err() {
            return Err(SourceError::Lost {
                topic: topic.to_string(),
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut last_tag = None;
        while out.len() < max && (out.is_empty() || bytes < max_bytes) {
            let Some(b) = q.buffer.pop_front() else { break };
            let size = crate::source::wire_size(&b.record);
            q.buffered_bytes -= size;
            if b.generation != generation {
                // Buffered by a link that broke before the buffers were cleared: the broker
                // delivers it again.
                continue;
            }
            bytes += size;
            let seq = if self.opts.at_most_once {
                last_tag = Some(b.tag);
                q.receipts.issue_settled()
            } else {
                q.receipts.issue(b.generation, b.tag)
            };
            out.push(Delivery {
                topic: name.clone(),
                partition,
                offset: seq,
                record: b.record,
                redeliveries: b.redeliveries,
            });
        }
        drop(st);
        if let Some(tag) = last_tag
            && !self.ack_handed_over(topic, generation, tag)
        {
            // The ack did not go out: the link is gone, and the broker hands these messages
            // out again. Running them now could run them twice.
            return Ok(Vec::new());
        }
        Ok(out)
    }

    fn at_end(&self, topic: &str, _partition: u32, _next: u64) -> Result<bool, SourceError> {
        {
            let st = self.shared.state.lock().expect("state");
            if st
                .queues
                .get(topic)
                .is_some_and(|q| !q.buffer.is_empty() || q.recounting > 0)
            {
                return Ok(false);
            }
        }
        Ok(self.ready(topic)? == 0)
    }

    fn transactional(&self) -> bool {
        self.opts.exactly_once
    }

    fn commit(&self, _group: &str, commit: Commit) -> Result<(), SourceError> {
        if !commit.replayed.is_empty() || !commit.dedupe_done.is_empty() {
            return Err(SourceError::Invalid(
                "dead-letter replay marks and dedupe marks are not kept on RabbitMQ".into(),
            ));
        }
        if commit.outputs.is_empty() && commit.settled.is_empty() {
            return Ok(());
        }
        // The queue whose messages this commit settles: the engine commits one partition (one
        // queue) at a time, so they are all of one, and its channel acks them. (A commit of
        // outputs alone, before their done marks and acks, names none: it needs no channel.)
        let queue: Option<String> = commit
            .settled
            .first()
            .or(commit.offsets.first())
            .map(|(t, _, _)| t.to_string());
        let (shared, tx) = (self.shared.clone(), self.opts.exactly_once);
        if self.opts.at_most_once {
            // Acked when fetched: no receipts; only the outputs go out.
            return self.rt.run(async move {
                let link = Self::link(&shared).await?;
                settle_on(
                    &shared,
                    &link,
                    None,
                    &commit.outputs,
                    Vec::new(),
                    false,
                    false,
                )
                .await
            });
        }
        // The receipts to ack. One of a lost link (or voided already) voids them all: the
        // broker delivers those messages again, so nothing of this commit may be published.
        let (receipts, generation) = {
            let mut st = self.shared.state.lock().expect("state");
            let generation = st.generation;
            let mut r = Vec::new();
            if let Some(queue) = &queue {
                let q = st.queues.entry(queue.clone()).or_default();
                let seqs: Vec<u64> = commit.settled.iter().map(|(_, _, s)| *s).collect();
                r = q
                    .receipts
                    .get(generation, &seqs)
                    .map_err(|_| SourceError::Lost {
                        topic: queue.clone(),
                    })?;
            }
            (r, generation)
        };
        self.rt.run(async move {
            let link = Self::link(&shared).await?;
            let lost = |shared: &Shared| {
                let mut st = shared.state.lock().expect("state");
                if let Some(q) = queue.as_ref().and_then(|q| st.queues.get_mut(q)) {
                    q.receipts.lost(generation);
                }
                SourceError::Lost {
                    topic: queue.clone().unwrap_or_default(),
                }
            };
            if link.generation != generation && !receipts.is_empty() {
                return Err(lost(&shared));
            }
            let tags: Vec<u64> = receipts.iter().map(|(_, t)| *t).collect();
            let r = settle_on(
                &shared,
                &link,
                queue.as_deref(),
                &commit.outputs,
                tags,
                tx,
                true,
            )
            .await;
            let channel_up = queue
                .as_ref()
                .is_none_or(|q| link.channels.get(q).is_some_and(|c| c.status().connected()));
            match r {
                Ok(()) => {
                    let mut st = shared.state.lock().expect("state");
                    if let Some(q) = queue.as_ref().and_then(|q| st.queues.get_mut(q)) {
                        q.receipts.settle(receipts.iter().map(|(seq, _)| *seq));
                    }
                    Ok(())
                }
                Err(e) if !link.conn.status().connected() || !channel_up => {
                    // The link broke under the commit: its receipts are void (the broker
                    // requeues what it did not ack), and nothing of it is published again.
                    tracing::warn!(error = %e, "commit interrupted by a lost link; its messages are delivered again");
                    forget(&shared, &link);
                    Err(lost(&shared))
                }
                Err(e) => Err(e),
            }
        })
    }

    fn topic_exists(&self, topic: &str) -> bool {
        // A caller's exclusive reply queue cannot be looked up from here; an answer to one
        // that is gone is dropped (published without `mandatory`).
        if fanout::is_reply_queue(topic) || self.shared.known.lock().expect("known").contains(topic)
        {
            return true;
        }
        // Only the broker's "no such queue" says no: a lost link is not a missing queue (the
        // commit finds out, and waits for the link), or a handler's outputs would fail as
        // invalid and be dead-lettered while the broker is away.
        match self.ready(topic) {
            Ok(_) => {
                self.shared
                    .known
                    .lock()
                    .expect("known")
                    .insert(topic.to_string());
                true
            }
            // Not a queue: a fanout exchange (outputs are published to it)?
            Err(SourceError::UnknownTopic(_)) => {
                let (shared, t) = (self.shared.clone(), topic.to_string());
                match self.rt.run(async move {
                    let link = Self::link(&shared).await?;
                    fanout::exchange_exists(&link.conn, &t).await
                }) {
                    Ok(true) => {
                        self.shared
                            .fanouts
                            .lock()
                            .expect("fanouts")
                            .insert(topic.to_string());
                        self.shared
                            .known
                            .lock()
                            .expect("known")
                            .insert(topic.to_string());
                        true
                    }
                    Ok(false) => false,
                    Err(_) => true,
                }
            }
            Err(_) => true,
        }
    }

    fn fits(&self, record: &Record) -> Result<(), String> {
        super::fits(record)
    }

    fn lag_note(&self) -> Option<String> {
        self.cfg.management.is_none().then(|| {
            "lag on RabbitMQ: ready messages + this process's unacked (another consumer's are \
             not seen over AMQP; --source-property management-url=http://host:15672 counts \
             every consumer's)"
                .to_string()
        })
    }

    fn ensure_topic(&self, topic: &str, _partitions: u32) -> Result<(), SourceError> {
        let (shared, q, ty) = (
            self.shared.clone(),
            topic.to_string(),
            self.cfg.queue_type.clone(),
        );
        self.rt.run(async move {
            let link = Self::link(&shared).await?;
            declare(&link.conn, &q, &ty).await
        })?;
        self.shared
            .known
            .lock()
            .expect("known")
            .insert(topic.to_string());
        Ok(())
    }

    fn dedupe_done(&self, _group: &str, _key: &[u8], _now_ms: u64) -> Result<bool, SourceError> {
        Err(SourceError::Invalid(
            "--dedupe on RabbitMQ needs a shared store: add --dedupe-store redis://host:port"
                .into(),
        ))
    }

    fn evict_dedupe(&self, _now_ms: u64, _max: usize) -> Result<usize, SourceError> {
        Ok(0)
    }

    fn append_signal(&self) -> Option<Arc<Notify>> {
        Some(self.shared.signal.clone())
    }

    /// Gives back (`basic.nack` with requeue) what the ended partition was handed on the
    /// current link and did not settle, and voids every receipt it held: the partition starts
    /// over with nothing, and the broker hands those messages out again.
    fn release(&self, topic: &str, _partition: u32) {
        let (tags, generation) = {
            let mut st = self.shared.state.lock().expect("state");
            let generation = st.generation;
            let Some(q) = st.queues.get_mut(topic) else {
                return;
            };
            let tags = q.receipts.release(generation);
            for t in &tags {
                q.outstanding.remove(t);
            }
            (tags, generation)
        };
        if tags.is_empty() {
            return;
        }
        let (shared, queue, tx) = (
            self.shared.clone(),
            topic.to_string(),
            self.opts.exactly_once,
        );
        let _ = self.rt.run(async move {
            // Only on the link that delivered them: tags are numbered per channel, and a newer
            // link's would name other messages (the broker requeued these with the old one).
            let link = shared.link.borrow().clone();
            let Some(link) = link.filter(|l| l.generation == generation) else {
                return Ok(());
            };
            let Some(ch) = link.channels.get(&queue) else {
                return Ok(());
            };
            let _tx = match link.tx_locks.get(&queue) {
                Some(l) if tx => Some(l.lock().await),
                _ => None,
            };
            // The link lives, so the partition stopped: this process takes no more of the
            // queue (a nack would hand the messages straight back to it, and count another
            // delivery on a quorum queue), and what it held goes to the other consumers now.
            if let Some(consumer) = link.consumer_tags.get(&queue) {
                shared.released.store(true, Ordering::Relaxed);
                let _ = tokio::time::timeout(
                    super::REQUEST_TIMEOUT,
                    ch.basic_cancel(consumer.as_str().into(), Default::default()),
                )
                .await;
            }
            for tag in tags {
                // A failure means the link went too: the broker requeues them itself.
                let _ = ch
                    .basic_nack(
                        tag,
                        lapin::options::BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await;
            }
            if tx {
                // On a channel in `tx` mode a nack waits for the commit, like an ack.
                let _ = tokio::time::timeout(super::REQUEST_TIMEOUT, ch.tx_commit()).await;
            }
            Ok::<(), SourceError>(())
        });
    }
}
