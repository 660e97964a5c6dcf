//! RabbitMQ as `weir topics`, `produce` and `consume` use it.

use super::fanout::{self, Kind};
pub(crate) use super::publish::publish_confirmed;
use super::{
    AmqpConfig, REQUEST_TIMEOUT, broker_error, check_queue_name, is_not_found,
    is_precondition_failed, redact,
};
use crate::source::broker::{Broker, DeadLetter, TopicSpec};
use crate::source::rt::Rt;
use crate::source::{
    Capabilities, Delivery, GroupOffset, Output, PartitionStats, Record, SourceError, TopicStats,
};
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use std::sync::Arc;

/// Connects to the broker, within [`REQUEST_TIMEOUT`].
pub(crate) async fn connect(url: &str) -> Result<Connection, SourceError> {
    let what = format!("connecting to {}", redact(url));
    let props = ConnectionProperties::default().with_connection_name("weir".into());
    tokio::time::timeout(REQUEST_TIMEOUT, Connection::connect(url, props))
        .await
        .map_err(|_| broker_error(&what, "no answer"))?
        .map_err(|e| {
            // Only the broker's refusal gets the hint: a broker that cannot be reached at all
            // says nothing about the vhost.
            let hint = if e.is_io_error() { "" } else { vhost_hint(url) };
            broker_error(&what, format!("{e}{hint}"))
        })
}

/// A hint for the URL whose path names the virtual host "" (`amqp://host:5672/`: the AMQP URI
/// spec reads what follows the last `/` as the vhost name), which the broker refuses.
fn vhost_hint(url: &str) -> &'static str {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(u) if u.vhost.is_empty() => {
            "; the URL ends in `/`, which names the virtual host \"\": leave the slash out for the \
             default vhost `/` (or write it as %2f: amqp://host:5672/%2f)"
        }
        _ => "",
    }
}

/// A new channel. Tried again when the answer is a soft error: right after the broker closed a
/// channel (a passive declare of a missing queue), lapin can hand that close to the next open.
pub(crate) async fn channel(conn: &Connection) -> Result<Channel, SourceError> {
    let mut tries = 0;
    loop {
        match conn.create_channel().await {
            Ok(ch) => return Ok(ch),
            Err(e) if e.is_amqp_soft_error() && tries < 3 => tries += 1,
            Err(e) => return Err(broker_error("opening a channel", e)),
        }
    }
}

/// The ready messages of `queue`, or `None` when it does not exist. Asked on a channel of its
/// own: the broker closes a channel that asks after a missing queue.
pub(crate) async fn depth(conn: &Connection, queue: &str) -> Result<Option<u32>, SourceError> {
    if check_queue_name(queue).is_err() {
        return Ok(None);
    }
    let ch = channel(conn).await?;
    let opts = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let r = ch
        .queue_declare(queue.into(), opts, FieldTable::default())
        .await;
    match r {
        Ok(q) => {
            let _ = ch.close(200, "done".into()).await;
            Ok(Some(q.message_count()))
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(broker_error(&format!("looking up queue {queue}"), e)),
    }
}

/// Declares a durable queue of `queue_type` (idempotent when it exists with the same type).
pub(crate) async fn declare(
    conn: &Connection,
    queue: &str,
    queue_type: &str,
) -> Result<(), SourceError> {
    declare_with(conn, queue, queue_type, None).await
}

/// [`declare`], with message priorities up to `max_priority` (`x-max-priority`) if given.
pub(crate) async fn declare_with(
    conn: &Connection,
    queue: &str,
    queue_type: &str,
    max_priority: Option<u8>,
) -> Result<(), SourceError> {
    check_queue_name(queue)?;
    let ch = channel(conn).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(queue_type)),
    );
    if let Some(n) = max_priority {
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(n));
    }
    let opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match ch.queue_declare(queue.into(), opts, args).await {
        Ok(_) => {
            let _ = ch.close(200, "done".into()).await;
            Ok(())
        }
        // It exists with other arguments (another queue type): it exists, which is what the
        // caller needs (unless it asked for priorities, which the broker refused).
        Err(e) if is_precondition_failed(&e) && max_priority.is_none() => Ok(()),
        Err(e) if max_priority.is_some() => Err(broker_error(
            &format!("declaring priority queue {queue}"),
            format!(
                "{e} (quorum queues take no x-max-priority: add --source-property queue-type=classic)"
            ),
        )),
        Err(e) => Err(broker_error(&format!("declaring queue {queue}"), e)),
    }
}

/// A connection for one command, with a confirm-mode channel for appends and the messages
/// `take` took and has not acked.
pub struct Rabbit {
    pub(super) rt: Rt,
    pub(super) cfg: AmqpConfig,
    pub(super) conn: Arc<Connection>,
    publisher: Option<Arc<Channel>>,
    /// The channel of the last `take`, with the highest tag it took.
    taken: Option<(Arc<Channel>, u64)>,
    /// The channel `dead_letters` read on, with the delivery tag of each dead letter by
    /// position; what is not acked goes back to the queue when the connection closes.
    letters: Option<(Arc<Channel>, Vec<u64>)>,
}

impl Rabbit {
    pub fn connect(cfg: AmqpConfig) -> Result<Rabbit, SourceError> {
        let rt = Rt::new("weir-amqp").map_err(|e| broker_error("starting the AMQP runtime", e))?;
        let url = cfg.url.clone();
        let conn = Arc::new(rt.run(async move { connect(&url).await })?);
        Ok(Rabbit {
            rt,
            cfg,
            conn,
            publisher: None,
            taken: None,
            letters: None,
        })
    }

    /// The confirm-mode channel appends go through, opened at the first.
    pub(super) fn publisher(&mut self) -> Result<Arc<Channel>, SourceError> {
        if let Some(ch) = &self.publisher {
            return Ok(ch.clone());
        }
        let conn = self.conn.clone();
        let ch = self.rt.run(async move {
            let ch = channel(&conn).await?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| broker_error("enabling publisher confirms", e))?;
            Ok::<_, SourceError>(ch)
        })?;
        let ch = Arc::new(ch);
        self.publisher = Some(ch.clone());
        Ok(ch)
    }

    fn depth(&self, queue: &str) -> Result<u32, SourceError> {
        let (conn, q) = (self.conn.clone(), queue.to_string());
        self.rt
            .run(async move { depth(&conn, &q).await })?
            .ok_or_else(|| SourceError::UnknownTopic(queue.to_string()))
    }

    /// Up to `max` messages of `queue` on a channel of their own, unacked.
    fn get(&self, queue: &str, max: usize) -> Result<(Arc<Channel>, Vec<Delivery>), SourceError> {
        self.depth(queue)?;
        let (conn, q) = (self.conn.clone(), queue.to_string());
        self.rt.run(async move {
            let ch = Arc::new(channel(&conn).await?);
            let name: Arc<str> = Arc::from(q.as_str());
            let mut out = Vec::new();
            while out.len() < max {
                let got = ch
                    .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| broker_error(&format!("reading {q}"), e))?;
                let Some(m) = got else { break };
                let d = m.delivery;
                let (record, redeliveries) = super::from_amqp(&d.properties, d.data, d.redelivered);
                out.push(Delivery {
                    topic: name.clone(),
                    partition: 0,
                    offset: d.delivery_tag,
                    record,
                    redeliveries,
                });
            }
            Ok((ch, out))
        })
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        // Closing the connection hands whatever was read and not acked back to the queue.
        let conn = self.conn.clone();
        let _ = self
            .rt
            .run(async move { conn.close(200, "bye".into()).await });
    }
}

impl Broker for Rabbit {
    fn name(&self) -> &'static str {
        "RabbitMQ"
    }

    fn capabilities(&self) -> Capabilities {
        super::CAPABILITIES
    }

    fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        _replication: Option<i32>,
    ) -> Result<(), SourceError> {
        if partitions != 1 {
            return Err(SourceError::Invalid(format!(
                "a RabbitMQ queue has no partitions: create {topic} with --partitions 1 (the default); \
                 processes on one queue share its messages"
            )));
        }
        if self.has_topic(topic)? {
            return Err(SourceError::TopicExists(topic.to_string()));
        }
        let (conn, q, ty) = (
            self.conn.clone(),
            topic.to_string(),
            self.cfg.queue_type.clone(),
        );
        self.rt.run(async move { declare(&conn, &q, &ty).await })
    }

    fn request_reply(
        &mut self,
        topic: &str,
        request: Record,
        timeout: std::time::Duration,
    ) -> Option<Result<Option<Record>, SourceError>> {
        Some(self.request_over_amqp(topic, request, timeout))
    }

    fn has_topic(&mut self, topic: &str) -> Result<bool, SourceError> {
        let (conn, t) = (self.conn.clone(), topic.to_string());
        Ok(self
            .rt
            .run(async move { fanout::kind(&conn, &t).await })?
            .is_some())
    }

    fn create_topic_with(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
        spec: &TopicSpec,
    ) -> Result<(), SourceError> {
        crate::source::broker::refuse_retention(self.name(), spec)?;
        if !spec.fanout {
            let Some(max) = spec.max_priority else {
                return self.create_topic(topic, partitions, replication);
            };
            if partitions != 1 {
                return Err(SourceError::Invalid(format!(
                    "a RabbitMQ queue has no partitions: create {topic} with --partitions 1"
                )));
            }
            if self.has_topic(topic)? {
                return Err(SourceError::TopicExists(topic.to_string()));
            }
            let (conn, q, ty) = (
                self.conn.clone(),
                topic.to_string(),
                self.cfg.queue_type.clone(),
            );
            return self
                .rt
                .run(async move { declare_with(&conn, &q, &ty, Some(max)).await });
        }
        if spec.max_priority.is_some() {
            return Err(SourceError::Invalid(format!(
                "--max-priority with --fanout: the groups' queues of {topic} take no priority \
                 here; create it without one of them"
            )));
        }
        let groups = &spec.groups;
        if partitions != 1 {
            return Err(SourceError::Invalid(format!(
                "a RabbitMQ fanout topic has no partitions: create {topic} with --partitions 1 \
                 (the default)"
            )));
        }
        let (conn, t, ty) = (
            self.conn.clone(),
            topic.to_string(),
            self.cfg.queue_type.clone(),
        );
        let groups = groups.to_vec();
        self.rt.run(async move {
            if fanout::kind(&conn, &t).await?.is_some() {
                return Err(SourceError::TopicExists(t));
            }
            fanout::declare_exchange(&conn, &t).await?;
            for g in &groups {
                fanout::bind_group(&conn, &t, g, &ty).await?;
            }
            Ok(())
        })
    }

    fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        let (conn, q) = (self.conn.clone(), topic.to_string());
        self.rt.run(async move {
            let ch = channel(&conn).await?;
            ch.queue_delete(
                q.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await
            .map_err(|e| broker_error(&format!("deleting {q}"), e))?;
            let _ = ch.close(200, "deleted".into()).await;
            Ok(())
        })
    }

    fn stats(
        &mut self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError> {
        let Some(topic) = topic else {
            return Err(SourceError::Invalid(
                "RabbitMQ lists queues only through its management API; name one: \
                 weir topics list QUEUE"
                    .into(),
            ));
        };
        if self.kind_of(topic)? == Kind::Fanout {
            return self.fanout_stats(topic, group);
        }
        let ready = u64::from(self.depth(topic)?);
        // A queue has no committed offsets: what waits in it is every group's lag.
        let groups = group
            .map(|g| GroupOffset {
                group: g.to_string(),
                committed: 0,
                lag: ready,
            })
            .into_iter()
            .collect();
        Ok(vec![TopicStats {
            topic: topic.to_string(),
            partitions: vec![PartitionStats {
                partition: 0,
                end_offset: ready,
                groups,
            }],
        }])
    }

    fn append(&mut self, topic: &str, batch: Vec<Record>) -> Result<(), SourceError> {
        // Refuses a missing queue (or exchange), as the logs refuse a missing topic.
        let fanouts = self.fanouts([topic])?;
        let ch = self.publisher()?;
        let q = topic.to_string();
        self.rt.run(async move {
            let records: Vec<(&str, &Record)> = batch.iter().map(|r| (q.as_str(), r)).collect();
            publish_confirmed(&ch, &records, &fanouts).await
        })
    }

    fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError> {
        // A fanout topic keeps nothing of its own: the error says to name a group.
        let queue = self.queue_of(topic, None)?;
        Ok(vec![(0, u64::from(self.depth(&queue)?))])
    }

    fn committed(
        &mut self,
        _group: &str,
        topic: &str,
        _partition: u32,
    ) -> Result<u64, SourceError> {
        self.kind_of(topic)?;
        Ok(0)
    }

    /// Shows messages without taking them: they are read unacked on a channel of their own,
    /// which is then closed, so the broker puts them back (marked redelivered).
    fn read(
        &mut self,
        topic: &str,
        _partition: u32,
        from: u64,
        _end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let queue = self.queue_of(topic, None)?;
        let (ch, mut got) = self.get(&queue, from as usize + max)?;
        let _ = self
            .rt
            .run(async move { ch.close(200, "peeked".into()).await });
        let got: Vec<Delivery> = got
            .drain(..)
            .enumerate()
            .skip(from as usize)
            .map(|(i, mut d)| {
                d.offset = i as u64;
                d
            })
            .collect();
        Ok(got)
    }

    fn commit_offset(
        &mut self,
        _group: &str,
        _topic: &str,
        _partition: u32,
        _offset: u64,
    ) -> Result<(), SourceError> {
        Err(SourceError::Invalid(
            "a RabbitMQ queue has no offsets to commit".into(),
        ))
    }

    fn take(&mut self, topic: &str, group: &str, max: usize) -> Result<Vec<Delivery>, SourceError> {
        self.settle_taken()?;
        let queue = self.queue_of(topic, Some(group))?;
        let (ch, got) = self.get(&queue, max)?;
        if let Some(last) = got.last() {
            self.taken = Some((ch, last.offset));
        }
        Ok(got
            .into_iter()
            .enumerate()
            .map(|(i, mut d)| {
                d.offset = i as u64;
                d
            })
            .collect())
    }

    fn settle_taken(&mut self) -> Result<(), SourceError> {
        let Some((ch, last)) = self.taken.take() else {
            return Ok(());
        };
        self.rt.run(async move {
            ch.basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| broker_error("acking what was printed", e))?;
            let _ = ch.close(200, "taken".into()).await;
            Ok(())
        })
    }

    /// Takes every message of the dead-letter queue, unacked: a replayed one is acked (it
    /// leaves the queue), the rest go back when the connection closes, marked redelivered.
    /// Ids are positions in the queue as read, from 1.
    fn dead_letters(&mut self, dlq: &str) -> Result<Vec<DeadLetter>, SourceError> {
        if let Some((ch, _)) = self.letters.take() {
            let _ = self
                .rt
                .run(async move { ch.close(200, "again".into()).await });
        }
        let depth = self.depth(dlq)? as usize;
        let (ch, got) = self.get(dlq, depth)?;
        let tags = got.iter().map(|d| d.offset).collect();
        self.letters = Some((ch, tags));
        Ok(got
            .into_iter()
            .enumerate()
            .map(|(i, mut d)| {
                d.offset = i as u64 + 1;
                DeadLetter {
                    id: d.offset.to_string(),
                    delivery: d,
                    replayed: false,
                }
            })
            .collect())
    }

    /// Publishes `outputs` with confirms, then acks the dead letter.
    fn replay(
        &mut self,
        _dlq: &str,
        letter: &DeadLetter,
        outputs: Vec<Output>,
    ) -> Result<(), SourceError> {
        let tag = self.letters.as_ref().and_then(|(ch, tags)| {
            let i = (letter.delivery.offset as usize).checked_sub(1)?;
            Some((ch.clone(), *tags.get(i)?))
        });
        let Some((letters, tag)) = tag else {
            return Err(SourceError::Invalid(format!(
                "dead letter {} was not read by this connection",
                letter.id
            )));
        };
        let mut outputs = outputs;
        let mut fanouts = self.fanouts(outputs.iter().map(|o| o.topic.as_str()))?;
        // Replayed to a fanout topic, a dead letter goes to the queue of the group that gave
        // up on it, not to every group again.
        if !fanouts.is_empty() {
            let group = letter
                .delivery
                .record
                .headers
                .iter()
                .rev()
                .find(|(n, _)| n == weir_core::dlq::GROUP)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            for o in &mut outputs {
                if !fanouts.contains(&o.topic) {
                    continue;
                }
                let Some(g) = group.as_deref() else {
                    return Err(SourceError::Invalid(format!(
                        "{} is a fanout topic and dead letter {} does not say which group gave \
                         up on it (it predates weir.dlq.group): replaying it would send it to \
                         every group; replay it with --module, or produce it to the group's \
                         queue {}.GROUP",
                        o.topic, letter.id, o.topic
                    )));
                };
                o.topic = fanout::group_queue(&o.topic, g);
            }
            fanouts = self.fanouts(outputs.iter().map(|o| o.topic.as_str()))?;
        }
        let ch = self.publisher()?;
        self.rt.run(async move {
            let records: Vec<(&str, &Record)> = outputs
                .iter()
                .map(|o| (o.topic.as_str(), &o.record))
                .collect();
            publish_confirmed(&ch, &records, &fanouts).await?;
            letters
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await
                .map_err(|e| broker_error("acking a replayed dead letter", e))
        })
    }
}
