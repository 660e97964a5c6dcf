//! A record as an SQS message, and back.
//!
//! - The body is the payload when it is text SQS can carry (XML's characters: no control
//!   characters but tab and line breaks, at least one character); otherwise its base64.
//! - The key travels in the attribute `weir.key`; headers are attributes of their own name.
//! - SQS takes at most 10 attributes, names of letters, digits, `_`, `-` and `.` (not first or
//!   last, never two in a row; not `AWS.`/`Amazon.`), unique, with non-empty values. A record
//!   whose headers do not all fit that way keeps its first fitting headers as attributes (the
//!   user's own come first in a dead letter) and packs the rest, in order, into one binary
//!   attribute `weir` (JSON), which also says when the body is base64.
//!
//! Decoding gives the key, the attributes' headers sorted by name (SQS keeps no order), then the
//! packed ones in their order.

use super::MAX_MESSAGE_BYTES;
use crate::source::Record;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

pub(crate) const KEY: &str = "weir.key";
pub(crate) const PACKED: &str = "weir";
const MAX_ATTRIBUTES: usize = 10;

/// An attribute's value: SQS's `String` or `Binary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attr {
    Text(String),
    Bytes(Vec<u8>),
}

impl Attr {
    fn of(v: &[u8]) -> Attr {
        match std::str::from_utf8(v) {
            Ok(s) if sqs_text(s) => Attr::Text(s.to_string()),
            _ => Attr::Bytes(v.to_vec()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Attr::Text(s) => s.as_bytes(),
            Attr::Bytes(b) => b,
        }
    }

    /// What it counts towards the message size: the value and its type's name.
    fn size(&self) -> usize {
        match self {
            Attr::Text(s) => s.len() + "String".len(),
            Attr::Bytes(b) => b.len() + "Binary".len(),
        }
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Packed {
    /// The key, base64, where it cannot be `weir.key` (empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
    /// Headers that are not attributes of their own: (name, base64 of the value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    h: Vec<(String, String)>,
    /// `base64` when the body is the payload's base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<String>,
}

/// The message of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    pub body: String,
    pub attributes: Vec<(String, Attr)>,
}

impl Encoded {
    /// Its size as SQS counts it: the body, and each attribute's name, type and value.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(n, v)| n.len() + v.size())
                .sum::<usize>()
    }
}

/// Whether SQS takes `s` as text (a body or a `String` value): XML's characters, non-empty.
fn sqs_text(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| {
            matches!(c, '\t' | '\n' | '\r')
                || ('\u{20}'..='\u{D7FF}').contains(&c)
                || ('\u{E000}'..='\u{FFFD}').contains(&c)
                || c >= '\u{10000}'
        })
}

/// Whether `name` may be an attribute's name of its own.
fn attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name != KEY
        && name != PACKED
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

pub(crate) fn encode(r: &Record) -> Encoded {
    let mut attributes: Vec<(String, Attr)> = Vec::new();
    let mut packed = Packed::default();
    match &r.key {
        // SQS takes no empty attribute value.
        Some(k) if k.is_empty() => packed.k = Some(String::new()),
        Some(k) => attributes.push((KEY.to_string(), Attr::of(k))),
        None => {}
    }
    let text = std::str::from_utf8(&r.payload).ok().filter(|s| sqs_text(s));
    let body = match text {
        Some(s) => s.to_string(),
        None => {
            packed.b = Some("base64".into());
            // SQS takes no empty body: the base64 of nothing is `=`-free and empty, so `-`.
            if r.payload.is_empty() {
                "-".to_string()
            } else {
                B64.encode(&r.payload)
            }
        }
    };
    // Which headers can be attributes of their own: valid, non-empty, a name used once.
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for (n, _) in &r.headers {
        *seen.entry(n.as_str()).or_default() += 1;
    }
    let own = |n: &str, v: &[u8]| attribute_name(n) && !v.is_empty() && seen[n] == 1;
    let eligible = r.headers.iter().filter(|(n, v)| own(n, v)).count();
    let all_own = eligible == r.headers.len();
    let room = MAX_ATTRIBUTES - attributes.len();
    // One slot for `weir` when anything must be packed.
    let needs_packed = packed.b.is_some() || packed.k.is_some() || !all_own || eligible > room;
    let mut slots = if needs_packed { room - 1 } else { room };
    for (n, v) in &r.headers {
        if slots > 0 && own(n, v) {
            attributes.push((n.clone(), Attr::of(v)));
            slots -= 1;
        } else {
            packed.h.push((n.clone(), B64.encode(v)));
        }
    }
    if needs_packed {
        let json = serde_json::to_vec(&packed).expect("strings serialise");
        attributes.push((PACKED.to_string(), Attr::Bytes(json)));
    }
    Encoded { body, attributes }
}

/// The record of a message: its body and attributes (as received; any order).
pub(crate) fn decode(
    body: &str,
    attributes: impl IntoIterator<Item = (String, Attr)>,
    timestamp_ms: Option<u64>,
) -> Record {
    let mut r = Record {
        timestamp_ms,
        ..Record::default()
    };
    let mut packed = Packed::default();
    let mut headers = Vec::new();
    for (n, v) in attributes {
        if n == KEY {
            r.key = Some(v.bytes().to_vec());
        } else if n == PACKED
            && let Attr::Bytes(b) = &v
            && let Ok(p) = serde_json::from_slice::<Packed>(b)
        {
            packed = p;
        } else {
            // (Another producer's attribute named `weir` that is not weir's packing, too.)
            headers.push((n, v.bytes().to_vec()));
        }
    }
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(k) = &packed.k {
        r.key = Some(B64.decode(k.as_bytes()).unwrap_or_default());
    }
    for (n, v) in packed.h {
        headers.push((
            n,
            B64.decode(v.as_bytes()).unwrap_or_else(|_| v.into_bytes()),
        ));
    }
    r.headers = headers;
    r.payload = match packed.b.as_deref() {
        Some("base64") if body == "-" => Vec::new(),
        Some("base64") => B64
            .decode(body.as_bytes())
            .unwrap_or_else(|_| body.as_bytes().to_vec()),
        _ => body.as_bytes().to_vec(),
    };
    r
}

/// Whether `r` can be sent: weir's limits, then SQS's message size (256 KiB with attributes).
pub(crate) fn fits(r: &Record, _fifo: bool) -> Result<(), String> {
    crate::source::within_limits(r)?;
    let size = encode(r).size();
    if size > MAX_MESSAGE_BYTES {
        return Err(format!(
            "a message of {size} bytes as SQS counts them (body and attributes); SQS takes \
             {MAX_MESSAGE_BYTES}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: Option<&str>, payload: &[u8], headers: &[(&str, &[u8])]) -> Record {
        Record {
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: payload.to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            timestamp_ms: Some(7),
        }
    }

    /// The record as decoding gives it back: attribute headers sorted by name, then packed.
    fn round_trip(r: &Record) -> Record {
        let e = encode(r);
        assert!(e.attributes.len() <= MAX_ATTRIBUTES, "{e:?}");
        assert!(sqs_text(&e.body), "{e:?}");
        decode(&e.body, e.attributes, Some(7))
    }

    #[test]
    fn records_travel_whole() {
        let many: Vec<(String, Vec<u8>)> = (0..12)
            .map(|i| (format!("h{i:02}"), format!("v{i}").into_bytes()))
            .collect();
        let many_refs: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        // (record, attributes expected, packed)
        let cases: Vec<(Record, usize, bool)> = vec![
            (rec(None, b"plain", &[]), 0, false),
            (rec(Some(""), b"plain", &[]), 1, true),
            (rec(Some("k"), b"{\"a\":1}", &[("a", b"1")]), 2, false),
            // Binary payload, empty payload, a control character: base64 body.
            (rec(None, &[0, 159, 255], &[]), 1, true),
            (rec(None, b"", &[]), 1, true),
            (rec(None, b"a\x01b", &[]), 1, true),
            // A repeated name, an empty value, a name SQS refuses: packed, in order.
            (rec(None, b"p", &[("x", b"1"), ("x", b"2")]), 1, true),
            (rec(None, b"p", &[("e", b""), ("ok", b"1")]), 2, true),
            (rec(None, b"p", &[("a b", b"1"), ("AWS.x", b"2")]), 1, true),
            // Binary header values are binary attributes.
            (rec(None, b"p", &[("bin", &[0xff, 0])]), 1, false),
            // Ten headers fit without a key; with a key, eight stay and two are packed.
            (rec(None, b"p", &many_refs[..10]), 10, false),
            (rec(Some("k"), b"p", &many_refs[..10]), 10, true),
            (rec(Some("k"), b"p", &many_refs), 10, true),
        ];
        for (r, attrs, packed) in cases {
            let e = encode(&r);
            assert_eq!(e.attributes.len(), attrs, "{r:?}: {e:?}");
            assert_eq!(
                e.attributes.iter().any(|(n, _)| n == PACKED),
                packed,
                "{r:?}: {e:?}"
            );
            let back = round_trip(&r);
            assert_eq!(back.key, r.key);
            assert_eq!(back.payload, r.payload);
            let (mut a, mut b) = (back.headers.clone(), r.headers.clone());
            a.sort();
            b.sort();
            assert_eq!(a, b, "{r:?}");
        }
        // Repeated names keep their order.
        let r = rec(None, b"p", &[("x", b"1"), ("x", b"2"), ("x", b"3")]);
        assert_eq!(round_trip(&r).headers, r.headers);
    }

    #[test]
    fn a_dead_letter_keeps_the_users_attributes_and_fits_ten() {
        // A message with eight attributes of the user's, then weir's envelope.
        let mut headers: Vec<(String, Vec<u8>)> = (0..8)
            .map(|i| (format!("user-{i}"), b"u".to_vec()))
            .collect();
        for n in [
            "topic",
            "partition",
            "offset",
            "attempts",
            "error-kind",
            "error",
        ] {
            headers.push((format!("weir.dlq.{n}"), b"x".to_vec()));
        }
        let r = Record {
            key: Some(b"k".to_vec()),
            payload: b"poison".to_vec(),
            headers,
            timestamp_ms: None,
        };
        let e = encode(&r);
        assert_eq!(e.attributes.len(), 10);
        for i in 0..8 {
            assert!(
                e.attributes.iter().any(|(n, _)| *n == format!("user-{i}")),
                "user-{i} is an attribute of its own: {e:?}"
            );
        }
        let back = decode(&e.body, e.attributes, None);
        assert_eq!(back.headers.len(), 14);
    }

    #[test]
    fn size_and_other_producers() {
        let big = rec(None, &vec![b'a'; MAX_MESSAGE_BYTES], &[]);
        assert!(fits(&big, false).is_ok());
        let over = rec(None, &vec![b'a'; MAX_MESSAGE_BYTES], &[("h", b"1")]);
        assert!(fits(&over, false).unwrap_err().contains("SQS takes"));
        // Another producer's `weir` attribute that is not weir's packing stays a header.
        let r = decode("b", [(PACKED.to_string(), Attr::Text("hi".into()))], None);
        assert_eq!(r.headers, vec![("weir".to_string(), b"hi".to_vec())]);
        // Another producer's binary JSON under that name is not weir's packing either.
        let other = Attr::Bytes(br#"{"x":1}"#.to_vec());
        let r = decode("b", [(PACKED.to_string(), other)], None);
        assert_eq!(
            r.headers,
            vec![("weir".to_string(), br#"{"x":1}"#.to_vec())]
        );
        assert_eq!(r.payload, b"b");
    }
}
