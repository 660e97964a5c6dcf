//! Where a command's topics live: the embedded log in the data directory, or Kafka when
//! `--brokers` (or `[source.kafka]`) is given. `topics`, `produce` and `consume` work on both.

use super::Globals;
use crate::source::embedded::local::{self, LogHandle};
use crate::source::kafka::{Admin, Publisher, Reader};
use crate::source::{Delivery, Record, SourceError, TopicStats};

pub(super) enum Target {
    Local(LogHandle),
    Kafka {
        admin: Admin,
        producer: Option<Publisher>,
        reader: Option<Reader>,
    },
}

impl Target {
    pub(super) fn open(g: &Globals) -> anyhow::Result<Target> {
        Ok(match &g.kafka {
            Some(cfg) => Target::Kafka {
                admin: Admin::connect(cfg)?,
                producer: None,
                reader: None,
            },
            None => Target::Local(local::open(&g.data_dir)?),
        })
    }

    pub(super) fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
    ) -> Result<(), SourceError> {
        match self {
            Target::Local(log) => log.create_topic(topic, partitions),
            Target::Kafka { admin, .. } => {
                admin.create_topic(topic, partitions, replication.unwrap_or(-1))
            }
        }
    }

    pub(super) fn stats(
        &mut self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError> {
        let mut stats = match self {
            Target::Local(log) => log.stats(topic)?,
            Target::Kafka { admin, .. } => {
                let groups: Vec<String> = group.map(String::from).into_iter().collect();
                admin.stats(topic, &groups)?
            }
        };
        if let Some(g) = group {
            for t in &mut stats {
                for p in &mut t.partitions {
                    p.groups.retain(|x| x.group == g);
                }
            }
        }
        Ok(stats)
    }

    /// Each partition of `topic` with its end offset.
    pub(super) fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError> {
        match self {
            Target::Local(log) => Ok(log.stats(Some(topic))?[0]
                .partitions
                .iter()
                .map(|p| (p.partition, p.end_offset))
                .collect()),
            Target::Kafka { admin, .. } => admin
                .partition_ids(topic)?
                .into_iter()
                .map(|p| Ok((p, admin.end_offset(topic, p)?)))
                .collect(),
        }
    }

    pub(super) fn append(&mut self, topic: &str, batch: Vec<Record>) -> Result<(), SourceError> {
        match self {
            Target::Local(log) => log.append(topic, batch).map(|_| ()),
            Target::Kafka {
                admin, producer, ..
            } => {
                if producer.is_none() {
                    // Refuse an unknown topic as the embedded log does, rather than have a
                    // broker auto-create it with its default partition count.
                    admin.partitions(topic)?;
                    *producer = Some(admin.producer()?);
                }
                producer
                    .as_ref()
                    .expect("producer was just created")
                    .append(topic, &batch)
            }
        }
    }

    pub(super) fn committed(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<u64, SourceError> {
        match self {
            Target::Local(log) => log.committed(group, topic, partition),
            Target::Kafka { admin, .. } => admin.committed(group, topic, partition),
        }
    }

    /// Up to `max` messages of a partition from `from` on, below `end`.
    pub(super) fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        match self {
            Target::Local(log) => log.read(topic, partition, from, max),
            Target::Kafka { admin, reader, .. } => {
                if reader.is_none() {
                    *reader = Some(admin.reader()?);
                }
                reader
                    .as_mut()
                    .expect("reader was just created")
                    .read(topic, partition, from, end, max)
            }
        }
    }

    pub(super) fn commit_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), SourceError> {
        match self {
            Target::Local(log) => log.commit_offset(group, topic, partition, offset),
            Target::Kafka { admin, .. } => admin.commit_offset(group, topic, partition, offset),
        }
    }
}
