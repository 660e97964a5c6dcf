//! Topic and group lifecycle as every broker answers it: what `weir topics alter|delete` and
//! `weir groups list|describe|seek|delete` show and take.

use serde::{Deserialize, Serialize};

/// One partition of a group, as `weir groups describe` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupPartition {
    pub topic: String,
    pub partition: u32,
    /// The next offset the group reads.
    pub committed: u64,
    pub end: u64,
    pub lag: u64,
    /// The oldest offset the broker still keeps, where it says.
    pub start: Option<u64>,
    /// Records the group's offset passed because retention deleted them before it read them
    /// (the embedded log counts them; elsewhere `None`).
    pub skipped_by_retention: Option<u64>,
    /// Age of the oldest record the group has not consumed, in seconds (`None`: none waits, or
    /// the broker does not say).
    pub oldest_unconsumed_age_s: Option<f64>,
}

/// A consumer group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub group: String,
    /// Its live members, where the broker knows them (Kafka); the embedded log's only member
    /// is the `weir run` that owns the data directory.
    pub members: Vec<String>,
    /// The broker's word for its state (Kafka: `Stable`, `Empty`...), where it has one.
    pub state: Option<String>,
    pub partitions: Vec<GroupPartition>,
}

/// A partition's committed offset before and after `weir groups seek`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeekMove {
    pub topic: String,
    pub partition: u32,
    pub from: u64,
    pub to: u64,
}

/// What a topic holds on disk and how long it keeps it (the embedded log).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopicUsage {
    pub topic: String,
    pub retention: String,
    pub bytes: u64,
    pub segments: usize,
    /// Age of the oldest record kept (by its timestamp), in seconds; `None` when it holds none.
    pub oldest_age_s: Option<f64>,
    /// First offset kept, per partition.
    pub starts: Vec<u64>,
}
