//! `weir:stream/reply`: a handler answers the message it is handling (request/reply).
//!
//! A request says where its answer goes in two headers: `reply-to` (a topic) and
//! `correlation-id` (RabbitMQ's `reply_to` and `correlation_id` properties arrive as them). The
//! answer is one more output of the message, to the reply-to topic with the request's
//! `correlation-id` header (and the id as its key, so one request's answers share a
//! partition): it is published only if the message succeeds, and once, like every output.

use super::State;
use super::bindings::weir::r#stream::{reply, types};
use crate::source::{Output, Record};

/// The header that names where a request's answer goes.
pub const REPLY_TO: &str = "reply-to";
/// The header that ties an answer to its request.
pub const CORRELATION_ID: &str = "correlation-id";

/// Where the message being handled wants its answer.
#[derive(Debug, Clone, Default)]
pub(super) struct Target {
    pub reply_to: Option<String>,
    pub correlation_id: Option<Vec<u8>>,
    /// Set once the handler answered: a second answer is refused.
    pub answered: bool,
    /// A batch call: no single message to answer.
    pub batch: bool,
}

impl Target {
    /// The reply target of a message with `headers` (the last of each header wins).
    pub(super) fn of(headers: &[(String, Vec<u8>)], batch: bool) -> Target {
        let last = |name: &str| {
            headers
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        Target {
            reply_to: last(REPLY_TO)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .filter(|t| !t.is_empty()),
            correlation_id: last(CORRELATION_ID),
            answered: false,
            batch,
        }
    }

    /// The answer as an output, or why there is none.
    fn answer(&mut self, payload: Vec<u8>, mut headers: types::Headers) -> Result<Output, String> {
        if self.batch {
            return Err(
                "reply in a batch call: answer each message with emit to its reply-to \
                        topic, copying its correlation-id header"
                    .into(),
            );
        }
        let Some(topic) = self.reply_to.clone() else {
            return Err("this message asked for no reply (it has no reply-to)".into());
        };
        if self.answered {
            return Err("this message was answered already".into());
        }
        headers.retain(|(n, _)| n != CORRELATION_ID);
        if let Some(id) = &self.correlation_id {
            headers.push((CORRELATION_ID.to_string(), id.clone()));
        }
        Ok(Output {
            topic,
            record: Record {
                key: self.correlation_id.clone(),
                payload,
                headers,
                timestamp_ms: None,
            },
        })
    }
}

/// The header an error answer carries: the failure's kind and text (`rejected: ...`).
pub const ERROR: &str = "weir.error";

/// The answer to a request (`headers` with a `reply-to`) that failed for good: an empty payload
/// with [`ERROR`], to the reply-to topic with the request's `correlation-id`. `None` for a
/// message that asked for no answer.
pub fn error_answer(headers: &[(String, Vec<u8>)], kind: &str, error: &str) -> Option<Output> {
    let mut t = Target::of(headers, false);
    let text = format!("{kind}: {}", crate::source::clip(error, 1024));
    t.answer(Vec::new(), vec![(ERROR.to_string(), text.into_bytes())])
        .ok()
}

impl reply::Host for State {
    fn send(&mut self, payload: Vec<u8>, headers: types::Headers) -> Result<(), String> {
        let out = self.reply.answer(payload, headers)?;
        // A reply topic that is gone (a caller's queue, deleted when it stopped waiting) costs
        // the answer, not the message: it is dropped, and the message succeeds.
        if let Err(e) = (self.shared.check_output)(&out.topic, &out.record)
            && e.contains(crate::source::NO_SUCH_TOPIC)
        {
            tracing::warn!(topic = %crate::source::clip(&out.topic, 200), "the request's reply-to topic does not exist (a caller that stopped waiting?): answer dropped");
            self.reply.answered = true;
            return Ok(());
        }
        // Checked and counted as every output is (a refused answer fails the message if the
        // handler returns ok regardless).
        self.push_output(out)?;
        self.reply.answered = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn answers_go_where_the_request_said_once() {
        let mut t = Target::of(
            &h(&[("reply-to", "answers"), ("correlation-id", "c-1")]),
            false,
        );
        let o = t
            .answer(
                b"42".to_vec(),
                h(&[("correlation-id", "forged"), ("x", "y")]),
            )
            .unwrap();
        assert_eq!(o.topic, "answers");
        assert_eq!(o.record.key.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(
            o.record.headers,
            h(&[("x", "y"), ("correlation-id", "c-1")])
        );
        type Case = (Vec<(String, Vec<u8>)>, bool, &'static str);
        let cases: [Case; 3] = [
            (h(&[("correlation-id", "c")]), false, "asked for no reply"),
            (h(&[("reply-to", "")]), false, "asked for no reply"),
            (h(&[("reply-to", "a")]), true, "batch call"),
        ];
        for (headers, batch, want) in cases {
            let e = Target::of(&headers, batch)
                .answer(Vec::new(), Vec::new())
                .unwrap_err();
            assert!(e.contains(want), "{headers:?}: {e}");
        }
    }
}
