//! The local socket's protocol (`<data-dir>/weir.sock`): one JSON object per line each way.
//! The server and client are in the runtime; the request side is here, where it is fuzzed.

use crate::record::Record;
use serde::{Deserialize, Serialize};

/// A request line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
#[doc(hidden)]
pub enum Request {
    Produce {
        topic: String,
        records: Vec<WireRecord>,
    },
    CreateTopic {
        topic: String,
        partitions: u32,
        /// What it keeps, as changed from the default for new topics.
        #[serde(default)]
        retention: crate::retention::RetentionChange,
    },
    /// Topic and group administration (`weir topics alter|delete`, `weir groups`); answered
    /// with a JSON value.
    Admin {
        admin: AdminRequest,
    },
    Stats {
        topic: Option<String>,
    },
    Read {
        topic: String,
        partition: u32,
        from: u64,
        max: usize,
    },
    Committed {
        group: String,
        topic: String,
        partition: u32,
    },
    Publish {
        outputs: Vec<(String, WireRecord)>,
        replayed: Vec<(String, u32, u64)>,
    },
    Replayed {
        topic: String,
        partition: u32,
    },
}

/// What `Request::Admin` asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case")]
#[doc(hidden)]
pub enum AdminRequest {
    AlterTopic {
        topic: String,
        change: crate::retention::RetentionChange,
    },
    DeleteTopic {
        topic: String,
    },
    Usage {
        topic: Option<String>,
    },
    Groups,
    SeekGroup {
        group: String,
        topic: String,
        partition: Option<u32>,
        to: crate::retention::SeekTo,
    },
    DeleteGroup {
        group: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[doc(hidden)]
pub struct WireRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<u64>,
}

impl From<Record> for WireRecord {
    fn from(r: Record) -> Self {
        WireRecord {
            key: r.key,
            payload: r.payload,
            headers: r.headers,
            timestamp_ms: r.timestamp_ms,
        }
    }
}

impl From<WireRecord> for Record {
    fn from(r: WireRecord) -> Self {
        Record {
            key: r.key,
            payload: r.payload,
            headers: r.headers,
            timestamp_ms: r.timestamp_ms,
        }
    }
}

/// Reads one request line as the server does, and checks its records as an append would
/// (the fuzz target of the socket protocol).
#[doc(hidden)]
pub fn parse_request(line: &[u8]) -> Result<(), String> {
    let req = serde_json::from_slice::<Request>(line).map_err(|e| e.to_string())?;
    if let Request::Produce { records, .. } = req {
        for r in records {
            crate::codec::check(&Record::from(r))?;
        }
    }
    Ok(())
}
