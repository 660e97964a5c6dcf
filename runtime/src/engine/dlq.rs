//! The dead-letter envelope and the retry-topic headers.
//!
//! A dead letter is the original message (key, payload, headers) plus `weir.dlq.*` headers
//! that say where it came from and why it failed. A message republished for a later retry
//! (`--retry-mode requeue`) carries `weir.retry.*` headers with its origin, its next attempt
//! number and the time before which it must not run.

use crate::source::{Delivery, Headers, Output, Record};
use std::sync::Arc;

pub const TOPIC: &str = "weir.dlq.topic";
pub const PARTITION: &str = "weir.dlq.partition";
pub const OFFSET: &str = "weir.dlq.offset";
pub const ATTEMPTS: &str = "weir.dlq.attempts";
pub const ERROR_KIND: &str = "weir.dlq.error-kind";
pub const ERROR: &str = "weir.dlq.error";
pub const MODULE: &str = "weir.dlq.module";
pub const MODULE_DIGEST: &str = "weir.dlq.module-digest";
pub const FIRST_FAILURE_MS: &str = "weir.dlq.first-failure-ms";
pub const LAST_FAILURE_MS: &str = "weir.dlq.last-failure-ms";

pub const RETRY_TOPIC: &str = "weir.retry.topic";
pub const RETRY_PARTITION: &str = "weir.retry.partition";
pub const RETRY_OFFSET: &str = "weir.retry.offset";
pub const RETRY_ATTEMPT: &str = "weir.retry.attempt";
pub const RETRY_NOT_BEFORE_MS: &str = "weir.retry.not-before-ms";
pub const RETRY_FIRST_FAILURE_MS: &str = "weir.retry.first-failure-ms";

/// Where a message came from originally, and its failure history so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
}

/// What a failed message's envelope records.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub origin: &'a Origin,
    pub attempts: u32,
    pub kind: &'a str,
    pub error: &'a str,
    pub module: &'a str,
    pub digest: &'a str,
    pub first_failure_ms: u64,
    pub last_failure_ms: u64,
}

fn with(mut headers: Headers, pairs: &[(&str, String)]) -> Headers {
    for (name, value) in pairs {
        headers.push((name.to_string(), value.clone().into_bytes()));
    }
    headers
}

/// The dead letter of `d` (whose headers must already be free of `weir.retry.*`).
pub fn envelope(d: &Delivery, f: &Failure<'_>, dlq_topic: String) -> Output {
    let headers = with(
        d.record.headers.clone(),
        &[
            (TOPIC, f.origin.topic.to_string()),
            (PARTITION, f.origin.partition.to_string()),
            (OFFSET, f.origin.offset.to_string()),
            (ATTEMPTS, f.attempts.to_string()),
            (ERROR_KIND, f.kind.to_string()),
            (ERROR, f.error.to_string()),
            (MODULE, f.module.to_string()),
            (MODULE_DIGEST, f.digest.to_string()),
            (FIRST_FAILURE_MS, f.first_failure_ms.to_string()),
            (LAST_FAILURE_MS, f.last_failure_ms.to_string()),
        ],
    );
    Output {
        topic: dlq_topic,
        record: Record {
            key: d.record.key.clone(),
            payload: d.record.payload.clone(),
            headers,
            timestamp_ms: None,
        },
    }
}

/// The copy of `d` republished to the retry topic for attempt `next_attempt`.
pub fn requeue(
    d: &Delivery,
    origin: &Origin,
    next_attempt: u32,
    not_before_ms: u64,
    first_failure_ms: u64,
    retry_topic: String,
) -> Output {
    let headers = with(
        d.record.headers.clone(),
        &[
            (RETRY_TOPIC, origin.topic.to_string()),
            (RETRY_PARTITION, origin.partition.to_string()),
            (RETRY_OFFSET, origin.offset.to_string()),
            (RETRY_ATTEMPT, next_attempt.to_string()),
            (RETRY_NOT_BEFORE_MS, not_before_ms.to_string()),
            (RETRY_FIRST_FAILURE_MS, first_failure_ms.to_string()),
        ],
    );
    Output {
        topic: retry_topic,
        record: Record {
            key: d.record.key.clone(),
            payload: d.record.payload.clone(),
            headers,
            timestamp_ms: d.record.timestamp_ms,
        },
    }
}

/// What a message read from a retry topic says about itself: the message as the handler must
/// see it (origin coordinates, `weir.retry.*` headers removed), its attempt number, its
/// not-before time and first failure time. `None` if it lacks the headers (it was not put
/// there by weir); it is then handled as a first delivery from the retry topic.
pub fn from_retry_topic(d: &Delivery) -> Option<(Delivery, u32, u64, u64)> {
    let get = |name: &str| {
        d.record
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let topic = get(RETRY_TOPIC)?;
    let partition = get(RETRY_PARTITION)?.parse().ok()?;
    let offset = get(RETRY_OFFSET)?.parse().ok()?;
    let attempt = get(RETRY_ATTEMPT)?.parse().ok()?;
    let not_before = get(RETRY_NOT_BEFORE_MS)?.parse().ok()?;
    let first = get(RETRY_FIRST_FAILURE_MS)?.parse().ok()?;
    let mut record = d.record.clone();
    record
        .headers
        .retain(|(n, _)| !n.starts_with("weir.retry."));
    Some((
        Delivery {
            topic: Arc::from(topic),
            partition,
            offset,
            record,
        },
        attempt,
        not_before,
        first,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requeued_message_reads_back_as_its_origin() {
        let d = Delivery {
            topic: Arc::from("orders"),
            partition: 3,
            offset: 42,
            record: Record {
                key: Some(b"k".to_vec()),
                payload: b"p".to_vec(),
                headers: vec![("h".into(), b"v".to_vec())],
                timestamp_ms: Some(9),
            },
        };
        let origin = Origin {
            topic: d.topic.clone(),
            partition: 3,
            offset: 42,
        };
        let out = requeue(&d, &origin, 2, 1000, 900, "orders.retry".into());
        let in_retry = Delivery {
            topic: Arc::from("orders.retry"),
            partition: 0,
            offset: 7,
            record: out.record,
        };
        let (back, attempt, not_before, first) = from_retry_topic(&in_retry).unwrap();
        assert_eq!(back, d);
        assert_eq!((attempt, not_before, first), (2, 1000, 900));
        // A message without weir's headers is not taken for a retry.
        assert!(from_retry_topic(&d).is_none());
    }
}
