//! `poison`: a test handler that rejects every message containing `poison` (it can never
//! succeed), fails a message containing `flaky` with `retry` on its first attempt, and copies
//! the others.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "consumer",
});

use exports::weir::stream::handler::Guest;
use weir::stream::types::{Failure, Message, RetryRequest};
use weir::stream::{config, emit};

struct Handler;

fn contains(msg: &Message, word: &str) -> bool {
    msg.payload
        .windows(word.len())
        .any(|w| w == word.as_bytes())
}

/// Good messages are copied to the output topic (config `output-topic`, default `out`). With
/// config `ignore-emit-errors=true` it returns `ok` even when the copy was refused (to test
/// that the host does not lose such an output silently).
fn pass(msg: &Message) -> Result<(), Failure> {
    let topic = config::get("output-topic").unwrap_or_else(|| "out".into());
    let sent = emit::send(&topic, msg.key.as_deref(), &msg.payload, &msg.headers);
    if config::get("ignore-emit-errors").as_deref() == Some("true") {
        return Ok(());
    }
    sent.map_err(|e| {
        Failure::Retry(RetryRequest {
            reason: e,
            delay_ms: None,
        })
    })
}

impl Guest for Handler {
    fn handle(msg: Message) -> Result<(), Failure> {
        if contains(&msg, "poison") {
            return Err(Failure::Reject(format!(
                "poison message at offset {}",
                msg.offset
            )));
        }
        if contains(&msg, "flaky") && msg.attempt == 1 {
            return Err(Failure::Retry(RetryRequest {
                reason: "first attempt of a flaky message".into(),
                delay_ms: None,
            }));
        }
        pass(&msg)
    }
}

export!(Handler);
