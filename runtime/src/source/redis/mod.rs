//! Redis Streams as a source, with the redis crate's blocking client.
//!
//! - A weir topic is a stream key (under `--source-property prefix=...`, if given); it has one
//!   partition (0). A group is a Redis consumer group (created at `0` when a run first needs
//!   it, so a new group reads the whole stream), and each weir process is a consumer of it,
//!   named `weir-<host>-<pid>` unless `consumer=` names it. Processes of a group compete for
//!   entries, as on a queue.
//! - Offsets are a sequence this process gives its deliveries; each keeps the entry id, and a
//!   message is settled by `XACK` of its id ([`Settle::PerMessage`](super::Settle)).
//! - A commit is one Lua script: it checks that this consumer still owns every entry it settles
//!   (`XPENDING`), then `XADD`s the outputs and `XACK`s the entries. Redis runs a script
//!   atomically, so an entry's outputs and its ack are written together or not at all: an
//!   entry is never acked without its outputs, and its outputs never written twice by weir,
//!   with or without `--exactly-once`. An entry another consumer took over meanwhile fails the
//!   commit before anything is written, and the partition starts over.
//! - Entries a consumer holds past `claim-idle` (default 30 s) are taken over with
//!   `XAUTOCLAIM` by any consumer of the group, so a killed process's entries run elsewhere.
//!   The engine renews the entries it holds (`XCLAIM ... JUSTID` by their owner) every third of
//!   that, so a long call is never handed to a second consumer while it runs. The attempt
//!   number is the entry's delivery count (`XPENDING`).
//! - Records map to entries: the payload is the field `payload`, the key the field `weir.key`,
//!   every other field a header (order kept). An entry without a `payload` field (written by
//!   another producer, `XADD s * id 7 customer c-1`) is handed over as a JSON object of its
//!   fields. The timestamp is the entry id's millisecond part.
//!
//! The blocking client fits the seam, which the engine calls from blocking threads; each
//! consumed stream reads on a connection of its own. Reads do not `BLOCK`: the engine waits in
//! `fetch`, so a read that waits for new entries would hold up its finished jobs and commits; an
//! empty answer makes it poll again (its idle interval, 20 ms). (The issue's `BLOCK` with a
//! response timeout past it, redis-rs issue 1924, is for a loop that has nothing else to do.)
//! The rest of weir does not name the redis crate for streams: this folder is the only place.

pub mod bench;
mod broker;
mod conns;
mod consumer;
mod read;
mod request;
mod scripts;

use super::tls::TlsFiles;
use super::{Capabilities, Record, Settle, SourceError};
use std::time::Duration;

pub use broker::RedisBroker;
pub use consumer::RedisSource;

/// Redis settles each entry by its id, counts deliveries, and writes a commit atomically.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    settle: Settle::PerMessage,
    groups: false,
    dedupe_marks: false,
    delivery_count: true,
    transactions: true,
    batch_size: None,
    // Redis has no delayed redelivery: requeue mode uses `<topic>.retry`.
    delayed_retry: false,
    // The real lease is `claim-idle` ([`RedisConfig::capabilities`]).
    lease: None,
    dense_offsets: false,
};

/// Stream keys are binary-safe strings; weir takes any UTF-8 name up to 1 KiB (`orders:eu`).
pub const NAMING: weir_core::topic::Naming = weir_core::topic::Naming {
    broker: "Redis",
    problem: key_problem,
    dlq: "{topic}.dlq",
    retry: "{topic}.retry",
};

fn key_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 1024 {
        Some("it is longer than 1024 bytes")
    } else if name.chars().any(char::is_control) {
        Some("it holds a control character")
    } else {
        None
    }
}

/// The field that carries a record's payload.
const PAYLOAD: &str = "payload";
/// The field that carries a record's key.
const KEY: &str = "weir.key";

/// How to reach Redis, and how to consume.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    /// Prepended to every topic to make its key (`team-a:`), as a virtual host would.
    pub prefix: String,
    /// This process's consumer name in its groups.
    pub consumer: String,
    /// How long an entry may stay pending with its consumer before another takes it over.
    pub claim_idle: Duration,
    /// `MAXLEN ~` on every `XADD` weir makes, when set.
    pub maxlen: Option<u64>,
    /// A read's time allowance beyond the request timeout (reads do not wait for entries).
    pub block: Duration,
    /// With rediss://: a CA to trust, a client certificate and key.
    pub tls: TlsFiles,
}

impl RedisConfig {
    pub fn from_spec(spec: &super::connect::SourceSpec) -> Result<RedisConfig, SourceError> {
        let url = spec.url.clone();
        redis::Client::open(url.as_str()).map_err(|e| {
            SourceError::Invalid(format!(
                "--source {}: not a Redis URL ({e}); pass redis://[user:pass@]host:port[/db] \
                 (rediss:// for TLS)",
                redact(&url)
            ))
        })?;
        let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|f| std::fs::read_to_string(f).ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "host".into());
        let mut cfg = RedisConfig {
            url,
            prefix: String::new(),
            consumer: format!("weir-{host}-{}", std::process::id()),
            claim_idle: Duration::from_secs(30),
            maxlen: None,
            block: Duration::from_millis(100),
            tls: TlsFiles::default(),
        };
        let bad = |k: &str, v: &str, what: &str| {
            SourceError::Invalid(format!("--source-property {k}={v}: {what}"))
        };
        for (k, v) in &spec.properties {
            if cfg.tls.take(k, v)? {
                continue;
            }
            match k.as_str() {
                "prefix" => cfg.prefix = v.clone(),
                "consumer" if !v.is_empty() => cfg.consumer = v.clone(),
                "claim-idle" => {
                    cfg.claim_idle =
                        weir_core::config::parse_duration(k, v).map_err(|e| bad(k, v, &e.0))?;
                    if cfg.claim_idle < Duration::from_millis(300) {
                        return Err(bad(k, v, "must be at least 300ms"));
                    }
                }
                "maxlen" => {
                    cfg.maxlen = Some(
                        v.parse()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| bad(k, v, "pass a number of entries, more than 0"))?,
                    )
                }
                _ => {
                    return Err(SourceError::Invalid(format!(
                        "--source-property {k}: Redis takes prefix=NAME, consumer=NAME, \
                         claim-idle=DURATION (30s), maxlen=N, and with rediss:// ca=, cert= \
                         and key= (PEM files)"
                    )));
                }
            }
        }
        cfg.tls.check()?;
        if cfg.tls.any() && !cfg.url.to_ascii_lowercase().starts_with("rediss://") {
            return Err(SourceError::Invalid(format!(
                "--source {}: ca=, cert= and key= are for TLS: use rediss://",
                redact(&cfg.url)
            )));
        }
        Ok(cfg)
    }

    /// A client for the URL, with the TLS files if any were given (else the system's roots).
    pub(crate) fn client(&self) -> Result<redis::Client, SourceError> {
        if !self.tls.any() {
            return redis::Client::open(self.url.as_str()).map_err(|e| error("reading the URL", e));
        }
        let root_cert = match &self.tls.ca {
            Some(p) => Some(super::tls::read("ca", p)?),
            None => None,
        };
        let client_tls = match (&self.tls.cert, &self.tls.key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: super::tls::read("cert", c)?,
                client_key: super::tls::read("key", k)?,
            }),
            _ => None,
        };
        redis::Client::build_with_tls(
            self.url.as_str(),
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(|e| error("reading the TLS files", e))
    }

    /// The stream key of `topic`.
    pub(crate) fn key(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// [`CAPABILITIES`] with the lease: `claim-idle`.
    pub(crate) fn capabilities(&self) -> Capabilities {
        Capabilities {
            lease: Some(self.claim_idle),
            ..CAPABILITIES
        }
    }
}

/// The URL with its password hidden, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    super::rabbitmq::redact(url)
}

pub(crate) fn error(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Broker {
        broker: "Redis",
        detail: format!("{what}: {e}"),
    }
}

/// What Redis cannot carry of a record beyond weir's limits: a header named like the fields
/// weir keeps the payload and the key in.
pub(crate) fn fits(r: &Record) -> Result<(), String> {
    super::within_limits(r)?;
    if let Some((n, _)) = r.headers.iter().find(|(n, _)| n == PAYLOAD || n == KEY) {
        return Err(format!(
            "a header named `{n}`: on Redis Streams that field holds the record's {}",
            if n == PAYLOAD { "payload" } else { "key" }
        ));
    }
    Ok(())
}

/// The fields of an entry for `r`: payload, key, then the headers in order.
pub(crate) fn fields(r: &Record) -> Vec<(&[u8], &[u8])> {
    let mut f: Vec<(&[u8], &[u8])> = Vec::with_capacity(2 + r.headers.len());
    f.push((PAYLOAD.as_bytes(), &r.payload));
    if let Some(k) = &r.key {
        f.push((KEY.as_bytes(), k));
    }
    for (n, v) in &r.headers {
        f.push((n.as_bytes(), v));
    }
    f
}

/// Reads the `[id, [f, v, ...]]` entries of an `XRANGE`, `XREADGROUP` or `XAUTOCLAIM` reply;
/// an entry whose fields are nil (deleted from the stream while pending) comes back with
/// `None` as its record.
pub(crate) fn entries(v: redis::Value) -> Result<Vec<(String, Option<Record>)>, SourceError> {
    let redis::Value::Array(items) = v else {
        return match v {
            redis::Value::Nil => Ok(Vec::new()),
            other => Err(error(
                "reading entries",
                format!("unexpected reply {other:?}"),
            )),
        };
    };
    items
        .into_iter()
        .map(|item| {
            let redis::Value::Array(mut pair) = item else {
                return Err(error("reading entries", "an entry is not [id, fields]"));
            };
            if pair.len() != 2 {
                return Err(error("reading entries", "an entry is not [id, fields]"));
            }
            let fields = pair.pop().expect("two");
            let id = text(pair.pop().expect("two"))?;
            let record = match fields {
                redis::Value::Nil => None,
                redis::Value::Array(f) => Some(record(&id, f)?),
                other => {
                    return Err(error("reading entries", format!("fields {other:?}")));
                }
            };
            Ok((id, record))
        })
        .collect()
}

fn record(id: &str, fields: Vec<redis::Value>) -> Result<Record, SourceError> {
    let mut pairs = Vec::with_capacity(fields.len() / 2);
    let mut it = fields.into_iter();
    while let (Some(n), Some(v)) = (it.next(), it.next()) {
        pairs.push((bytes(n)?, bytes(v)?));
    }
    let timestamp_ms = id.split('-').next().and_then(|ms| ms.parse().ok());
    let mut r = Record {
        timestamp_ms,
        ..Record::default()
    };
    if !pairs.iter().any(|(n, _)| n == PAYLOAD.as_bytes()) {
        // Written by another producer: its fields, as a JSON object, are the payload.
        let obj: serde_json::Map<String, serde_json::Value> = pairs
            .into_iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(&n).into_owned(),
                    String::from_utf8_lossy(&v).into_owned().into(),
                )
            })
            .collect();
        r.payload = serde_json::to_vec(&obj).expect("a JSON object");
        return Ok(r);
    }
    for (n, v) in pairs {
        match n.as_slice() {
            b"payload" => r.payload = v,
            b"weir.key" => r.key = Some(v),
            _ => r
                .headers
                .push((String::from_utf8_lossy(&n).into_owned(), v)),
        }
    }
    Ok(r)
}

pub(crate) fn bytes(v: redis::Value) -> Result<Vec<u8>, SourceError> {
    match v {
        redis::Value::BulkString(b) => Ok(b),
        redis::Value::SimpleString(s) => Ok(s.into_bytes()),
        redis::Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(error(
            "reading a reply",
            format!("expected a string, got {other:?}"),
        )),
    }
}

pub(crate) fn text(v: redis::Value) -> Result<String, SourceError> {
    String::from_utf8(bytes(v)?).map_err(|e| error("reading a reply", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value::{Array, BulkString, Nil};

    fn s(x: &str) -> redis::Value {
        BulkString(x.as_bytes().to_vec())
    }

    #[test]
    fn entries_become_records() {
        let reply = Array(vec![
            Array(vec![
                s("1700000000123-0"),
                Array(vec![
                    s("payload"),
                    s("{}"),
                    s("weir.key"),
                    s("k"),
                    s("h"),
                    s("1"),
                    s("h"),
                    s("2"),
                ]),
            ]),
            Array(vec![s("1700000000124-0"), Array(vec![s("id"), s("7")])]),
            Array(vec![s("1700000000125-0"), Nil]),
        ]);
        let got = entries(reply).unwrap();
        let first = got[0].1.clone().unwrap();
        assert_eq!(first.payload, b"{}");
        assert_eq!(first.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(
            first.headers,
            vec![
                ("h".to_string(), b"1".to_vec()),
                ("h".into(), b"2".to_vec())
            ]
        );
        assert_eq!(first.timestamp_ms, Some(1_700_000_000_123));
        // Another producer's fields are the payload, as JSON.
        assert_eq!(got[1].1.clone().unwrap().payload, br#"{"id":"7"}"#);
        // Deleted while pending.
        assert_eq!(got[2], ("1700000000125-0".to_string(), None));
        // And back: the fields weir writes for a record read the same.
        let f: Vec<redis::Value> = fields(&first)
            .into_iter()
            .flat_map(|(n, v)| [BulkString(n.to_vec()), BulkString(v.to_vec())])
            .collect();
        assert_eq!(record("1700000000123-0", f).unwrap(), first);
    }

    #[test]
    fn names_and_fields_redis_refuses() {
        for (name, ok) in [("orders:eu", true), ("", false), ("a\nb", false)] {
            assert_eq!(key_problem(name).is_none(), ok, "{name:?}");
        }
        let r = Record {
            headers: vec![("payload".into(), vec![])],
            ..Record::default()
        };
        assert!(fits(&r).unwrap_err().contains("`payload`"));
    }
}
