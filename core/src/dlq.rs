//! The dead-letter envelope and the retry-topic headers.
//!
//! A dead letter is the original message (key, payload, headers) plus `weir.dlq.*` headers
//! that say where it came from and why it failed. A message republished for a later retry
//! (`--retry-mode requeue`) carries `weir.retry.*` headers with its origin, its next attempt
//! number and the time before which it must not run.

use crate::record::{Delivery, Headers, Output, Record};
use std::sync::Arc;

pub const TOPIC: &str = "weir.dlq.topic";
pub const PARTITION: &str = "weir.dlq.partition";
pub const OFFSET: &str = "weir.dlq.offset";
pub const ATTEMPTS: &str = "weir.dlq.attempts";
pub const ERROR_KIND: &str = "weir.dlq.error-kind";
pub const ERROR: &str = "weir.dlq.error";
pub const MODULE: &str = "weir.dlq.module";
/// The consumer group that gave up on the message (a fanout topic's dead letter is replayed to
/// that group's queue only).
pub const GROUP: &str = "weir.dlq.group";
pub const MODULE_DIGEST: &str = "weir.dlq.module-digest";
pub const FIRST_FAILURE_MS: &str = "weir.dlq.first-failure-ms";
pub const LAST_FAILURE_MS: &str = "weir.dlq.last-failure-ms";
/// Set on a dead letter that was cut to fit the broker: what was cut, with the original sizes
/// (`payload=N`, `headers=N`, `key=N`, comma-separated).
pub const TRUNCATED: &str = "weir.dlq.truncated";

/// The longest error text a dead letter carries (a guest's reject reason is the guest's to
/// choose, and is cut here rather than make the dead letter unwritable).
pub const MAX_ERROR_BYTES: usize = 4096;

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
    pub group: &'a str,
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
            (
                ERROR,
                crate::record::clip(f.error, MAX_ERROR_BYTES).to_string(),
            ),
            (MODULE, f.module.to_string()),
            (MODULE_DIGEST, f.digest.to_string()),
            (GROUP, f.group.to_string()),
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

/// `out` (a dead letter), cut until `fits` takes it, so that a message too large for the
/// broker with its envelope is still dead-lettered rather than stop the run: first the payload
/// (to the most that fits), then the original headers, then the key. What was cut is named in
/// [`TRUNCATED`]; the `weir.dlq.*` headers always stay.
pub fn fit(mut out: Output, fits: impl Fn(&Record) -> Result<(), String>) -> Output {
    if fits(&out.record).is_ok() {
        return out;
    }
    let r = &mut out.record;
    let mut cut = vec![format!("payload={}", r.payload.len())];
    r.headers.push((TRUNCATED.to_string(), Vec::new()));
    let mark = |r: &mut Record, cut: &[String]| {
        if let Some(h) = r.headers.iter_mut().rev().find(|(n, _)| n == TRUNCATED) {
            h.1 = cut.join(",").into_bytes();
        }
    };
    mark(r, &cut);
    let payload = std::mem::take(&mut r.payload);
    if fits(r).is_ok() {
        // The most of the payload that fits: the largest n with payload[..n] taken.
        let (mut lo, mut hi) = (0usize, payload.len());
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            r.payload = payload[..mid].to_vec();
            if fits(r).is_ok() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        r.payload = payload[..lo].to_vec();
        return out;
    }
    let own = r
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with("weir.dlq."))
        .count();
    cut.push(format!("headers={}", r.headers.len() - own));
    r.headers.retain(|(n, _)| n.starts_with("weir.dlq."));
    mark(r, &cut);
    if fits(r).is_err()
        && let Some(k) = r.key.take()
    {
        cut.push(format!("key={}", k.len()));
        mark(r, &cut);
    }
    out
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

/// A message read from a retry topic, as the engine runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryCopy {
    /// The message as the handler must see it: its origin's coordinates, `weir.retry.*` removed.
    pub msg: Delivery,
    pub attempt: u32,
    pub not_before_ms: u64,
    pub first_failure_ms: u64,
}

/// Reads a message of the retry topic of `origin_topic`. Its `weir.retry.*` headers are input
/// like any other (anyone who can write the retry topic can write them), so none is trusted
/// beyond what it can harm: the origin topic is always `origin_topic` (a header naming another
/// is ignored), the not-before time is at most `max_wait_ms` after `now_ms` (so a far-future one
/// cannot pin the commit point), and a header that is missing or does not parse falls back to
/// the retry topic's own coordinates, attempt 1, no wait.
pub fn from_retry_topic(
    d: &Delivery,
    origin_topic: &Arc<str>,
    now_ms: u64,
    max_wait_ms: u64,
) -> RetryCopy {
    let get = |name: &str| -> Option<u64> {
        d.record
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse().ok())
    };
    let named = d
        .record
        .headers
        .iter()
        .rev()
        .find(|(n, _)| n == RETRY_TOPIC)
        .map(|(_, v)| v.as_slice());
    if named.is_some_and(|t| t != origin_topic.as_bytes()) {
        tracing::warn!(
            topic = %d.topic, partition = d.partition, offset = d.offset,
            named = %crate::record::clip(&String::from_utf8_lossy(named.unwrap_or_default()), 200),
            origin = %origin_topic,
            "a retry-topic message names another origin topic; it is handled as a message of its retry topic's origin"
        );
    }
    let partition = get(RETRY_PARTITION)
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(d.partition);
    let offset = get(RETRY_OFFSET).unwrap_or(d.offset);
    let attempt = get(RETRY_ATTEMPT)
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(1)
        .max(1);
    let not_before_ms = get(RETRY_NOT_BEFORE_MS)
        .unwrap_or(0)
        .min(now_ms.saturating_add(max_wait_ms));
    let first_failure_ms = get(RETRY_FIRST_FAILURE_MS).unwrap_or(now_ms).min(now_ms);
    let mut record = d.record.clone();
    record
        .headers
        .retain(|(n, _)| !n.starts_with("weir.retry."));
    RetryCopy {
        msg: Delivery {
            topic: origin_topic.clone(),
            partition,
            offset,
            record,
            redeliveries: 0,
        },
        attempt,
        not_before_ms,
        first_failure_ms,
    }
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
            redeliveries: 0,
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
            redeliveries: 0,
        };
        let back = from_retry_topic(&in_retry, &d.topic, 950, 60_000);
        assert_eq!(back.msg, d);
        assert_eq!(
            (back.attempt, back.not_before_ms, back.first_failure_ms),
            (2, 1000, 900)
        );
    }

    fn in_retry(headers: &[(&str, &str)]) -> Delivery {
        Delivery {
            topic: Arc::from("orders.retry"),
            partition: 1,
            offset: 7,
            redeliveries: 0,
            record: Record {
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                ..Record::default()
            },
        }
    }

    #[test]
    fn retry_headers_are_not_trusted_beyond_what_they_can_harm() {
        let origin: Arc<str> = Arc::from("orders");
        let now = 1_000_000;
        // (headers, expected (topic, partition, offset, attempt, not-before, first failure))
        type Want<'a> = (&'a str, u32, u64, u32, u64, u64);
        let cases: &[(&[(&str, &str)], Want)] = &[
            // Another origin topic (one that may not exist) is ignored.
            (
                &[
                    (RETRY_TOPIC, "missing"),
                    (RETRY_PARTITION, "0"),
                    (RETRY_OFFSET, "5"),
                    (RETRY_ATTEMPT, "2"),
                    (RETRY_NOT_BEFORE_MS, "1000100"),
                    (RETRY_FIRST_FAILURE_MS, "999000"),
                ],
                ("orders", 0, 5, 2, 1_000_100, 999_000),
            ),
            // A far-future not-before is cut to the longest backoff.
            (
                &[
                    (RETRY_NOT_BEFORE_MS, "18446744073709551615"),
                    (RETRY_ATTEMPT, "3"),
                ],
                ("orders", 1, 7, 3, now + 30_000, now),
            ),
            // Nothing parses: the retry topic's coordinates, attempt 1, now.
            (
                &[
                    (RETRY_PARTITION, "x"),
                    (RETRY_OFFSET, "-1"),
                    (RETRY_ATTEMPT, "0"),
                    (RETRY_FIRST_FAILURE_MS, "9999999999999"),
                ],
                ("orders", 1, 7, 1, 0, now),
            ),
            // No weir headers at all (a message someone else wrote there).
            (&[], ("orders", 1, 7, 1, 0, now)),
        ];
        for (headers, want) in cases {
            let c = from_retry_topic(&in_retry(headers), &origin, now, 30_000);
            let got = (
                &*c.msg.topic,
                c.msg.partition,
                c.msg.offset,
                c.attempt,
                c.not_before_ms,
                c.first_failure_ms,
            );
            assert_eq!(got, *want, "{headers:?}");
            assert!(
                !c.msg
                    .record
                    .headers
                    .iter()
                    .any(|(n, _)| n.starts_with("weir.retry."))
            );
        }
    }

    fn letter(payload: usize, headers: usize, key: usize) -> Output {
        let d = Delivery {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
            redeliveries: 0,
            record: Record {
                key: Some(vec![b'k'; key]),
                payload: vec![b'p'; payload],
                headers: (0..headers)
                    .map(|i| (format!("h{i}"), vec![b'v'; 100]))
                    .collect(),
                timestamp_ms: None,
            },
        };
        let origin = Origin {
            topic: d.topic.clone(),
            partition: 0,
            offset: 0,
        };
        let f = Failure {
            origin: &origin,
            attempts: 1,
            kind: "rejected",
            error: &"e".repeat(100_000),
            module: "m",
            digest: "d",
            group: "g",
            first_failure_ms: 1,
            last_failure_ms: 2,
        };
        envelope(&d, &f, "t.dlq".into())
    }

    fn at_most(n: usize) -> impl Fn(&Record) -> Result<(), String> {
        move |r: &Record| {
            if crate::record::wire_size(r) <= n {
                Ok(())
            } else {
                Err("too big".into())
            }
        }
    }

    fn truncated(o: &Output) -> Option<String> {
        o.record
            .headers
            .iter()
            .find(|(n, _)| n == TRUNCATED)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn a_dead_letter_is_cut_to_fit_and_says_what_was_cut() {
        // The error text is bounded whatever the guest said.
        let small = letter(10, 0, 1);
        let error = small
            .record
            .headers
            .iter()
            .find(|(n, _)| n == ERROR)
            .unwrap();
        assert_eq!(error.1.len(), MAX_ERROR_BYTES);
        // It fits: untouched.
        let o = fit(small.clone(), at_most(1 << 20));
        assert_eq!(o, small);
        // Too big by its payload: the payload is cut to the most that fits.
        let o = fit(letter(2_000_000, 2, 10), at_most(1_000_000));
        assert_eq!(crate::record::wire_size(&o.record), 1_000_000);
        assert_eq!(truncated(&o).as_deref(), Some("payload=2000000"));
        assert_eq!(o.record.key.as_deref(), Some(&[b'k'; 10][..]));
        // The headers alone are too big: they go too, weir's stay.
        let o = fit(letter(100, 2_000, 10), at_most(50_000));
        assert_eq!(truncated(&o).as_deref(), Some("payload=100,headers=2000"));
        assert!(
            o.record
                .headers
                .iter()
                .all(|(n, _)| n.starts_with("weir.dlq."))
        );
        assert!(o.record.payload.is_empty());
        // And the key last.
        let o = fit(letter(100, 0, 60_000), at_most(50_000));
        assert_eq!(
            truncated(&o).as_deref(),
            Some("payload=100,headers=0,key=60000")
        );
        assert!(crate::record::wire_size(&o.record) <= 50_000);
    }
}
