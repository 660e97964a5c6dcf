//! Membership of one consumer group: the poller thread, the per-partition buffers the engine
//! fetches from, the rebalance callbacks, and the committer thread.

use super::admin::{Admin, bad_config, to_delivery};
use super::publisher::Publisher;
use super::{KafkaConfig, REQUEST_TIMEOUT, storage};
use crate::source::{Commit, Delivery, GroupEvent, Output, SourceError};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc;

/// A partition's buffer pauses fetching at this many messages and resumes below the other.
const PAUSE_AT: usize = 8192;
const RESUME_AT: usize = 2048;
/// The same bounds in bytes, so that large messages are bounded too.
const PAUSE_AT_BYTES: usize = 64 << 20;
const RESUME_AT_BYTES: usize = 16 << 20;
/// Commits the committer merges into one produce-and-store step (or one transaction).
const MERGE_MAX: usize = 256;
/// Attempts at one transaction before the run fails.
const TXN_ATTEMPTS: u32 = 5;

type Parts = HashMap<Arc<str>, HashMap<u32, Buf>>;

#[derive(Default)]
struct Buf {
    queue: VecDeque<Delivery>,
    /// The bytes of the messages in `queue`.
    bytes: usize,
    paused: bool,
}

/// What the poller thread, the rebalance callbacks and the engine's calls share.
struct Shared {
    /// The partitions this process owns now, each with its buffer.
    parts: Mutex<Parts>,
    /// Where assignments and revocations go; `None` once the process leaves the group.
    events: Mutex<Option<mpsc::UnboundedSender<GroupEvent>>>,
    revoke_timeout: Duration,
    exactly_once: bool,
    stop: AtomicBool,
}

impl Shared {
    fn owns(&self, topic: &str, partition: u32) -> bool {
        let parts = self.parts.lock().expect("parts lock");
        parts.get(topic).is_some_and(|m| m.contains_key(&partition))
    }
}

fn list(parts: &Parts, tpl: &TopicPartitionList) -> Vec<(Arc<str>, u32)> {
    tpl.elements()
        .iter()
        .map(|e| {
            let name = parts
                .get_key_value(e.topic())
                .map_or_else(|| Arc::from(e.topic()), |(k, _)| k.clone());
            (name, e.partition() as u32)
        })
        .collect()
}

fn describe(ps: &[(Arc<str>, u32)]) -> String {
    ps.iter()
        .map(|(t, p)| format!("{t}/{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The consumer's context: librdkafka calls it from `poll`, on the poller thread.
struct Rebalancer {
    shared: Arc<Shared>,
}

impl ClientContext for Rebalancer {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::log_librdkafka(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        super::error_librdkafka(&error, reason);
    }
}

impl ConsumerContext for Rebalancer {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        match rebalance {
            Rebalance::Assign(tpl) => {
                let ps = {
                    let mut parts = s.parts.lock().expect("parts lock");
                    let ps = list(&parts, tpl);
                    for (t, p) in &ps {
                        parts
                            .entry(t.clone())
                            .or_default()
                            .insert(*p, Buf::default());
                    }
                    ps
                };
                if ps.is_empty() {
                    return;
                }
                tracing::info!(partitions = %describe(&ps), "partitions assigned");
                if let Some(tx) = s.events.lock().expect("events lock").as_ref() {
                    let _ = tx.send(GroupEvent::Assigned(ps));
                }
            }
            Rebalance::Revoke(tpl) => {
                let ps = list(&s.parts.lock().expect("parts lock"), tpl);
                if ps.is_empty() {
                    return;
                }
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = %describe(&ps), lost, "partitions revoked; draining them");
                let tx = s.events.lock().expect("events lock").clone();
                if let Some(tx) = tx {
                    let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
                    let ev = GroupEvent::Revoked {
                        partitions: ps.clone(),
                        done: done_tx,
                    };
                    // The engine answers within its revoke timeout; the margin covers the
                    // last commit.
                    if tx.send(ev).is_ok()
                        && done_rx
                            .recv_timeout(s.revoke_timeout + Duration::from_secs(5))
                            .is_err()
                    {
                        tracing::warn!(partitions = %describe(&ps), "the engine did not finish revoked partitions in time; letting go");
                    }
                }
                // Everything finished on these partitions is stored now: commit it before
                // another member starts from the committed offsets.
                if !s.exactly_once && !lost {
                    commit_stored(consumer, "revoke");
                }
                let mut parts = s.parts.lock().expect("parts lock");
                for (t, p) in &ps {
                    if let Some(m) = parts.get_mut(t) {
                        m.remove(p);
                    }
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _: &TopicPartitionList) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            // The stored offsets stay stored: the next periodic commit sends them again.
            Err(e) => {
                tracing::warn!(error = %e, "committing offsets failed; retrying at the next interval")
            }
        }
    }
}

fn commit_stored<C: ConsumerContext>(consumer: &BaseConsumer<C>, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing was stored since the last commit.
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            tracing::warn!(error = %e, when, "committing offsets failed; the next owner may see duplicates")
        }
    }
}

/// A commit the engine asked for, and where its answer goes.
struct Request {
    commit: Commit,
    reply: std::sync::mpsc::SyncSender<Result<(), String>>,
}

/// This process's membership of a consumer group.
pub(crate) struct Group {
    name: String,
    consumer: Arc<BaseConsumer<Rebalancer>>,
    shared: Arc<Shared>,
    commits: Mutex<Option<crossbeam_channel::Sender<Request>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Group {
    /// Joins `group`, subscribed to `topics`. Assignments and revocations arrive on the
    /// returned channel.
    pub(crate) fn join(
        cfg: &KafkaConfig,
        group: &str,
        topics: &[String],
        exactly_once: bool,
        revoke_timeout: Duration,
    ) -> Result<(Group, mpsc::UnboundedReceiver<GroupEvent>), SourceError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            parts: Mutex::new(HashMap::new()),
            events: Mutex::new(Some(tx)),
            revoke_timeout,
            exactly_once,
            stop: AtomicBool::new(false),
        });
        let auto_commit = if exactly_once { "false" } else { "true" };
        let mut c = cfg.client(&[
            ("auto.offset.reset", "earliest"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("isolation.level", "read_committed"),
            ("queued.max.messages.kbytes", "16384"),
            ("enable.auto.commit", auto_commit),
        ]);
        c.set("group.id", group)
            .set("enable.auto.offset.store", "false");
        let consumer: BaseConsumer<Rebalancer> = c
            .create_with_context(Rebalancer {
                shared: shared.clone(),
            })
            .map_err(|e| bad_config(cfg, e))?;
        let consumer = Arc::new(consumer);
        // A member with a static identity (`group.instance.id`, KIP-345, as users give each
        // pod of a StatefulSet) keeps its transactional id across restarts: the restarted
        // member fences the dead one's producer and aborts its open transaction at once, so
        // read_committed readers are not held back until the broker's transaction timeout (a
        // broker may never abort it: see docs/kafka.md). Without one, the id is new each start.
        let txn_id = match cfg.properties.get("group.instance.id") {
            Some(member) => format!("weir-{group}-{member}"),
            None => format!(
                "weir-{group}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
        };
        let publisher = if exactly_once {
            let p = Publisher::new(
                cfg,
                &[
                    ("transactional.id", txn_id.as_str()),
                    // A crashed member's open transaction holds back read_committed readers
                    // until the broker aborts it at this timeout: keep it short.
                    ("transaction.timeout.ms", "30000"),
                    ("message.timeout.ms", "25000"),
                ],
            )?;
            p.producer
                .init_transactions(Duration::from_secs(30))
                .map_err(|e| storage("starting the transactional producer", e))?;
            p
        } else {
            Publisher::new(cfg, &[])?
        };
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| storage(&format!("subscribing to {}", topics.join(",")), e))?;
        let (ctx, crx) = crossbeam_channel::bounded::<Request>(1024);
        let poller = {
            let (consumer, shared) = (consumer.clone(), shared.clone());
            std::thread::Builder::new()
                .name("weir-kafka-poll".into())
                .spawn(move || poll_loop(&consumer, &shared))
                .map_err(|e| storage("starting the poller thread", e))?
        };
        let committer = {
            let (consumer, shared) = (consumer.clone(), shared.clone());
            std::thread::Builder::new()
                .name("weir-kafka-commit".into())
                .spawn(move || commit_loop(&crx, &publisher, &consumer, &shared))
                .map_err(|e| storage("starting the committer thread", e))?
        };
        tracing::info!(group, topics = %topics.join(","), exactly_once, "joining the consumer group");
        Ok((
            Group {
                name: group.to_string(),
                consumer,
                shared,
                commits: Mutex::new(Some(ctx)),
                threads: Mutex::new(vec![poller, committer]),
            },
            rx,
        ))
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn committed(&self, topic: &str, partition: u32) -> Result<u64, SourceError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition as i32);
        let got = self
            .consumer
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| storage(&format!("committed offset of {topic}/{partition}"), e))?;
        Ok(
            match got
                .find_partition(topic, partition as i32)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(n)) if n >= 0 => n as u64,
                _ => 0,
            },
        )
    }

    pub(crate) fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Vec<Delivery> {
        let mut parts = self.shared.parts.lock().expect("parts lock");
        let Some(buf) = parts.get_mut(topic).and_then(|m| m.get_mut(&partition)) else {
            return Vec::new();
        };
        while let Some(d) = buf.queue.front().filter(|d| d.offset < from) {
            buf.bytes -= crate::source::wire_size(&d.record);
            buf.queue.pop_front();
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max && bytes < max_bytes {
            let Some(d) = buf.queue.pop_front() else {
                break;
            };
            let size = crate::source::wire_size(&d.record);
            buf.bytes -= size;
            bytes += size;
            out.push(d);
        }
        if buf.paused && buf.queue.len() < RESUME_AT && buf.bytes < RESUME_AT_BYTES {
            match self.consumer.resume(&one(topic, partition)) {
                Ok(()) => buf.paused = false,
                Err(e) => tracing::warn!(error = %e, topic, partition, "resuming fetch failed"),
            }
        }
        out
    }

    /// Whether everything up to the partition's end was handed to the engine.
    pub(crate) fn at_end(
        &self,
        admin: &Admin,
        topic: &str,
        partition: u32,
    ) -> Result<bool, SourceError> {
        {
            let parts = self.shared.parts.lock().expect("parts lock");
            match parts.get(topic).and_then(|m| m.get(&partition)) {
                None => return Ok(true),
                Some(b) if !b.queue.is_empty() => return Ok(false),
                Some(_) => {}
            }
        }
        let position = self.consumer.position().ok().and_then(|tpl| {
            match tpl.find_partition(topic, partition as i32)?.offset() {
                Offset::Offset(n) if n >= 0 => Some(n as u64),
                _ => None,
            }
        });
        let position = match position {
            Some(p) => p,
            None => self.committed(topic, partition)?,
        };
        Ok(position >= admin.end_offset(topic, partition)?)
    }

    pub(crate) fn commit(&self, commit: Commit) -> Result<(), SourceError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let tx = self.commits.lock().expect("commits lock").clone();
        let Some(tx) = tx else {
            return Err(storage("commit", "the consumer group was left"));
        };
        tx.send(Request { commit, reply })
            .map_err(|_| storage("commit", "the committer thread stopped"))?;
        match answer.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(storage("commit", e)),
            Err(_) => Err(storage("commit", "the committer thread stopped")),
        }
    }

    /// Leaves the group: stops the threads, commits what is stored, and closes the consumer
    /// (which hands the partitions to the other members at once).
    pub(crate) fn leave(g: Arc<Group>) -> Result<(), SourceError> {
        g.shared.events.lock().expect("events lock").take();
        g.shared.stop.store(true, Ordering::SeqCst);
        g.commits.lock().expect("commits lock").take();
        for t in g.threads.lock().expect("threads lock").drain(..) {
            let _ = t.join();
        }
        if !g.shared.exactly_once {
            commit_stored(&*g.consumer, "shutdown");
        }
        // Dropping the last handle closes the consumer.
        drop(g);
        Ok(())
    }
}

fn one(topic: &str, partition: u32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition as i32);
    tpl
}

fn poll_loop(consumer: &BaseConsumer<Rebalancer>, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => push(consumer, shared, &m),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Kafka consumer error; librdkafka retries");
            }
        }
    }
}

fn push(consumer: &BaseConsumer<Rebalancer>, shared: &Shared, m: &BorrowedMessage<'_>) {
    let mut parts = shared.parts.lock().expect("parts lock");
    let partition = m.partition() as u32;
    let Some((name, buf)) = parts
        .iter_mut()
        .find(|(k, _)| &***k == m.topic())
        .and_then(|(k, bufs)| Some((k, bufs.get_mut(&partition)?)))
    else {
        // A partition no longer ours: the next owner reads it from the committed offset.
        return;
    };
    let d = to_delivery(name, m);
    buf.bytes += crate::source::wire_size(&d.record);
    buf.queue.push_back(d);
    if !buf.paused && (buf.queue.len() >= PAUSE_AT || buf.bytes >= PAUSE_AT_BYTES) {
        match consumer.pause(&one(name, partition)) {
            Ok(()) => buf.paused = true,
            Err(e) => tracing::warn!(error = %e, "pausing fetch failed"),
        }
    }
}

/// Merges waiting commits into one step: publish every output and wait for the delivery
/// reports, then store the offsets (or, exactly-once: outputs and offsets in one transaction).
fn commit_loop(
    rx: &crossbeam_channel::Receiver<Request>,
    publisher: &Publisher,
    consumer: &BaseConsumer<Rebalancer>,
    shared: &Shared,
) {
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        while reqs.len() < MERGE_MAX {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let outputs: Vec<&Output> = reqs.iter().flat_map(|r| &r.commit.outputs).collect();
        // The furthest offset asked for per partition; only partitions still ours.
        let mut offsets: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        for r in &reqs {
            for (t, p, o) in &r.commit.offsets {
                let e = offsets.entry((t, *p)).or_insert(*o);
                *e = (*e).max(*o);
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &offsets {
            if shared.owns(t, *p) {
                let _ = tpl.add_partition_offset(t, *p as i32, Offset::Offset(*o as i64));
            }
        }
        let result = if shared.exactly_once {
            transact(publisher, consumer, &outputs, &tpl)
        } else {
            publisher.publish(&outputs).map(|()| {
                // A failure here means the partition was revoked between the check and the
                // store: the next owner handles those messages again.
                if tpl.count() > 0
                    && let Err(e) = consumer.store_offsets(&tpl)
                {
                    tracing::warn!(error = %e, "storing offsets failed; their messages will be redelivered");
                }
            })
        };
        let result = result.map_err(|e| e.to_string());
        for r in reqs {
            let _ = r.reply.send(result.clone());
        }
    }
}

/// What to do about a failed transactional call.
enum TxnError {
    /// Abort the transaction and run it again from the start.
    Abort(String),
    /// The producer cannot go on (fenced by a newer member, or a fatal broker error).
    Fatal(String),
}

fn classify(what: &str, e: &KafkaError) -> TxnError {
    let why = format!("{what}: {e}");
    match e {
        KafkaError::Transaction(t) if t.txn_requires_abort() => TxnError::Abort(why),
        _ => TxnError::Fatal(why),
    }
}

/// Calls `f` again while it fails with a retriable error (librdkafka's rule for
/// `send_offsets_to_transaction` and `commit_transaction`).
fn retrying(what: &str, f: impl Fn() -> Result<(), KafkaError>) -> Result<(), TxnError> {
    for attempt in 1u64.. {
        match f() {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(t)) if t.is_retriable() && attempt < 10 => {
                tracing::warn!(attempt, error = %t, "{what} failed; retrying");
                std::thread::sleep(Duration::from_millis(100 * attempt));
            }
            Err(e) => return Err(classify(what, &e)),
        }
    }
    unreachable!("the loop returns")
}

/// One transaction: the outputs, then the offsets, committed together; run again from the
/// start when the broker aborts it.
fn transact(
    publisher: &Publisher,
    consumer: &BaseConsumer<Rebalancer>,
    outputs: &[&Output],
    offsets: &TopicPartitionList,
) -> Result<(), SourceError> {
    let p = &publisher.producer;
    let once = || -> Result<(), TxnError> {
        p.begin_transaction().map_err(|e| classify("begin", &e))?;
        // A failed delivery fails the commit too; abort at once instead.
        publisher
            .publish(outputs)
            .map_err(|e| TxnError::Abort(e.to_string()))?;
        if offsets.count() > 0 {
            let meta = consumer
                .group_metadata()
                .ok_or_else(|| TxnError::Fatal("no consumer group metadata".into()))?;
            retrying("sending offsets to the transaction", || {
                p.send_offsets_to_transaction(offsets, &meta, REQUEST_TIMEOUT)
            })?;
        }
        retrying("committing the transaction", || {
            p.commit_transaction(REQUEST_TIMEOUT)
        })
    };
    let mut last = String::new();
    for attempt in 1..=TXN_ATTEMPTS {
        match once() {
            Ok(()) => return Ok(()),
            Err(TxnError::Fatal(why)) => {
                return Err(storage("transaction (the producer cannot go on)", why));
            }
            Err(TxnError::Abort(why)) => {
                tracing::warn!(attempt, error = %why, "transaction failed; aborting it and trying again");
                retrying("aborting the transaction", || {
                    p.abort_transaction(REQUEST_TIMEOUT)
                })
                .map_err(|e| match e {
                    TxnError::Abort(w) | TxnError::Fatal(w) => storage("transaction", w),
                })?;
                last = why;
            }
        }
    }
    Err(storage(
        "transaction",
        format!("{TXN_ATTEMPTS} attempts failed; the last: {last}"),
    ))
}
