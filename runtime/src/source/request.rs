//! A request and its answer through any broker: what `weir request` and the admin server's
//! `POST /topics/T/request` share.
//!
//! The request carries a fresh `correlation-id` and a `reply-to` topic (`<TOPIC>.replies` unless
//! the caller names one; created when missing); a handler answers with `weir:stream/reply` and
//! the host publishes the answer there once the request succeeds. The caller reads the reply
//! topic from where it ended before the request was sent until the answer with its id comes, or
//! the timeout passes. A broker with its own reply routing (RabbitMQ: an exclusive queue per
//! caller; SQS: a queue per call) answers through [`Broker::request_reply`] instead.

use super::broker::Broker;
use super::{Record, SourceError};
use crate::host::reply::{CORRELATION_ID, REPLY_TO};
use std::time::{Duration, Instant};

/// How a call ended.
#[derive(Debug)]
pub enum Called {
    /// The answer (the host's error answer carries a `weir.error` header).
    Answered(Record),
    /// No answer within the timeout; `reply_to` is where it was awaited.
    TimedOut { reply_to: String },
}

/// Sends `request` (its key, payload and headers; a `correlation-id` and `reply-to` are added)
/// to `topic` and waits up to `timeout` for its answer. Returns the correlation id and the
/// outcome. The topic must exist.
pub fn call(
    b: &mut dyn Broker,
    topic: &str,
    mut request: Record,
    reply_to: Option<&str>,
    timeout: Duration,
) -> Result<(String, Called), SourceError> {
    if !b.has_topic(topic)? {
        return Err(SourceError::UnknownTopic(topic.to_string()));
    }
    if reply_to.is_some() && b.name() == "SQS" {
        return Err(SourceError::Invalid(
            "--reply-to on SQS: a queue hands each message to one reader, so a reply queue \
             cannot be shared or read without taking it; leave --reply-to out (each call gets \
             a queue of its own)"
                .into(),
        ));
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    request
        .headers
        .retain(|(n, _)| n != CORRELATION_ID && n != REPLY_TO);
    request
        .headers
        .push((CORRELATION_ID.to_string(), id.clone().into_bytes()));
    let sent = Instant::now();
    if reply_to.is_none()
        && let Some(answer) = b.request_reply(topic, request.clone(), timeout)
    {
        let called = match answer? {
            Some(a) => Called::Answered(a),
            None => Called::TimedOut {
                reply_to: "its reply queue".into(),
            },
        };
        return Ok((id, called));
    }
    let reply_to = reply_to
        .map(String::from)
        .unwrap_or_else(|| format!("{topic}.replies"));
    if !b.has_topic(&reply_to)? {
        match b.create_topic(&reply_to, 1, None) {
            Ok(()) | Err(SourceError::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
        // A broker may list a new topic a moment after it answers the create (Kafka's
        // metadata): wait for it, within the call's time.
        let mut pause = Duration::from_millis(5);
        while !b.has_topic(&reply_to)? {
            if sent.elapsed() >= timeout {
                return Ok((id, Called::TimedOut { reply_to }));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
    // Where the reply topic ends now: the answer comes after.
    let mut from: Vec<(u32, u64)> = b.ends(&reply_to)?;
    request
        .headers
        .push((REPLY_TO.to_string(), reply_to.clone().into_bytes()));
    b.append(topic, vec![request])?;
    tracing::trace!(took = ?sent.elapsed(), "request sent");
    let mut pause = Duration::from_millis(1);
    while sent.elapsed() < timeout {
        let ends = b.ends(&reply_to)?;
        tracing::trace!(took = ?sent.elapsed(), ?ends, "reply topic's ends");
        for (partition, end) in ends {
            let Some(at) = from.iter_mut().find(|(p, _)| *p == partition) else {
                // A partition added since: read it from its start.
                from.push((partition, 0));
                continue;
            };
            while at.1 < end {
                let got = b.read(&reply_to, partition, at.1, end, 1000)?;
                tracing::trace!(took = ?sent.elapsed(), n = got.len(), "read the reply topic");
                let Some(last) = got.last() else { break };
                at.1 = last.offset + 1;
                if let Some(a) = got.into_iter().find(|d| is_answer_to(&d.record, &id)) {
                    return Ok((id, Called::Answered(a.record)));
                }
            }
        }
        std::thread::sleep(pause.min(timeout.saturating_sub(sent.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    Ok((id, Called::TimedOut { reply_to }))
}

/// Whether `r` carries correlation id `id`.
pub fn is_answer_to(r: &Record, id: &str) -> bool {
    r.headers
        .iter()
        .any(|(n, v)| n == CORRELATION_ID && v == id.as_bytes())
}
