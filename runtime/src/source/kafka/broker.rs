//! Kafka as `weir topics`, `produce` and `consume` use it.

use super::{Admin, KafkaConfig, Publisher, Reader};
use crate::source::broker::{Broker, TopicSpec, filter_group, refuse_priority};
use crate::source::lifecycle::{GroupInfo, SeekMove};
use crate::source::{Capabilities, Delivery, Record, SourceError, TopicStats};
use weir_core::retention::{RetentionChange, SeekTo};

/// The admin client, with a producer and a reader made when first needed.
pub struct KafkaBroker {
    admin: Admin,
    producer: Option<Publisher>,
    reader: Option<Reader>,
}

impl KafkaBroker {
    /// Connects lazily: nothing is sent until the first request.
    pub fn connect(cfg: KafkaConfig) -> Result<KafkaBroker, SourceError> {
        Ok(KafkaBroker {
            admin: Admin::connect(&cfg)?,
            producer: None,
            reader: None,
        })
    }
}

impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        "Kafka"
    }

    fn capabilities(&self) -> Capabilities {
        super::CAPABILITIES
    }

    fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
    ) -> Result<(), SourceError> {
        self.admin
            .create_topic(topic, partitions, replication.unwrap_or(-1))
    }

    fn create_topic_with(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
        spec: &TopicSpec,
    ) -> Result<(), SourceError> {
        refuse_priority(self.name(), spec)?;
        let configs = super::lifecycle::retention_configs(&spec.retention)?;
        self.admin
            .create_topic_configured(topic, partitions, replication.unwrap_or(-1), &configs)
    }

    fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        self.admin.delete_topic(topic)
    }

    fn alter_topic(&mut self, topic: &str, change: &RetentionChange) -> Result<(), SourceError> {
        self.admin.set_retention(topic, change)
    }

    fn list_groups(&mut self) -> Result<Vec<GroupInfo>, SourceError> {
        self.admin.groups()
    }

    fn seek_group(
        &mut self,
        group: &str,
        topic: &str,
        partition: Option<u32>,
        to: SeekTo,
    ) -> Result<Vec<SeekMove>, SourceError> {
        self.admin.seek_group(group, topic, partition, to)
    }

    fn delete_group(&mut self, group: &str) -> Result<(), SourceError> {
        self.admin.delete_group(group)
    }

    fn stats(
        &mut self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError> {
        let groups: Vec<String> = group.map(String::from).into_iter().collect();
        let mut stats = self.admin.stats(topic, &groups)?;
        filter_group(&mut stats, group);
        Ok(stats)
    }

    fn append(&mut self, topic: &str, batch: Vec<Record>) -> Result<(), SourceError> {
        if self.producer.is_none() {
            // Refuse an unknown topic as the embedded log does, rather than have a broker
            // auto-create it with its default partition count.
            self.admin.partitions(topic)?;
            self.producer = Some(self.admin.producer()?);
        }
        self.producer
            .as_ref()
            .expect("producer was just created")
            .append(topic, &batch)
    }

    fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError> {
        self.admin
            .partition_ids(topic)?
            .into_iter()
            .map(|p| Ok((p, self.admin.end_offset(topic, p)?)))
            .collect()
    }

    fn committed(&mut self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError> {
        self.admin.committed(group, topic, partition)
    }

    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        if self.reader.is_none() {
            self.reader = Some(self.admin.reader()?);
        }
        self.reader
            .as_mut()
            .expect("reader was just created")
            .read(topic, partition, from, end, max)
    }

    fn commit_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), SourceError> {
        self.admin.commit_offset(group, topic, partition, offset)
    }
}
