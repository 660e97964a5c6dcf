//! `POST /topics/{topic}/request?timeout=5s`: request/reply over HTTP, so a synchronous API can
//! sit in front of asynchronous workers. The body is the request's payload; the request goes to
//! `topic` with `reply-to: <topic>.replies` and a fresh `correlation-id`, and the HTTP answer is
//! the handler's reply (200, `{"correlation_id", "payload", "headers"}`), its failure (502, the
//! host's error answer), or 504 after the timeout.
//!
//! On the embedded log the run's own log is read; on a broker, [`crate::source::request::call`]
//! does what `weir request` does, on a broker connection taken from [`Brokers`].

use super::{Admin, Answer};
use crate::host::reply::{CORRELATION_ID, ERROR, REPLY_TO};
use crate::source::broker::Broker;
use crate::source::connect::SourceSpec;
use crate::source::request::{Called, call, is_answer_to};
use crate::source::{Record, SourceError};
use serde_json::json;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Broker connections for requests, each used by one call at a time and kept for the next
/// (connecting costs more than a request).
pub struct Brokers {
    spec: SourceSpec,
    idle: Mutex<Vec<Box<dyn Broker>>>,
    /// Calls in flight at most: each holds a blocking thread of the run's I/O runtime (which
    /// its commits use too) and a broker connection for up to its timeout.
    calls: tokio::sync::Semaphore,
}

/// Broker calls in flight at most; past it, callers get 503 with Retry-After.
const MAX_CALLS: usize = 64;

/// Connections kept idle at most; more calls at once connect for themselves.
const MAX_IDLE: usize = 16;

impl Brokers {
    pub fn new(spec: SourceSpec) -> Brokers {
        Brokers {
            spec,
            idle: Mutex::new(Vec::new()),
            calls: tokio::sync::Semaphore::new(MAX_CALLS),
        }
    }

    /// One call on a kept connection (or a new one); the connection is kept after unless the
    /// call failed (it may be the connection that failed).
    fn call(
        &self,
        topic: &str,
        request: Record,
        timeout: Duration,
    ) -> Result<(String, Called), SourceError> {
        let kept = self.idle.lock().expect("brokers lock").pop();
        let mut b = match kept {
            Some(b) => b,
            None => self.spec.broker()?,
        };
        let called = call(b.as_mut(), topic, request, None, timeout)?;
        let mut idle = self.idle.lock().expect("brokers lock");
        if idle.len() < MAX_IDLE {
            idle.push(b);
        }
        Ok(called)
    }
}

/// The longest wait a caller may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) async fn request(
    admin: &Admin,
    topic: String,
    timeout: Option<String>,
    body: &[u8],
) -> Answer {
    let timeout = match timeout
        .as_deref()
        .map(|t| weir_core::config::parse_duration("timeout", t))
    {
        None => Duration::from_secs(5),
        Some(Ok(t)) if t <= MAX_TIMEOUT && !t.is_zero() => t,
        Some(Ok(_)) => return Answer::error(400, "timeout: from 1ms to 60s"),
        Some(Err(e)) => return Answer::error(400, e.0),
    };
    let Some(log) = admin.log.clone() else {
        let Some(brokers) = admin.brokers.clone() else {
            return Answer::error(404, "request/reply is not served by this run");
        };
        let request = Record {
            key: None,
            payload: body.to_vec(),
            headers: Vec::new(),
            timestamp_ms: None,
        };
        let Ok(permit) = brokers.calls.try_acquire() else {
            return Answer::error(
                503,
                format!("{MAX_CALLS} requests are waiting for answers already; try again"),
            )
            .retry_after(1);
        };
        let to = topic.clone();
        let b = brokers.clone();
        let called = tokio::task::spawn_blocking(move || b.call(&to, request, timeout)).await;
        drop(permit);
        return match called {
            Ok(Ok((id, Called::Answered(r)))) => answered(&id, &r),
            Ok(Ok((id, Called::TimedOut { .. }))) => timed_out(timeout, &id, &topic),
            Ok(Err(e)) if e.is_bad_input() => Answer::error(400, e),
            Ok(Err(e)) => Answer::error(503, e),
            Err(e) => Answer::error(503, e),
        };
    };
    let reply_to = format!("{topic}.replies");
    let id = hex::encode(rand::random::<[u8; 16]>());
    let request = Record {
        key: None,
        payload: body.to_vec(),
        headers: vec![
            (REPLY_TO.to_string(), reply_to.clone().into_bytes()),
            (CORRELATION_ID.to_string(), id.clone().into_bytes()),
        ],
        timestamp_ms: None,
    };
    // Where the reply topic ends now: the answer comes after.
    let sent = {
        let (log, topic, reply_to) = (log.clone(), topic.clone(), reply_to.clone());
        tokio::task::spawn_blocking(move || {
            if !log.topic_names().contains(&topic) {
                return Err(SourceError::UnknownTopic(topic));
            }
            log.ensure_topic(&reply_to, 1)?;
            let from: Vec<(u32, u64)> = log.stats(Some(&reply_to))?[0]
                .partitions
                .iter()
                .map(|p| (p.partition, p.end_offset))
                .collect();
            log.append(&topic, vec![request])?;
            Ok(from)
        })
        .await
    };
    let mut from = match sent {
        Ok(Ok(from)) => from,
        Ok(Err(e)) if e.is_bad_input() => return Answer::error(400, e),
        Ok(Err(e)) => return Answer::error(503, e),
        Err(e) => return Answer::error(503, e),
    };
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    while started.elapsed() < timeout {
        for (partition, at) in from.iter_mut() {
            let got = match log.read(&reply_to, *partition, *at, 1000) {
                Ok(g) => g,
                Err(e) => return Answer::error(503, e),
            };
            if let Some(last) = got.last() {
                *at = last.offset + 1;
            }
            let mine = got.into_iter().find(|d| is_answer_to(&d.record, &id));
            if let Some(d) = mine {
                return answered(&id, &d.record);
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    timed_out(timeout, &id, &topic)
}

fn timed_out(timeout: Duration, id: &str, topic: &str) -> Answer {
    Answer::error(
        504,
        format!(
            "no answer within {timeout:?} (request {id} on {topic}; is a handler that replies consuming it?)"
        ),
    )
}

fn answered(id: &str, r: &Record) -> Answer {
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    if let Some((_, e)) = r.headers.iter().rev().find(|(n, _)| n == ERROR) {
        return Answer::json(
            502,
            json!({ "error": format!("the handler failed on the request: {}", text(e)), "correlation_id": id }),
        );
    }
    let headers: serde_json::Map<String, serde_json::Value> = r
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), json!(text(v))))
        .collect();
    Answer::json(
        200,
        json!({ "correlation_id": id, "payload": text(&r.payload), "headers": headers }),
    )
}
