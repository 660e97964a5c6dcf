//! RabbitMQ (AMQP 0-9-1) as a source, with lapin on a tokio runtime of its own.
//!
//! - A weir topic is a queue, consumed as it is; `weir topics create` declares a durable one.
//!   It has one partition (0). Every weir process on a queue competes for its messages.
//! - Offsets are a sequence this process gives its deliveries (see [`Delivery`]); each keeps
//!   the broker's delivery tag, and a message is acked by its tag once its outputs are
//!   confirmed ([`Settle::PerMessage`](super::Settle)).
//! - Records map to AMQP messages: the payload is the body, headers are the header table (a
//!   name that repeats becomes an array), the key travels in the `weir.key` header, and the
//!   timestamp is AMQP's `timestamp` (seconds). Messages are published persistent to the
//!   default exchange, routed by queue name.
//! - The attempt number comes from `x-delivery-count` (quorum queues). A classic queue counts
//!   nothing but a `redelivered` flag, so weir counts for it: a redelivered message is
//!   published again to the back of its queue with `weir.deliveries` (its deliveries so far)
//!   and the redelivered copy acked, so a message that keeps coming back (a handler that
//!   crashes the process, a `consumer_timeout`) reaches its last attempt and the DLQ.
//!
//! The rest of weir does not name lapin: this folder is the only place that does.

pub mod bench;
mod broker;
mod consumer;
mod fanout;
mod link;
mod management;
mod publish;
mod request;
mod settle;

use super::{Capabilities, Record, Settle, SourceError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::collections::BTreeMap;
use std::time::Duration;

pub use broker::Rabbit;
pub use consumer::RabbitSource;

/// RabbitMQ settles each message by its delivery tag, counts deliveries on quorum queues, and
/// has transactions (`tx`) for outputs and acks together.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    settle: Settle::PerMessage,
    groups: false,
    dedupe_marks: false,
    delivery_count: true,
    transactions: true,
    batch_size: None,
    // Delays need a dead-letter exchange and a TTL per delay; weir's retry queue does it.
    delayed_retry: false,
    // A message is held as long as its channel lives, up to the broker's `consumer_timeout`.
    lease: None,
    dense_offsets: false,
};

/// The header that carries a record's key.
pub(crate) const KEY_HEADER: &str = "weir.key";
/// The broker's delivery counter on quorum queues.
const DELIVERY_COUNT: &str = "x-delivery-count";
/// weir's delivery counter on classic queues: how often the message was delivered before this
/// copy was published (see [`uncounted_redelivery`]).
pub(crate) const WEIR_DELIVERIES: &str = "weir.deliveries";

/// Whether a delivery is one the broker does not count: redelivered from a queue without
/// `x-delivery-count` (a classic queue). weir then publishes a counted copy.
pub(crate) fn uncounted_redelivery(props: &lapin::BasicProperties, redelivered: bool) -> bool {
    redelivered
        && !props
            .headers()
            .as_ref()
            .is_some_and(|t| t.inner().contains_key(DELIVERY_COUNT))
}
/// AMQP's short strings (queue names, header names) hold at most this many bytes.
const SHORT_STRING: usize = 255;
/// How long a publish may wait for the broker's confirm, or a request for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost` as given.
    pub url: String,
    /// Queue type for `weir topics create` (`x-queue-type`): `classic` (the default) or
    /// `quorum` (replicated, with a delivery count).
    pub queue_type: String,
    /// `management-url`: where to read the whole queue's depth.
    pub management: Option<management::Management>,
}

impl AmqpConfig {
    /// From `amqp://...` and the `--source-property` settings: `queue-type=classic|quorum`.
    pub fn from_spec(spec: &super::connect::SourceSpec) -> Result<AmqpConfig, SourceError> {
        let mut cfg = AmqpConfig {
            url: spec.url.clone(),
            queue_type: "classic".into(),
            management: None,
        };
        let uri = spec.url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            SourceError::Invalid(format!(
                "--source {}: not an AMQP URL ({e}); pass amqp://user:pass@host:port/vhost",
                redact(&spec.url)
            ))
        })?;
        for (k, v) in &spec.properties {
            match k.as_str() {
                "queue-type" if v == "classic" || v == "quorum" => cfg.queue_type = v.clone(),
                "queue-type" => {
                    return Err(SourceError::Invalid(format!(
                        "--source-property queue-type={v}: pass classic or quorum"
                    )));
                }
                "management-url" => {
                    cfg.management = Some(management::Management::parse(v, &uri)?);
                }
                _ => {
                    return Err(SourceError::Invalid(format!(
                        "--source-property {k}: RabbitMQ takes queue-type=classic|quorum and \
                         management-url=http://host:15672"
                    )));
                }
            }
        }
        Ok(cfg)
    }
}

/// The URL with its password hidden, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub(crate) fn broker_error(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Broker {
        broker: "RabbitMQ",
        detail: format!("{what}: {e}"),
    }
}

/// Whether `e` is the broker saying a queue does not exist (404 NOT_FOUND).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a)
        if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Whether `e` is the broker refusing a declare that does not match the queue (406).
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a)
        if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// RabbitMQ's queue names: any UTF-8 of up to 255 bytes (`orders:eu`, `billing/v2`), except
/// the broker's own `amq.` prefix; dead letters and retries go to `<queue>.dlq`/`.retry`.
pub const NAMING: weir_core::topic::Naming = weir_core::topic::Naming {
    broker: "RabbitMQ",
    problem: queue_name_problem,
    dlq: "{topic}.dlq",
    retry: "{topic}.retry",
};

/// What is wrong with `name` as a RabbitMQ queue name; `None` when it is a good one.
fn queue_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > SHORT_STRING {
        Some("it is longer than 255 bytes")
    } else if name.starts_with("amq.") {
        Some("names that start with `amq.` are the broker's own")
    } else {
        None
    }
}

/// Whether a queue name is one RabbitMQ takes (what `topics create` and outputs need).
pub(crate) fn check_queue_name(name: &str) -> Result<(), SourceError> {
    match queue_name_problem(name) {
        None => Ok(()),
        Some(why) => Err(SourceError::InvalidTopic {
            name: name.to_string(),
            why,
        }),
    }
}

/// What RabbitMQ cannot carry of a record beyond weir's limits: header names are short strings.
pub(crate) fn fits(r: &Record) -> Result<(), String> {
    super::within_limits(r)?;
    if let Some((n, _)) = r.headers.iter().find(|(n, _)| n.len() > SHORT_STRING) {
        return Err(format!(
            "header name `{}...` of {} bytes; AMQP header names hold at most {SHORT_STRING}",
            super::clip(n, 32),
            n.len()
        ));
    }
    Ok(())
}

/// A record as an AMQP message: its properties and body. `fits` must have passed.
pub(crate) fn to_amqp(r: &Record) -> lapin::BasicProperties {
    let mut table: BTreeMap<ShortString, AMQPValue> = BTreeMap::new();
    for (name, value) in &r.headers {
        let v = AMQPValue::LongString(LongString::from(value.clone()));
        let key = ShortString::try_new(name.as_str()).unwrap_or_else(|_| "weir.invalid".into());
        match table.remove(&key) {
            None => {
                table.insert(key, v);
            }
            // A name that repeats: its values as an array, in order.
            Some(AMQPValue::FieldArray(mut a)) => {
                a.push(v);
                table.insert(key, AMQPValue::FieldArray(a));
            }
            Some(first) => {
                table.insert(key, AMQPValue::FieldArray(vec![first, v].into()));
            }
        }
    }
    if let Some(k) = &r.key {
        table.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(k.clone())),
        );
    }
    let mut p = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(FieldTable::from(table));
    // Request/reply: the `reply-to` and `correlation-id` headers are AMQP's own properties too,
    // so a client that reads those (not the headers) finds its answer.
    let last = |name: &str| {
        r.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| ShortString::try_new(String::from_utf8_lossy(v).as_ref()).ok())
    };
    if let Some(id) = last(crate::host::reply::CORRELATION_ID) {
        p = p.with_correlation_id(id);
    }
    if let Some(to) = last(crate::host::reply::REPLY_TO) {
        p = p.with_reply_to(to);
    }
    // The `weir.priority` header is the message's AMQP priority (a priority queue's order).
    if let Some(n) = r
        .headers
        .iter()
        .rev()
        .find(|(n, _)| n == crate::source::PRIORITY_HEADER)
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<u8>().ok())
    {
        p = p.with_priority(n);
    }
    if let Some(ms) = r.timestamp_ms {
        p = p.with_timestamp(ms / 1000);
    }
    p
}

/// An AMQP message as a record, and how often the broker delivered it before.
pub(crate) fn from_amqp(
    props: &lapin::BasicProperties,
    body: Vec<u8>,
    redelivered: bool,
) -> (Record, u32) {
    let mut r = Record {
        payload: body,
        timestamp_ms: props.timestamp().map(|s| s.saturating_mul(1000)),
        ..Record::default()
    };
    let (mut count, mut weir_count) = (None, 0u64);
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            if name == KEY_HEADER {
                r.key = Some(value_bytes(value));
            } else if name == DELIVERY_COUNT {
                count = value_number(value);
            } else if name == WEIR_DELIVERIES {
                weir_count = String::from_utf8_lossy(&value_bytes(value))
                    .parse()
                    .unwrap_or(0);
            } else if let AMQPValue::FieldArray(a) = value {
                for v in a.as_slice() {
                    r.headers.push((name.to_string(), value_bytes(v)));
                }
            } else {
                r.headers.push((name.to_string(), value_bytes(value)));
            }
        }
    }
    // Another client's AMQP reply_to and correlation_id reach the handler (and `reply`) as
    // the headers request/reply reads.
    for (name, value) in [
        (crate::host::reply::REPLY_TO, props.reply_to()),
        (crate::host::reply::CORRELATION_ID, props.correlation_id()),
    ] {
        if let Some(v) = value
            && !r.headers.iter().any(|(n, _)| n == name)
        {
            r.headers
                .push((name.to_string(), v.as_str().as_bytes().to_vec()));
        }
    }
    // Another client's AMQP priority reaches the handler (and its outputs) as the header.
    if let Some(p) = props.priority()
        && !r
            .headers
            .iter()
            .any(|(n, _)| n == crate::source::PRIORITY_HEADER)
    {
        r.headers.push((
            crate::source::PRIORITY_HEADER.to_string(),
            p.to_string().into_bytes(),
        ));
    }
    let redeliveries = match count {
        Some(n) => n.min(u32::MAX as u64) as u32,
        None => weir_count
            .saturating_add(u64::from(redelivered))
            .min(u32::MAX as u64) as u32,
    };
    (r, redeliveries)
}

/// A header value as bytes: strings and byte arrays as they are, numbers and the rest as text.
fn value_bytes(v: &AMQPValue) -> Vec<u8> {
    match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::Void => Vec::new(),
        other => match value_number(other) {
            Some(n) => n.to_string().into_bytes(),
            None => format!("{other:?}").into_bytes(),
        },
    }
}

fn value_number(v: &AMQPValue) -> Option<u64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::ShortShortUInt(n) => u64::from(*n),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::ShortUInt(n) => u64::from(*n),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::LongUInt(n) => u64::from(*n),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::Timestamp(n) => *n,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_trip_through_amqp() {
        let r = Record {
            key: Some(b"customer-7".to_vec()),
            payload: b"{\"id\":1}".to_vec(),
            headers: vec![
                ("trace".into(), b"abc".to_vec()),
                ("tag".into(), b"a".to_vec()),
                ("tag".into(), b"b".to_vec()),
                ("tag".into(), b"c".to_vec()),
                ("bin".into(), vec![0, 255, 1]),
            ],
            timestamp_ms: Some(1_700_000_123_456),
        };
        let props = to_amqp(&r);
        let (back, redeliveries) = from_amqp(&props, r.payload.clone(), false);
        assert_eq!(back.key, r.key);
        assert_eq!(back.payload, r.payload);
        assert_eq!(
            back.timestamp_ms,
            Some(1_700_000_123_000),
            "AMQP keeps seconds"
        );
        let mut want = r.headers.clone();
        want.sort();
        let mut got = back.headers.clone();
        got.sort();
        assert_eq!(got, want, "repeated names keep every value, in order");
        assert_eq!(redeliveries, 0);
    }

    #[test]
    fn the_delivery_count_comes_from_the_broker_or_weirs_header() {
        // (x-delivery-count, weir.deliveries, redelivered, redeliveries, weir publishes a
        // counted copy)
        type Case = (Option<AMQPValue>, Option<&'static str>, bool, u32, bool);
        let cases: &[Case] = &[
            (None, None, false, 0, false),
            (None, None, true, 1, true),
            (Some(AMQPValue::LongLongInt(3)), None, true, 3, false),
            (Some(AMQPValue::LongInt(-1)), None, true, 1, false),
            // A classic queue's counted copy, and that copy delivered again.
            (None, Some("2"), false, 2, false),
            (None, Some("2"), true, 3, true),
            (None, Some("junk"), true, 1, true),
            // The broker's count wins where there is one.
            (Some(AMQPValue::LongLongInt(3)), Some("7"), true, 3, false),
        ];
        for (count, ours, redelivered, want, recount) in cases {
            let mut t = BTreeMap::new();
            if let Some(c) = count {
                t.insert(ShortString::from(DELIVERY_COUNT), c.clone());
            }
            if let Some(n) = ours {
                t.insert(
                    ShortString::from(WEIR_DELIVERIES),
                    AMQPValue::LongString(LongString::from(n.as_bytes().to_vec())),
                );
            }
            let props = lapin::BasicProperties::default().with_headers(FieldTable::from(t));
            let (r, n) = from_amqp(&props, Vec::new(), *redelivered);
            let case = format!("{count:?} {ours:?} {redelivered}");
            assert_eq!(n, *want, "{case}");
            assert_eq!(
                uncounted_redelivery(&props, *redelivered),
                *recount,
                "{case}"
            );
            assert!(
                r.headers.is_empty(),
                "the counters are not user headers: {case}"
            );
        }
    }

    #[test]
    fn header_names_past_a_short_string_do_not_fit() {
        let mut r = Record::default();
        r.headers.push(("n".repeat(255), Vec::new()));
        assert!(fits(&r).is_ok());
        r.headers.push(("n".repeat(256), Vec::new()));
        assert!(fits(&r).unwrap_err().contains("255"));
    }

    #[test]
    fn queue_names_and_urls() {
        assert!(check_queue_name("orders").is_ok());
        assert!(check_queue_name("amq.gen-x").is_err());
        assert!(check_queue_name(&"q".repeat(256)).is_err());
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
