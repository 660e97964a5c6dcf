//! The admin server's writes: ingest (`POST /topics/{topic}/messages`) and hot reload
//! (`POST /module`). Both take input from the network, so both bound it before they use it.

use super::{Admin, Answer};
use crate::source::Record;
use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde_json::json;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// The records of an ingest body: one message object or a list of them.
pub(super) fn parse(body: &[u8]) -> Result<Vec<Record>, Answer> {
    let text =
        std::str::from_utf8(body).map_err(|_| Answer::error(400, "the body is not UTF-8"))?;
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
        Answer::error(
            status,
            format!("the body is not a message or a list of messages: {e}"),
        )
    })?;
    if items.is_empty() {
        return Err(Answer::error(400, "no messages in the body"));
    }
    let mut records = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        records.push(
            item.record()
                .map_err(|e| Answer::error(400, format!("message {i}: {e}")))?,
        );
    }
    Ok(records)
}

pub(super) async fn ingest(admin: &Admin, topic: String, body: &[u8]) -> Answer {
    let Some(log) = admin.log.clone() else {
        return Answer::error(
            404,
            "ingest is served on the embedded log only; on Kafka, produce to the brokers",
        );
    };
    let records = match parse(body) {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let limit = admin.max_depth.clone();
    let placed = tokio::task::spawn_blocking(move || {
        if let Some(limit) = &limit
            && let Some(depth) = limit.over(&log, &topic)?
        {
            return Ok(Err(depth));
        }
        log.append(&topic, records).map(Ok)
    })
    .await;
    match placed {
        Ok(Ok(Ok(placed))) => Answer::json(200, json!({ "placed": placed })),
        Ok(Ok(Err(depth))) => Answer::error(
            429,
            format!(
                "slow down: the topic holds {depth} unconsumed messages, over --max-depth {}",
                admin.max_depth.as_ref().map_or(0, |l| l.max)
            ),
        )
        .retry_after(1),
        Ok(Err(e)) if e.is_bad_input() => Answer::error(400, e),
        Ok(Err(e)) => Answer::error(503, e),
        Err(e) => Answer::error(503, e),
    }
}

#[derive(Deserialize)]
struct ReloadBody {
    path: PathBuf,
}

/// The module `requested` names, if the operator allows reloads from there: a regular file in
/// `dir` (after resolving links and `..`), of at most [`crate::host::MAX_COMPONENT_BYTES`].
pub(super) fn allowed_module(dir: &Path, requested: &Path) -> Result<PathBuf, Answer> {
    let shown = requested.display();
    let path = std::fs::canonicalize(requested)
        .map_err(|e| Answer::error(400, format!("cannot read {shown}: {e}")))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| {
        Answer::error(
            503,
            format!("the reload directory {} cannot be read: {e}", dir.display()),
        )
    })?;
    if !path.starts_with(&dir) {
        return Err(Answer::error(
            403,
            format!(
                "{shown} is outside the reload directory {}; copy the module there, or start weir with --reload-dir",
                dir.display()
            ),
        ));
    }
    let meta = std::fs::metadata(&path)
        .map_err(|e| Answer::error(400, format!("cannot read {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(Answer::error(400, format!("{shown} is not a regular file")));
    }
    if meta.len() > crate::host::MAX_COMPONENT_BYTES {
        return Err(Answer::error(
            400,
            format!(
                "{shown} is {} bytes; a module may have at most {} bytes",
                meta.len(),
                crate::host::MAX_COMPONENT_BYTES
            ),
        ));
    }
    Ok(path)
}

/// `POST /module` with `{"path": "/path/to/handler.wasm"}` (a file in the reload directory):
/// load it and make it the handler for new work; in-flight calls finish on the old one.
pub(super) async fn reload(admin: &Admin, body: &[u8]) -> Answer {
    let Some(reload) = admin.reload.clone() else {
        return Answer::error(404, "this run does not reload modules");
    };
    let requested = match serde_json::from_slice::<ReloadBody>(body) {
        Ok(b) => b.path,
        Err(e) => {
            return Answer::error(
                400,
                format!("the body is {{\"path\": \"/path/to/handler.wasm\"}}: {e}"),
            );
        }
    };
    let dir = admin.reload_dir.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let path = allowed_module(&dir, &requested)?;
        reload(&path).map_err(|why| Answer::error(400, why))
    })
    .await;
    match loaded {
        Ok(Ok((name, digest))) => Answer::json(
            200,
            json!({ "module": name, "digest": format!("sha256:{digest}") }),
        ),
        Ok(Err(answer)) => answer,
        Err(e) => Answer::error(503, e),
    }
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
