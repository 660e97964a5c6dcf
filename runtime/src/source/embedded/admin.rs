//! Topic and group lifecycle on the embedded log: delete a topic, list and describe groups,
//! move (seek) and delete a group.

use super::local::{LogHandle, Served};
use super::{EmbeddedLog, codec, now_ms};
use crate::source::SourceError;
use crate::source::lifecycle::{GroupInfo, GroupPartition, SeekMove, TopicUsage};
use fjall::PersistMode;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use weir_core::retention::{RetentionChange, SeekTo};
use weir_core::socket::AdminRequest;

impl EmbeddedLog {
    /// Deletes `topic`: its definition, its segments, and every group's offsets, skip counts
    /// and replay marks on it, in one durable write; the segments' files after it (a crash in
    /// between leaves keyspaces no topic holds, which the next open deletes).
    pub fn delete_topic(&self, topic: &str) -> Result<(), SourceError> {
        self.writable()?;
        let _w = self.write.lock().expect("write lock");
        let t = self.topic(topic)?;
        let mut batch = self.db.batch();
        batch.remove(&self.meta, codec::topic_key(topic));
        // Taken off the topic (under the write lock, as retention takes a segment), so a
        // retention pass running now finds nothing left to delete.
        let segs = std::mem::take(&mut *t.segments.write().expect("segment list lock"));
        for s in &segs {
            batch.remove(&self.meta, codec::segment_key(topic, s.id));
        }
        for prefix in [&b"o/"[..], b"k/"] {
            for item in self.meta.prefix(prefix) {
                let k = item.key().map_err(|e| self.storage(e))?;
                let mut as_offset = k.to_vec();
                as_offset[0] = b'o';
                if codec::parse_group_key(&as_offset).is_some_and(|(_, t, _)| t == topic) {
                    batch.remove(&self.meta, k.to_vec());
                }
            }
        }
        for p in 0..t.partitions {
            let mut prefix = b"r/".to_vec();
            prefix.extend_from_slice(&codec::partition_prefix(topic, p));
            for item in self.meta.prefix(&prefix) {
                batch.remove(
                    &self.meta,
                    item.key().map_err(|e| self.storage(e))?.to_vec(),
                );
            }
        }
        batch.commit().map_err(|e| self.write_failed(e))?;
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| self.write_failed(e))?;
        self.topics.write().expect("topic table lock").remove(topic);
        for s in segs {
            self.delete_segment_keyspace(s)?;
        }
        Ok(())
    }

    /// Every group with a committed offset (or only `only`), with its partitions.
    pub fn groups(&self, only: Option<&str>) -> Result<Vec<GroupInfo>, SourceError> {
        let now = now_ms();
        let mut by: BTreeMap<String, Vec<GroupPartition>> = BTreeMap::new();
        for item in self.meta.prefix(b"o/") {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let (group, topic, partition) = codec::parse_group_key(&k)
                .ok_or_else(|| self.corrupt("a group offset key".into()))?;
            if only.is_some_and(|o| o != group) {
                continue;
            }
            let committed = u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| self.corrupt(format!("offset of group `{group}`")))?,
            );
            let Ok(t) = self.topic(&topic) else { continue };
            if partition >= t.partitions {
                continue;
            }
            let end = t.ends[partition as usize].load(Ordering::Acquire);
            let start = t.start(partition);
            let skipped = self
                .meta
                .get(codec::skipped_key(&group, &topic, partition))
                .map_err(|e| self.storage(e))?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes);
            let oldest = self
                .read(&topic, partition, committed, 1)?
                .first()
                .and_then(|d| d.record.timestamp_ms)
                .map(|ts| now.saturating_sub(ts) as f64 / 1000.0);
            by.entry(group).or_default().push(GroupPartition {
                topic,
                partition,
                committed,
                end,
                lag: end.saturating_sub(committed.max(start)),
                start: Some(start),
                skipped_by_retention: Some(skipped),
                oldest_unconsumed_age_s: oldest,
            });
        }
        if let Some(o) = only
            && by.is_empty()
        {
            return Err(SourceError::Invalid(format!(
                "group `{o}` has no committed offset on this data directory; `weir groups list` shows the groups there are"
            )));
        }
        Ok(by
            .into_iter()
            .map(|(group, partitions)| GroupInfo {
                group,
                members: Vec::new(),
                state: None,
                partitions,
            })
            .collect())
    }

    /// Moves `group`'s committed offsets on `topic` (every partition, or `partition`) to `to`,
    /// within what is kept, in one durable write.
    pub fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: Option<u32>,
        to: SeekTo,
    ) -> Result<Vec<SeekMove>, SourceError> {
        let t = self.topic(topic)?;
        let partitions: Vec<u32> = match partition {
            Some(p) if p >= t.partitions => {
                return Err(SourceError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: p,
                    partitions: t.partitions,
                });
            }
            Some(p) => vec![p],
            None => (0..t.partitions).collect(),
        };
        self.writable()?;
        let _w = self.write.lock().expect("write lock");
        let mut batch = self.db.batch();
        let mut moves = Vec::new();
        for p in partitions {
            let (start, end) = (t.start(p), t.ends[p as usize].load(Ordering::Acquire));
            let target = match to {
                SeekTo::Earliest => start,
                SeekTo::Latest => end,
                SeekTo::Offset(o) => o.clamp(start, end),
                SeekTo::Time(ms) => self.first_at_or_after(topic, p, start, end, ms)?,
            };
            let from = self.committed_offset(group, topic, p)?;
            batch.insert(
                &self.meta,
                codec::group_key(group, topic, p),
                target.to_be_bytes(),
            );
            moves.push(SeekMove {
                topic: topic.to_string(),
                partition: p,
                from,
                to: target,
            });
        }
        batch.commit().map_err(|e| self.write_failed(e))?;
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| self.write_failed(e))?;
        Ok(moves)
    }

    /// The first offset in `start..end` whose record was appended at or after `ms` (`end` when
    /// none was). Appends stamp records in order, so this is a binary search; a producer's own
    /// timestamps out of order make it find one of the records around `ms`, as Kafka's
    /// `OffsetsForTimes` does with its index.
    fn first_at_or_after(
        &self,
        topic: &str,
        p: u32,
        start: u64,
        end: u64,
        ms: u64,
    ) -> Result<u64, SourceError> {
        let (mut lo, mut hi) = (start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = self.read(topic, p, mid, 1)?;
            let ts = at
                .first()
                .and_then(|d| d.record.timestamp_ms)
                .unwrap_or(u64::MAX);
            if ts >= ms {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }

    /// Deletes `group`: its offsets, skip counts and dedupe marks (their expiry index entries
    /// go when they expire).
    pub fn delete_group(&self, group: &str) -> Result<(), SourceError> {
        self.writable()?;
        let _w = self.write.lock().expect("write lock");
        let mut batch = self.db.batch();
        let mut found = false;
        for prefix in [b'o', b'k'] {
            let mut p = vec![prefix, b'/'];
            p.extend_from_slice(group.as_bytes());
            p.push(0);
            for item in self.meta.prefix(&p) {
                batch.remove(
                    &self.meta,
                    item.key().map_err(|e| self.storage(e))?.to_vec(),
                );
                found |= prefix == b'o';
            }
        }
        if !found {
            return Err(SourceError::Invalid(format!(
                "group `{group}` has no committed offset on this data directory; `weir groups list` shows the groups there are"
            )));
        }
        let mut marks = b"d/".to_vec();
        marks.extend_from_slice(group.as_bytes());
        marks.push(0);
        for item in self.dedupe.prefix(&marks) {
            batch.remove(
                &self.dedupe,
                item.key().map_err(|e| self.storage(e))?.to_vec(),
            );
        }
        batch.commit().map_err(|e| self.write_failed(e))?;
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| self.write_failed(e))?;
        Ok(())
    }
}

/// Answers an admin request that came through the socket of the run that owns the log: what
/// the run consumes is not deleted or moved under it.
pub(super) fn serve(
    log: &EmbeddedLog,
    req: AdminRequest,
    run: Option<&Served>,
) -> Result<serde_json::Value, SourceError> {
    let busy = |what: &str| {
        SourceError::Invalid(format!(
            "{what} is being consumed by the `weir run` that owns {}; stop it first (as \
             Kafka's tools refuse to move a group with live members)",
            log.dir().display()
        ))
    };
    match req {
        AdminRequest::AlterTopic { topic, change } => {
            log.set_retention(&topic, |now| change.apply(now))?;
            Ok(serde_json::Value::Null)
        }
        AdminRequest::DeleteTopic { topic } => {
            if run.is_some_and(|r| r.guarded.contains(&topic)) {
                return Err(busy(&format!("topic `{topic}`")));
            }
            if run.is_some() && log.topic(&topic)?.written.load(Ordering::Relaxed) {
                return Err(SourceError::Invalid(format!(
                    "topic `{topic}` takes the outputs of the `weir run` that owns {}; stop it \
                     first (its next commit would fail)",
                    log.dir().display()
                )));
            }
            log.delete_topic(&topic)?;
            Ok(serde_json::Value::Null)
        }
        AdminRequest::Usage { topic } => Ok(to_json(&log.usage(topic.as_deref())?)),
        AdminRequest::Groups => Ok(to_json(&log.groups(None)?)),
        AdminRequest::SeekGroup {
            group,
            topic,
            partition,
            to,
        } => {
            if run.is_some_and(|r| r.group == group) {
                return Err(busy(&format!("group `{group}`")));
            }
            Ok(to_json(&log.seek_group(&group, &topic, partition, to)?))
        }
        AdminRequest::DeleteGroup { group } => {
            if run.is_some_and(|r| r.group == group) {
                return Err(busy(&format!("group `{group}`")));
            }
            log.delete_group(&group)?;
            Ok(serde_json::Value::Null)
        }
    }
}

fn to_json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("answers serialise")
}

impl LogHandle {
    /// Runs an admin request here, or through the run that owns the log; its answer.
    fn admin<T: serde::de::DeserializeOwned>(
        &mut self,
        req: AdminRequest,
    ) -> Result<T, SourceError> {
        let value = match self {
            LogHandle::Local(log) => serve(log, req, None)?,
            LogHandle::Remote(c) => c.admin(req)?,
        };
        serde_json::from_value(value)
            .map_err(|e| SourceError::Invalid(format!("unreadable answer: {e}")))
    }

    pub fn alter_topic(&mut self, topic: &str, change: RetentionChange) -> Result<(), SourceError> {
        self.admin::<()>(AdminRequest::AlterTopic {
            topic: topic.into(),
            change,
        })
    }

    pub fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        self.admin::<()>(AdminRequest::DeleteTopic {
            topic: topic.into(),
        })
    }

    pub fn usage(&mut self, topic: Option<&str>) -> Result<Vec<TopicUsage>, SourceError> {
        self.admin(AdminRequest::Usage {
            topic: topic.map(str::to_string),
        })
    }

    pub fn groups(&mut self) -> Result<Vec<GroupInfo>, SourceError> {
        self.admin(AdminRequest::Groups)
    }

    pub fn seek_group(
        &mut self,
        group: &str,
        topic: &str,
        partition: Option<u32>,
        to: SeekTo,
    ) -> Result<Vec<SeekMove>, SourceError> {
        self.admin(AdminRequest::SeekGroup {
            group: group.into(),
            topic: topic.into(),
            partition,
            to,
        })
    }

    pub fn delete_group(&mut self, group: &str) -> Result<(), SourceError> {
        self.admin::<()>(AdminRequest::DeleteGroup {
            group: group.into(),
        })
    }
}
