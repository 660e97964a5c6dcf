//! Idempotent dedupe: which key identifies a message, and what to do with a message whose key
//! was already handled.
//!
//! The key comes from a header (default `idempotency-key`), the message key, or a hash of the
//! payload. Before a message runs, its key is claimed; a key already marked done (within the
//! window) makes the message a duplicate, acked without invoking the handler. A key claimed by
//! a message still in flight makes the later copy wait for the first. On success the key is
//! marked done in the same atomic write as the outputs and the offset, so on the embedded log a
//! consume-transform-produce handler is exactly-once.
//!
//! Several processes (a Kafka consumer group) share a [`SharedStore`] instead (Redis): a key is
//! claimed there with an expiry, so a claim dies with its holder, and marked done after the
//! outputs are published and before the offset moves.

use crate::source::Delivery;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// A shared store's answer to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This process holds the key now: run the message.
    Mine,
    /// The key was handled within the window: the message is a duplicate.
    Done,
    /// Another process holds the key: look again shortly.
    Busy,
}

/// The shared store did not answer (or refused).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// A dedupe store shared by the processes of a consumer group. Calls block (the engine makes
/// them with short timeouts).
pub trait SharedStore: std::fmt::Debug + Send + Sync {
    /// Claims each key for `token` for `ttl`, unless it is done or held by another token; one
    /// answer per key, in order (one round trip for all of them). Each key comes with the
    /// place of the message asking (`topic/partition/offset`): a key another process
    /// [finished](SharedStore::finish) from that very place is the same message delivered again
    /// (its first holder stopped before writing it) and is claimed; from another place, the
    /// message is a duplicate.
    fn claim_many(
        &self,
        group: &str,
        keys: &[(&[u8], &str)],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<Claim>, StoreError>;
    /// Turns `token`'s claims on keys into "done, waiting for the commit point" (each with the
    /// place of its message), for `ttl`: copies elsewhere are duplicates rather than wait.
    fn finish(
        &self,
        group: &str,
        keys: &[(Vec<u8>, String)],
        token: &str,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Marks keys done for `window` (after their outputs were published).
    fn mark_done(&self, group: &str, keys: &[Vec<u8>], window: Duration) -> Result<(), StoreError>;
    /// Drops `token`'s claims (running or finished) on keys that were not marked done (their
    /// message failed, was given up, or its partition stopped).
    fn release(&self, group: &str, keys: &[Vec<u8>], token: &str) -> Result<(), StoreError>;
    /// Where it is, for the log.
    fn describe(&self) -> String;
}

pub use weir_core::config::KeySource;

#[derive(Debug, Clone)]
pub struct DedupeConfig {
    pub source: KeySource,
    /// How long a done key is remembered.
    pub window: Duration,
    /// A store shared by several processes; `None`: marks live in the source (embedded log).
    pub store: Option<Arc<dyn SharedStore>>,
    /// How long a claim in the shared store lives without its holder: longer than a message
    /// can take with all its retries.
    pub claim_ttl: Duration,
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
            redeliveries: 0,
        }
    }

    #[test]
    fn keys_come_from_the_chosen_source() {
        let w = Duration::from_secs(1);
        let header = DedupeConfig {
            source: KeySource::Header("idempotency-key".into()),
            window: w,
            store: None,
            claim_ttl: w,
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
            store: None,
            claim_ttl: w,
        };
        assert_eq!(key.key_of(&msg(Some("k"), &[], "")), Some(b"k".to_vec()));
        let hash = DedupeConfig {
            source: KeySource::PayloadHash,
            window: w,
            store: None,
            claim_ttl: w,
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
