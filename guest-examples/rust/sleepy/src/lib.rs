//! `sleepy`: waits on I/O for each message (5 ms through WASI's monotonic clock, or the number of
//! milliseconds in the `wait-ms` setting), then emits the message unchanged to `out` (or the
//! topic in the `output-topic` setting). It stands
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
    weir_guest::emit(&topic, msg.key.as_deref(), &msg.payload, &[]).map_err(Failure::retry)
}

weir_guest::export_handler!(handle);
