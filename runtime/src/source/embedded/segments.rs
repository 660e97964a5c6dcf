//! A topic's records, in segments.
//!
//! Each segment is a fjall keyspace of its own (`seg.<id>`) holding every partition's records
//! from the offsets where it begins (its `base`, one per partition) to where the next one
//! begins; the last segment is the active one, where appends go. Its definition is a `meta` entry
//! (`s/topic 0 id`), written in the same write batch as the first records that go into it, so a
//! segment exists exactly when its records do. Retention drops the oldest segment by deleting its
//! definition (a durable write), then its keyspace: whole files, with no tombstone per record and
//! no compaction to wait for. A keyspace whose definition is gone (a crash between the two) is
//! deleted when the log next opens.
//!
//! Data directories made before segments kept every topic's records in one keyspace, `records`:
//! it is segment 0 of each topic that existed then, shared, and deleted once no topic holds it.

use super::{EmbeddedLog, Topic, codec};
use crate::source::SourceError;
use fjall::{Keyspace, KeyspaceCreateOptions};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The keyspace of segment 0 (see the module's text).
pub(super) const LEGACY: &str = "records";

pub(super) struct Segment {
    pub id: u64,
    /// Its keyspace's name.
    pub name: String,
    pub ks: Keyspace,
    /// First offset of each partition in this segment.
    pub base: Vec<u64>,
    pub created_ms: u64,
    /// Bytes of records appended to it, counted from its size on disk when the log opened.
    pub written: AtomicU64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct SegmentMeta {
    pub base: Vec<u64>,
    pub created_ms: u64,
    /// The keyspace holding it (a recycled one keeps its name); absent: `seg.<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyspace: Option<String>,
}

/// Emptied segment keyspaces, kept for the next segments: fjall 3.1.13 records every keyspace
/// created or deleted in its own metadata tree, which grew without bound under that churn (3,000
/// creates and deletes left 9 GB there, measured), so a deleted segment's keyspace is emptied
/// and reused rather than deleted.
#[derive(Default)]
pub(super) struct Pool {
    /// Empty, ready for a new segment.
    pub(super) ready: Vec<(String, Keyspace)>,
    /// Waiting for a flush fjall has pending (emptied once it is done, so the flush cannot
    /// write old records into a reused keyspace).
    waiting: Vec<(String, Keyspace)>,
}

/// Emptied keyspaces kept; past this, one more is deleted (rare: retention deletes as many
/// segments as rolls create).
const POOL_MAX: usize = 64;

pub(super) fn keyspace_name(id: u64) -> String {
    if id == 0 {
        LEGACY.to_string()
    } else {
        format!("seg.{id}")
    }
}

fn segment_id_of(name: &str) -> Option<u64> {
    name.strip_prefix("seg.")?.parse().ok()
}

/// Starts flushing a keyspace's memtable to a table (fjall's `rotate_memtable`: public, but
/// hidden from its docs; fjall is pinned to the version this was written against). A failure
/// only delays the flush to fjall's own time.
pub(super) fn flush(ks: &Keyspace) {
    if let Err(e) = ks.rotate_memtable() {
        tracing::debug!(error = %e, "flushing a sealed segment failed; fjall flushes it later");
    }
}

impl Segment {
    /// Its size: on disk once its records are flushed to tables (a sealed segment's memtable is
    /// flushed when the next one starts); before that, the bytes appended to it.
    pub fn bytes(&self, sealed: bool) -> u64 {
        let disk = self.ks.disk_space();
        if sealed && disk > 0 {
            disk
        } else {
            disk.max(self.written.load(Ordering::Relaxed))
        }
    }
}

impl EmbeddedLog {
    /// Reads every topic's segment definitions, opens their keyspaces, and deletes keyspaces no
    /// definition names (left by a crash in the middle of a deletion or a roll). Topics defined
    /// before segments existed get segment 0 (the `records` keyspace), written down here once.
    pub(super) fn load_segments(
        &self,
        topics: &[(String, u32)],
    ) -> Result<BTreeMap<String, Vec<Arc<Segment>>>, SourceError> {
        let mut defs: BTreeMap<String, Vec<(u64, SegmentMeta)>> = BTreeMap::new();
        for item in self.meta.prefix(b"s/") {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let (topic, id) = codec::parse_segment_key(&k)
                .ok_or_else(|| self.corrupt("a segment key that is not one".into()))?;
            let m: SegmentMeta = serde_json::from_slice(&v)
                .map_err(|e| self.corrupt(format!("segment {id} of topic `{topic}`: {e}")))?;
            defs.entry(topic).or_default().push((id, m));
        }
        let legacy: Vec<&(String, u32)> = topics
            .iter()
            .filter(|(t, _)| !defs.contains_key(t))
            .collect();
        if !legacy.is_empty() {
            let mut batch = self.db.batch();
            for (t, partitions) in legacy {
                let m = SegmentMeta {
                    base: vec![0; *partitions as usize],
                    created_ms: 0,
                    keyspace: None,
                };
                batch.insert(
                    &self.meta,
                    codec::segment_key(t, 0),
                    serde_json::to_vec(&m).expect("segment meta serialises"),
                );
                defs.entry(t.clone()).or_default().push((0, m));
            }
            batch.commit().map_err(|e| self.write_failed(e))?;
            self.db
                .persist(fjall::PersistMode::SyncAll)
                .map_err(|e| self.write_failed(e))?;
        }
        let mut out = BTreeMap::new();
        let mut named = HashSet::new();
        let mut max_id = 0;
        for (topic, list) in defs {
            let mut segs = Vec::with_capacity(list.len());
            for (id, m) in list {
                let name = m.keyspace.clone().unwrap_or_else(|| keyspace_name(id));
                let ks = self.segment_keyspace_named(&name)?;
                named.insert(name.clone());
                max_id = max_id.max(id);
                segs.push(Arc::new(Segment {
                    id,
                    name,
                    written: AtomicU64::new(self.size_at_open(&ks, id)?),
                    ks,
                    base: m.base,
                    created_ms: m.created_ms,
                }));
            }
            out.insert(topic, segs);
        }
        for name in self.db.list_keyspace_names() {
            let name = name.to_string();
            let orphan =
                (segment_id_of(&name).is_some() || name == LEGACY) && !named.contains(&name);
            if let Some(id) = segment_id_of(&name) {
                max_id = max_id.max(id);
            }
            if orphan && name == LEGACY {
                let ks = self.segment_keyspace_named(&name)?;
                drop_tables(&ks);
                self.db.delete_keyspace(ks).map_err(|e| self.storage(e))?;
                tracing::info!(keyspace = %name, "deleted a segment no topic holds");
            } else if orphan {
                // Its segment was deleted (or never defined: a crash): empty, for reuse.
                let ks = self.segment_keyspace_named(&name)?;
                self.recycle(name, ks)?;
            }
        }
        self.next_segment.store(max_id + 1, Ordering::Relaxed);
        Ok(out)
    }

    /// A segment's size when the log opens: on disk, or, while its records are only in the
    /// journal (a crash before fjall flushed them), their bytes, read from the memtable the
    /// journal was replayed into (at most the journal's bound in all).
    fn size_at_open(&self, ks: &Keyspace, id: u64) -> Result<u64, SourceError> {
        let disk = ks.disk_space();
        // (Segment 0 is shared by topics: its size is what is on disk.)
        if disk > 0 || id == 0 {
            return Ok(disk);
        }
        let mut bytes = 0u64;
        for item in ks.iter() {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            bytes += (k.len() + v.len()) as u64;
        }
        Ok(bytes)
    }

    fn segment_keyspace(&self, id: u64) -> Result<Keyspace, SourceError> {
        self.segment_keyspace_named(&keyspace_name(id))
    }

    fn segment_keyspace_named(&self, name: &str) -> Result<Keyspace, SourceError> {
        self.db
            .keyspace(name, KeyspaceCreateOptions::default)
            .map_err(|e| self.storage(e))
    }

    /// A new segment for `topic` beginning at `base`, defined in `batch`: it exists once the
    /// batch is committed. Its keyspace is created now (an empty one is deleted at the next open
    /// if the batch never is).
    pub(super) fn new_segment(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        topic: &str,
        base: Vec<u64>,
        now: u64,
    ) -> Result<Arc<Segment>, SourceError> {
        let id = self.next_segment.fetch_add(1, Ordering::Relaxed);
        let reused = self.pool.lock().expect("pool lock").ready.pop();
        let (name, ks) = match reused {
            Some(free) => free,
            None => {
                let ks = self
                    .segment_keyspace(id)
                    .map_err(|e| self.write_failed(e))?;
                (keyspace_name(id), ks)
            }
        };
        let m = SegmentMeta {
            base,
            created_ms: now,
            keyspace: Some(name.clone()),
        };
        batch.insert(
            &self.meta,
            codec::segment_key(topic, id),
            serde_json::to_vec(&m).expect("segment meta serialises"),
        );
        Ok(Arc::new(Segment {
            id,
            name,
            ks,
            base: m.base,
            created_ms: now,
            written: AtomicU64::new(0),
        }))
    }

    /// Deletes the oldest segment of `topic` (never its only one). The definition goes first,
    /// durably; the keyspace after (its files once no reader holds it).
    ///
    /// Under the write lock, which `delete_topic` holds while it takes a topic's segments: the
    /// segment is taken off the list by whichever comes first, and only that one empties its
    /// keyspace. (Without it, a topic deleted while retention trimmed it had its oldest
    /// segment's keyspace emptied twice, the second time after a new segment might have taken
    /// it from the pool.)
    pub(super) fn drop_oldest_segment(
        &self,
        topic: &str,
        t: &Topic,
        id: u64,
    ) -> Result<(), SourceError> {
        let gone = {
            let _w = self.write.lock().expect("write lock");
            let mut segs = t.segments.write().expect("segment list lock");
            if segs.len() < 2 || segs[0].id != id {
                return Ok(());
            }
            let mut batch = self.db.batch();
            batch.remove(&self.meta, codec::segment_key(topic, id));
            self.writable()?;
            batch.commit().map_err(|e| self.write_failed(e))?;
            segs.remove(0)
        };
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(|e| self.write_failed(e))?;
        self.delete_segment_keyspace(gone)
    }

    /// Deletes a segment's keyspace, unless it is segment 0 and another topic still holds it.
    pub(super) fn delete_segment_keyspace(&self, seg: Arc<Segment>) -> Result<(), SourceError> {
        if seg.id == 0 {
            let shared = self
                .topics
                .read()
                .expect("topic table lock")
                .values()
                .any(|t| {
                    t.segments
                        .read()
                        .expect("segment list lock")
                        .iter()
                        .any(|s| s.id == 0)
                });
            if shared {
                return Ok(());
            }
        }
        if seg.id == 0 && seg.name == LEGACY {
            drop_tables(&seg.ks);
            return self
                .db
                .delete_keyspace(seg.ks.clone())
                .map_err(|e| self.write_failed(e));
        }
        self.recycle(seg.name.clone(), seg.ks.clone())
    }

    /// Empties a keyspace no segment holds and keeps it for the next segment; one that fjall
    /// still has a flush pending for waits for it ([`EmbeddedLog::settle_pool`]).
    fn recycle(&self, name: String, ks: Keyspace) -> Result<(), SourceError> {
        if ks.sealed_memtable_count() > 0 {
            self.pool
                .lock()
                .expect("pool lock")
                .waiting
                .push((name, ks));
            return Ok(());
        }
        drop_tables(&ks);
        ks.clear().map_err(|e| self.write_failed(e))?;
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.ready.iter().any(|(n, _)| *n == name) {
            // Already given back: twice in the pool, two new segments would share it.
            debug_assert!(false, "keyspace {name} recycled twice");
            return Ok(());
        }
        if pool.ready.len() < POOL_MAX {
            pool.ready.push((name, ks));
            return Ok(());
        }
        drop(pool);
        self.db
            .delete_keyspace(ks)
            .map_err(|e| self.write_failed(e))
    }

    /// Empties the keyspaces whose pending flushes are done (retention calls it every pass).
    pub(super) fn settle_pool(&self) -> Result<(), SourceError> {
        let waiting = std::mem::take(&mut self.pool.lock().expect("pool lock").waiting);
        for (name, ks) in waiting {
            self.recycle(name, ks)?;
        }
        Ok(())
    }
}

/// Drops every table of a keyspace about to be deleted. fjall deletes a keyspace's folder once
/// its last handle goes, but lsm-tree keeps the file descriptors of tables it read in a cache
/// shared by the database and closes one only when its table is marked deleted, which only a
/// compaction does: a deleted segment's files stayed open, unlinked, and their disk space with
/// them (96 of 146 deleted segments here, in a run that read them). `drop_range` over the whole
/// keyspace is such a compaction. (It and the `tree` field are public but hidden from fjall's
/// docs; fjall is pinned to the version this was written against.) A failure leaves the files
/// to the end of the process.
pub(super) fn drop_tables(ks: &Keyspace) {
    use fjall::AbstractTree;
    if let Err(e) = ks.tree.drop_range::<&[u8], _>(..) {
        tracing::debug!(error = %e, "dropping a deleted segment's tables failed; its files go when weir exits");
    }
}

impl Topic {
    /// The segments a read of `partition` from `from` up to `end` touches, each with the range
    /// of offsets it holds of that read: `from` is raised to the oldest kept record.
    pub(super) fn spans(&self, partition: u32, from: u64, end: u64) -> Vec<(Keyspace, u64, u64)> {
        let p = partition as usize;
        let segs = self.segments.read().expect("segment list lock");
        let mut out = Vec::new();
        let mut at = from.max(segs.first().map_or(0, |s| s.base[p]));
        for (i, s) in segs.iter().enumerate() {
            let stop = segs.get(i + 1).map_or(end, |n| n.base[p]).min(end);
            if stop > at {
                out.push((s.ks.clone(), at, stop));
                at = stop;
            }
        }
        out
    }

    /// The first offset of `partition` still kept.
    pub(super) fn start(&self, partition: u32) -> u64 {
        // A topic being deleted has none left.
        self.segments
            .read()
            .expect("segment list lock")
            .first()
            .map_or(0, |s| s.base[partition as usize])
    }

    pub(super) fn active(&self) -> Arc<Segment> {
        self.segments
            .read()
            .expect("segment list lock")
            .last()
            .expect("a topic has a segment")
            .clone()
    }
}
