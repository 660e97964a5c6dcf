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
//! on RabbitMQ through an exclusive reply queue, on SQS through a queue per call
//! (`Broker::request_reply`).

use super::{Globals, bad_input, shown};
use crate::host::reply::ERROR;
use crate::source::Record;
use crate::source::request::{self, Called};
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
        if b.holds_data_dir() {
            // Waiting here would hold the directory and keep any `weir run` out of it.
            return Err(bad_input(format!(
                "weir request {}: no `weir run` serves the data directory, so nothing would \
                 answer; start one with a handler that replies (weir run --module ... --topic {})",
                self.topic, self.topic
            )));
        }
        let mut headers = Vec::new();
        for h in &self.headers {
            let (k, v) = crate::config::parse_pair("--header", h).map_err(|e| bad_input(e.0))?;
            headers.push((k, v.into_bytes()));
        }
        let request = Record {
            key: self.key.as_ref().map(|k| k.as_bytes().to_vec()),
            payload: self.payload.clone().into_bytes(),
            headers,
            timestamp_ms: None,
        };
        let sent = Instant::now();
        let (id, called) = request::call(
            b.as_mut(),
            &self.topic,
            request,
            self.reply_to.as_deref(),
            timeout,
        )?;
        Ok(match called {
            Called::Answered(a) => answered(&a, sent.elapsed()),
            Called::TimedOut { reply_to } => timed_out(&id, &self.topic, timeout, &reply_to),
        })
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
