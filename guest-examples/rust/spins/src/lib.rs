//! `spins`: a test handler that loops forever on a message containing `spin` (the host must
//! stop it at its deadline) and copies the others.

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

/// Good messages are copied to the output topic (config `output-topic`, default `out`).
fn pass(msg: &Message) -> Result<(), Failure> {
    let topic = config::get("output-topic").unwrap_or_else(|| "out".into());
    emit::send(&topic, msg.key.as_deref(), &msg.payload, &msg.headers).map_err(|e| {
        Failure::Retry(RetryRequest {
            reason: e,
            delay_ms: None,
        })
    })
}

impl Guest for Handler {
    fn handle(msg: Message) -> Result<(), Failure> {
        if contains(&msg, "spin") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        pass(&msg)
    }
}

export!(Handler);
