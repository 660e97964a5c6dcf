//! Idempotent dedupe: which key identifies a message, and what to do with a message whose key
//! was already handled.
//!
//! The key comes from a header (default `idempotency-key`), the message key, or a hash of the
//! payload. Before a message runs, its key is claimed; a key already marked done (within the
//! window) makes the message a duplicate, acked without invoking the handler. A key claimed by
//! a message still in flight makes the later copy wait for the first. On success the key is
//! marked done in the same atomic write as the outputs and the offset, so on the embedded log a
//! consume-transform-produce handler is exactly-once. Pure: the store is behind [`DedupeStore`].

use crate::source::Delivery;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Where the idempotency key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The value of this header.
    Header(String),
    /// The message key.
    MessageKey,
    /// SHA-256 of the payload.
    PayloadHash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeConfig {
    pub source: KeySource,
    /// How long a done key is remembered.
    pub window: Duration,
}

impl DedupeConfig {
    /// The message's idempotency key, or `None` if it has none (it is then processed normally).
    pub fn key_of(&self, d: &Delivery) -> Option<Vec<u8>> {
        match &self.source {
            KeySource::Header(name) => d
                .record
                .headers
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone()),
            KeySource::MessageKey => d.record.key.clone(),
            KeySource::PayloadHash => Some(Sha256::digest(&d.record.payload).to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Record;
    use std::sync::Arc;

    fn msg(key: Option<&str>, headers: &[(&str, &str)], payload: &str) -> Delivery {
        Delivery {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
            record: Record {
                key: key.map(|k| k.as_bytes().to_vec()),
                payload: payload.as_bytes().to_vec(),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                timestamp_ms: None,
            },
        }
    }

    #[test]
    fn keys_come_from_the_chosen_source() {
        let w = Duration::from_secs(1);
        let header = DedupeConfig {
            source: KeySource::Header("idempotency-key".into()),
            window: w,
        };
        assert_eq!(
            header.key_of(&msg(
                None,
                &[("idempotency-key", "a"), ("idempotency-key", "b")],
                ""
            )),
            Some(b"b".to_vec())
        );
        assert_eq!(
            header.key_of(&msg(Some("k"), &[], "")),
            None,
            "no header, no key"
        );
        let key = DedupeConfig {
            source: KeySource::MessageKey,
            window: w,
        };
        assert_eq!(key.key_of(&msg(Some("k"), &[], "")), Some(b"k".to_vec()));
        let hash = DedupeConfig {
            source: KeySource::PayloadHash,
            window: w,
        };
        assert_eq!(
            hash.key_of(&msg(None, &[], "x")),
            hash.key_of(&msg(Some("other"), &[], "x"))
        );
        assert_ne!(
            hash.key_of(&msg(None, &[], "x")),
            hash.key_of(&msg(None, &[], "y"))
        );
    }
}
