//! NATS JetStream as a source, with async-nats on a tokio runtime of its own.
//!
//! - A weir topic is a subject, stored in a stream of its own that `weir topics create` makes
//!   (named after the subject, `.` as `_`, since stream names may not hold `.`). It has one
//!   partition (0).
//! - A group is a durable pull consumer on the stream (explicit acks, `ack_wait` = the lease),
//!   shared by the weir processes of the group: they compete for its messages.
//! - Offsets are a sequence this process gives its deliveries; each keeps the message (its ack
//!   subject), and a message is acked once its outputs are stored ([`Settle::PerMessage`]).
//! - A retry in requeue mode is a `NAK` with the backoff as its delay (the broker redelivers,
//!   no retry stream); the attempt number is the delivery count; a long call gets `+WPI`
//!   (in progress) every third of `ack_wait`; a stopped partition `NAK`s what it did not run.
//! - Outputs carry `Nats-Msg-Id` = the input's stream and sequence and the output's place, so
//!   JetStream's duplicate window drops an output published again after a crash before its
//!   input's ack.
//! - Records map to messages: payload = body, headers = NATS headers (text; a name may repeat;
//!   order kept within a name), the key in the `weir.key` header.
//!
//! The rest of weir does not name async-nats: this folder is the only place that does.
//!
//! [`Settle::PerMessage`]: super::Settle::PerMessage

pub mod bench;
mod broker;
mod consumer;
mod link;

use super::{Capabilities, Record, Settle, SourceError};
use std::time::Duration;

pub use broker::NatsBroker;
pub use consumer::NatsSource;

pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    settle: Settle::PerMessage,
    groups: false,
    dedupe_marks: false,
    delivery_count: true,
    // Outputs and acks are not one transaction; the duplicate window covers a republished output.
    transactions: false,
    batch_size: None,
    delayed_retry: true,
    // The real lease is `ack-wait` ([`NatsConfig::capabilities`]).
    lease: None,
    dense_offsets: false,
};

/// Subjects: letters, digits, `-`, `_` and `.` between tokens (no wildcards, no spaces).
pub const NAMING: weir_core::topic::Naming = weir_core::topic::Naming {
    broker: "NATS JetStream",
    problem: subject_problem,
    dlq: "{topic}.dlq",
    retry: "{topic}.retry",
};

fn subject_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 200 {
        Some("it is longer than 200 characters")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("use only ASCII letters, digits, `-`, `_` and `.` (no wildcards or spaces)")
    } else if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        Some("`.` separates tokens: none may be empty")
    } else {
        None
    }
}

/// The header that carries a record's key.
const KEY_HEADER: &str = "weir.key";

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    /// Prepended to every subject and stream name (`team-a.`), as a virtual host would.
    pub prefix: String,
    /// The durable consumer's `ack_wait` when weir creates it: the lease.
    pub ack_wait: Duration,
    /// How long one pull waits for messages.
    pub block: Duration,
    /// TLS: required (`tls=true`, or any TLS file given), and a CA, a client certificate and
    /// key.
    pub require_tls: bool,
    pub tls: super::tls::TlsFiles,
}

impl NatsConfig {
    pub fn from_spec(spec: &super::connect::SourceSpec) -> Result<NatsConfig, SourceError> {
        let mut cfg = NatsConfig {
            url: spec.url.clone(),
            prefix: String::new(),
            ack_wait: Duration::from_secs(30),
            block: Duration::from_millis(100),
            require_tls: false,
            tls: Default::default(),
        };
        spec.url.parse::<async_nats::ServerAddr>().map_err(|e| {
            SourceError::Invalid(format!(
                "--source {}: not a NATS URL ({e}); pass nats://host:port",
                super::rabbitmq::redact(&spec.url)
            ))
        })?;
        for (k, v) in &spec.properties {
            if cfg.tls.take(k, v)? {
                continue;
            }
            match k.as_str() {
                "tls" => {
                    cfg.require_tls = match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(SourceError::Invalid(format!(
                                "--source-property tls={v}: pass true or false"
                            )));
                        }
                    }
                }
                "prefix" => {
                    if !v.is_empty() && subject_problem(v.trim_end_matches('.')).is_some() {
                        return Err(SourceError::Invalid(format!(
                            "--source-property prefix={v}: use letters, digits, `-`, `_`, `.`"
                        )));
                    }
                    cfg.prefix = v.clone();
                }
                "ack-wait" => {
                    cfg.ack_wait = weir_core::config::parse_duration(k, v).map_err(|e| {
                        SourceError::Invalid(format!("--source-property {k}={v}: {}", e.0))
                    })?;
                    if cfg.ack_wait < Duration::from_millis(500) {
                        return Err(SourceError::Invalid(format!(
                            "--source-property {k}={v}: must be at least 500ms"
                        )));
                    }
                }
                _ => {
                    return Err(SourceError::Invalid(format!(
                        "--source-property {k}: NATS takes prefix=NAME, ack-wait=DURATION (30s), \
                         tls=true, and ca=, cert= and key= (PEM files)"
                    )));
                }
            }
        }
        cfg.tls.check()?;
        if cfg.tls.any() {
            if spec.properties.get("tls").is_some_and(|v| v == "false") {
                return Err(SourceError::Invalid(
                    "--source-property tls=false with ca=, cert= or key=: those are for TLS; \
                     drop tls=false or the files"
                        .into(),
                ));
            }
            cfg.require_tls = true;
        }
        Ok(cfg)
    }

    /// How a client connects: TLS if asked for (or if the server requires it), with the files
    /// given.
    pub(crate) fn options(&self) -> async_nats::ConnectOptions {
        let mut o = async_nats::ConnectOptions::new().require_tls(self.require_tls);
        if let Some(ca) = &self.tls.ca {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(c), Some(k)) = (&self.tls.cert, &self.tls.key) {
            o = o.add_client_certificate(c.clone(), k.clone());
        }
        o
    }

    /// The subject of `topic`.
    pub(crate) fn subject(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// The stream that stores `topic`.
    pub(crate) fn stream(&self, topic: &str) -> String {
        self.subject(topic).replace('.', "_")
    }

    pub(crate) fn capabilities(&self) -> Capabilities {
        Capabilities {
            lease: Some(self.ack_wait),
            ..CAPABILITIES
        }
    }
}

/// The durable consumer's name for `group`: names may hold only letters, digits, `-` and `_`,
/// so anything else (and `_` itself) is written `_XX` (its bytes in hex): `a.b` and `a_b` stay
/// apart. A group of letters, digits and `-` keeps its name.
pub(crate) fn durable(group: &str) -> String {
    let mut out = String::with_capacity(group.len());
    for b in group.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

pub(crate) fn error(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Broker {
        broker: "NATS",
        detail: format!("{what}: {e}"),
    }
}

/// What NATS cannot carry of a record beyond weir's limits: header values are text on one line.
pub(crate) fn fits(r: &Record) -> Result<(), String> {
    super::within_limits(r)?;
    for (n, v) in &r.headers {
        let ok_name = !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        let ok_value = std::str::from_utf8(v).is_ok_and(|s| !s.contains(['\r', '\n']));
        if !ok_name || !ok_value {
            return Err(format!(
                "header `{}`: NATS headers are text (a name of visible ASCII without `:`, a value on one line)",
                super::clip(n, 64)
            ));
        }
    }
    if r.key
        .as_ref()
        .is_some_and(|k| std::str::from_utf8(k).map_or(true, |s| s.contains(['\r', '\n'])))
    {
        return Err(
            "the key: on NATS it travels in a header, so it must be text on one line".into(),
        );
    }
    Ok(())
}

/// The headers of a message for `r` (the key in `weir.key`), plus `extra`. Never panics on
/// what it is given (async-nats asserts on names and values it would refuse): a name NATS
/// cannot carry is left out, a line break in a value becomes a space. `fits` refuses such
/// records before they get here; dead letters keep the failure's own text, which can hold any.
pub(crate) fn headers(r: &Record, extra: &[(&str, String)]) -> async_nats::HeaderMap {
    use std::str::FromStr;
    let mut h = async_nats::HeaderMap::new();
    let mut put = |n: &str, v: &str, replace: bool| {
        let Ok(name) = async_nats::HeaderName::from_str(n) else {
            return;
        };
        let clean = v.replace(['\r', '\n'], " ");
        let Ok(value) = async_nats::HeaderValue::from_str(&clean) else {
            return;
        };
        if replace {
            h.insert(name, value);
        } else {
            h.append(name, value);
        }
    };
    for (n, v) in &r.headers {
        put(n, &String::from_utf8_lossy(v), false);
    }
    if let Some(k) = &r.key {
        put(KEY_HEADER, &String::from_utf8_lossy(k), true);
    }
    for (n, v) in extra {
        put(n, v, true);
    }
    h
}

/// The record of a message: body, headers (the key out of `weir.key`; JetStream's own `Nats-*`
/// headers left out), `timestamp_ms` as given.
pub(crate) fn record(
    payload: &[u8],
    headers: Option<&async_nats::HeaderMap>,
    timestamp_ms: Option<u64>,
) -> Record {
    let mut r = Record {
        payload: payload.to_vec(),
        timestamp_ms,
        ..Record::default()
    };
    if let Some(h) = headers {
        let mut all: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, values) in h.iter() {
            let name = name.to_string();
            for v in values {
                if name == KEY_HEADER {
                    r.key = Some(v.as_str().as_bytes().to_vec());
                } else if !name.starts_with("Nats-") {
                    all.push((name.clone(), v.as_str().as_bytes().to_vec()));
                }
            }
        }
        // NATS keeps no order between names: sorted by name, so it is at least stable.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        r.headers = all;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_properties() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "").unwrap();
        let pem = pem.to_str().unwrap();
        // (properties, Ok(TLS required) or the start of the error)
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<bool, &'a str>);
        let cases: &[Case] = &[
            (&[], Ok(false)),
            (&[("tls", "true")], Ok(true)),
            (&[("ca", pem)], Ok(true)),
            (
                &[("tls", "false"), ("ca", pem)],
                Err("--source-property tls=false with"),
            ),
            (&[("tls", "yes")], Err("--source-property tls=yes")),
            (
                &[("cert", pem)],
                Err("--source-property cert=... needs key="),
            ),
        ];
        for (props, want) in cases {
            let properties = props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let spec = super::super::connect::SourceSpec {
                url: "nats://127.0.0.1:4222".into(),
                properties,
                ..super::super::connect::SourceSpec::parse(
                    Some("nats://127.0.0.1:4222"),
                    Default::default(),
                    "d".into(),
                )
                .unwrap()
            };
            match (NatsConfig::from_spec(&spec), want) {
                (Ok(c), Ok(tls)) => assert_eq!(c.require_tls, *tls, "{props:?}"),
                (Err(e), Err(start)) => assert!(e.to_string().contains(start), "{props:?}: {e}"),
                (got, want) => panic!(
                    "{props:?}: got {:?}, want {want:?}",
                    got.map(|c| c.require_tls)
                ),
            }
        }
    }

    #[test]
    fn subjects_and_records() {
        for (name, ok) in [
            ("orders", true),
            ("orders.dlq", true),
            ("orders:eu", false),
            ("a..b", false),
            ("o*", false),
        ] {
            assert_eq!(subject_problem(name).is_none(), ok, "{name}");
        }
        let r = Record {
            key: Some(b"k".to_vec()),
            payload: b"p".to_vec(),
            headers: vec![("a".into(), b"1".to_vec()), ("a".into(), b"2".to_vec())],
            timestamp_ms: Some(5),
        };
        let h = headers(&r, &[("Nats-Msg-Id", "x".into())]);
        assert_eq!(record(b"p", Some(&h), Some(5)), r);
        let bad = Record {
            headers: vec![
                ("a".into(), b"1\r\n2".to_vec()),
                ("b:c".into(), b"x".to_vec()),
            ],
            ..Record::default()
        };
        assert!(fits(&bad).is_err());
        // A dead letter may still carry such text: it is cleaned, never a panic.
        let h = headers(&bad, &[]);
        assert_eq!(h.get("a").map(|v| v.as_str()), Some("1  2"));
        assert_eq!(h.iter().count(), 1);
        // Group names never share a consumer.
        assert_eq!(durable("shipping-eu"), "shipping-eu");
        assert_ne!(durable("a.b"), durable("a_b"));
    }
}
