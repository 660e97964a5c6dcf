//! RabbitMQ as the engine's [`Source`]: one consumer per queue on one channel, deliveries
//! buffered until the engine fetches them, each acked by its tag once it finished.
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
//!   of each will come. Their outputs may then be published twice (at-least-once).
//! - `--exactly-once`: the consume channel is in `tx` mode; a commit publishes the outputs and
//!   acks their inputs in one transaction.
//! - At-most-once: the consumer auto-acks; nothing is settled.

use super::broker::{channel, connect, declare, depth, publish_confirmed};
use super::rt::Rt;
use super::{AmqpConfig, REQUEST_TIMEOUT, broker_error};
use crate::source::connect::ConsumerOptions;
use crate::source::{Capabilities, Commit, Delivery, Record, Source, SourceError};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How long a commit waits for the broker to come back before the run stops.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// The longest pause between two attempts to reconnect.
const RECONNECT_MAX_WAIT: Duration = Duration::from_secs(5);

/// One connection with its channels.
struct Link {
    generation: u64,
    conn: Connection,
    consume: Channel,
    /// Confirm mode; in `tx` mode the consume channel publishes instead.
    publish: Option<Channel>,
}

/// A delivery waiting to be fetched.
struct Buffered {
    record: Record,
    redeliveries: u32,
    generation: u64,
    tag: u64,
}

#[derive(Default)]
struct Queue {
    buffer: VecDeque<Buffered>,
    buffered_bytes: usize,
    /// The sequence number the next fetched delivery gets.
    next_seq: u64,
    /// How many fetched deliveries were settled.
    settled: u64,
    /// Sequence number to (generation, delivery tag).
    receipts: HashMap<u64, (u64, u64)>,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Queue>,
    /// The current link's generation, and its tags handed over and not acked.
    generation: u64,
    outstanding: BTreeSet<u64>,
    /// Set when the consumer cannot go on (its queue was deleted): fetch reports it.
    failed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    link: watch::Sender<Option<Arc<Link>>>,
    signal: Arc<Notify>,
    known: Mutex<HashSet<String>>,
    stopping: AtomicBool,
}

/// RabbitMQ as the engine consumes it.
pub struct RabbitSource {
    shared: Arc<Shared>,
    cfg: AmqpConfig,
    opts: ConsumerOptions,
    // Last: the runtime goes when everything that runs on it has.
    rt: Rt,
}

impl RabbitSource {
    /// Connects and starts consuming `opts.topics`; a queue that does not exist is an error.
    pub fn start(cfg: AmqpConfig, opts: &ConsumerOptions) -> Result<RabbitSource, SourceError> {
        let rt = Rt::new().map_err(|e| broker_error("starting the AMQP runtime", e))?;
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
            stopping: AtomicBool::new(false),
        });
        let first = {
            let (cfg, opts) = (cfg.clone(), opts.clone());
            rt.run(async move { open(&cfg, &opts, 1).await })?
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
            let link = Self::link(&shared).await?;
            depth(&link.conn, &q).await
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

/// Connects, checks the queues, and starts a consumer on each.
async fn open(
    cfg: &AmqpConfig,
    opts: &ConsumerOptions,
    generation: u64,
) -> Result<(Arc<Link>, Vec<(String, Consumer)>), SourceError> {
    let conn = connect(&cfg.url).await?;
    for t in &opts.topics {
        if depth(&conn, t).await?.is_none() {
            return Err(SourceError::UnknownTopic(t.clone()));
        }
    }
    for t in &opts.retry_topics {
        declare(&conn, t, &cfg.queue_type).await?;
    }
    let consume = channel(&conn).await?;
    let prefetch = opts.prefetch.clamp(1, u16::MAX as usize) as u16;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| broker_error("setting the prefetch", e))?;
    let publish = if opts.exactly_once {
        consume
            .tx_select()
            .await
            .map_err(|e| broker_error("starting transactions", e))?;
        None
    } else {
        let p = channel(&conn).await?;
        p.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker_error("enabling publisher confirms", e))?;
        Some(p)
    };
    let mut consumers = Vec::new();
    for (i, t) in opts.topics.iter().chain(&opts.retry_topics).enumerate() {
        // Unique per consumer on the channel (the broker closes the connection otherwise).
        let tag = format!(
            "weir-{}-{}-{generation}-{i}",
            opts.group,
            std::process::id()
        );
        let c = consume
            .basic_consume(
                t.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack: opts.at_most_once,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(&format!("consuming {t}"), e))?;
        consumers.push((t.clone(), c));
    }
    let link = Arc::new(Link {
        generation,
        conn,
        consume,
        publish,
    });
    Ok((link, consumers))
}

/// Moves deliveries into the buffers, and reconnects when the link breaks.
async fn supervise(
    shared: Arc<Shared>,
    cfg: AmqpConfig,
    opts: ConsumerOptions,
    first: (Arc<Link>, Vec<(String, Consumer)>),
) {
    let mut next = Some(first);
    let mut generation = 1;
    let mut wait = Duration::from_millis(100);
    while !shared.stopping.load(Ordering::Relaxed) {
        let (link, consumers) = match next.take() {
            Some(l) => l,
            None => match open(&cfg, &opts, generation).await {
                Ok(l) => {
                    tracing::info!(generation, "reconnected to RabbitMQ");
                    l
                }
                Err(SourceError::UnknownTopic(q)) => {
                    shared.state.lock().expect("state").failed = Some(format!(
                        "queue {q} no longer exists (it was deleted while weir consumed it)"
                    ));
                    shared.signal.notify_waiters();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot reach RabbitMQ; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RECONNECT_MAX_WAIT);
                    continue;
                }
            },
        };
        wait = Duration::from_millis(100);
        {
            let mut st = shared.state.lock().expect("state");
            st.generation = link.generation;
            st.outstanding.clear();
        }
        shared.link.send_replace(Some(link.clone()));
        let mut streams = futures_util::stream::select_all(
            consumers
                .into_iter()
                .map(|(t, c)| c.map(move |d| (t.clone(), d))),
        );
        let why = loop {
            match streams.next().await {
                Some((topic, Ok(d))) => {
                    let (record, redeliveries) =
                        super::from_amqp(&d.properties, d.data, d.redelivered);
                    let mut st = shared.state.lock().expect("state");
                    if !opts.at_most_once {
                        st.outstanding.insert(d.delivery_tag);
                    }
                    let q = st.queues.entry(topic).or_default();
                    q.buffered_bytes += crate::source::wire_size(&record);
                    q.buffer.push_back(Buffered {
                        record,
                        redeliveries,
                        generation: link.generation,
                        tag: d.delivery_tag,
                    });
                    drop(st);
                    shared.signal.notify_waiters();
                }
                Some((topic, Err(e))) => break format!("consuming {topic}: {e}"),
                None => break "the broker cancelled the consumer".to_string(),
            }
        };
        shared.link.send_replace(None);
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!(reason = %why, "lost the RabbitMQ link; reconnecting (unacked messages go back to their queues)");
        {
            // What the old link delivered and the engine has not fetched is requeued by the
            // broker: drop it here, or it would run twice.
            let mut st = shared.state.lock().expect("state");
            for q in st.queues.values_mut() {
                q.buffer.clear();
                q.buffered_bytes = 0;
            }
            st.outstanding.clear();
        }
        let _ = link.conn.close(200, "reconnecting".into()).await;
        generation += 1;
    }
}

/// The acks that settle `tags` given the tags handed over and not yet acked: one `multiple`
/// ack for every settled tag below the lowest unsettled one, and one each for the rest.
/// Removes the settled tags from `outstanding`.
fn acks(outstanding: &mut BTreeSet<u64>, mut tags: Vec<u64>) -> Vec<(u64, bool)> {
    tags.retain(|t| outstanding.remove(t));
    tags.sort_unstable();
    let floor = outstanding.first().copied().unwrap_or(u64::MAX);
    let below = tags.partition_point(|t| *t < floor);
    let mut out = Vec::new();
    if below > 1 {
        out.push((tags[below - 1], true));
    } else if below == 1 {
        out.push((tags[0], false));
    }
    out.extend(tags[below..].iter().map(|t| (*t, false)));
    out
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
        Ok(st.queues.get(topic).map_or(0, |q| q.settled))
    }

    fn end_offset(&self, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let ready = self.ready(topic)?;
        let st = self.shared.state.lock().expect("state");
        Ok(st
            .queues
            .get(topic)
            .map_or(0, |q| q.next_seq + q.buffer.len() as u64)
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
        let q = st.queues.entry(topic.to_string()).or_default();
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max && (out.is_empty() || bytes < max_bytes) {
            let Some(b) = q.buffer.pop_front() else { break };
            let size = crate::source::wire_size(&b.record);
            q.buffered_bytes -= size;
            bytes += size;
            let seq = q.next_seq;
            q.next_seq += 1;
            q.receipts.insert(seq, (b.generation, b.tag));
            out.push(Delivery {
                topic: name.clone(),
                partition,
                offset: seq,
                record: b.record,
                redeliveries: b.redeliveries,
            });
        }
        Ok(out)
    }

    fn at_end(&self, topic: &str, _partition: u32, _next: u64) -> Result<bool, SourceError> {
        {
            let st = self.shared.state.lock().expect("state");
            if st.queues.get(topic).is_some_and(|q| !q.buffer.is_empty()) {
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
        // The receipts to ack, by generation; each settled message is counted once.
        let receipts: Vec<(u64, u64)> = {
            let mut st = self.shared.state.lock().expect("state");
            let mut r = Vec::with_capacity(commit.settled.len());
            for (topic, _, seq) in &commit.settled {
                if let Some(q) = st.queues.get_mut(&**topic)
                    && let Some(receipt) = q.receipts.remove(seq)
                {
                    q.settled += 1;
                    r.push(receipt);
                }
            }
            r
        };
        let (shared, tx) = (self.shared.clone(), self.opts.exactly_once);
        let settle = !self.opts.at_most_once;
        self.rt.run(async move {
            let outputs = commit.outputs;
            loop {
                let link = Self::link(&shared).await?;
                let tags: Vec<u64> = receipts
                    .iter()
                    .filter(|(g, _)| *g == link.generation)
                    .map(|(_, t)| *t)
                    .collect();
                let r = settle_on(&shared, &link, &outputs, tags, tx, settle).await;
                match r {
                    Ok(()) => return Ok(()),
                    Err(e) if !link.conn.status().connected() || !link.consume.status().connected() => {
                        // The link broke under the commit: its receipts are void (the broker
                        // requeued those messages); publish again on the next link.
                        tracing::warn!(error = %e, "commit interrupted by a lost link; publishing again after reconnecting");
                        shared.link.send_if_modified(|l| {
                            if l.as_ref().is_some_and(|l| l.generation == link.generation) {
                                *l = None;
                                true
                            } else {
                                false
                            }
                        });
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    fn topic_exists(&self, topic: &str) -> bool {
        if self.shared.known.lock().expect("known").contains(topic) {
            return true;
        }
        let exists = self.ready(topic).is_ok();
        if exists {
            self.shared
                .known
                .lock()
                .expect("known")
                .insert(topic.to_string());
        }
        exists
    }

    fn fits(&self, record: &Record) -> Result<(), String> {
        super::fits(record)
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
}

/// Publishes `outputs` and acks `tags` on `link`: confirmed publishes then acks, or one `tx`.
async fn settle_on(
    shared: &Shared,
    link: &Link,
    outputs: &[crate::source::Output],
    tags: Vec<u64>,
    tx: bool,
    settle: bool,
) -> Result<(), SourceError> {
    let to_ack = if settle {
        let mut st = shared.state.lock().expect("state");
        if st.generation == link.generation {
            acks(&mut st.outstanding, tags)
        } else {
            Vec::new()
        }
    } else {
        Vec::new()
    };
    match &link.publish {
        Some(publish) => {
            let records: Vec<(&str, &Record)> = outputs
                .iter()
                .map(|o| (o.topic.as_str(), &o.record))
                .collect();
            publish_confirmed(publish, &records).await?;
        }
        None => {
            for o in outputs {
                link.consume
                    .basic_publish(
                        "".into(),
                        o.topic.as_str().into(),
                        BasicPublishOptions::default(),
                        &o.record.payload,
                        super::to_amqp(&o.record),
                    )
                    .await
                    .map_err(|e| broker_error(&format!("publishing to {}", o.topic), e))?;
            }
        }
    }
    for (tag, multiple) in to_ack {
        link.consume
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| broker_error("acking", e))?;
    }
    if tx {
        tokio::time::timeout(REQUEST_TIMEOUT, link.consume.tx_commit())
            .await
            .map_err(|_| broker_error("committing the transaction", "no answer"))?
            .map_err(|e| broker_error("committing the transaction", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::acks;
    use std::collections::BTreeSet;

    #[test]
    fn acks_take_one_multiple_below_the_lowest_unsettled_tag() {
        // (outstanding, settled now, acks sent, outstanding after)
        type Case<'a> = (&'a [u64], &'a [u64], &'a [(u64, bool)], &'a [u64]);
        let cases: &[Case] = &[
            (&[1, 2, 3], &[1, 2, 3], &[(3, true)], &[]),
            (&[1, 2, 3], &[1], &[(1, false)], &[2, 3]),
            (&[1, 2, 3], &[2, 3], &[(2, false), (3, false)], &[1]),
            (
                &[1, 2, 3, 4, 5],
                &[1, 2, 4],
                &[(2, true), (4, false)],
                &[3, 5],
            ),
            (&[1, 2], &[7], &[], &[1, 2]),
            (&[5, 6], &[6, 5], &[(6, true)], &[]),
        ];
        for (outstanding, settled, want, left) in cases {
            let mut o: BTreeSet<u64> = outstanding.iter().copied().collect();
            let got = acks(&mut o, settled.to_vec());
            assert_eq!(got, *want, "{outstanding:?} {settled:?}");
            assert_eq!(o.into_iter().collect::<Vec<_>>(), *left);
        }
    }
}
