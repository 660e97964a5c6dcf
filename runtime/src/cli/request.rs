//! `weir request TOPIC PAYLOAD`: sends a request and prints its answer (request/reply).
//!
//! The request carries `reply-to` (a topic, `<TOPIC>.replies` unless `--reply-to` names one;
//! created when missing) and a fresh `correlation-id`; a handler answers it with
//! `weir:stream/reply` and the host publishes the answer there once the request succeeds. This
//! command reads the reply topic from where it ended before the request was sent until the
//! answer with its id comes, or the timeout passes.
//!
//! Exit codes: 0 and the answer's payload on standard output; 1 when the handler failed for good
//! (the host's error answer, printed on standard error); 124 on timeout (as `timeout(1)`);
//! 2 for bad input. On logs (embedded, Kafka, Redis Streams, JetStream) through a reply topic;
//! on RabbitMQ through an exclusive reply queue (`Broker::request_reply`); SQS not yet.

use super::{Globals, bad_input, shown};
use crate::host::reply::{CORRELATION_ID, ERROR, REPLY_TO};
use crate::source::{Record, SourceError};
use clap::Args;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit code when no answer came in time.
const TIMED_OUT: u8 = 124;

#[derive(Debug, Args)]
pub struct RequestCommand {
    /// Topic a handler that answers consumes
    topic: String,
    /// The request's payload
    payload: String,
    /// How long to wait for the answer
    #[arg(long, default_value = "5s")]
    timeout: String,
    /// Topic the answer is sent to [default: TOPIC.replies, created when missing]
    #[arg(long)]
    reply_to: Option<String>,
    /// Key of the request [default: none]
    #[arg(long)]
    key: Option<String>,
    /// Header NAME=VALUE on the request; repeat for more [default: none]
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
}

impl RequestCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let timeout = weir_core::config::parse_duration("--timeout", &self.timeout)
            .map_err(|e| bad_input(e.0))?;
        let mut b = g.source.broker()?;
        if b.name() == "SQS" {
            return Err(bad_input(
                "weir request on SQS: not built yet (request/reply runs on the embedded log, \
                 Kafka, RabbitMQ, Redis Streams and JetStream; see docs/patterns.md)",
            ));
        }
        if b.holds_data_dir() {
            // Waiting here would hold the directory and keep any `weir run` out of it.
            return Err(bad_input(format!(
                "weir request {}: no `weir run` serves the data directory, so nothing would \
                 answer; start one with a handler that replies (weir run --module ... --topic {})",
                self.topic, self.topic
            )));
        }
        if !b.has_topic(&self.topic)? {
            return Err(SourceError::UnknownTopic(self.topic.clone()).into());
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let mut headers = Vec::new();
        for h in &self.headers {
            let (k, v) = crate::config::parse_pair("--header", h).map_err(|e| bad_input(e.0))?;
            headers.push((k, v.into_bytes()));
        }
        headers.push((CORRELATION_ID.to_string(), id.clone().into_bytes()));
        let mut request = Record {
            key: self.key.as_ref().map(|k| k.as_bytes().to_vec()),
            payload: self.payload.clone().into_bytes(),
            headers,
            timestamp_ms: None,
        };
        let sent = Instant::now();
        // A broker with its own reply routing (RabbitMQ: an exclusive queue per caller).
        if self.reply_to.is_none()
            && let Some(answer) = b.request_reply(&self.topic, request.clone(), timeout)
        {
            return match answer? {
                Some(a) => Ok(answered(&a, sent.elapsed())),
                None => Ok(timed_out(&id, &self.topic, timeout, "its reply queue")),
            };
        }
        let reply_to = self
            .reply_to
            .clone()
            .unwrap_or_else(|| format!("{}.replies", self.topic));
        if !b.has_topic(&reply_to)? {
            match b.create_topic(&reply_to, 1, None) {
                Ok(()) | Err(SourceError::TopicExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut from: Vec<(u32, u64)> = b.ends(&reply_to)?;
        request
            .headers
            .push((REPLY_TO.to_string(), reply_to.clone().into_bytes()));
        b.append(&self.topic, vec![request])?;
        let mut pause = Duration::from_millis(2);
        while sent.elapsed() < timeout {
            let ends = b.ends(&reply_to)?;
            for (partition, end) in ends {
                let Some(at) = from.iter_mut().find(|(p, _)| *p == partition) else {
                    from.push((partition, 0));
                    continue;
                };
                while at.1 < end {
                    let got = b.read(&reply_to, partition, at.1, end, 1000)?;
                    let Some(last) = got.last() else { break };
                    at.1 = last.offset + 1;
                    let answer = got.into_iter().find(|d| {
                        d.record
                            .headers
                            .iter()
                            .any(|(n, v)| n == CORRELATION_ID && v == id.as_bytes())
                    });
                    if let Some(a) = answer {
                        return Ok(answered(&a.record, sent.elapsed()));
                    }
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        Ok(timed_out(&id, &self.topic, timeout, &reply_to))
    }
}

/// Says no answer came, and exits with [`TIMED_OUT`].
fn timed_out(id: &str, topic: &str, timeout: Duration, reply_to: &str) -> ExitCode {
    eprintln!(
        "error: no answer to request {id} on {topic} within {timeout:?} (the answer goes to \
         {reply_to}): is a `weir run` with a handler that replies consuming {topic}?"
    );
    ExitCode::from(TIMED_OUT)
}

/// Prints an answer: its payload on standard output, or the host's error answer on standard
/// error with exit code 1.
fn answered(r: &Record, took: Duration) -> ExitCode {
    tracing::debug!(took = ?took, "answered");
    if let Some((_, e)) = r.headers.iter().rev().find(|(n, _)| n == ERROR) {
        eprintln!("error: the handler failed on the request: {}", shown(e));
        return ExitCode::from(1);
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&r.payload);
    let _ = out.write_all(b"\n");
    ExitCode::SUCCESS
}
