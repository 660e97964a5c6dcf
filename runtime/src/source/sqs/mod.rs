//! Amazon SQS as a source, with the AWS SDK for Rust (aws-sdk-sqs) on a tokio runtime of its own.
//!
//! - `--source sqs://REGION` (or `sqs://` for the region of the AWS default chain). Endpoint,
//!   credentials and region come the way every AWS tool takes them: `AWS_ENDPOINT_URL_SQS` /
//!   `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, SSO, a
//!   credential process, the instance's role. So a local server (moto, ElasticMQ, LocalStack)
//!   and a real account both work.
//! - A weir topic is a queue (under `--source-property prefix=...`, if given), resolved to its
//!   URL. Queue names hold letters, digits, `-` and `_`, so the dead-letter queue of `orders`
//!   is `orders-dlq`. With `fifo=true` every queue is a FIFO queue: topic `orders` is the queue
//!   `orders.fifo`, a record's key is its `MessageGroupId` (SQS keeps order per group), and each
//!   output carries a `MessageDeduplicationId` made from the input it came from, so an output
//!   published again (its input ran again after a crash before its delete) is dropped by SQS.
//! - Every weir process on a queue competes for its messages. A few receivers per queue long
//!   poll in the background (at most 10 messages a call, `receivers=` of them, never more held
//!   and buffered than `--max-in-flight`, or 10); a message is deleted (in batches) once its
//!   outputs are sent.
//! - A retry is the queue's own: `ChangeMessageVisibility` to the backoff (requeue mode), and the
//!   attempt number is `ApproximateReceiveCount`. The lease is the queue's visibility timeout:
//!   the engine extends the visibility of every message it holds every third of it, so a long
//!   call is not handed to another consumer meanwhile.
//! - Records map to messages: payload = body (base64 where it is not text SQS can carry), key
//!   and headers = message attributes. SQS takes at most 10 attributes: a record with more
//!   (a dead letter's envelope on a message with attributes of its own) keeps its first ones as
//!   attributes and packs the rest into one attribute, `weir` ([`encode`]).
//!
//! The rest of weir does not name the AWS SDK: this folder is the only place that does.

pub mod bench;
mod broker;
mod client;
mod consumer;
mod encode;
mod receive;
mod request;

use super::{Capabilities, Record, Settle, SourceError};
use std::time::Duration;

pub use broker::SqsBroker;
pub use consumer::SqsSource;
pub(crate) use encode::{decode, encode, fits};

pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    settle: Settle::PerMessage,
    groups: false,
    dedupe_marks: false,
    delivery_count: true,
    // Sends and deletes are separate calls; FIFO deduplication ids cover a resent output.
    transactions: false,
    batch_size: None,
    delayed_retry: true,
    // The real lease is the queue's visibility timeout, read when a run starts.
    lease: Some(Duration::from_secs(30)),
    dense_offsets: false,
};

/// Queue names: letters, digits, `-` and `_`, 80 at most with `.fifo`.
pub const NAMING: weir_core::topic::Naming = weir_core::topic::Naming {
    broker: "Amazon SQS",
    problem: queue_problem,
    dlq: "{topic}-dlq",
    retry: "{topic}-retry",
};

fn queue_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.ends_with(".fifo") {
        Some("name it without `.fifo`: pass --source-property fifo=true for FIFO queues")
    } else if name.len() > 75 {
        Some("it is longer than 75 characters (SQS takes 80 with `.fifo`)")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        Some("use only ASCII letters, digits, `-` and `_` (SQS queue names)")
    } else {
        None
    }
}

/// The most bytes of one message (body and attributes), SQS's long-standing default.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// The region from the URL; `None`: the default chain's.
    pub region: Option<String>,
    /// Prepended to every queue name (`team-a-`).
    pub prefix: String,
    /// Every queue is FIFO (`<name>.fifo`).
    pub fifo: bool,
    /// Background receivers per consumed queue.
    pub receivers: usize,
    /// How long one receive waits for messages (long polling; 20 s at most).
    pub wait: Duration,
    /// The visibility timeout of queues weir creates.
    pub visibility: Duration,
    /// How long what `weir consume` and `weir dlq` read stays hidden from consumers between
    /// renewals (it is made visible again when the command ends).
    pub read_hold: Duration,
    /// The URL as given, for messages.
    pub url: String,
}

impl SqsConfig {
    pub fn from_spec(spec: &super::connect::SourceSpec) -> Result<SqsConfig, SourceError> {
        let rest = spec
            .url
            .split_once("://")
            .map_or("", |(_, r)| r)
            .trim_end_matches('/');
        let region = if rest.is_empty() {
            None
        } else if rest
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            Some(rest.to_string())
        } else {
            return Err(SourceError::Invalid(format!(
                "--source {}: not an SQS URL; pass sqs://REGION (sqs://eu-west-1), or sqs:// for \
                 the region of AWS_REGION or your profile; the endpoint comes from \
                 AWS_ENDPOINT_URL_SQS or AWS_ENDPOINT_URL",
                spec.url
            )));
        };
        let mut cfg = SqsConfig {
            region,
            prefix: String::new(),
            fifo: false,
            receivers: 4,
            wait: Duration::from_secs(20),
            visibility: Duration::from_secs(30),
            read_hold: Duration::from_secs(60),
            url: spec.url.clone(),
        };
        let bad = |k: &str, v: &str, what: &str| {
            SourceError::Invalid(format!("--source-property {k}={v}: {what}"))
        };
        let duration =
            |k: &str, v: &str| weir_core::config::parse_duration(k, v).map_err(|e| bad(k, v, &e.0));
        for (k, v) in &spec.properties {
            match k.as_str() {
                "prefix" => {
                    if !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                    {
                        return Err(bad(k, v, "use letters, digits, `-` and `_`"));
                    }
                    cfg.prefix = v.clone();
                }
                "fifo" => {
                    cfg.fifo = match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(k, v, "pass true or false")),
                    }
                }
                "receivers" => {
                    cfg.receivers = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| bad(k, v, "a number from 1 to 64"))?;
                }
                "wait" => {
                    cfg.wait = duration(k, v)?;
                    if cfg.wait > Duration::from_secs(20) {
                        return Err(bad(k, v, "SQS waits 20s at most"));
                    }
                }
                "visibility" => {
                    cfg.visibility = duration(k, v)?;
                    if cfg.visibility < Duration::from_secs(1)
                        || cfg.visibility > Duration::from_secs(12 * 3600)
                    {
                        return Err(bad(k, v, "from 1s to 12h (SQS's bounds)"));
                    }
                }
                "read-hold" => {
                    cfg.read_hold = duration(k, v)?;
                    if cfg.read_hold < Duration::from_secs(1)
                        || cfg.read_hold > Duration::from_secs(12 * 3600)
                    {
                        return Err(bad(k, v, "from 1s to 12h (SQS's bounds)"));
                    }
                }
                _ => {
                    return Err(SourceError::Invalid(format!(
                        "--source-property {k}: SQS takes prefix=NAME, fifo=true, receivers=N (4), \
                         wait=DURATION (20s), visibility=DURATION (30s, for queues weir creates), \
                         read-hold=DURATION (60s, what weir consume and weir dlq hide while they \
                         read)"
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// The queue name of `topic`.
    pub(crate) fn queue(&self, topic: &str) -> String {
        if self.fifo {
            format!("{}{topic}.fifo", self.prefix)
        } else {
            format!("{}{topic}", self.prefix)
        }
    }

    /// The topic of queue `name`, if it is one of this prefix (and kind).
    pub(crate) fn topic_of(&self, name: &str) -> Option<String> {
        let t = name.strip_prefix(&self.prefix)?;
        if self.fifo {
            t.strip_suffix(".fifo").map(str::to_string)
        } else {
            (!t.ends_with(".fifo")).then(|| t.to_string())
        }
    }

    pub(crate) fn capabilities(&self, lease: Duration) -> Capabilities {
        Capabilities {
            lease: Some(lease),
            ..CAPABILITIES
        }
    }
}

pub(crate) fn error(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Broker {
        broker: "SQS",
        detail: format!("{what}: {e}"),
    }
}

/// Whether `r` can be sent to SQS: weir's limits, then the message size.
pub(crate) fn check(r: &Record) -> Result<(), String> {
    fits(r, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::connect::SourceSpec;

    fn spec(url: &str, props: &[(&str, &str)]) -> Result<SqsConfig, SourceError> {
        let properties = props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SqsConfig::from_spec(&SourceSpec {
            url: url.into(),
            properties,
            kind: crate::source::connect::Kind::Sqs,
            data_dir: "d".into(),
        })
    }

    #[test]
    fn urls_and_properties() {
        // (url, properties, Ok(region, queue of `orders`) or the start of the error)
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            Result<(Option<&'a str>, &'a str), &'a str>,
        );
        let cases: &[Case] = &[
            ("sqs://", &[], Ok((None, "orders"))),
            ("sqs://eu-west-1", &[], Ok((Some("eu-west-1"), "orders"))),
            ("sqs://eu-west-1/", &[], Ok((Some("eu-west-1"), "orders"))),
            (
                "sqs://host:4566",
                &[],
                Err("--source sqs://host:4566: not an SQS URL"),
            ),
            ("sqs://", &[("prefix", "t1-")], Ok((None, "t1-orders"))),
            ("sqs://", &[("fifo", "true")], Ok((None, "orders.fifo"))),
            (
                "sqs://",
                &[("fifo", "yes")],
                Err("--source-property fifo=yes"),
            ),
            (
                "sqs://",
                &[("prefix", "a.b")],
                Err("--source-property prefix=a.b"),
            ),
            (
                "sqs://",
                &[("wait", "30s")],
                Err("--source-property wait=30s: SQS waits"),
            ),
            (
                "sqs://",
                &[("visibility", "0s")],
                Err("--source-property visibility=0s"),
            ),
            (
                "sqs://",
                &[("read-hold", "500ms")],
                Err("--source-property read-hold=500ms: from 1s"),
            ),
            (
                "sqs://",
                &[("receivers", "0")],
                Err("--source-property receivers=0"),
            ),
            (
                "sqs://",
                &[("ack-wait", "1s")],
                Err("--source-property ack-wait: SQS takes"),
            ),
        ];
        for (url, props, want) in cases {
            match (spec(url, props), want) {
                (Ok(c), Ok((region, queue))) => {
                    assert_eq!(c.region.as_deref(), *region, "{url} {props:?}");
                    assert_eq!(c.queue("orders"), *queue, "{url} {props:?}");
                    assert_eq!(c.topic_of(queue).as_deref(), Some("orders"));
                }
                (Err(e), Err(start)) => {
                    assert!(e.to_string().starts_with(start), "{url} {props:?}: {e}")
                }
                (got, want) => panic!("{url} {props:?}: got {got:?}, want {want:?}"),
            }
        }
        let fifo = spec("sqs://", &[("fifo", "true")]).unwrap();
        assert_eq!(
            fifo.topic_of("orders"),
            None,
            "a standard queue is not a FIFO topic"
        );
        let std = spec("sqs://", &[]).unwrap();
        assert_eq!(std.topic_of("orders.fifo"), None);
    }

    #[test]
    fn queue_names() {
        for (name, ok) in [
            ("orders", true),
            ("orders-dlq", true),
            ("a_b-9", true),
            ("orders.dlq", false),
            ("orders.fifo", false),
            ("", false),
        ] {
            assert_eq!(queue_problem(name).is_none(), ok, "{name}");
        }
        assert!(queue_problem(&"a".repeat(76)).is_some());
    }
}
