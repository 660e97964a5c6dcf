//! The embedded log: weir's default source, a durable single-node log in the data directory.
//!
//! Built on fjall (an LSM-tree storage engine with a write-ahead journal). Three keyspaces:
//! `records` holds every message under `topic 0 partition offset` (see [`codec`]); `meta` holds
//! topic definitions and consumer-group offsets; `marks` holds dedupe marks and their expiry
//! index. A commit (outputs plus offsets) is one fjall
//! write batch, so it is atomic; every append and commit is fsynced before it is reported done,
//! so what `weir produce` reported as written survives `kill -9` and power loss.
//!
//! One process owns a data directory at a time (fjall holds a file lock). While `weir run` owns
//! it, other `weir` commands reach the log through its local socket (see [`local`]).

mod admin;
mod broker;
pub mod check;
mod health;
mod retention;
mod segments;
mod sync;
pub(crate) use weir_core::codec;
pub mod local;

use super::{
    Commit, Delivery, GroupOffset, PartitionStats, Record, Source, SourceError, TopicStats,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use weir_core::retention::Retention;

/// The journal bytes past which fjall flushes memtables so it can drop old journal files
/// (its default is 512 MiB): what the data directory holds beyond the topics' retention.
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// The most partitions a topic may have; a guard against typos like `--partitions 40000`.
pub const MAX_PARTITIONS: u32 = 1024;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TopicMeta {
    partitions: u32,
    created_ms: u64,
    /// Absent in topics made before retention: they keep everything.
    #[serde(default = "keep_forever")]
    retention: Retention,
}

fn keep_forever() -> Retention {
    Retention::FOREVER
}

struct Topic {
    partitions: u32,
    /// Oldest first; the last takes appends. Changed under `EmbeddedLog::write` (a roll) or by
    /// retention (the first one goes).
    segments: std::sync::RwLock<Vec<Arc<segments::Segment>>>,
    retention: std::sync::RwLock<Retention>,
    /// Next offset per partition. Only changed under `EmbeddedLog::write`.
    ends: Vec<AtomicU64>,
    /// Where the next keyless record goes (round robin).
    next_keyless: AtomicU64,
    /// A commit (a run's outputs or dead letters) wrote to it in this process.
    written: std::sync::atomic::AtomicBool,
}

/// The end offsets a write batch moves and the segments it starts, kept apart until the batch
/// is committed.
#[derive(Default)]
struct Ends(
    Vec<(Arc<Topic>, u32, u64)>,
    Vec<(Arc<Topic>, Arc<segments::Segment>)>,
);

impl Ends {
    /// The next offset of the partition, counting what this batch staged already.
    fn peek(&self, t: &Arc<Topic>, p: u32) -> u64 {
        self.0
            .iter()
            .find(|(x, q, _)| Arc::ptr_eq(x, t) && *q == p)
            .map_or_else(|| t.ends[p as usize].load(Ordering::Acquire), |e| e.2)
    }

    /// The segment this batch appends the topic's records to.
    fn segment(&self, t: &Arc<Topic>) -> Arc<segments::Segment> {
        self.1
            .iter()
            .rev()
            .find(|(x, _)| Arc::ptr_eq(x, t))
            .map_or_else(|| t.active(), |(_, s)| s.clone())
    }

    /// The next offset of the partition, counting what this batch staged already.
    fn take(&mut self, t: &Arc<Topic>, p: u32) -> u64 {
        if let Some(e) = self
            .0
            .iter_mut()
            .find(|(x, q, _)| Arc::ptr_eq(x, t) && *q == p)
        {
            e.2 += 1;
            return e.2 - 1;
        }
        let next = t.ends[p as usize].load(Ordering::Acquire);
        self.0.push((t.clone(), p, next + 1));
        next
    }

    /// Makes the staged records readable: their batch is committed. New segments are listed
    /// before the ends move, so a reader never looks for a record in a segment it cannot see.
    fn apply(self) {
        for (t, s) in self.1 {
            let mut segs = t.segments.write().expect("segment list lock");
            // The segment it seals takes no more appends: flush it to tables now, so that its
            // size on disk is known and the journal can be let go.
            if let Some(sealed) = segs.last() {
                segments::flush(&sealed.ks);
            }
            segs.push(s);
        }
        for (t, p, end) in self.0 {
            t.ends[p as usize].store(end, Ordering::Release);
        }
    }
}

pub struct EmbeddedLog {
    dir: PathBuf,
    db: Database,
    meta: Keyspace,
    /// Dedupe done marks (`d/`) and their expiry index (`x/`): a keyspace of their own, so the
    /// point lookups of new keys do not wade through the offsets rewritten on every commit.
    dedupe: Keyspace,
    /// Topic table; read on every fetch, written only by `create_topic`.
    topics: std::sync::RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises offset assignment and the write batch that uses it, so offsets are dense
    /// and increasing. The fsync happens after it is released, through [`sync::GroupSync`], so
    /// concurrent writers share one.
    write: Mutex<()>,
    /// Group commit: one fsync for the batches committed while the last one ran.
    sync: sync::GroupSync,
    /// Woken after every durable append, so idle partitions fetch at once instead of at their
    /// next poll.
    appended: Arc<tokio::sync::Notify>,
    /// Set by the first failed write; every later write is refused.
    health: health::Health,
    /// The id the next segment gets.
    next_segment: AtomicU64,
    /// Records groups skipped because retention deleted them first, since the log opened.
    skipped: AtomicU64,
    /// Segments retention deleted since the log opened.
    dropped: AtomicU64,
    /// Emptied segment keyspaces, for the next segments.
    pool: Mutex<segments::Pool>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.dir)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Kafka's rules, so topic names move between sources unchanged.
pub fn validate_topic_name(name: &str) -> Result<(), SourceError> {
    match weir_core::topic::problem(name) {
        Some(why) => Err(SourceError::InvalidTopic {
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Stable partitioner for keyed records (FNV-1a): the same key always lands in the same
/// partition, across processes and releases, as long as the partition count is unchanged.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(partitions)) as u32
}

/// The dedupe marks are looked up one by one, mostly for keys that are not there. fjall's
/// defaults keep the filter blocks of level 0 in memory and read a table's whole filter block
/// from disk (and checksum it) for every lookup below that: past about two million marks, a
/// lookup read megabytes, and throughput fell from 190,000 to 11,000 messages/s. Partitioned
/// filters and indexes at every level make a lookup read one small partition, which the block
/// cache (bounded) keeps.
fn dedupe_keyspace_options() -> KeyspaceCreateOptions {
    use fjall::config::PartitioningPolicy;
    KeyspaceCreateOptions::default()
        .filter_block_partitioning_policy(PartitioningPolicy::all(true))
        .index_block_partitioning_policy(PartitioningPolicy::all(true))
        .max_memtable_size(16 << 20)
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir`. Fails with [`SourceError::Locked`] if another
    /// process has it open, and [`SourceError::Corrupt`] if it cannot be read; neither changes
    /// anything on disk.
    pub fn open(dir: &Path) -> Result<Self, SourceError> {
        let shown = dir.display().to_string();
        if dir.exists() && !dir.is_dir() {
            return Err(SourceError::Corrupt {
                dir: shown,
                detail: "it is a file, not a directory".into(),
            });
        }
        let db_dir = dir.join("log");
        // A directory with files in it but no log is someone else's: refuse rather than mix.
        if dir.is_dir() && !db_dir.exists() {
            let foreign = std::fs::read_dir(dir)
                .map_err(|e| SourceError::Storage {
                    dir: shown.clone(),
                    detail: e.to_string(),
                })?
                .filter_map(Result::ok)
                .any(|e| !matches!(e.file_name().to_str(), Some("compiled" | "weir.sock")));
            if foreign {
                return Err(SourceError::Corrupt {
                    dir: shown,
                    detail: "it has files but no `log` directory".into(),
                });
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| SourceError::Storage {
            dir: shown.clone(),
            detail: e.to_string(),
        })?;
        // fjall asserts on some damaged journal entries (a length that disagrees with another,
        // in debug builds) rather than return its error: a damaged directory is an error that
        // says so, never a crash.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Database::builder(&db_dir)
                .max_journaling_size(MAX_JOURNAL_BYTES)
                .open()
        }));
        let db = match opened {
            Ok(db) => db.map_err(|e| map_open_error(&shown, e))?,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                return Err(SourceError::Corrupt {
                    dir: shown,
                    detail: format!(
                        "its journal could not be read: {}",
                        why.lines().next().unwrap_or(why)
                    ),
                });
            }
        };
        let meta = db
            .keyspace("meta", KeyspaceCreateOptions::default)
            .map_err(|e| map_open_error(&shown, e))?;
        let dedupe = db
            .keyspace("marks", dedupe_keyspace_options)
            .map_err(|e| map_open_error(&shown, e))?;
        let log = Self {
            dir: dir.to_path_buf(),
            db,
            meta,
            dedupe,
            topics: Default::default(),
            write: Mutex::new(()),
            sync: sync::GroupSync::default(),
            appended: Default::default(),
            health: Default::default(),
            next_segment: AtomicU64::new(1),
            skipped: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            pool: Default::default(),
        };
        log.load_topics()?;
        log.move_dedupe_marks()?;
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Older data directories kept their marks in `meta` (first layout) or in a keyspace
    /// `dedupe` with fjall's default options (second): move them to `marks`, in atomic chunks
    /// (each one moves its entries, so an interrupted move goes on at the next open), then drop
    /// the old keyspace.
    fn move_dedupe_marks(&self) -> Result<(), SourceError> {
        const CHUNK: usize = 100_000;
        let mut moved = 0usize;
        let old = if self.db.keyspace_exists("dedupe") {
            Some(
                self.db
                    .keyspace("dedupe", KeyspaceCreateOptions::default)
                    .map_err(|e| self.storage(e))?,
            )
        } else {
            None
        };
        let mut sources: Vec<(&Keyspace, &[u8])> = vec![(&self.meta, b"d/"), (&self.meta, b"x/")];
        if let Some(old) = &old {
            sources.push((old, b""));
        }
        for (from, prefix) in sources {
            loop {
                let mut batch = self.db.batch();
                let mut n = 0usize;
                for item in from.prefix(prefix).take(CHUNK) {
                    let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
                    batch.insert(&self.dedupe, k.to_vec(), v.to_vec());
                    batch.remove(from, k.to_vec());
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                batch.commit().map_err(|e| self.storage(e))?;
                moved += n;
            }
        }
        if let Some(old) = old {
            self.db.delete_keyspace(old).map_err(|e| self.storage(e))?;
        }
        if moved > 0 {
            tracing::info!(
                marks = moved,
                "moved dedupe marks to their keyspace `marks`"
            );
        }
        Ok(())
    }

    fn storage(&self, e: impl std::fmt::Display) -> SourceError {
        SourceError::Storage {
            dir: self.dir.display().to_string(),
            detail: e.to_string(),
        }
    }

    /// A write (batch, insert or fsync) failed: no later write is taken.
    fn write_failed(&self, e: impl std::fmt::Display) -> SourceError {
        self.health.fail(&self.dir.display().to_string(), e)
    }

    /// Waits until the batch of `ticket` is on disk: one fsync shared with the writers that
    /// committed meanwhile ([`sync::GroupSync`]).
    fn durable(&self, ticket: u64) -> Result<(), SourceError> {
        self.sync.wait(ticket, || {
            self.db
                .persist(PersistMode::SyncAll)
                .map_err(|e| self.write_failed(e))
        })
    }

    /// fsyncs that made appends and commits durable since the log opened.
    pub fn syncs(&self) -> u64 {
        self.sync.syncs()
    }

    fn writable(&self) -> Result<(), SourceError> {
        self.health.check(&self.dir.display().to_string())
    }

    /// The first failed write's error, once one failed (the log takes no more).
    pub fn failure(&self) -> Option<&str> {
        self.health.failure()
    }

    /// Waits until a write fails.
    pub async fn failed(&self) {
        self.health.failed().await
    }

    fn corrupt(&self, detail: String) -> SourceError {
        SourceError::Corrupt {
            dir: self.dir.display().to_string(),
            detail,
        }
    }

    fn load_topics(&self) -> Result<(), SourceError> {
        let mut metas = Vec::new();
        for item in self.meta.prefix(b"t/") {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let name = std::str::from_utf8(&k[2..])
                .map_err(|_| self.corrupt("a topic name is not UTF-8".into()))?
                .to_string();
            let meta: TopicMeta = serde_json::from_slice(&v)
                .map_err(|e| self.corrupt(format!("topic `{name}` metadata: {e}")))?;
            metas.push((name, meta));
        }
        let names: Vec<(String, u32)> = metas
            .iter()
            .map(|(n, m)| (n.clone(), m.partitions))
            .collect();
        let mut segments = self.load_segments(&names)?;
        let mut topics = HashMap::new();
        for (name, meta) in metas {
            let segs = segments.remove(&name).unwrap_or_default();
            let Some(active) = segs.last() else {
                return Err(self.corrupt(format!("topic `{name}` has no segment")));
            };
            if segs
                .iter()
                .any(|s| s.base.len() != meta.partitions as usize)
            {
                return Err(self.corrupt(format!(
                    "a segment of topic `{name}` does not have {} partitions",
                    meta.partitions
                )));
            }
            // Appends go to the newest segment only: a partition ends at its last record
            // there, or where the segment begins when it holds none of that partition.
            let mut ends = Vec::with_capacity(meta.partitions as usize);
            for p in 0..meta.partitions {
                let last = active
                    .ks
                    .prefix(codec::partition_prefix(&name, p))
                    .next_back()
                    .map(|g| g.key().map_err(|e| self.storage(e)))
                    .transpose()?;
                let end = match last {
                    None => active.base[p as usize],
                    Some(k) => {
                        codec::offset_of(&k)
                            .ok_or_else(|| self.corrupt(format!("bad record key in `{name}`")))?
                            + 1
                    }
                };
                ends.push(AtomicU64::new(end));
            }
            let topic = Topic {
                partitions: meta.partitions,
                segments: std::sync::RwLock::new(segs),
                retention: std::sync::RwLock::new(meta.retention),
                ends,
                next_keyless: AtomicU64::new(u64::from(rand::random::<u32>())),
                written: Default::default(),
            };
            topics.insert(name, Arc::new(topic));
        }
        *self.topics.write().expect("topic table lock") = topics;
        Ok(())
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, SourceError> {
        self.topics
            .read()
            .expect("topic table lock")
            .get(name)
            .cloned()
            .ok_or_else(|| SourceError::UnknownTopic(name.to_string()))
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<(), SourceError> {
        self.create_topic_retained(name, partitions, Retention::default_for_new_topics())
    }

    /// Creates a topic that keeps what `retention` says.
    pub fn create_topic_retained(
        &self,
        name: &str,
        partitions: u32,
        retention: Retention,
    ) -> Result<(), SourceError> {
        validate_topic_name(name)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(SourceError::Invalid(format!(
                "--partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}"
            )));
        }
        self.writable()?;
        let _w = self.write.lock().expect("write lock");
        let mut topics = self.topics.write().expect("topic table lock");
        if topics.contains_key(name) {
            return Err(SourceError::TopicExists(name.to_string()));
        }
        let now = now_ms();
        let meta = TopicMeta {
            partitions,
            created_ms: now,
            retention,
        };
        let value = serde_json::to_vec(&meta).expect("topic meta serialises");
        let mut batch = self.db.batch();
        batch.insert(&self.meta, codec::topic_key(name), value);
        let first = self.new_segment(&mut batch, name, vec![0; partitions as usize], now)?;
        batch.commit().map_err(|e| self.write_failed(e))?;
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| self.write_failed(e))?;
        let ends = (0..partitions).map(|_| AtomicU64::new(0)).collect();
        topics.insert(
            name.to_string(),
            Arc::new(Topic {
                partitions,
                segments: std::sync::RwLock::new(vec![first]),
                retention: std::sync::RwLock::new(retention),
                ends,
                next_keyless: AtomicU64::new(0),
                written: Default::default(),
            }),
        );
        Ok(())
    }

    /// The first offset of the partition still kept.
    pub fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, SourceError> {
        let t = self.topic(topic)?;
        if partition >= t.partitions {
            return Err(SourceError::UnknownPartition {
                topic: topic.to_string(),
                partition,
                partitions: t.partitions,
            });
        }
        Ok(t.start(partition))
    }

    /// `t` is still the topic named `name` (not deleted, nor made again, since it was looked
    /// up). Called under `self.write`, which a deletion takes too.
    fn still_there(&self, name: &str, t: &Arc<Topic>) -> Result<(), SourceError> {
        match self.topics.read().expect("topic table lock").get(name) {
            Some(now) if Arc::ptr_eq(now, t) => Ok(()),
            _ => Err(SourceError::UnknownTopic(name.to_string())),
        }
    }

    /// Creates the topic unless it exists (with any partition count).
    /// Dead-letter topics (`<topic>.dlq`) keep everything: they hold work an operator has to
    /// look at, and they are small.
    pub fn ensure_topic(&self, name: &str, partitions: u32) -> Result<(), SourceError> {
        let retention = if name.ends_with(".dlq") {
            Retention::FOREVER
        } else {
            Retention::default_for_new_topics()
        };
        match self.create_topic_retained(name, partitions, retention) {
            Err(SourceError::TopicExists(_)) => Ok(()),
            other => other,
        }
    }

    pub fn topic_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .topics
            .read()
            .expect("topic table lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Appends `records` to `topic`, durably. Keyed records go to the partition of their key,
    /// keyless ones round robin. Returns (partition, offset) per record, in order.
    pub fn append(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<(u32, u64)>, SourceError> {
        let t = self.topic(topic)?;
        for r in &records {
            codec::check(r).map_err(SourceError::Invalid)?;
        }
        let (placed, ticket) = {
            let _w = self.write.lock().expect("write lock");
            self.still_there(topic, &t)?;
            let mut batch = self.db.batch();
            let mut ends = Ends::default();
            let placed = self.stage(&mut batch, topic, &t, records, now_ms(), &mut ends)?;
            self.writable()?;
            batch.commit().map_err(|e| self.write_failed(e))?;
            ends.apply();
            (placed, self.sync.ticket())
        };
        self.durable(ticket)?;
        // Another writer's fsync may have failed meanwhile: after that, a later fsync's success
        // does not vouch for this write (Linux reports a writeback error once).
        self.writable()?;
        self.appended.notify_waiters();
        Ok(placed)
    }

    /// Adds records to a write batch, assigning offsets after those already staged in `ends`.
    /// Caller holds `self.write`, and moves the in-memory end offsets ([`Ends::apply`]) only
    /// once the batch is committed: a failed write leaves them where the stored records end.
    fn stage(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        topic: &str,
        t: &Arc<Topic>,
        records: Vec<Record>,
        now: u64,
        ends: &mut Ends,
    ) -> Result<Vec<(u32, u64)>, SourceError> {
        let mut placed = Vec::with_capacity(records.len());
        let mut buf = Vec::new();
        let mut seg = ends.segment(t);
        let (seg_bytes, seg_ms) = {
            let r = t.retention.read().expect("retention lock");
            (r.segment_bytes(), r.segment_ms())
        };
        for mut r in records {
            let written = seg.written.load(Ordering::Relaxed);
            if written >= seg_bytes || (written > 0 && now.saturating_sub(seg.created_ms) >= seg_ms)
            {
                let base = (0..t.partitions).map(|p| ends.peek(t, p)).collect();
                seg = self.new_segment(batch, topic, base, now)?;
                ends.1.push((t.clone(), seg.clone()));
            }
            let p = match &r.key {
                Some(k) => partition_for_key(k, t.partitions),
                None => {
                    (t.next_keyless.fetch_add(1, Ordering::Relaxed) % u64::from(t.partitions))
                        as u32
                }
            };
            r.timestamp_ms.get_or_insert(now);
            let offset = ends.take(t, p);
            buf.clear();
            codec::encode(&r, &mut buf);
            batch.insert(&seg.ks, codec::record_key(topic, p, offset), buf.as_slice());
            seg.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
            placed.push((p, offset));
        }
        Ok(placed)
    }

    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        self.read_bounded(topic, partition, from, max, usize::MAX)
    }

    /// [`EmbeddedLog::read`], stopping once the records read hold `max_bytes` (at least one).
    pub fn read_bounded(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let t = self.topic(topic)?;
        if partition >= t.partitions {
            return Err(SourceError::UnknownPartition {
                topic: topic.to_string(),
                partition,
                partitions: t.partitions,
            });
        }
        let end = t.ends[partition as usize].load(Ordering::Acquire);
        if from >= end || max == 0 {
            return Ok(Vec::new());
        }
        let name: Arc<str> = Arc::from(topic);
        let mut out = Vec::with_capacity(max.min((end - from) as usize).min(1024));
        let mut bytes = 0usize;
        let spans = t.spans(partition, from, end);
        let wanted = spans.first().map_or(from, |s| s.1);
        let records = spans.iter().flat_map(|(ks, from, to)| {
            ks.range(
                codec::record_key(topic, partition, *from)
                    ..codec::record_key(topic, partition, *to),
            )
        });
        for item in records.take(max) {
            if bytes >= max_bytes {
                break;
            }
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let offset = codec::offset_of(&k)
                .ok_or_else(|| self.corrupt(format!("bad record key in `{topic}`")))?;
            // Records missing where retention keeps them are damage, not a skip: the consumer
            // would count them as deleted by retention. (Past the oldest kept record, the
            // segment holding them must have been deleted while this read went through it.)
            if out.is_empty() && offset != wanted && offset > t.start(partition) {
                return Err(self.corrupt(format!(
                    "{topic}/{partition}: offsets {wanted} to {} are missing, though retention keeps them",
                    offset - 1
                )));
            }
            // A segment retention deleted while this read went through it leaves a hole: what
            // comes after is returned by the next read, which begins past the hole, so the
            // consumer sees (and counts) the skip.
            if out
                .last()
                .is_some_and(|d: &Delivery| offset != d.offset + 1)
            {
                break;
            }
            let record = codec::decode(&v)
                .map_err(|e| self.corrupt(format!("{topic}/{partition} offset {offset}: {e}")))?;
            bytes += crate::source::wire_size(&record);
            out.push(Delivery {
                topic: name.clone(),
                partition,
                offset,
                record,
                redeliveries: 0,
            });
        }
        Ok(out)
    }

    pub fn committed_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<u64, SourceError> {
        match self
            .meta
            .get(codec::group_key(group, topic, partition))
            .map_err(|e| self.storage(e))?
        {
            // A group that never committed starts at the oldest record kept.
            None => Ok(self
                .topic(topic)
                .ok()
                .filter(|t| partition < t.partitions)
                .map_or(0, |t| t.start(partition))),
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                    self.corrupt(format!("offset of group `{group}` on {topic}/{partition}"))
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Publishes outputs and moves offsets in one atomic, durable write.
    pub fn commit_batch(&self, group: &str, commit: Commit) -> Result<(), SourceError> {
        let has_outputs = !commit.outputs.is_empty();
        let commit_skipped: u64 = commit.skipped.iter().map(|(_, _, n)| n).sum();
        let mut output_topics = Vec::new();
        for o in &commit.outputs {
            output_topics.push(self.topic(&o.topic)?);
            codec::check(&o.record).map_err(SourceError::Invalid)?;
        }
        let ticket = {
            let _w = self.write.lock().expect("write lock");
            let mut batch = self.db.batch();
            let now = now_ms();
            let mut ends = Ends::default();
            let mut checked: Option<&Arc<Topic>> = None;
            for (o, t) in commit.outputs.into_iter().zip(&output_topics) {
                if !checked.is_some_and(|c| Arc::ptr_eq(c, t)) {
                    self.still_there(&o.topic, t)?;
                    t.written.store(true, Ordering::Relaxed);
                    checked = Some(t);
                }
                self.stage(&mut batch, &o.topic, t, vec![o.record], now, &mut ends)?;
            }
            for (topic, partition, next) in &commit.offsets {
                batch.insert(
                    &self.meta,
                    codec::group_key(group, topic, *partition),
                    next.to_be_bytes(),
                );
            }
            for (key, expires) in &commit.dedupe_done {
                let mark = codec::dedupe_key(group, key);
                batch.insert(&self.dedupe, codec::expiry_key(*expires, &mark), []);
                batch.insert(&self.dedupe, mark, expires.to_be_bytes());
            }
            for (topic, partition, n) in &commit.skipped {
                let key = codec::skipped_key(group, topic, *partition);
                let before = self.meta.get(&key).map_err(|e| self.storage(e))?;
                let before = before
                    .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                    .map_or(0, u64::from_be_bytes);
                batch.insert(&self.meta, key, (before + n).to_be_bytes());
            }
            for (topic, partition, offset) in &commit.replayed {
                batch.insert(
                    &self.meta,
                    codec::replay_key(topic, *partition, *offset),
                    now.to_be_bytes(),
                );
            }
            self.writable()?;
            batch.commit().map_err(|e| self.write_failed(e))?;
            ends.apply();
            self.sync.ticket()
        };
        self.durable(ticket)?;
        self.writable()?;
        let skipped: u64 = commit_skipped;
        self.skipped.fetch_add(skipped, Ordering::Relaxed);
        if has_outputs {
            self.appended.notify_waiters();
        }
        Ok(())
    }

    /// Offsets of the partition's dead letters that were replayed.
    pub fn replayed(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<std::collections::BTreeSet<u64>, SourceError> {
        let mut prefix = b"r/".to_vec();
        prefix.extend_from_slice(&codec::partition_prefix(topic, partition));
        let mut out = std::collections::BTreeSet::new();
        for item in self.meta.prefix(&prefix) {
            let k = item.key().map_err(|e| self.storage(e))?;
            out.insert(codec::offset_of(&k).ok_or_else(|| self.corrupt("a replay mark".into()))?);
        }
        Ok(out)
    }

    /// Depth and per-group lag of every partition of every topic (or of `only`).
    pub fn stats(&self, only: Option<&str>) -> Result<Vec<TopicStats>, SourceError> {
        let mut by_partition: HashMap<(String, u32), Vec<(String, u64)>> = HashMap::new();
        for item in self.meta.prefix(b"o/") {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            let (group, topic, partition) = codec::parse_group_key(&k)
                .ok_or_else(|| self.corrupt("a group offset key".into()))?;
            let committed = u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| self.corrupt(format!("offset of group `{group}`")))?,
            );
            by_partition
                .entry((topic, partition))
                .or_default()
                .push((group, committed));
        }
        let mut out = Vec::new();
        for name in self.topic_names() {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let t = self.topic(&name)?;
            let partitions = (0..t.partitions)
                .map(|p| {
                    let end = t.ends[p as usize].load(Ordering::Acquire);
                    let groups = by_partition
                        .remove(&(name.clone(), p))
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(group, committed)| GroupOffset {
                            group,
                            committed,
                            // What retention deleted is not waiting for the group.
                            lag: end.saturating_sub(committed.max(t.start(p))),
                        })
                        .collect();
                    PartitionStats {
                        partition: p,
                        end_offset: end,
                        groups,
                    }
                })
                .collect();
            out.push(TopicStats {
                topic: name,
                partitions,
            });
        }
        if let Some(o) = only
            && out.is_empty()
        {
            return Err(SourceError::UnknownTopic(o.to_string()));
        }
        Ok(out)
    }
}

fn map_open_error(dir: &str, e: fjall::Error) -> SourceError {
    match e {
        fjall::Error::Locked => SourceError::Locked {
            dir: dir.to_string(),
        },
        fjall::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            SourceError::Storage {
                dir: dir.to_string(),
                detail: format!("permission denied: {io}"),
            }
        }
        fjall::Error::Io(io) => SourceError::Storage {
            dir: dir.to_string(),
            detail: io.to_string(),
        },
        other => SourceError::Corrupt {
            dir: dir.to_string(),
            detail: format!("{other:?}"),
        },
    }
}

/// The embedded log settles by committed offset, writes outputs and offsets in one atomic batch
/// (a transaction, always on) and keeps dedupe marks with its commits.
pub(crate) const CAPABILITIES: crate::source::Capabilities = crate::source::Capabilities {
    dedupe_marks: true,
    transactions: true,
    dense_offsets: true,
    ..crate::source::Capabilities::LOG
};

impl Source for EmbeddedLog {
    fn capabilities(&self) -> crate::source::Capabilities {
        CAPABILITIES
    }

    fn append_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.appended.clone())
    }
    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        Ok(self.topic(topic)?.partitions)
    }
    fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError> {
        self.committed_offset(group, topic, partition)
    }
    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, SourceError> {
        let t = self.topic(topic)?;
        t.ends
            .get(partition as usize)
            .map(|e| e.load(Ordering::Acquire))
            .ok_or(SourceError::UnknownPartition {
                topic: topic.into(),
                partition,
                partitions: t.partitions,
            })
    }
    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        self.read_bounded(topic, partition, from, max, max_bytes)
    }
    fn commit(&self, group: &str, commit: Commit) -> Result<(), SourceError> {
        self.commit_batch(group, commit)
    }
    fn topic_exists(&self, topic: &str) -> bool {
        self.topic(topic).is_ok()
    }
    fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), SourceError> {
        EmbeddedLog::ensure_topic(self, topic, partitions)
    }
    fn dedupe_done(&self, group: &str, key: &[u8], now_ms: u64) -> Result<bool, SourceError> {
        match self
            .dedupe
            .get(codec::dedupe_key(group, key))
            .map_err(|e| self.storage(e))?
        {
            None => Ok(false),
            Some(v) => {
                let expires = u64::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| self.corrupt("a dedupe mark".into()))?,
                );
                Ok(expires > now_ms)
            }
        }
    }
    fn evict_dedupe(&self, now_ms: u64, max: usize) -> Result<usize, SourceError> {
        let mut doomed = Vec::new();
        for item in self
            .dedupe
            .range(codec::expiry_key(0, b"")..codec::expiry_key(now_ms, b""))
            .take(max)
        {
            doomed.push(item.key().map_err(|e| self.storage(e))?);
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let _w = self.write.lock().expect("write lock");
        let mut batch = self.db.batch();
        for index in &doomed {
            let mark = &index[10..];
            // A newer mark of the same key (handled again later) has a later expiry: keep it.
            let current = self.dedupe.get(mark).map_err(|e| self.storage(e))?;
            let expiry = u64::from_be_bytes(index[2..10].try_into().expect("8 bytes"));
            if current.is_some_and(|v| v.as_ref() == expiry.to_be_bytes()) {
                batch.remove(&self.dedupe, mark.to_vec());
            }
            batch.remove(&self.dedupe, index.to_vec());
        }
        self.writable()?;
        batch.commit().map_err(|e| self.write_failed(e))?;
        Ok(doomed.len())
    }
}

#[cfg(test)]
mod retention_tests;
#[cfg(test)]
mod tests;
