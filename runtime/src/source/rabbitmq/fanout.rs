//! Fan-out on RabbitMQ: a topic created with `weir topics create T --fanout` is a durable fanout
//! exchange `T` rather than a queue, and each consumer group of it reads a durable queue of its
//! own, `T.GROUP`, bound to the exchange when the group first runs (or named up front with
//! `topics create T --fanout --group G`). A message published to `T` is copied into every
//! bound group's queue, so each group gets every message, and a slow group's backlog waits in
//! its own queue without holding back the others. A group receives what is published after
//! its queue is bound, as RabbitMQ's fanout exchanges do; a publish with no group bound yet is
//! refused (the broker returns it as unroutable) rather than dropped.

use super::AmqpConfig;
use super::broker::{Rabbit, channel, declare, depth};
use super::{broker_error, check_queue_name, is_not_found};
use crate::source::connect::ConsumerOptions;
use crate::source::{GroupOffset, PartitionStats, SourceError, TopicStats};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use std::collections::{HashMap, HashSet};

/// What a name is on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A queue: a work queue, its messages shared by every consumer.
    Queue,
    /// A fanout exchange: every group has a queue of its own.
    Fanout,
}

/// The queue group `group` reads of fanout topic `topic`.
pub(crate) fn group_queue(topic: &str, group: &str) -> String {
    format!("{topic}.{group}")
}

/// Whether the exchange `name` exists. Asked on a channel of its own: the broker closes a
/// channel that asks after a missing exchange.
pub(crate) async fn exchange_exists(conn: &Connection, name: &str) -> Result<bool, SourceError> {
    if name.is_empty() || check_queue_name(name).is_err() {
        return Ok(false);
    }
    let ch = channel(conn).await?;
    let opts = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match ch
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            opts,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => {
            let _ = ch.close(200, "done".into()).await;
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(broker_error(&format!("looking up exchange {name}"), e)),
    }
}

/// What `name` is: a queue, a fanout exchange, or nothing (`None`). A queue wins where both
/// exist.
pub(crate) async fn kind(conn: &Connection, name: &str) -> Result<Option<Kind>, SourceError> {
    if depth(conn, name).await?.is_some() {
        return Ok(Some(Kind::Queue));
    }
    Ok(exchange_exists(conn, name).await?.then_some(Kind::Fanout))
}

/// Declares the durable fanout exchange `topic`.
pub(crate) async fn declare_exchange(conn: &Connection, topic: &str) -> Result<(), SourceError> {
    check_queue_name(topic)?;
    let ch = channel(conn).await?;
    let opts = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        topic.into(),
        ExchangeKind::Fanout,
        opts,
        FieldTable::default(),
    )
    .await
    .map_err(|e| {
        broker_error(
            &format!("declaring fanout exchange {topic}"),
            format!("{e} (an exchange of another type by that name exists?)"),
        )
    })?;
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

/// Declares group `group`'s queue of fanout topic `topic` and binds it (both idempotent);
/// returns the queue's name.
pub(crate) async fn bind_group(
    conn: &Connection,
    topic: &str,
    group: &str,
    queue_type: &str,
) -> Result<String, SourceError> {
    check_group(topic, group)?;
    let q = group_queue(topic, group);
    declare(conn, &q, queue_type).await?;
    let ch = channel(conn).await?;
    ch.queue_bind(
        q.as_str().into(),
        topic.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| broker_error(&format!("binding {q} to fanout exchange {topic}"), e))?;
    let _ = ch.close(200, "done".into()).await;
    Ok(q)
}

/// A group's queue must not be one weir names for another purpose (`T.dlq`, `T.retry`).
fn check_group(topic: &str, group: &str) -> Result<(), SourceError> {
    if matches!(group, "dlq" | "retry") || group.is_empty() {
        return Err(SourceError::Invalid(format!(
            "group `{group}` on fanout topic {topic}: its queue would be {topic}.{group}, a name \
             weir uses for dead letters or retries; pick another group name"
        )));
    }
    check_queue_name(&group_queue(topic, group))
}

/// Whether `name` is a caller's reply queue: server-named (`amq.gen-...`, exclusive to the
/// caller's connection: other connections can publish to it but not look it up), or direct
/// reply-to (`amq.rabbitmq.reply-to.<caller>`, the name RabbitMQ gives the caller's pseudo-queue
/// in the request's `reply_to`). Either is gone when its caller is: an answer to it is published
/// without `mandatory` and dropped then, as RabbitMQ's RPC pattern expects.
pub(crate) fn is_reply_queue(name: &str) -> bool {
    name.starts_with("amq.gen-") || name.starts_with("amq.rabbitmq.reply-to")
}

/// Where a message for `name` is published: (exchange, routing key).
pub(crate) fn route<'a>(name: &'a str, fanouts: &HashSet<String>) -> (&'a str, &'a str) {
    if fanouts.contains(name) {
        (name, "")
    } else {
        ("", name)
    }
}

/// Resolves each consumed topic to its queue: its own, or for a fanout topic the group's
/// (declared and bound here, so a group receives what is published from its first run on).
pub(super) async fn group_queues(
    cfg: &AmqpConfig,
    opts: &ConsumerOptions,
) -> Result<(HashMap<String, String>, HashSet<String>), SourceError> {
    let conn = super::broker::connect(&cfg.url).await?;
    let mut queues = HashMap::new();
    let mut fanouts = HashSet::new();
    for t in &opts.topics {
        match kind(&conn, t).await? {
            Some(Kind::Queue) => {}
            Some(Kind::Fanout) => {
                if !opts.retry_topics.is_empty() {
                    return Err(SourceError::Invalid(format!(
                        "requeue mode on fanout topic {t}: its retry queue would be shared by \
                         every group of {t}, and each would take the others' retries; use the \
                         default retries (--retry-mode blocking) on fanout topics"
                    )));
                }
                let q = bind_group(&conn, t, &opts.group, &cfg.queue_type).await?;
                queues.insert(t.clone(), q);
                fanouts.insert(t.clone());
            }
            None => return Err(SourceError::UnknownTopic(t.clone())),
        }
    }
    let _ = conn.close(200, "resolved".into()).await;
    Ok((queues, fanouts))
}

impl Rabbit {
    /// What `topic` is: a queue or a fanout exchange.
    pub(super) fn kind_of(&self, topic: &str) -> Result<Kind, SourceError> {
        let (conn, t) = (self.conn.clone(), topic.to_string());
        self.rt
            .run(async move { kind(&conn, &t).await })?
            .ok_or_else(|| SourceError::UnknownTopic(topic.to_string()))
    }

    /// The names in `topics` that are fanout exchanges.
    pub(super) fn fanouts<'a>(
        &self,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashSet<String>, SourceError> {
        let mut out = HashSet::new();
        for t in topics {
            if !out.contains(t) && self.kind_of(t)? == Kind::Fanout {
                out.insert(t.to_string());
            }
        }
        Ok(out)
    }

    /// The queue a command reads for `topic`: the topic's own, or on a fanout topic `group`'s.
    pub(super) fn queue_of(&self, topic: &str, group: Option<&str>) -> Result<String, SourceError> {
        match (self.kind_of(topic)?, group) {
            (Kind::Queue, _) => Ok(topic.to_string()),
            (Kind::Fanout, Some(g)) => Ok(group_queue(topic, g)),
            (Kind::Fanout, None) => Err(SourceError::Invalid(format!(
                "{topic} is a fanout topic: it keeps no messages of its own, each group's queue \
                 does; name a group (weir consume {topic} --group G takes that group's \
                 messages; weir topics list {topic} --group G shows its lag)"
            ))),
        }
    }

    /// A fanout topic's groups, each with what waits in its queue as its lag: `group`'s, or
    /// every bound queue's (from the management API, the only place that lists bindings).
    pub(super) fn fanout_stats(
        &self,
        topic: &str,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError> {
        let groups: Vec<String> = match (group, &self.cfg.management) {
            (Some(g), _) => vec![g.to_string()],
            (None, Some(m)) => {
                let (m, t) = (m.clone(), topic.to_string());
                let prefix = format!("{topic}.");
                self.rt
                    .run(async move { m.bound_queues(&t).await })?
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|q| q.strip_prefix(&prefix).map(str::to_string))
                    .collect()
            }
            (None, None) => {
                return Err(SourceError::Invalid(format!(
                    "{topic} is a fanout topic: AMQP cannot list the groups bound to it; name \
                     one (weir topics list {topic} --group G), or give \
                     --source-property management-url=http://host:15672"
                )));
            }
        };
        let mut out = Vec::new();
        for g in groups {
            let q = group_queue(topic, &g);
            let (conn, q2) = (self.conn.clone(), q.clone());
            // A group that never ran has no queue yet: nothing waits for it.
            let ready = self
                .rt
                .run(async move { depth(&conn, &q2).await })?
                .unwrap_or(0);
            out.push(GroupOffset {
                group: g,
                committed: 0,
                lag: u64::from(ready),
            });
        }
        Ok(vec![TopicStats {
            topic: topic.to_string(),
            partitions: vec![PartitionStats {
                partition: 0,
                end_offset: out.iter().map(|g| g.lag).max().unwrap_or(0),
                groups: out,
            }],
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_group_queues() {
        let fanouts: HashSet<String> = ["events".to_string()].into();
        let cases = [
            ("events", ("events", "")),
            ("orders", ("", "orders")),
            ("events.billing", ("", "events.billing")),
        ];
        for (name, want) in cases {
            assert_eq!(route(name, &fanouts), want, "{name}");
        }
        assert_eq!(group_queue("events", "billing"), "events.billing");
        for (group, ok) in [
            ("billing", true),
            ("dlq", false),
            ("retry", false),
            ("", false),
        ] {
            assert_eq!(check_group("events", group).is_ok(), ok, "{group}");
        }
    }
}
