//! How long a topic of the embedded log keeps its records, and which of its segments go.
//!
//! A topic's records live in segments (one storage keyspace each; see the embedded log's
//! `segments` module); retention deletes whole segments, oldest first, and never the active one
//! (the segment appends go to). [`doomed`] is the decision, a pure function of the segments, the
//! groups' committed offsets and the clock, so it is tested by table below.

use serde::{Deserialize, Serialize};

/// What a topic keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Records older than this go (by the time their segment stopped taking appends); `None`
    /// keeps them whatever their age.
    #[serde(default)]
    pub max_age_ms: Option<u64>,
    /// Past this many bytes on disk, the oldest segments go; `None`: no bound.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub policy: Policy,
    /// A segment takes appends until it holds this many bytes (or gets older than a tenth of
    /// `max_age_ms`); `None`: derived from the limits ([`Retention::segment_bytes`]).
    #[serde(default)]
    pub segment_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Age and size decide; a group that has not read what goes skips it.
    #[default]
    Limits,
    /// A segment goes once every group that reads the topic has committed past it (as
    /// JetStream's interest retention); age and size do not delete what a group still needs. A
    /// topic no group has read keeps everything.
    Interest,
}

/// Seven days, as Kafka's `log.retention.hours` default: what a topic created without a
/// retention keeps.
pub const DEFAULT_MAX_AGE_MS: u64 = 7 * 24 * 3_600_000;

impl Retention {
    /// Keeps everything (topics of data directories made before retention existed, and dead
    /// letter topics, which hold work an operator has to look at).
    pub const FOREVER: Retention = Retention {
        max_age_ms: None,
        max_bytes: None,
        policy: Policy::Limits,
        segment_bytes: None,
    };

    /// What a new topic gets unless told otherwise: seven days.
    pub fn default_for_new_topics() -> Retention {
        Retention {
            max_age_ms: Some(DEFAULT_MAX_AGE_MS),
            ..Retention::FOREVER
        }
    }

    /// Bytes a segment takes before the next one starts: a twentieth of `max_bytes`, between 1 MiB
    /// and 256 MiB; 128 MiB unbounded. A sealed segment is on disk twice while its memtable is
    /// flushed (in the journal and in new tables), so the segment size is what the directory can
    /// go over the bound by, on top of the journal: a tenth went 12 MB past a 650 MB directory in
    /// the 30-minute run at 50,000 msg/s with a 500 MiB bound (docs/performance.md).
    pub fn segment_bytes(&self) -> u64 {
        if let Some(b) = self.segment_bytes {
            return b.max(1);
        }
        match self.max_bytes {
            Some(max) => (max / 20).clamp(1 << 20, 256 << 20),
            None => 128 << 20,
        }
    }

    /// Age at which the active segment makes way for a new one, so that age retention can
    /// delete it: a tenth of `max_age_ms`, at least a second, at most an hour; an hour without one.
    pub fn segment_ms(&self) -> u64 {
        match self.max_age_ms {
            Some(age) => (age / 10).clamp(1_000, 3_600_000),
            None => 3_600_000,
        }
    }

    /// How `weir topics list` shows it.
    pub fn describe(&self) -> String {
        let age = self.max_age_ms.map(human_ms);
        let bytes = self.max_bytes.map(human_bytes);
        let limits = match (age, bytes) {
            (None, None) => "forever".to_string(),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (Some(a), Some(b)) => format!("{a}, {b}"),
        };
        match self.policy {
            Policy::Limits => limits,
            Policy::Interest => "until every group has read it".to_string(),
        }
    }
}

/// A change to a topic's [`Retention`] (`weir topics create` and `alter`): each field given
/// replaces the topic's; `Some(None)` removes a limit (`forever`, `unlimited`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionChange {
    #[serde(default)]
    pub max_age_ms: Option<Option<u64>>,
    #[serde(default)]
    pub max_bytes: Option<Option<u64>>,
    #[serde(default)]
    pub policy: Option<Policy>,
    #[serde(default)]
    pub segment_bytes: Option<Option<u64>>,
}

impl RetentionChange {
    pub fn is_empty(&self) -> bool {
        *self == RetentionChange::default()
    }

    pub fn apply(&self, mut r: Retention) -> Retention {
        if let Some(v) = self.max_age_ms {
            r.max_age_ms = v;
        }
        if let Some(v) = self.max_bytes {
            r.max_bytes = v;
        }
        if let Some(v) = self.policy {
            r.policy = v;
        }
        if let Some(v) = self.segment_bytes {
            r.segment_bytes = v;
        }
        r
    }
}

/// Where `weir groups seek` moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeekTo {
    /// The oldest record kept.
    Earliest,
    /// The end: only what is appended from now on.
    Latest,
    /// This offset (in every partition asked for), within what is kept.
    Offset(u64),
    /// The first record appended at or after this time (ms since the epoch).
    Time(u64),
}

fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

/// What [`doomed`] knows of a segment.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// First offset of each partition in the segment.
    pub base: Vec<u64>,
    /// When it was started (ms since the epoch).
    pub created_ms: u64,
    /// Its size on disk.
    pub bytes: u64,
}

/// How many of the oldest `segments` (oldest first, the last one active) retention deletes now.
/// `groups` holds each group's committed offset per partition (the interest policy reads it).
pub fn doomed(r: &Retention, segments: &[SegmentInfo], groups: &[Vec<u64>], now_ms: u64) -> usize {
    let sealed = segments.len().saturating_sub(1);
    match r.policy {
        Policy::Interest => {
            if groups.is_empty() {
                return 0;
            }
            // Segment k ends where k + 1 begins; it goes once every group is past that.
            (0..sealed)
                .take_while(|&k| {
                    let next = &segments[k + 1].base;
                    groups.iter().all(|committed| {
                        next.iter()
                            .enumerate()
                            .all(|(p, &end)| committed.get(p).copied().unwrap_or(0) >= end)
                    })
                })
                .count()
        }
        Policy::Limits => {
            let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
            let mut n = 0;
            while n < sealed {
                // The segment took its last append when the next one was started.
                let closed = segments[n + 1].created_ms;
                let too_old = r
                    .max_age_ms
                    .is_some_and(|age| now_ms.saturating_sub(closed) >= age);
                let too_big = r.max_bytes.is_some_and(|max| total > max);
                if !(too_old || too_big) {
                    break;
                }
                total -= segments[n].bytes;
                n += 1;
            }
            n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(base: &[u64], created_ms: u64, bytes: u64) -> SegmentInfo {
        SegmentInfo {
            base: base.to_vec(),
            created_ms,
            bytes,
        }
    }

    #[test]
    fn limits_by_age_and_size() {
        let limits = |age: Option<u64>, bytes: Option<u64>| Retention {
            max_age_ms: age,
            max_bytes: bytes,
            ..Retention::FOREVER
        };
        // Three segments started at 0, 100 and 200 ms, 10 bytes each; the last is active.
        let segs = [seg(&[0], 0, 10), seg(&[5], 100, 10), seg(&[9], 200, 10)];
        let cases: &[(&str, Retention, u64, usize)] = &[
            ("forever keeps all", Retention::FOREVER, 10_000, 0),
            ("young enough", limits(Some(1_000), None), 1_050, 0),
            (
                "the first closed 1000 ms ago",
                limits(Some(1_000), None),
                1_100,
                1,
            ),
            ("both closed long ago", limits(Some(1_000), None), 5_000, 2),
            (
                "the active one never goes",
                limits(Some(1), None),
                u64::MAX,
                2,
            ),
            ("30 bytes within 30", limits(None, Some(30)), 0, 0),
            ("30 bytes over 25: one goes", limits(None, Some(25)), 0, 1),
            ("over 5: all sealed go", limits(None, Some(5)), 0, 2),
            (
                "age takes one, size no more",
                limits(Some(1_000), Some(25)),
                1_150,
                1,
            ),
            (
                "size takes what age keeps",
                limits(Some(10_000), Some(15)),
                1_150,
                2,
            ),
            (
                "a clock before the segments",
                limits(Some(1_000), None),
                0,
                0,
            ),
        ];
        for (name, r, now, want) in cases {
            assert_eq!(doomed(r, &segs, &[], *now), *want, "{name}");
        }
    }

    #[test]
    fn interest_waits_for_every_group() {
        let interest = Retention {
            policy: Policy::Interest,
            max_age_ms: Some(1),
            max_bytes: Some(1),
            ..Retention::FOREVER
        };
        // Two partitions; segment 0 holds offsets [0,5) and [0,3), segment 1 [5,8) and [3,6).
        let segs = [
            seg(&[0, 0], 0, 10),
            seg(&[5, 3], 1, 10),
            seg(&[8, 6], 2, 10),
        ];
        let cases: &[(&str, Vec<Vec<u64>>, usize)] = &[
            ("no group: keep everything", vec![], 0),
            ("one group at the start", vec![vec![0, 0]], 0),
            ("past segment 0 on one partition only", vec![vec![5, 2]], 0),
            ("past segment 0", vec![vec![5, 3]], 1),
            ("past both sealed", vec![vec![100, 100]], 2),
            (
                "the slowest group decides",
                vec![vec![100, 100], vec![6, 4]],
                1,
            ),
            ("a group with fewer partitions known", vec![vec![9]], 0),
        ];
        for (name, groups, want) in cases {
            assert_eq!(doomed(&interest, &segs, groups, 1_000_000), *want, "{name}");
        }
    }

    #[test]
    fn segment_sizes_follow_the_limits() {
        let r = |bytes: Option<u64>, seg: Option<u64>| Retention {
            max_bytes: bytes,
            segment_bytes: seg,
            ..Retention::FOREVER
        };
        assert_eq!(r(None, None).segment_bytes(), 128 << 20);
        assert_eq!(r(Some(500 << 20), None).segment_bytes(), 25 << 20);
        assert_eq!(r(Some(1 << 20), None).segment_bytes(), 1 << 20);
        assert_eq!(r(Some(100 << 30), None).segment_bytes(), 256 << 20);
        assert_eq!(r(Some(100 << 30), Some(4096)).segment_bytes(), 4096);
        let aged = Retention {
            max_age_ms: Some(DEFAULT_MAX_AGE_MS),
            ..Retention::FOREVER
        };
        assert_eq!(aged.segment_ms(), 3_600_000);
        assert_eq!(aged.describe(), "7d");
        assert_eq!(r(Some(500 << 20), None).describe(), "500MiB");
    }
}
