//! `weir check-data`: verifies a data directory against the log's invariants.
//!
//! - Every record belongs to a defined topic and a partition below its count, and decodes.
//! - A partition's offsets are dense from its first kept record (retention deletes the oldest
//!   segments whole), and each record lies in the segment whose span holds its offset.
//! - A group's committed offset names a topic and partition that exist, and is at most the
//!   partition's end (an offset past the end would skip what is appended next).
//! - A replay mark names a stored dead letter.
//! - Every dedupe done mark (`d/`) has its expiry index entry (`x/<its expiry><mark>`); an index
//!   entry without its mark is allowed (eviction removes both in one batch, but a mark written
//!   again later moves to a new expiry and leaves the old entry for eviction to drop).
//!
//! Opening the log already runs fjall's journal recovery, which drops a torn batch at the
//! journal's end: that is the repair a crash needs, done before these checks.

use super::{EmbeddedLog, Topic, codec};
use crate::source::SourceError;
use fjall::Keyspace;
use std::collections::HashMap;
use std::sync::Arc;

/// What a check found: counts, and every problem (empty when the directory is sound).
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub topics: usize,
    pub records: u64,
    pub group_offsets: usize,
    pub replay_marks: usize,
    pub dedupe_marks: usize,
    pub problems: Vec<String>,
}

/// How many problems are listed; the rest are counted.
const MAX_LISTED: usize = 100;

impl Report {
    fn problem(&mut self, p: String) {
        if self.problems.len() < MAX_LISTED {
            self.problems.push(p);
        } else if self.problems.len() == MAX_LISTED {
            self.problems
                .push("(more problems; the first 100 are listed)".into());
        }
    }
}

impl EmbeddedLog {
    /// Reads the whole directory and checks it. Errors only when it cannot be read.
    pub fn check(&self) -> Result<Report, SourceError> {
        let mut r = Report::default();
        let topics: HashMap<String, u32> = self
            .topics
            .read()
            .expect("topic table lock")
            .iter()
            .map(|(n, t)| (n.clone(), t.partitions))
            .collect();
        r.topics = topics.len();
        // Records: (topic, partition) -> the next offset expected.
        let mut ends: HashMap<(String, u32), u64> = HashMap::new();
        let all: Vec<(String, Arc<Topic>)> = self
            .topics
            .read()
            .expect("topic table lock")
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        // Which topics hold each segment (segment 0 is shared by the topics that held records
        // before segments; a topic that dropped it leaves its records there until all have).
        let mut holders: HashMap<u64, (Keyspace, Vec<String>)> = HashMap::new();
        for (name, t) in &all {
            let segs = t.segments.read().expect("segment list lock").clone();
            for s in &segs {
                holders
                    .entry(s.id)
                    .or_insert_with(|| (s.ks.clone(), Vec::new()))
                    .1
                    .push(name.clone());
            }
            for p in 0..t.partitions {
                let mut next = segs[0].base[p as usize];
                for (i, s) in segs.iter().enumerate() {
                    let stop = segs.get(i + 1).map(|n| n.base[p as usize]);
                    if s.base[p as usize] != next {
                        r.problem(format!(
                            "{name}/{p}: segment {} begins at {} where the one before ends at {next}",
                            s.id, s.base[p as usize]
                        ));
                    }
                    for item in s.ks.prefix(codec::partition_prefix(name, p)) {
                        let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
                        r.records += 1;
                        let Some(offset) = codec::offset_of(&k) else {
                            r.problem(format!("a record key that is not one: {}", hex::encode(&k)));
                            continue;
                        };
                        if offset != next {
                            r.problem(format!(
                                "{name}/{p}: offset {offset} follows {} (offsets must be dense)",
                                next.wrapping_sub(1)
                            ));
                        }
                        if stop.is_some_and(|stop| offset >= stop) {
                            r.problem(format!(
                                "{name}/{p}@{offset} is in segment {}, which ends at {}",
                                s.id,
                                stop.unwrap_or_default()
                            ));
                        }
                        next = offset + 1;
                        if let Err(e) = codec::decode(&v) {
                            r.problem(format!("record {name}/{p}@{offset} does not decode: {e}"));
                        }
                    }
                    if let Some(stop) = stop {
                        if next < stop {
                            r.problem(format!(
                                "{name}/{p}: segment {} holds records up to {}, but the next begins at {stop}",
                                s.id,
                                next.wrapping_sub(1)
                            ));
                        }
                        next = next.max(stop);
                    }
                }
                ends.insert((name.clone(), p), next);
            }
        }
        // Records no topic holds in a segment: of a topic not defined, a partition past its
        // count, or another topic's (a segment holds one topic's records, but segment 0).
        for (id, (ks, owners)) in &holders {
            for item in ks.iter() {
                let k = item.key().map_err(|e| self.storage(e))?;
                let Some((topic, partition, offset)) = split_record_key(&k) else {
                    r.problem(format!("a record key that is not one: {}", hex::encode(&k)));
                    continue;
                };
                match topics.get(&topic) {
                    None if *id != 0 => r.problem(format!(
                        "record {topic}/{partition}@{offset} of a topic that is not defined"
                    )),
                    Some(&n) if partition >= n => r.problem(format!(
                        "record {topic}/{partition}@{offset}: the topic has {n} partition(s)"
                    )),
                    Some(_) if *id != 0 && !owners.contains(&topic) => r.problem(format!(
                        "record {topic}/{partition}@{offset} in segment {id} of another topic"
                    )),
                    _ => {}
                }
            }
        }
        let end = |t: &str, p: u32| ends.get(&(t.to_string(), p)).copied().unwrap_or(0);
        for item in self.meta.prefix(b"o/") {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            r.group_offsets += 1;
            let Some((group, topic, partition)) = codec::parse_group_key(&k) else {
                r.problem(format!(
                    "a group offset key that is not one: {}",
                    hex::encode(&k)
                ));
                continue;
            };
            let Ok(bytes) = <[u8; 8]>::try_from(v.as_ref()) else {
                r.problem(format!(
                    "group {group}'s offset on {topic}/{partition} is not 8 bytes"
                ));
                continue;
            };
            let committed = u64::from_be_bytes(bytes);
            match topics.get(&topic) {
                None => r.problem(format!(
                    "group {group} has an offset on {topic}, which is not defined"
                )),
                Some(&n) if partition >= n => r.problem(format!(
                    "group {group} has an offset on {topic}/{partition}: the topic has {n} partition(s)"
                )),
                Some(_) if committed > end(&topic, partition) => r.problem(format!(
                    "group {group}'s offset on {topic}/{partition} is {committed}, past the end {}",
                    end(&topic, partition)
                )),
                Some(_) => {}
            }
        }
        for item in self.meta.prefix(b"r/") {
            let k = item.key().map_err(|e| self.storage(e))?;
            r.replay_marks += 1;
            match split_record_key(&k[2..]) {
                Some((t, p, o)) if o < end(&t, p) => {}
                Some((t, p, o)) => {
                    r.problem(format!("replay mark for {t}/{p}@{o}, which is not stored"))
                }
                None => r.problem(format!(
                    "a replay mark key that is not one: {}",
                    hex::encode(&k)
                )),
            }
        }
        for item in self.dedupe.prefix(b"d/") {
            let (k, v) = item.into_inner().map_err(|e| self.storage(e))?;
            r.dedupe_marks += 1;
            let Ok(bytes) = <[u8; 8]>::try_from(v.as_ref()) else {
                r.problem(format!("dedupe mark {} is not 8 bytes", hex::encode(&k)));
                continue;
            };
            let index = codec::expiry_key(u64::from_be_bytes(bytes), &k);
            if !self
                .dedupe
                .contains_key(&index)
                .map_err(|e| self.storage(e))?
            {
                r.problem(format!(
                    "dedupe mark {} has no expiry index entry (it would never be evicted)",
                    String::from_utf8_lossy(&k)
                ));
            }
        }
        // Marks of the first layouts, which opening moves: none may be left.
        if self.meta.prefix(b"d/").next().is_some() || self.meta.prefix(b"x/").next().is_some() {
            r.problem("dedupe marks left in `meta` (opening should have moved them)".into());
        }
        Ok(r)
    }
}

/// (topic, partition, offset) of a record key: `topic 0x00 partition(u32 BE) offset(u64 BE)`.
fn split_record_key(k: &[u8]) -> Option<(String, u32, u64)> {
    let (head, offset) = k.split_at(k.len().checked_sub(8)?);
    let (head, partition) = head.split_at(head.len().checked_sub(4)?);
    let topic = head.strip_suffix(&[0])?;
    Some((
        std::str::from_utf8(topic).ok()?.to_string(),
        u32::from_be_bytes(partition.try_into().ok()?),
        u64::from_be_bytes(offset.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Commit, Output, Record};

    fn rec(p: &str) -> Record {
        Record {
            key: None,
            payload: p.as_bytes().to_vec(),
            headers: vec![],
            timestamp_ms: None,
        }
    }

    #[test]
    fn a_sound_directory_has_no_problems() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        log.create_topic("in", 2).unwrap();
        log.create_topic("out", 1).unwrap();
        log.append("in", (0..10).map(|i| rec(&i.to_string())).collect())
            .unwrap();
        let commit = Commit {
            outputs: vec![Output {
                topic: "out".into(),
                record: rec("x"),
            }],
            offsets: vec![("in".into(), 0, 1)],
            dedupe_done: vec![(b"k1".to_vec(), u64::MAX / 2)],
            ..Commit::default()
        };
        log.commit_batch("g", commit).unwrap();
        let r = log.check().unwrap();
        assert!(r.problems.is_empty(), "{r:?}");
        assert_eq!(
            (r.topics, r.records, r.group_offsets, r.dedupe_marks),
            (2, 11, 1, 1)
        );
    }

    #[test]
    fn each_broken_invariant_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        log.create_topic("in", 1).unwrap();
        log.append("in", vec![rec("a"), rec("b")]).unwrap();
        let seg = log.topic("in").unwrap().active();
        let mut b = log.db.batch();
        // A gap at offset 2, a record that does not decode, an offset past the end, a mark
        // without its index entry, a record of no topic.
        b.insert(&seg.ks, codec::record_key("in", 0, 3), [9u8, 9, 9]);
        b.insert(
            &log.meta,
            codec::group_key("g", "in", 0),
            99u64.to_be_bytes(),
        );
        b.insert(
            &log.dedupe,
            codec::dedupe_key("g", b"k"),
            5u64.to_be_bytes(),
        );
        b.insert(&seg.ks, codec::record_key("ghost", 0, 0), [1u8, 0]);
        b.commit().unwrap();
        let r = log.check().unwrap();
        let all = r.problems.join("\n");
        for expected in [
            "offset 3 follows 1",
            "does not decode",
            "past the end",
            "no expiry index entry",
            "not defined",
        ] {
            assert!(all.contains(expected), "{expected:?} not in:\n{all}");
        }
    }
}
