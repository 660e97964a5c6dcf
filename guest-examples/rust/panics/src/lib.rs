//! `panics`: a test handler that traps (a Rust panic aborts to `unreachable`) on any message
//! whose payload contains the word `panic`, and emits a copy of every other message to the
//! topic named by config key `output-topic` (default `out`). Used to show that a trapping guest
//! never takes the host down.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "consumer",
});

use exports::weir::stream::handler::Guest;
use weir::stream::emit;
use weir::stream::types::{Failure, Message, RetryRequest};

struct Panics;

impl Guest for Panics {
    fn handle(msg: Message) -> Result<(), Failure> {
        if msg.payload.windows(5).any(|w| w == b"panic") {
            panic!("asked to panic at offset {}", msg.offset);
        }
        let topic = weir::stream::config::get("output-topic").unwrap_or_else(|| "out".into());
        emit::send(&topic, msg.key.as_deref(), &msg.payload, &msg.headers).map_err(|e| {
            Failure::Retry(RetryRequest {
                reason: e,
                delay_ms: None,
            })
        })
    }
}

export!(Panics);
