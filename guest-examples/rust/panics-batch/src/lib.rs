//! `panics-batch`: `panics` through the batch entry point. A whole `handle-batch` call traps
//! when any message in it contains `panic`, so the host cannot tell the culprit from the call
//! alone; used to test that the host isolates it and charges only that message.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "batch-consumer",
});

use exports::weir::stream::batch_handler::Guest;
use weir::stream::emit;
use weir::stream::types::{Failure, Message, RetryRequest};

struct PanicsBatch;

impl Guest for PanicsBatch {
    fn handle_batch(msgs: Vec<Message>) -> Vec<Result<(), Failure>> {
        let topic = weir::stream::config::get("output-topic").unwrap_or_else(|| "out".into());
        msgs.iter()
            .map(|msg| {
                if msg.payload.windows(5).any(|w| w == b"panic") {
                    panic!("asked to panic at offset {}", msg.offset);
                }
                emit::send(&topic, msg.key.as_deref(), &msg.payload, &msg.headers).map_err(|e| {
                    Failure::Retry(RetryRequest {
                        reason: e,
                        delay_ms: None,
                    })
                })
            })
            .collect()
    }
}

export!(PanicsBatch);
