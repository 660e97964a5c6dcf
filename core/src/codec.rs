//! The byte layout of keys and values in the embedded log's keyspaces.
//!
//! Keys sort the way the log reads: a record key is `topic 0x00 partition(u32 BE) offset(u64 BE)`,
//! so one partition is one contiguous, offset-ordered range. A record value is versioned so the
//! layout can change without a migration of old data:
//!
//! ```text
//! u8 version (1) | u8 flags (bit 0: key, bit 1: timestamp) | [u64 timestamp] | [u32 len, key]
//! | u32 header count | (u16 len, name, u32 len, value)* | payload (the rest)
//! ```

use crate::record::Record;

const VERSION: u8 = 1;
const HAS_KEY: u8 = 1;
const HAS_TS: u8 = 2;

pub fn record_key(topic: &str, partition: u32, offset: u64) -> Vec<u8> {
    let mut k = partition_prefix(topic, partition);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

pub fn partition_prefix(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 13);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The offset at the end of a record key, if the key is one.
pub fn offset_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub fn group_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 8);
    k.extend_from_slice(b"o/");
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Splits a key made by [`group_key`] into (group, topic, partition).
pub fn parse_group_key(key: &[u8]) -> Option<(String, String, u32)> {
    let rest = key.strip_prefix(b"o/")?;
    let (body, part) = rest.split_at(rest.len().checked_sub(4)?);
    let partition = u32::from_be_bytes(part.try_into().ok()?);
    let body = body.strip_suffix(&[0])?;
    let sep = body.iter().position(|&b| b == 0)?;
    let group = std::str::from_utf8(&body[..sep]).ok()?.to_string();
    let topic = std::str::from_utf8(&body[sep + 1..]).ok()?.to_string();
    Some((group, topic, partition))
}

/// Key of the mark that a dead letter was replayed: `r/topic 0 partition offset`.
pub fn replay_key(topic: &str, partition: u32, offset: u64) -> Vec<u8> {
    let mut k = b"r/".to_vec();
    k.extend_from_slice(&record_key(topic, partition, offset));
    k
}

/// Key of an idempotency key's done mark: `d/group 0 key`; the value is its expiry (u64 BE).
pub fn dedupe_key(group: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + key.len() + 3);
    k.extend_from_slice(b"d/");
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// Key of the expiry index entry of a done mark: `x/expiry(u64 BE)` then the mark's key, so
/// expired marks are one range scan from the start.
pub fn expiry_key(expires_ms: u64, mark: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + mark.len());
    k.extend_from_slice(b"x/");
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(mark);
    k
}

/// Key of a topic's segment: `s/topic 0 id(u64 BE)`; the value says where it begins.
pub fn segment_key(topic: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 11);
    k.extend_from_slice(b"s/");
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Splits a key made by [`segment_key`] into (topic, id).
pub fn parse_segment_key(key: &[u8]) -> Option<(String, u64)> {
    let rest = key.strip_prefix(b"s/")?;
    let (head, id) = rest.split_at(rest.len().checked_sub(8)?);
    let topic = std::str::from_utf8(head.strip_suffix(&[0])?).ok()?;
    Some((topic.to_string(), u64::from_be_bytes(id.try_into().ok()?)))
}

/// Key of the count of records a group skipped because retention deleted them before it read
/// them: `k/group 0 topic 0 partition(u32 BE)`, the value a u64 BE.
pub fn skipped_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = group_key(group, topic, partition);
    k[0] = b'k';
    k
}

pub fn topic_key(topic: &str) -> Vec<u8> {
    let mut k = b"t/".to_vec();
    k.extend_from_slice(topic.as_bytes());
    k
}

pub fn encode(r: &Record, out: &mut Vec<u8>) {
    let header_bytes: usize = r.headers.iter().map(|(n, v)| 6 + n.len() + v.len()).sum();
    out.reserve(
        2 + 8 + 4 + r.key.as_ref().map_or(0, Vec::len) + 4 + header_bytes + r.payload.len(),
    );
    out.push(VERSION);
    let flags = if r.key.is_some() { HAS_KEY } else { 0 }
        | if r.timestamp_ms.is_some() { HAS_TS } else { 0 };
    out.push(flags);
    if let Some(ts) = r.timestamp_ms {
        out.extend_from_slice(&ts.to_be_bytes());
    }
    if let Some(key) = &r.key {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
    }
    out.extend_from_slice(&(r.headers.len() as u32).to_be_bytes());
    for (name, value) in &r.headers {
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out.extend_from_slice(&r.payload);
}

/// Limits a record must respect to be encodable; checked when it is produced, so that an
/// append never fails half-way.
pub fn check(r: &Record) -> Result<(), String> {
    if r.key.as_ref().is_some_and(|k| k.len() > u32::MAX as usize) {
        return Err("key is larger than 4 GiB".into());
    }
    for (name, value) in &r.headers {
        if name.len() > u16::MAX as usize {
            return Err(format!(
                "header name `{}...` is longer than 65535 bytes",
                crate::record::clip(name, 16)
            ));
        }
        if value.len() > u32::MAX as usize {
            return Err(format!("header `{name}` is larger than 4 GiB"));
        }
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!(
                "record truncated: wanted {n} bytes, {} left",
                self.buf.len()
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

pub fn decode(bytes: &[u8]) -> Result<Record, String> {
    let mut r = Reader { buf: bytes };
    let version = r.u8()?;
    if version != VERSION {
        return Err(format!("unknown record version {version}"));
    }
    let flags = r.u8()?;
    let timestamp_ms = if flags & HAS_TS != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let key = if flags & HAS_KEY != 0 {
        let n = r.u32()? as usize;
        Some(r.take(n)?.to_vec())
    } else {
        None
    };
    let count = r.u32()? as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = r.u16()? as usize;
        let name = std::str::from_utf8(r.take(n)?)
            .map_err(|_| "header name is not UTF-8".to_string())?
            .to_string();
        let n = r.u32()? as usize;
        headers.push((name, r.take(n)?.to_vec()));
    }
    Ok(Record {
        key,
        payload: r.buf.to_vec(),
        headers,
        timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let records = [
            Record::default(),
            Record {
                key: Some(b"k".to_vec()),
                payload: b"hello".to_vec(),
                headers: vec![("a".into(), b"1".to_vec()), ("a".into(), vec![])],
                timestamp_ms: Some(1_700_000_000_000),
            },
            Record {
                key: Some(vec![]),
                payload: vec![0; 1000],
                headers: vec![],
                timestamp_ms: None,
            },
        ];
        for rec in records {
            let mut buf = Vec::new();
            encode(&rec, &mut buf);
            assert_eq!(decode(&buf).unwrap(), rec);
        }
    }

    #[test]
    fn truncated_and_unknown_records_are_errors_not_panics() {
        let rec = Record {
            key: Some(b"key".to_vec()),
            payload: b"p".to_vec(),
            headers: vec![("h".into(), b"v".to_vec())],
            timestamp_ms: Some(5),
        };
        let mut buf = Vec::new();
        encode(&rec, &mut buf);
        // Every strict prefix that cuts into the fixed fields must fail cleanly.
        for n in 0..buf.len() - 1 {
            let _ = decode(&buf[..n]);
        }
        assert!(decode(&buf[..5]).is_err());
        buf[0] = 9;
        assert_eq!(decode(&buf).unwrap_err(), "unknown record version 9");
    }

    #[test]
    fn keys_sort_by_partition_then_offset() {
        let a = record_key("t", 0, 255);
        let b = record_key("t", 0, 256);
        let c = record_key("t", 1, 0);
        assert!(a < b && b < c);
        assert_eq!(offset_of(&b), Some(256));
        // A topic that extends another's name sorts apart from it thanks to the 0 separator.
        assert!(record_key("t", 9, u64::MAX) < record_key("t.dlq", 0, 0));
    }

    #[test]
    fn group_keys_parse_back() {
        let k = group_key("g-1", "orders", 7);
        assert_eq!(
            parse_group_key(&k),
            Some(("g-1".into(), "orders".into(), 7))
        );
        assert_eq!(parse_group_key(b"o/"), None);
    }
}
