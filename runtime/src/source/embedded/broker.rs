//! The embedded log as `weir topics`, `produce` and `consume` use it.

use super::local::LogHandle;
use crate::source::broker::{Broker, DeadLetter, TopicSpec, filter_group};
use crate::source::lifecycle::{GroupInfo, SeekMove, TopicUsage};
use crate::source::{Capabilities, Delivery, Output, Record, SourceError, TopicStats};
use weir_core::retention::{RetentionChange, SeekTo};

impl Broker for LogHandle {
    fn name(&self) -> &'static str {
        "the embedded log"
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
        LogHandle::create_topic(self, topic, partitions, RetentionChange::default())
    }

    fn create_topic_with(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
        spec: &TopicSpec,
    ) -> Result<(), SourceError> {
        let _ = replication;
        crate::source::broker::refuse_priority(self.name(), spec)?;
        LogHandle::create_topic(self, topic, partitions, spec.retention)
    }

    fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        LogHandle::delete_topic(self, topic)
    }

    fn alter_topic(&mut self, topic: &str, change: &RetentionChange) -> Result<(), SourceError> {
        LogHandle::alter_topic(self, topic, *change)
    }

    fn usage(&mut self, topic: Option<&str>) -> Result<Vec<TopicUsage>, SourceError> {
        LogHandle::usage(self, topic)
    }

    fn list_groups(&mut self) -> Result<Vec<GroupInfo>, SourceError> {
        LogHandle::groups(self)
    }

    fn seek_group(
        &mut self,
        group: &str,
        topic: &str,
        partition: Option<u32>,
        to: SeekTo,
    ) -> Result<Vec<SeekMove>, SourceError> {
        LogHandle::seek_group(self, group, topic, partition, to)
    }

    fn delete_group(&mut self, group: &str) -> Result<(), SourceError> {
        LogHandle::delete_group(self, group)
    }

    fn holds_data_dir(&self) -> bool {
        matches!(self, LogHandle::Local(_))
    }

    /// From the topic list: through another process's socket, a missing topic's error does not
    /// keep its kind.
    fn has_topic(&mut self, topic: &str) -> Result<bool, SourceError> {
        Ok(LogHandle::stats(self, None)?
            .iter()
            .any(|t| t.topic == topic))
    }

    fn stats(
        &mut self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError> {
        let mut stats = LogHandle::stats(self, topic)?;
        filter_group(&mut stats, group);
        Ok(stats)
    }

    fn append(&mut self, topic: &str, batch: Vec<Record>) -> Result<(), SourceError> {
        LogHandle::append(self, topic, batch).map(|_| ())
    }

    fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError> {
        Ok(LogHandle::stats(self, Some(topic))?[0]
            .partitions
            .iter()
            .map(|p| (p.partition, p.end_offset))
            .collect())
    }

    fn committed(&mut self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError> {
        LogHandle::committed(self, group, topic, partition)
    }

    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        _end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        LogHandle::read(self, topic, partition, from, max)
    }

    fn commit_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), SourceError> {
        LogHandle::commit_offset(self, group, topic, partition, offset)
    }

    /// The log keeps replay marks beside each partition's dead letters.
    fn dead_letters(&mut self, dlq: &str) -> Result<Vec<DeadLetter>, SourceError> {
        let mut out = Vec::new();
        for (partition, end) in Broker::ends(self, dlq)? {
            let replayed = LogHandle::replayed(self, dlq, partition)?;
            let mut from = 0;
            while from < end {
                let batch = LogHandle::read(self, dlq, partition, from, 1000)?;
                let Some(last) = batch.last() else { break };
                from = last.offset + 1;
                out.extend(batch.into_iter().map(|d| DeadLetter {
                    id: format!("{}:{}", d.partition, d.offset),
                    replayed: replayed.contains(&d.offset),
                    delivery: d,
                }));
            }
        }
        Ok(out)
    }

    /// The outputs and the replay mark in one atomic batch.
    fn replay(
        &mut self,
        dlq: &str,
        letter: &DeadLetter,
        outputs: Vec<Output>,
    ) -> Result<(), SourceError> {
        let d = &letter.delivery;
        LogHandle::publish(
            self,
            outputs,
            vec![(dlq.to_string(), d.partition, d.offset)],
        )
    }
}
