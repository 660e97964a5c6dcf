//! What the commands other than `weir run` need from wherever the topics live: create and list
//! topics, append, read a partition, and a group's committed offsets. One implementation per
//! broker, beside its [`Source`](super::Source); [`super::connect`] picks one by URL.

use super::lifecycle::{GroupInfo, SeekMove, TopicUsage};
use super::{Capabilities, Delivery, Output, Record, SourceError, TopicStats};
use weir_core::retention::{RetentionChange, SeekTo};

/// A dead letter as `weir dlq` shows it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// How `weir dlq show` names it: `PARTITION:OFFSET` on a log, the position in the queue
    /// (from 1, as listed) on a queue.
    pub id: String,
    pub delivery: Delivery,
    /// Replayed before (a log keeps its dead letters; a queue drops the replayed ones).
    pub replayed: bool,
}

/// What `weir topics create` asks beyond a name and partitions.
#[derive(Debug, Clone, Default)]
pub struct TopicSpec {
    /// `--fanout`: every group gets every message.
    pub fanout: bool,
    /// `--group`: with `fanout`, the groups whose queues are declared now.
    pub groups: Vec<String>,
    /// `--max-priority`: message priorities 0..=N within the topic (RabbitMQ).
    pub max_priority: Option<u8>,
    /// `--retention`, `--retention-bytes`, `--retention-policy`, `--segment-bytes`.
    pub retention: RetentionChange,
}

/// A broker as `weir topics`, `produce` and `consume` use it. Blocking, one command at a time;
/// `Send`, so the admin server can keep connections for requests between calls.
pub trait Broker: Send {
    /// The broker's name as messages give it (`the embedded log`, `Kafka`, `RabbitMQ`).
    fn name(&self) -> &'static str;

    /// What the broker does natively.
    fn capabilities(&self) -> Capabilities;

    /// Creates `topic`. `replication` is a replica count where the broker has one (Kafka).
    fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
    ) -> Result<(), SourceError>;

    /// Sends `request` to `topic` and waits up to `timeout` for the answer with its
    /// `correlation-id`, where the broker has its own way to route one (RabbitMQ: an exclusive
    /// reply queue per caller). `None`: it has not, and `weir request` reads a reply topic.
    fn request_reply(
        &mut self,
        _topic: &str,
        _request: Record,
        _timeout: std::time::Duration,
    ) -> Option<Result<Option<Record>, SourceError>> {
        None
    }

    /// Whether this command opened the embedded log's data directory itself (no `weir run`
    /// serves it): nothing else can use the log while the command holds it.
    fn holds_data_dir(&self) -> bool {
        false
    }

    /// Whether `topic` exists (by its partitions' ends, unless the broker knows better).
    fn has_topic(&mut self, topic: &str) -> Result<bool, SourceError> {
        match self.ends(topic) {
            Ok(_) => Ok(true),
            Err(SourceError::UnknownTopic(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates `topic` as `spec` asks. Fan-out: every consumer group gets every message; on a
    /// log (and on Redis Streams and JetStream) every topic does that already, so this creates
    /// a topic; RabbitMQ declares a fanout exchange and binds a queue for each of the groups.
    /// Message priorities are RabbitMQ's (`x-max-priority`); elsewhere they are refused.
    fn create_topic_with(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
        spec: &TopicSpec,
    ) -> Result<(), SourceError> {
        refuse_priority(self.name(), spec)?;
        refuse_retention(self.name(), spec)?;
        self.create_topic(topic, partitions, replication)
    }

    /// Deletes `topic` and what it holds (where the broker allows it).
    fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        Err(SourceError::Invalid(format!(
            "deleting topics on {} is not supported; {topic} stays",
            self.name()
        )))
    }

    /// Changes what `topic` keeps (`weir topics alter`), where the broker has a retention
    /// weir can set.
    fn alter_topic(&mut self, topic: &str, change: &RetentionChange) -> Result<(), SourceError> {
        let _ = change;
        Err(self.not_here(&format!("changing what topic {topic} keeps")))
    }

    /// Bytes on disk, retention and oldest record per topic, where the broker says.
    fn usage(&mut self, topic: Option<&str>) -> Result<Vec<TopicUsage>, SourceError> {
        let _ = topic;
        Ok(Vec::new())
    }

    /// The consumer groups and where each one is.
    fn list_groups(&mut self) -> Result<Vec<GroupInfo>, SourceError> {
        Err(self.not_here("listing consumer groups"))
    }

    /// Moves `group`'s committed offsets on `topic` (every partition, or `partition`).
    fn seek_group(
        &mut self,
        group: &str,
        topic: &str,
        partition: Option<u32>,
        to: SeekTo,
    ) -> Result<Vec<SeekMove>, SourceError> {
        let _ = (topic, partition, to);
        Err(self.not_here(&format!("moving group {group}")))
    }

    /// Deletes `group` and its committed offsets.
    fn delete_group(&mut self, group: &str) -> Result<(), SourceError> {
        Err(self.not_here(&format!("deleting group {group}")))
    }

    /// The error of a lifecycle verb the broker does not have.
    fn not_here(&self, what: &str) -> SourceError {
        SourceError::Invalid(format!(
            "{what} is not something weir does on {}; use the broker's own tools (see \
             docs/sources.md)",
            self.name()
        ))
    }

    /// Every topic (or `topic`) with each partition's end and, per group (or only `group`),
    /// its committed offset and lag.
    fn stats(
        &mut self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError>;

    /// Appends `batch` to `topic`, durably (acknowledged by the broker) when this returns.
    fn append(&mut self, topic: &str, batch: Vec<Record>) -> Result<(), SourceError>;

    /// Each partition of `topic` with its end offset.
    fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError>;

    /// The next offset `group` will read from the partition (0 if it never committed).
    fn committed(&mut self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError>;

    /// Up to `max` messages of a partition from `from` on, below `end`, without consuming them.
    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError>;

    /// Moves `group`'s committed offset of the partition.
    fn commit_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), SourceError>;

    /// Takes up to `max` messages off a queue for `group` (`weir consume --group` on a queue;
    /// a queue without groups, RabbitMQ's, ignores it), in the
    /// order the broker hands them over; they are the caller's once [`Broker::settle_taken`]
    /// acks them, and go back to the queue if it is never called. Logs are read by offset.
    fn take(&mut self, topic: &str, group: &str, max: usize) -> Result<Vec<Delivery>, SourceError> {
        let _ = (topic, group, max);
        Err(SourceError::Invalid(format!(
            "{} is a log: read it by offset",
            self.name()
        )))
    }

    /// Acks what [`Broker::take`] took.
    fn settle_taken(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Every dead letter in `dlq`, oldest first. A log keeps which were replayed in a topic
    /// beside it (`<dlq>.replayed`, one record per replay); the embedded log and queues
    /// override this with what they do natively.
    fn dead_letters(&mut self, dlq: &str) -> Result<Vec<DeadLetter>, SourceError> {
        super::dead_letters::read_log(self, dlq)
    }

    /// Publishes `outputs` in place of `letter` and records that it was replayed, so that a
    /// later replay without `--force` skips it.
    fn replay(
        &mut self,
        dlq: &str,
        letter: &DeadLetter,
        outputs: Vec<Output>,
    ) -> Result<(), SourceError> {
        super::dead_letters::replay_on_log(self, dlq, letter, outputs)
    }
}

/// The checks of `topics create` on a broker whose topics have one partition (a stream shared by
/// a group's processes): one partition asked for, and a name the broker takes (`naming`).
pub fn check_single_partition_topic(
    naming: &weir_core::topic::Naming,
    topic: &str,
    partitions: u32,
) -> Result<(), SourceError> {
    if partitions != 1 {
        return Err(SourceError::Invalid(format!(
            "a {} topic has no partitions; create `{topic}` with --partitions 1 (the \
             processes of a group share its messages)",
            naming.broker
        )));
    }
    match (naming.problem)(topic) {
        Some(why) => Err(SourceError::InvalidTopic {
            name: topic.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Refuses `--max-priority` on a log: priorities within a topic are RabbitMQ's.
pub fn refuse_priority(broker: &str, spec: &TopicSpec) -> Result<(), SourceError> {
    if spec.max_priority.is_none() {
        return Ok(());
    }
    Err(SourceError::Invalid(format!(
        "--max-priority: message priorities within a topic are RabbitMQ's priority queues; \
         {broker} orders a topic's messages by offset. Put urgent work on a topic of its own and \
         run with --priority urgent,routine"
    )))
}

/// Refuses `--retention` and its kin where the broker keeps records by rules weir does not set.
pub fn refuse_retention(broker: &str, spec: &TopicSpec) -> Result<(), SourceError> {
    if spec.retention.is_empty() {
        return Ok(());
    }
    Err(SourceError::Invalid(format!(
        "--retention, --retention-bytes, --retention-policy and --segment-bytes set the embedded \
         log's retention; {broker} keeps messages by its own rules (see docs/sources.md)"
    )))
}

/// Keeps only `group`'s offsets in `stats`, when a group is given.
pub fn filter_group(stats: &mut [TopicStats], group: Option<&str>) {
    if let Some(g) = group {
        for t in stats {
            for p in &mut t.partitions {
                p.groups.retain(|x| x.group == g);
            }
        }
    }
}
