//! Retention on the embedded log: a thread of the process that owns the log deletes, every
//! [`PASS_EVERY`], the oldest segments of each topic that its [`Retention`] lets go (the decision
//! is [`weir_core::retention::doomed`]), and measures what an operator watches: each topic's bytes
//! on disk and the age of its oldest record.
//!
//! Deleting a segment is one small durable write and a keyspace dropped (see [`super::segments`]);
//! appends and reads go on meanwhile.

use super::{EmbeddedLog, Topic, codec, now_ms};
use crate::source::SourceError;
use crate::source::lifecycle::TopicUsage;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use weir_core::retention::{Retention, SegmentInfo, doomed};

/// How often retention looks.
pub const PASS_EVERY: Duration = Duration::from_millis(500);

impl EmbeddedLog {
    /// Starts the retention thread; it ends once the log is dropped.
    pub fn keep_retention(self: &Arc<Self>) {
        let log: Weak<EmbeddedLog> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("weir-retention".into())
            .spawn(move || {
                let mut low = false;
                let mut first = true;
                loop {
                    // Not a wait for a condition: retention looks again after this long (and
                    // once at once, for what expired while nothing ran).
                    if !std::mem::take(&mut first) {
                        std::thread::sleep(PASS_EVERY);
                    }
                    let Some(log) = log.upgrade() else { return };
                    if log.failure().is_some() {
                        return;
                    }
                    if let Err(e) = log.retain(now_ms()) {
                        tracing::warn!(error = %e, "retention could not delete old records; it tries again");
                    }
                    low = log.watch_free_space(low);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "retention could not start: old records are kept");
        }
    }

    /// Warns once when the free space under the data directory falls below [`LOW_SPACE`] (and
    /// once when it is back): a full disk stops the run. Returns whether it is low now.
    fn watch_free_space(&self, was_low: bool) -> bool {
        let Some((free, total)) = free_space(self.dir()) else {
            return was_low;
        };
        let low = low_space(free, total);
        if low && !was_low {
            tracing::warn!(
                dir = %self.dir().display(),
                free_mib = free >> 20,
                total_mib = total >> 20,
                "the disk under the data directory is nearly full; a full disk stops the run. Free space, or bound topics with `weir topics alter T --retention-bytes SIZE`"
            );
        } else if was_low && !low {
            tracing::info!(
                free_mib = free >> 20,
                "free space under the data directory is back"
            );
        }
        low
    }

    /// One retention pass over every topic: returns how many segments went.
    pub fn retain(&self, now: u64) -> Result<usize, SourceError> {
        self.settle_pool()?;
        let committed = self.committed_by_topic()?;
        let topics: Vec<(String, Arc<Topic>)> = self
            .topics
            .read()
            .expect("topic table lock")
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let mut dropped = 0;
        for (name, t) in topics {
            let retention = *t.retention.read().expect("retention lock");
            let segs = t.segments.read().expect("segment list lock").clone();
            let infos: Vec<(u64, SegmentInfo)> = segs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let info = SegmentInfo {
                        base: s.base.clone(),
                        created_ms: s.created_ms,
                        bytes: s.bytes(i + 1 < segs.len()),
                    };
                    (s.id, info)
                })
                .collect();
            let groups = committed.get(&name).map(Vec::as_slice).unwrap_or(&[]);
            let only: Vec<SegmentInfo> = infos.iter().map(|(_, i)| i.clone()).collect();
            let n = doomed(&retention, &only, groups, now);
            for (id, info) in infos.iter().take(n) {
                self.drop_oldest_segment(&name, &t, *id)?;
                self.dropped.fetch_add(1, Ordering::Relaxed);
                dropped += 1;
                tracing::info!(
                    topic = %name,
                    segment = id,
                    bytes = info.bytes,
                    "retention deleted a segment ({})",
                    retention.describe()
                );
            }
        }
        Ok(dropped)
    }

    /// Each topic's groups' committed offsets, one list per group (in partition order).
    fn committed_by_topic(&self) -> Result<HashMap<String, Vec<Vec<u64>>>, SourceError> {
        let mut by: HashMap<(String, String), Vec<(u32, u64)>> = HashMap::new();
        for item in self.meta.prefix(b"o/") {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let (group, topic, partition) = codec::parse_group_key(&k)
                .ok_or_else(|| self.corrupt("a group offset key".into()))?;
            let bytes: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| self.corrupt(format!("offset of group `{group}`")))?;
            by.entry((topic, group))
                .or_default()
                .push((partition, u64::from_be_bytes(bytes)));
        }
        let mut out: HashMap<String, Vec<Vec<u64>>> = HashMap::new();
        for ((topic, _), mut offsets) in by {
            offsets.sort_unstable();
            let Ok(t) = self.topic(&topic) else { continue };
            let mut per = vec![0; t.partitions as usize];
            for (p, o) in offsets {
                if let Some(slot) = per.get_mut(p as usize) {
                    *slot = o;
                }
            }
            out.entry(topic).or_default().push(per);
        }
        Ok(out)
    }

    /// What each topic (or `only`) holds now.
    pub fn usage(&self, only: Option<&str>) -> Result<Vec<TopicUsage>, SourceError> {
        let now = now_ms();
        let mut out = Vec::new();
        for name in self.topic_names() {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let t = self.topic(&name)?;
            let segs = t.segments.read().expect("segment list lock").clone();
            let starts: Vec<u64> = (0..t.partitions).map(|p| t.start(p)).collect();
            let mut oldest: Option<u64> = None;
            for p in 0..t.partitions {
                if let Some(d) = self.read(&name, p, starts[p as usize], 1)?.first() {
                    let ts = d.record.timestamp_ms.unwrap_or(now);
                    oldest = Some(oldest.map_or(ts, |o| o.min(ts)));
                }
            }
            let retention: Retention = *t.retention.read().expect("retention lock");
            out.push(TopicUsage {
                topic: name,
                retention: retention.describe(),
                bytes: segs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| s.bytes(i + 1 < segs.len()))
                    .sum(),
                segments: segs.len(),
                oldest_age_s: oldest.map(|o| now.saturating_sub(o) as f64 / 1000.0),
                starts,
            });
        }
        Ok(out)
    }

    /// Changes what `topic` keeps from now on (`weir topics alter`): `change` gets what it
    /// keeps now, under the write lock (two alters at once both count).
    pub fn set_retention(
        &self,
        topic: &str,
        change: impl FnOnce(Retention) -> Retention,
    ) -> Result<(), SourceError> {
        let t = self.topic(topic)?;
        self.writable()?;
        let _w = self.write.lock().expect("write lock");
        let retention = change(*t.retention.read().expect("retention lock"));
        let key = codec::topic_key(topic);
        let old = self
            .meta
            .get(&key)
            .map_err(|e| self.storage(e))?
            .ok_or_else(|| SourceError::UnknownTopic(topic.to_string()))?;
        let mut meta: super::TopicMeta = serde_json::from_slice(&old)
            .map_err(|e| self.corrupt(format!("topic `{topic}` metadata: {e}")))?;
        meta.retention = retention;
        self.meta
            .insert(
                key,
                serde_json::to_vec(&meta).expect("topic meta serialises"),
            )
            .map_err(|e| self.write_failed(e))?;
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(|e| self.write_failed(e))?;
        *t.retention.write().expect("retention lock") = retention;
        Ok(())
    }

    /// Segments retention deleted (in this process).
    pub fn segments_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records groups skipped because retention had deleted them (counted in this process).
    pub fn skipped_by_retention(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// Under 10% of the disk and under 1 GiB free: low.
pub const LOW_SPACE: (u64, u64) = (10, 1 << 30);

fn low_space(free: u64, total: u64) -> bool {
    free < LOW_SPACE.1 && free.saturating_mul(100) < total.saturating_mul(LOW_SPACE.0)
}

/// (free bytes for this user, total bytes) of the filesystem under `dir`.
pub fn free_space(dir: &std::path::Path) -> Option<(u64, u64)> {
    let v = rustix::fs::statvfs(dir).ok()?;
    Some((v.f_bavail * v.f_frsize, v.f_blocks * v.f_frsize))
}

#[cfg(test)]
mod tests {
    #[test]
    fn low_space_is_both_under_a_tenth_and_under_a_gib() {
        let gib = 1u64 << 30;
        for (free, total, low) in [
            (gib / 2, 100 * gib, true),
            (gib / 2, 4 * gib, false),
            (2 * gib, 100 * gib, false),
            (0, 40 << 20, true),
            (10 << 20, 40 << 20, false),
        ] {
            assert_eq!(super::low_space(free, total), low, "{free} of {total}");
        }
    }
}
