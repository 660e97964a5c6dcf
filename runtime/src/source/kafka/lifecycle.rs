//! Topic and group lifecycle on Kafka, as `kafka-topics`, `kafka-configs` and
//! `kafka-consumer-groups` do it: delete a topic, set its retention, list and describe groups,
//! move (seek) and delete a group.

use super::admin::{Admin, unreachable_brokers};
use super::{REQUEST_TIMEOUT, storage};
use crate::source::SourceError;
use crate::source::lifecycle::{GroupInfo, GroupPartition, SeekMove};
use rdkafka::admin::{AdminOptions, AlterConfig, ConfigSource, ResourceSpecifier};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use weir_core::retention::{Policy, RetentionChange, SeekTo};

/// The topic configs a [`RetentionChange`] sets (`-1`: no limit).
pub(super) fn retention_configs(
    c: &RetentionChange,
) -> Result<Vec<(&'static str, String)>, SourceError> {
    if c.policy == Some(Policy::Interest) {
        return Err(SourceError::Invalid(
            "--retention-policy interest is the embedded log's; a Kafka topic keeps records by \
             age and size (its groups' offsets do not hold them)"
                .into(),
        ));
    }
    let limit = |v: Option<u64>| v.map_or("-1".to_string(), |n| n.to_string());
    let mut out = Vec::new();
    if let Some(age) = c.max_age_ms {
        out.push(("retention.ms", limit(age)));
    }
    if let Some(bytes) = c.max_bytes {
        out.push(("retention.bytes", limit(bytes)));
    }
    if let Some(seg) = c.segment_bytes {
        out.push(("segment.bytes", limit(seg)));
    }
    Ok(out)
}

impl Admin {
    fn opts(&self) -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT))
    }

    /// Deletes `topic` (the brokers must allow it: `delete.topic.enable`).
    pub fn delete_topic(&self, topic: &str) -> Result<(), SourceError> {
        self.partition_ids(topic)?;
        let results = futures_executor::block_on(self.admin.delete_topics(&[topic], &self.opts()))
            .map_err(|e| unreachable_brokers(&self.cfg, e))?;
        for r in results {
            if let Err((_, code)) = r {
                return Err(SourceError::Invalid(format!(
                    "the brokers refused to delete topic `{topic}`: {code}"
                )));
            }
        }
        self.known.lock().expect("topics lock").0.remove(topic);
        Ok(())
    }

    /// Sets the topic's retention configs, keeping its other dynamic configs (AlterConfigs
    /// replaces a topic's whole set, so the current ones are read first).
    pub fn set_retention(&self, topic: &str, change: &RetentionChange) -> Result<(), SourceError> {
        let wanted = retention_configs(change)?;
        self.partition_ids(topic)?;
        let spec = ResourceSpecifier::Topic(topic);
        let described =
            futures_executor::block_on(self.admin.describe_configs([&spec], &self.opts()))
                .map_err(|e| unreachable_brokers(&self.cfg, e))?;
        let mut keep: Vec<(String, String)> = Vec::new();
        for r in described {
            let r = r.map_err(|code| {
                SourceError::Invalid(format!("reading topic `{topic}`'s configs: {code}"))
            })?;
            // (A sensitive config comes back without its value and cannot be sent back: the
            // brokers drop it. Retention is set by kafka-configs on such topics.)
            for e in r.entries {
                if matches!(e.source, ConfigSource::DynamicTopic)
                    && let Some(v) = e.value
                    && !wanted.iter().any(|(k, _)| *k == e.name)
                {
                    keep.push((e.name, v));
                }
            }
        }
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (k, v) in &keep {
            alter = alter.set(k, v);
        }
        for (k, v) in &wanted {
            alter = alter.set(k, v);
        }
        let results = futures_executor::block_on(self.admin.alter_configs([&alter], &self.opts()))
            .map_err(|e| unreachable_brokers(&self.cfg, e))?;
        for r in results {
            if let Err((_, code)) = r {
                return Err(SourceError::Invalid(format!(
                    "the brokers refused to change topic `{topic}`'s retention: {code}"
                )));
            }
        }
        Ok(())
    }

    /// The consumer groups the brokers list, with their members and committed offsets.
    pub fn groups(&self) -> Result<Vec<GroupInfo>, SourceError> {
        let list = self
            .meta
            .fetch_group_list(None, REQUEST_TIMEOUT)
            .map_err(|e| not_listed(&e.to_string()))?;
        let md = self
            .meta
            .fetch_metadata(None, REQUEST_TIMEOUT)
            .map_err(|e| unreachable_brokers(&self.cfg, e))?;
        let topics: Vec<(String, Vec<u32>)> = md
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__"))
            .map(|t| {
                let ids = t.partitions().iter().map(|p| p.id() as u32).collect();
                (t.name().to_string(), ids)
            })
            .collect();
        let mut out = Vec::new();
        for g in list.groups() {
            if !(g.protocol_type() == "consumer" || g.protocol_type().is_empty()) {
                continue;
            }
            let c = self.group_client(g.name())?;
            let mut tpl = TopicPartitionList::new();
            for (t, ids) in &topics {
                for p in ids {
                    tpl.add_partition(t, *p as i32);
                }
            }
            let got = c
                .committed_offsets(tpl, REQUEST_TIMEOUT)
                .map_err(|e| storage(&format!("committed offsets of group {}", g.name()), e))?;
            let mut partitions = Vec::new();
            for e in got.elements() {
                let Offset::Offset(n) = e.offset() else {
                    continue;
                };
                let (low, high) = self.watermarks(e.topic(), e.partition() as u32)?;
                let committed = n.max(0) as u64;
                partitions.push(GroupPartition {
                    topic: e.topic().to_string(),
                    partition: e.partition() as u32,
                    committed,
                    end: high,
                    lag: high.saturating_sub(committed.max(low)),
                    start: Some(low),
                    skipped_by_retention: None,
                    oldest_unconsumed_age_s: None,
                });
            }
            out.push(GroupInfo {
                group: g.name().to_string(),
                members: g
                    .members()
                    .iter()
                    .map(|m| format!("{} ({}{})", m.id(), m.client_id(), m.client_host()))
                    .collect(),
                state: Some(g.state().to_string()),
                partitions,
            });
        }
        out.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(out)
    }

    /// Moves `group`'s committed offsets on `topic`, as `kafka-consumer-groups --reset-offsets`
    /// does: refused while the group has live members.
    pub fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: Option<u32>,
        to: SeekTo,
    ) -> Result<Vec<SeekMove>, SourceError> {
        let ids = self.partition_ids(topic)?;
        let ids: Vec<u32> = match partition {
            Some(p) if !ids.contains(&p) => {
                return Err(SourceError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: p,
                    partitions: ids.len() as u32,
                });
            }
            Some(p) => vec![p],
            None => ids,
        };
        match self.meta.fetch_group_list(Some(group), REQUEST_TIMEOUT) {
            Ok(list) => {
                if let Some(g) = list.groups().iter().find(|g| !g.members().is_empty()) {
                    return Err(SourceError::Invalid(format!(
                        "group `{group}` has {} live member(s) ({}): stop them first, as \
                         kafka-consumer-groups does",
                        g.members().len(),
                        g.state()
                    )));
                }
            }
            // A broker that does not answer DescribeGroups (librdkafka's mock cluster): the
            // commit below is refused by a broker whose group has a generation.
            Err(e) => tracing::debug!(error = %e, "the brokers do not describe groups"),
        }
        let mut targets = Vec::with_capacity(ids.len());
        let by_time = match to {
            SeekTo::Time(ms) => {
                let mut tpl = TopicPartitionList::new();
                for p in &ids {
                    tpl.add_partition_offset(topic, *p as i32, Offset::Offset(ms as i64))
                        .map_err(|e| storage("offset list", e))?;
                }
                Some(
                    self.meta
                        .offsets_for_times(tpl, REQUEST_TIMEOUT)
                        .map_err(|e| storage("looking up offsets by time", e))?,
                )
            }
            _ => None,
        };
        for p in &ids {
            let (low, high) = self.watermarks(topic, *p)?;
            let target = match to {
                SeekTo::Earliest => low,
                SeekTo::Latest => high,
                SeekTo::Offset(o) => o.clamp(low, high),
                SeekTo::Time(ms) => {
                    let found = by_time
                        .as_ref()
                        .and_then(|t| t.find_partition(topic, *p as i32));
                    match found.as_ref().map(|e| (e.offset(), e.error())) {
                        Some((Offset::Offset(n), Ok(()))) if n >= 0 => (n as u64).clamp(low, high),
                        // No record at or after the time.
                        Some((Offset::End, Ok(()))) => high,
                        other => {
                            return Err(SourceError::Invalid(format!(
                                "the brokers did not look up {topic}/{p} by time {ms} ({other:?}); \
                                 nothing moved. Seek with --offset instead"
                            )));
                        }
                    }
                }
            };
            targets.push((*p, target));
        }
        let c = self.group_client(group)?;
        let before = {
            let mut tpl = TopicPartitionList::new();
            for p in &ids {
                tpl.add_partition(topic, *p as i32);
            }
            c.committed_offsets(tpl, REQUEST_TIMEOUT)
                .map_err(|e| storage(&format!("committed offsets of group {group}"), e))?
        };
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &targets {
            tpl.add_partition_offset(topic, *p as i32, Offset::Offset(*o as i64))
                .map_err(|e| storage("offset list", e))?;
        }
        c.commit(&tpl, CommitMode::Sync)
            .map_err(|e| match e.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::RebalanceInProgress,
                ) => SourceError::Invalid(format!(
                    "the brokers refused to move group `{group}`: it has live members ({e}); stop \
                 them and try again once the brokers have let them go (after the group's \
                 session timeout). librdkafka's mock cluster never lets a group's members go"
                )),
                _ => storage(&format!("moving group {group}'s offsets"), e),
            })?;
        Ok(targets
            .into_iter()
            .map(|(p, to)| SeekMove {
                topic: topic.to_string(),
                partition: p,
                from: match before.find_partition(topic, p as i32).map(|e| e.offset()) {
                    Some(Offset::Offset(n)) if n >= 0 => n as u64,
                    _ => 0,
                },
                to,
            })
            .collect())
    }

    /// Deletes `group` (refused by the brokers while it has members).
    pub fn delete_group(&self, group: &str) -> Result<(), SourceError> {
        let results = futures_executor::block_on(self.admin.delete_groups(&[group], &self.opts()))
            .map_err(|e| unreachable_brokers(&self.cfg, e))?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {
                    return Err(SourceError::Invalid(format!(
                        "no group `{group}` on these brokers; `weir groups list` shows the groups"
                    )));
                }
                Err((_, code)) => {
                    return Err(SourceError::Invalid(format!(
                        "the brokers refused to delete group `{group}`: {code} (a group with \
                         live members cannot be deleted)"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn not_listed(e: &str) -> SourceError {
    SourceError::Invalid(format!(
        "the brokers do not list consumer groups ({e}); librdkafka's mock cluster does not"
    ))
}
