//! The admin server's ingest body (`POST /topics/{topic}/messages`): one message object or a
//! list of them, parsed borrowed and bounded, since it comes from the network.

use crate::record::Record;
use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Messages one ingest request may carry; a larger batch is refused whole (split it).
pub const MAX_INGEST_MESSAGES: usize = 100_000;

/// One message of an ingest body, borrowed from it: `{"payload": ..., "key": "k", "headers":
/// {"name": "value"}}`. A string payload is sent as its text, any other JSON value as its JSON
/// text. Borrowing keeps a parsed body about the size of the body (a `serde_json::Value` tree
/// was many times larger).
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default, borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    headers: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
}

impl Incoming<'_> {
    fn record(self) -> Result<Record, String> {
        let raw = self.payload.get();
        let payload = if raw.starts_with('"') {
            serde_json::from_str::<String>(raw)
                .map_err(|e| e.to_string())?
                .into_bytes()
        } else {
            raw.as_bytes().to_vec()
        };
        Ok(Record {
            key: self.key.map(|k| k.into_owned().into_bytes()),
            payload,
            headers: self
                .headers
                .unwrap_or_default()
                .into_iter()
                .map(|(n, v)| (n.into_owned(), v.into_owned().into_bytes()))
                .collect(),
            timestamp_ms: None,
        })
    }
}

/// A JSON array of at most [`MAX_INGEST_MESSAGES`], refused as soon as it has one more.
struct Bounded<'a>(Vec<Incoming<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for Bounded<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seq<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Seq<'a> {
            type Value = Bounded<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a list of at most {MAX_INGEST_MESSAGES} messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(m) = seq.next_element::<Incoming<'a>>()? {
                    if out.len() == MAX_INGEST_MESSAGES {
                        return Err(serde::de::Error::custom(format!(
                            "over {MAX_INGEST_MESSAGES} messages in one request; send them in smaller batches"
                        )));
                    }
                    out.push(m);
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(Seq(std::marker::PhantomData))
    }
}

/// Why an ingest body is refused: the HTTP status to answer with, and what to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

fn refused(status: u16, message: impl Into<String>) -> Refused {
    Refused {
        status,
        message: message.into(),
    }
}

/// The records of an ingest body: one message object or a list of them.
pub fn parse(body: &[u8]) -> Result<Vec<Record>, Refused> {
    let text = std::str::from_utf8(body).map_err(|_| refused(400, "the body is not UTF-8"))?;
    let items = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Bounded>(text).map(|b| b.0)
    } else {
        serde_json::from_str::<Incoming>(text).map(|m| vec![m])
    };
    let items = items.map_err(|e| {
        let status = if e.to_string().contains("smaller batches") {
            413
        } else {
            400
        };
        refused(
            status,
            format!("the body is not a message or a list of messages: {e}"),
        )
    })?;
    if items.is_empty() {
        return Err(refused(400, "no messages in the body"));
    }
    let mut records = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        records.push(
            item.record()
                .map_err(|e| refused(400, format!("message {i}: {e}")))?,
        );
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_bodies() {
        let ok = |body: &str| parse(body.as_bytes()).map_err(|a| a.status);
        let r = ok(r#"{"payload":"hi","key":"k","headers":{"h":"v"}}"#).unwrap();
        assert_eq!(r[0].payload, b"hi");
        assert_eq!(r[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r[0].headers, vec![("h".to_string(), b"v".to_vec())]);
        let r = ok(r#" [{"payload":{"a": 1}}, {"payload":"\u00e9\n"}]"#).unwrap();
        assert_eq!(r[0].payload, br#"{"a": 1}"#);
        assert_eq!(r[1].payload, "é\n".as_bytes());
        for (body, status) in [
            ("", 400),
            ("[]", 400),
            ("{}", 400),
            (r#"{"payload":1,"key":2}"#, 400),
            (r#"{"payload":1,"headers":{"h":1}}"#, 400),
            ("[1]", 400),
            ("\u{0}", 400),
        ] {
            assert_eq!(ok(body).err(), Some(status), "{body:?}");
        }
        let many = format!(
            "[{}{{\"payload\":1}}]",
            r#"{"payload":1},"#.repeat(MAX_INGEST_MESSAGES)
        );
        assert_eq!(ok(&many).err(), Some(413));
        let most = format!(
            "[{}{{\"payload\":1}}]",
            r#"{"payload":1},"#.repeat(MAX_INGEST_MESSAGES - 1)
        );
        assert_eq!(ok(&most).map(|r| r.len()), Ok(MAX_INGEST_MESSAGES));
    }
}
