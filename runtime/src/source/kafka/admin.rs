//! The side of Kafka that needs no consumer group: metadata, watermarks, committed offsets of
//! any group, creating topics, and the plain producer and reader behind `weir produce` and
//! `weir consume`.

use super::publisher::Publisher;
use super::{KafkaConfig, Logged, REQUEST_TIMEOUT, storage};
use crate::source::{Delivery, GroupOffset, PartitionStats, Record, SourceError, TopicStats};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the set of known topics may be re-read from the brokers on a miss.
const TOPICS_REFRESH: Duration = Duration::from_secs(1);

/// Metadata, watermarks and topic administration.
pub struct Admin {
    pub(super) cfg: KafkaConfig,
    /// A group-less consumer: metadata and watermark requests (it never creates topics).
    pub(super) meta: BaseConsumer<Logged>,
    pub(super) admin: AdminClient<Logged>,
    /// Topics known to exist, and when the set was last read.
    pub(super) known: Mutex<(HashSet<String>, Option<Instant>)>,
}

impl Admin {
    pub fn connect(cfg: &KafkaConfig) -> Result<Admin, SourceError> {
        cfg.validate()?;
        let meta = cfg
            .client(&[("allow.auto.create.topics", "false")])
            .create_with_context(Logged)
            .map_err(|e| bad_config(cfg, e))?;
        let admin = cfg
            .client(&[])
            .create_with_context(Logged)
            .map_err(|e| bad_config(cfg, e))?;
        Ok(Admin {
            cfg: cfg.clone(),
            meta,
            admin,
            known: Mutex::new((HashSet::new(), None)),
        })
    }

    pub(crate) fn config(&self) -> &KafkaConfig {
        &self.cfg
    }

    /// Partition ids of `topic`, in order; an unknown topic is the user's to fix.
    pub fn partition_ids(&self, topic: &str) -> Result<Vec<u32>, SourceError> {
        let md = self
            .meta
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| unreachable_brokers(&self.cfg, e))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Err(SourceError::UnknownTopic(topic.to_string()));
        };
        match t.error() {
            None => {}
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                return Err(SourceError::UnknownTopic(topic.to_string()));
            }
            Some(e) => {
                return Err(storage(
                    &format!("metadata of topic {topic}"),
                    format!("{e:?}"),
                ));
            }
        }
        if t.partitions().is_empty() {
            return Err(SourceError::UnknownTopic(topic.to_string()));
        }
        let mut ids: Vec<u32> = t.partitions().iter().map(|p| p.id() as u32).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    pub fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        Ok(self.partition_ids(topic)?.len() as u32)
    }

    pub fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), SourceError> {
        let (low, high) = self
            .meta
            .fetch_watermarks(topic, partition as i32, REQUEST_TIMEOUT)
            .map_err(|e| storage(&format!("watermarks of {topic}/{partition}"), e))?;
        Ok((low.max(0) as u64, high.max(0) as u64))
    }

    pub fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, SourceError> {
        Ok(self.watermarks(topic, partition)?.1)
    }

    /// A consumer of `group` that never joins it: reads and commits the group's offsets.
    pub(super) fn group_client(&self, group: &str) -> Result<BaseConsumer<Logged>, SourceError> {
        self.cfg
            .client(&[("enable.auto.commit", "false")])
            .set("group.id", group)
            .create_with_context(Logged)
            .map_err(|e| bad_config(&self.cfg, e))
    }

    /// `group`'s committed offsets for the given partitions; a partition the group never
    /// committed reads as its low watermark (where an `earliest` reset starts).
    fn committed_many(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<u64>, SourceError> {
        let c = self.group_client(group)?;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p as i32);
        }
        let got = c
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| storage(&format!("committed offsets of group {group}"), e))?;
        partitions
            .iter()
            .map(
                |p| match got.find_partition(topic, *p as i32).map(|e| e.offset()) {
                    Some(Offset::Offset(n)) if n >= 0 => Ok(n as u64),
                    _ => Ok(self.watermarks(topic, *p)?.0),
                },
            )
            .collect()
    }

    pub fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError> {
        Ok(self.committed_many(group, topic, &[partition])?[0])
    }

    /// Whether `topic` exists; a miss re-reads the topic list at most once per second, so the
    /// check stays cheap on the output path.
    pub fn topic_exists(&self, topic: &str) -> bool {
        let mut known = self.known.lock().expect("topics lock");
        if known.0.contains(topic) {
            return true;
        }
        if known.1.is_some_and(|t| t.elapsed() < TOPICS_REFRESH) {
            return false;
        }
        known.1 = Some(Instant::now());
        match self.meta.fetch_metadata(None, REQUEST_TIMEOUT) {
            Ok(md) => {
                known.0 = md
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| t.name().to_string())
                    .collect();
            }
            Err(e) => tracing::warn!(error = %e, "listing Kafka topics failed"),
        }
        known.0.contains(topic)
    }

    /// Creates `topic`; `replication` -1 takes the brokers' default.
    pub fn create_topic(
        &self,
        topic: &str,
        partitions: u32,
        replication: i32,
    ) -> Result<(), SourceError> {
        self.create_topic_configured(topic, partitions, replication, &[])
    }

    /// Creates `topic` with topic configs (`retention.ms`...).
    pub fn create_topic_configured(
        &self,
        topic: &str,
        partitions: u32,
        replication: i32,
        configs: &[(&str, String)],
    ) -> Result<(), SourceError> {
        crate::source::embedded::validate_topic_name(topic)?;
        if partitions == 0 || partitions > 100_000 {
            return Err(SourceError::Invalid(format!(
                "--partitions: {partitions} is not between 1 and 100000"
            )));
        }
        let mut new = NewTopic::new(
            topic,
            partitions as i32,
            TopicReplication::Fixed(replication),
        );
        for (k, v) in configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = futures_executor::block_on(self.admin.create_topics([&new], &opts))
            .map_err(|e| unreachable_brokers(&self.cfg, e))?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    return Err(SourceError::TopicExists(topic.to_string()));
                }
                Err((_, code)) => {
                    return Err(SourceError::Invalid(format!(
                        "the brokers refused to create topic `{topic}`: {code}; create it with \
                         your Kafka tools, or check the permissions of this client"
                    )));
                }
            }
        }
        self.known
            .lock()
            .expect("topics lock")
            .0
            .insert(topic.to_string());
        Ok(())
    }

    /// Creates `topic` unless it exists (dead-letter and retry topics).
    pub fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), SourceError> {
        if self.partition_ids(topic).is_ok() {
            return Ok(());
        }
        match self.create_topic(topic, partitions, -1) {
            Ok(()) | Err(SourceError::TopicExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Depth of every partition of `topic` (or of every topic), and the committed offset and
    /// lag of each group in `groups` (or of every consumer group the brokers list).
    pub fn stats(
        &self,
        topic: Option<&str>,
        groups: &[String],
    ) -> Result<Vec<TopicStats>, SourceError> {
        let names: Vec<String> = match topic {
            Some(t) => {
                self.partition_ids(t)?;
                vec![t.to_string()]
            }
            None => {
                let md = self
                    .meta
                    .fetch_metadata(None, REQUEST_TIMEOUT)
                    .map_err(|e| unreachable_brokers(&self.cfg, e))?;
                let mut v: Vec<String> = md
                    .topics()
                    .iter()
                    .map(|t| t.name().to_string())
                    .filter(|n| !n.starts_with("__"))
                    .collect();
                v.sort();
                v
            }
        };
        let groups: Vec<String> = if groups.is_empty() {
            self.list_groups()
        } else {
            groups.to_vec()
        };
        let mut out = Vec::new();
        for name in names {
            let ids = self.partition_ids(&name)?;
            let mut committed: HashMap<&str, Vec<u64>> = HashMap::new();
            for g in &groups {
                committed.insert(g, self.committed_many(g, &name, &ids)?);
            }
            let mut partitions = Vec::new();
            for (i, p) in ids.iter().enumerate() {
                let (low, high) = self.watermarks(&name, *p)?;
                let groups = groups
                    .iter()
                    .filter_map(|g| {
                        let c = committed[g.as_str()][i];
                        // A group that never committed here reads as the low watermark; show
                        // it only if it has consumed something of this topic.
                        (c > low || committed[g.as_str()].iter().any(|&x| x > 0)).then(|| {
                            GroupOffset {
                                group: g.clone(),
                                committed: c,
                                lag: high.saturating_sub(c),
                            }
                        })
                    })
                    .collect();
                partitions.push(PartitionStats {
                    partition: *p,
                    end_offset: high,
                    groups,
                });
            }
            out.push(TopicStats {
                topic: name,
                partitions,
            });
        }
        Ok(out)
    }

    /// Consumer groups the brokers know; empty where the brokers do not answer ListGroups.
    fn list_groups(&self) -> Vec<String> {
        match self.meta.fetch_group_list(None, REQUEST_TIMEOUT) {
            Ok(list) => {
                let mut v: Vec<String> = list
                    .groups()
                    .iter()
                    .filter(|g| g.protocol_type() == "consumer" || g.protocol_type().is_empty())
                    .map(|g| g.name().to_string())
                    .collect();
                v.sort();
                v
            }
            Err(e) => {
                tracing::debug!(error = %e, "listing consumer groups failed; pass --group");
                Vec::new()
            }
        }
    }

    /// An idempotent producer for `weir produce`.
    pub fn producer(&self) -> Result<Publisher, SourceError> {
        Publisher::new(&self.cfg, &[])
    }

    /// A reader for `weir consume`: reads partitions from an offset, outside any group.
    pub fn reader(&self) -> Result<Reader, SourceError> {
        let consumer: BaseConsumer<DefaultConsumerContext> = self
            .cfg
            .client(&[
                ("enable.auto.commit", "false"),
                ("isolation.level", "read_committed"),
                ("auto.offset.reset", "earliest"),
            ])
            .set("group.id", "weir-consume-cli")
            .create()
            .map_err(|e| bad_config(&self.cfg, e))?;
        Ok(Reader { consumer, at: None })
    }

    /// Commits `offset` for `group` on a partition (`weir consume --group`).
    pub fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), SourceError> {
        let c = self.group_client(group)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))
            .map_err(|e| storage("offset list", e))?;
        c.commit(&tpl, CommitMode::Sync)
            .map_err(|e| storage(&format!("committing group {group}'s offset"), e))
    }
}

pub(crate) fn bad_config(cfg: &KafkaConfig, e: KafkaError) -> SourceError {
    SourceError::Invalid(format!(
        "cannot configure the Kafka client for {}: {e}; check --brokers and --kafka-property",
        cfg.brokers
    ))
}

pub(super) fn unreachable_brokers(cfg: &KafkaConfig, e: KafkaError) -> SourceError {
    storage(
        &format!("the Kafka brokers at {} did not answer", cfg.brokers),
        e,
    )
}

/// Reads one partition at a time from an offset (`weir consume`).
pub struct Reader {
    consumer: BaseConsumer<DefaultConsumerContext>,
    /// The partition assigned, and the next offset it will return.
    at: Option<(String, u32, u64)>,
}

impl Reader {
    /// Up to `max` messages of the partition from `from` on, stopping at `end` (exclusive).
    pub fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        if self.at.as_ref() != Some(&(topic.to_string(), partition, from)) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64))
                .map_err(|e| storage("offset list", e))?;
            self.consumer
                .assign(&tpl)
                .map_err(|e| storage(&format!("reading {topic}/{partition}"), e))?;
        }
        let name: Arc<str> = Arc::from(topic);
        let mut out = Vec::new();
        let mut next = from;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while out.len() < max && next < end {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let d = to_delivery(&name, &m);
                    next = d.offset + 1;
                    if d.offset < end {
                        out.push(d);
                    }
                }
                // librdkafka reconnects by itself: a lost connection is waited out, up to the
                // deadline, as the run's consumer does.
                Some(Err(e)) if transient(&e) && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "a transient error while reading; polling on");
                }
                Some(Err(e)) => return Err(storage(&format!("reading {topic}/{partition}"), e)),
                None => {
                    // The rest up to `end` may be transaction markers, which are never
                    // returned: the consumer's position tells.
                    let pos = self.consumer.position().ok().and_then(|tpl| {
                        match tpl.find_partition(topic, partition as i32)?.offset() {
                            Offset::Offset(n) => Some(n as u64),
                            _ => None,
                        }
                    });
                    if pos.is_some_and(|p| p >= end) || Instant::now() > deadline {
                        break;
                    }
                }
            }
        }
        self.at = Some((topic.to_string(), partition, next));
        Ok(out)
    }
}

/// Errors a consumer outlives: the connection or the partition's leader comes back.
fn transient(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::NetworkException
        )
    )
}

/// A Kafka message as the engine sees it.
pub(crate) fn to_delivery(topic: &Arc<str>, m: &impl Message) -> Delivery {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Delivery {
        topic: topic.clone(),
        partition: m.partition() as u32,
        offset: m.offset() as u64,
        record: Record {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
            timestamp_ms: m.timestamp().to_millis().map(|t| t.max(0) as u64),
        },
        redeliveries: 0,
    }
}
