//! `flaky`: a test handler whose messages containing `flaky` fail with `retry` on their first
//! N attempts (config `fail-attempts`, default 2) and succeed after, reading `attempt`. With
//! config `delay-ms` set, it asks for that delay instead of the host's backoff.

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

/// Good messages are copied to the output topic (config `output-topic`, default `out`), with
/// two headers more: `seen-offset` and `seen-attempt`, the offset and attempt the handler was
/// given (for a retry copy, the origin's, which only weir's retry headers can tell it).
fn pass(msg: &Message) -> Result<(), Failure> {
    let topic = config::get("output-topic").unwrap_or_else(|| "out".into());
    let mut headers = msg.headers.clone();
    headers.push(("seen-offset".into(), msg.offset.to_string().into_bytes()));
    headers.push(("seen-attempt".into(), msg.attempt.to_string().into_bytes()));
    emit::send(&topic, msg.key.as_deref(), &msg.payload, &headers).map_err(|e| {
        Failure::Retry(RetryRequest {
            reason: e,
            delay_ms: None,
        })
    })
}

impl Guest for Handler {
    fn handle(msg: Message) -> Result<(), Failure> {
        let failures: u32 = config::get("fail-attempts")
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        if contains(&msg, "flaky") && msg.attempt <= failures {
            let delay_ms = config::get("delay-ms").and_then(|v| v.parse().ok());
            return Err(Failure::Retry(RetryRequest {
                reason: format!("attempt {} of a flaky message", msg.attempt),
                delay_ms,
            }));
        }
        pass(&msg)
    }
}

export!(Handler);
