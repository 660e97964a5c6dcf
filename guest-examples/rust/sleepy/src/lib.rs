//! `sleepy`: waits on I/O for each message (5 ms through WASI's monotonic clock, or the number of
//! milliseconds in the `wait-ms` setting), then emits the message unchanged to `out` (or the
//! topic in the `output-topic` setting; with `stamp=true` each output carries `handled-at` (µs),
//! `appended-at-ms` (its input's) and `from-topic` headers). It stands
//! for a handler that calls a slow downstream: it holds an instance without using a CPU, which
//! is what running more instances helps with.

use std::time::Duration;
use weir_guest::{Failure, Message, Outcome};

fn handle(msg: Message) -> Outcome {
    let wait = weir_guest::config("wait-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    std::thread::sleep(Duration::from_millis(wait));
    let topic = weir_guest::config("output-topic").unwrap_or_else(|| "out".into());
    // `stamp=true`: the output says when it was handled (wall clock, microseconds) and what
    // topic its input came from, for tests of the order things are served in.
    let (at, appended);
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    if weir_guest::config("stamp").as_deref() == Some("true") {
        at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
            .to_string();
        headers.push(("handled-at", at.as_bytes()));
        headers.push(("from-topic", msg.topic.as_bytes()));
        appended = msg.timestamp_ms.unwrap_or(0).to_string();
        headers.push(("appended-at-ms", appended.as_bytes()));
    }
    weir_guest::emit(&topic, msg.key.as_deref(), &msg.payload, &headers).map_err(Failure::retry)
}

weir_guest::export_handler!(handle);
