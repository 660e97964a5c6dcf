//! Where messages come from and where outputs go.
//!
//! Two seams, one per side of weir:
//! - [`Source`]: what `weir run`'s engine consumes through. It fetches a batch from a partition
//!   and commits: outputs, then the settlement of what finished. Brokers settle in one of two
//!   ways ([`Settle`]): a watermark per partition (the embedded log, Kafka: everything below an
//!   offset is done), or each message by a receipt the broker issued (RabbitMQ's delivery tag;
//!   later a Redis stream entry id, a JetStream ack subject, an SQS receipt handle). The engine
//!   keeps its offset tracker on a local sequence either way; a per-message source gets the
//!   sequence numbers that finished ([`Commit::settled`]) and acks each by its receipt, so one
//!   slow message holds back nothing. [`Capabilities`] say what the broker does natively.
//! - [`broker::Broker`]: what the other commands (`topics`, `produce`, `consume`) use.
//!
//! [`connect`] turns `--source URL` into either; it is the one file that lists the brokers.
//! `embedded` is the default, a durable single-node log in the data directory; every other
//! broker is a folder of its own, and no file outside it names its client crate.

pub mod broker;
pub mod connect;
pub mod dead_letters;
pub mod embedded;
pub mod kafka;
pub mod lifecycle;
#[cfg(test)]
pub mod memory;
#[cfg(test)]
pub mod memory_queue;
pub mod nats;
pub mod rabbitmq;
pub mod receipts;
pub mod redis;
pub mod request;
pub(crate) mod rt;
pub mod sqs;
pub mod tls;

use std::sync::Arc;

pub use weir_core::record::{Delivery, Headers, Output, Record, clip, wire_size};

/// A message's priority (0..=255) where the broker has priorities (RabbitMQ's priority queues:
/// the AMQP `priority` property both ways).
pub const PRIORITY_HEADER: &str = "weir.priority";

/// One atomic step of a consumer: publish `outputs`, move each partition's committed offset
/// (the next offset to read) to the given value, and mark dead letters as replayed. Either all
/// of it happens or none.
#[derive(Debug, Default)]
pub struct Commit {
    pub offsets: Vec<(Arc<str>, u32, u64)>,
    pub outputs: Vec<Output>,
    /// Dead letters (topic, partition, offset) this step replays; see `weir dlq replay`.
    pub replayed: Vec<(String, u32, u64)>,
    /// Idempotency keys this step marks as done, with when the mark expires (ms since the epoch).
    pub dedupe_done: Vec<(Vec<u8>, u64)>,
    /// Per-message sources ([`Settle::PerMessage`]): the messages (topic, partition, offset)
    /// that finished since the last commit (handled, dead-lettered or requeued), to ack by their
    /// receipts after the outputs are confirmed. Empty for watermark sources, which take
    /// `offsets` instead.
    pub settled: Vec<(Arc<str>, u32, u64)>,
    /// Per-message sources that redeliver after a delay ([`Capabilities::delayed_retry`]):
    /// messages (topic, partition, offset) to give back to the broker, to be delivered again
    /// (with their delivery count one higher) no sooner than the delay; they are settled by it.
    pub delayed: Vec<(Arc<str>, u32, u64, std::time::Duration)>,
    /// Where each of `outputs` came from, in the same order: the (topic, offset) of the message
    /// whose handling emitted it; `None` where the engine cannot tell (a batch call's outputs
    /// belong to all its messages). A broker that drops a message published twice under one id
    /// (JetStream's `Nats-Msg-Id`) names each output by it. Empty where the engine does not say.
    pub origins: Vec<Option<(Arc<str>, u64)>>,
    /// Records of (topic, partition) that this step's offset passes without the group having
    /// read them, because retention deleted them first (the embedded log keeps the count with
    /// the offset, so it is counted once whatever crashes).
    pub skipped: Vec<(Arc<str>, u32, u64)>,
}

/// How a broker learns that messages are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// A committed offset per partition: everything below it is done (logs).
    Watermark,
    /// Each message by its own receipt (queues); offsets are the source's local sequence.
    PerMessage,
}

/// What a broker does natively, so the engine uses it rather than re-implementing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub settle: Settle,
    /// The broker assigns partitions to the members of a group ([`Source::join_group`]).
    pub groups: bool,
    /// The broker keeps weir's dedupe marks with its commits (the embedded log); elsewhere
    /// `--dedupe` needs a shared store (`--dedupe-store redis://...`).
    pub dedupe_marks: bool,
    /// The broker counts deliveries ([`Delivery::redeliveries`]).
    pub delivery_count: bool,
    /// Outputs and the settlement can be one broker transaction (`--exactly-once`).
    pub transactions: bool,
    /// Messages fetched per call into the handler when the user does not say.
    pub batch_size: Option<usize>,
    /// The broker delivers a message again after a delay it is given ([`Commit::delayed`]:
    /// JetStream's `NakWithDelay`, SQS's `ChangeMessageVisibility`): `--retry-mode requeue`
    /// uses it instead of a retry topic, and the attempt number is the broker's delivery count.
    pub delayed_retry: bool,
    /// The broker hands a message to another consumer once it was held this long unacked
    /// (JetStream's `ack_wait`, SQS's visibility timeout), unless [`Source::extend`] renews
    /// it: the engine does, for every message it holds (a long call, a blocking retry's wait,
    /// a lane behind them). `None`: the broker waits as long as the link lives (RabbitMQ, up
    /// to its `consumer_timeout`), or nothing is leased (logs).
    pub lease: Option<std::time::Duration>,
    /// Offsets are dense (the embedded log): a fetch that begins past the offset asked for
    /// means retention deleted what lies between.
    pub dense_offsets: bool,
}

impl Capabilities {
    /// A log that settles by watermark, with nothing else native.
    pub const LOG: Capabilities = Capabilities {
        settle: Settle::Watermark,
        groups: false,
        dedupe_marks: false,
        delivery_count: false,
        transactions: false,
        batch_size: None,
        delayed_retry: false,
        lease: None,
        dense_offsets: false,
    };
}

/// Depth and lag of one partition, as `weir topics list` shows them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionStats {
    pub partition: u32,
    /// The offset the next appended message gets; also the number of messages ever appended.
    pub end_offset: u64,
    /// Per consumer group: its committed offset (the next it will read) and its lag.
    pub groups: Vec<GroupOffset>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupOffset {
    pub group: String,
    pub committed: u64,
    pub lag: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicStats {
    pub topic: String,
    pub partitions: Vec<PartitionStats>,
}

/// Errors a source reports. Callers branch on the kind (an unknown topic is the user's to fix,
/// a storage failure is not), so this is an enum rather than an opaque error.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("topic `{0}` does not exist; create it with `weir topics create {0}`")]
    UnknownTopic(String),
    #[error("topic `{0}` already exists")]
    TopicExists(String),
    #[error("invalid topic name `{name}`: {why}")]
    InvalidTopic { name: String, why: &'static str },
    #[error("topic `{topic}` has no partition {partition} (it has {partitions})")]
    UnknownPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    #[error(
        "the data directory {dir} is in use by another weir process (its lock is held); \
         stop that process, or point --data-dir at another directory"
    )]
    Locked { dir: String },
    #[error(
        "the data directory {dir} is corrupt or not a weir data directory ({detail}); \
         restore it from a backup or point --data-dir at another directory"
    )]
    Corrupt { dir: String, detail: String },
    #[error("storage error in {dir}: {detail}")]
    Storage { dir: String, detail: String },
    #[error("{0}")]
    Invalid(String),
    /// The broker failed a request, or could not be reached.
    #[error("{broker}: {detail}")]
    Broker {
        /// Which broker (`Kafka`, `RabbitMQ`).
        broker: &'static str,
        detail: String,
    },
    /// The link the partition's messages came on is gone, and with it their receipts: the
    /// broker hands those messages out again. The engine drops what the partition holds (its
    /// messages, their outputs, their dedupe claims) and starts it again; nothing of it is
    /// published or acked.
    #[error(
        "the link to the broker that delivered `{topic}`'s messages was lost; they are delivered again"
    )]
    Lost { topic: String },
}

/// weir's own bounds on a record it publishes (outputs, dead letters, retry copies), the same on
/// every source; a broker may add its own ([`Source::fits`]). A guest's output past one of them
/// fails that message as `invalid-output`, before anything is written, so one message never
/// fails a commit (which would stop the run, and again after every restart).
pub mod limits {
    /// The largest payload.
    pub const PAYLOAD_BYTES: usize = 16 << 20;
    /// The largest key.
    pub const KEY_BYTES: usize = 64 << 10;
    /// The most headers on one record.
    pub const HEADERS: usize = 1024;
    /// The longest header name.
    pub const HEADER_NAME_BYTES: usize = 1024;
    /// The largest header value.
    pub const HEADER_VALUE_BYTES: usize = 1 << 20;
}

/// Whether `r` is within weir's [`limits`]; the error names the part and the bound.
pub fn within_limits(r: &Record) -> Result<(), String> {
    use limits::*;
    if r.payload.len() > PAYLOAD_BYTES {
        return Err(format!(
            "payload of {} bytes; the most is {PAYLOAD_BYTES}",
            r.payload.len()
        ));
    }
    if let Some(k) = r.key.as_ref().filter(|k| k.len() > KEY_BYTES) {
        return Err(format!("key of {} bytes; the most is {KEY_BYTES}", k.len()));
    }
    if r.headers.len() > HEADERS {
        return Err(format!(
            "{} headers; the most is {HEADERS}",
            r.headers.len()
        ));
    }
    for (name, value) in &r.headers {
        if name.len() > HEADER_NAME_BYTES {
            return Err(format!(
                "header name `{}...` of {} bytes; the most is {HEADER_NAME_BYTES}",
                clip(name, 32),
                name.len()
            ));
        }
        if value.len() > HEADER_VALUE_BYTES {
            return Err(format!(
                "header `{}` of {} bytes; the most is {HEADER_VALUE_BYTES}",
                clip(name, 64),
                value.len()
            ));
        }
    }
    Ok(())
}

/// What `emit.send` asks before it takes an output: may `record` be published to `topic`?
pub type OutputCheck = Arc<dyn Fn(&str, &Record) -> Result<(), String> + Send + Sync>;

/// The [`OutputCheck`] of `source`: the topic exists, and the record fits weir's limits and
/// the broker's ([`Source::fits`]).
/// How an [`output_check`] says the topic is missing (an answer to a reply topic that is gone is
/// dropped rather than failed: host/reply.rs).
pub const NO_SUCH_TOPIC: &str = "which does not exist";

pub fn output_check(source: Arc<dyn Source>) -> OutputCheck {
    Arc::new(move |topic: &str, r: &Record| {
        source.fits(r)?;
        if !source.topic_exists(topic) {
            return Err(format!("emitted to topic `{topic}`, {NO_SUCH_TOPIC}"));
        }
        Ok(())
    })
}

/// An [`OutputCheck`] of weir's [`limits`] alone, any topic taken (`weir test`, `weir check`).
pub fn limits_only() -> OutputCheck {
    Arc::new(|_: &str, r: &Record| within_limits(r))
}

/// A change of the partitions this process consumes, decided by the broker's group protocol.
#[derive(Debug)]
pub enum GroupEvent {
    /// Start consuming these partitions from their committed offsets.
    Assigned(Vec<(Arc<str>, u32)>),
    /// Stop these: finish what is in flight, commit, then answer on `done` (the source holds
    /// the partitions until then, or until its revoke timeout).
    Revoked {
        partitions: Vec<(Arc<str>, u32)>,
        done: std::sync::mpsc::SyncSender<()>,
    },
}

/// What the engine needs from a broker. Implementations are blocking; the engine calls them
/// from blocking threads.
pub trait Source: Send + Sync + 'static {
    /// What the broker does natively; see [`Capabilities`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::LOG
    }
    /// The number of partitions of `topic` (1 for a queue).
    fn partitions(&self, topic: &str) -> Result<u32, SourceError>;
    /// The next offset `group` will read from the partition (0 if it never committed). On a
    /// per-message source: how many of this process's deliveries were settled.
    fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError>;
    /// The offset the next appended message of the partition will get. On a per-message
    /// source: this process's deliveries so far plus what waits in the broker, so that
    /// `end_offset - committed` is the depth (ready + unacked) either way.
    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, SourceError>;
    /// Up to `max` messages of the partition from offset `from` on, in offset order, and no
    /// more once they hold `max_bytes` (always at least one, however large).
    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError>;
    /// Publish the outputs and move the offsets of `group`, atomically and durably.
    fn commit(&self, group: &str, commit: Commit) -> Result<(), SourceError>;
    /// Whether [`Source::commit`] writes the outputs and settles their inputs in one broker
    /// transaction (Kafka and RabbitMQ with `--exactly-once`): then a shared dedupe store's marks
    /// are written after it, rather than between the outputs and the settling, and a crash in
    /// between can no longer publish an output twice.
    fn transactional(&self) -> bool {
        false
    }
    /// Whether `topic` exists (outputs to a missing topic are refused before commit).
    fn topic_exists(&self, topic: &str) -> bool;
    /// Whether the broker can take `record` (weir's [`limits`], then the broker's own, such as
    /// its largest message). No I/O: the engine asks it for every dead letter it writes.
    fn fits(&self, record: &Record) -> Result<(), String> {
        within_limits(record)
    }
    /// Creates `topic` with `partitions` unless it exists (dead-letter topics).
    fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), SourceError>;
    /// Whether `group` already handled a message with idempotency key `key` (a done mark that
    /// has not expired at `now_ms`).
    fn dedupe_done(&self, group: &str, key: &[u8], now_ms: u64) -> Result<bool, SourceError>;
    /// Deletes done marks that expired before `now_ms`, at most `max`; returns how many.
    fn evict_dedupe(&self, now_ms: u64, max: usize) -> Result<usize, SourceError>;
    /// Whether everything of the partition below its end was fetched, given that the last
    /// fetch from `next` came back empty (`--drain`).
    fn at_end(&self, topic: &str, partition: u32, next: u64) -> Result<bool, SourceError> {
        Ok(next >= self.end_offset(topic, partition)?)
    }
    /// Joins `group` for `topics` where the broker assigns partitions to the members of a
    /// group (Kafka). `None`: the source has no groups, and this process consumes every
    /// partition (the embedded log).
    fn join_group(
        &self,
        _group: &str,
        _topics: &[String],
        _revoke_timeout: std::time::Duration,
    ) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<GroupEvent>>, SourceError> {
        Ok(None)
    }
    /// Leaves the group joined by `join_group`, after the last commit.
    fn leave_group(&self) -> Result<(), SourceError> {
        Ok(())
    }
    /// Woken when messages were appended, if the source can tell (the embedded log); without
    /// it, idle partitions poll.
    fn append_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// The partition's task ended without settling all it was handed (a lost link, a
    /// revocation, a stop with messages waiting): give those messages back to the broker now
    /// (a queue requeues them, for this process or another to take at once rather than when a
    /// lease or a link runs out), and let the partition start again with nothing held. Logs
    /// have nothing to do: their offsets say it.
    fn release(&self, _topic: &str, _partition: u32) {}
    /// What the lag of this source does not count, where it counts less than it seems
    /// (`weir status` and the admin server's `/status` say it).
    fn lag_note(&self) -> Option<String> {
        None
    }
    /// Keeps the messages (by offset) of the partition from being handed to another consumer
    /// for another [`Capabilities::lease`] (JetStream's in-progress ack, SQS's visibility).
    /// Sources without a lease have nothing to do.
    fn extend(&self, _topic: &str, _partition: u32, _offsets: &[u64]) -> Result<(), SourceError> {
        Ok(())
    }
}
