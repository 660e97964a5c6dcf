//! `noop`: acknowledges every message and does nothing else. It measures the host's own cost
//! (fetch, dispatch, the call into the component, commit). It exports the batch entry point.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "batch-consumer",
});

use exports::weir::stream::batch_handler::Guest;
use weir::stream::types::{Failure, Message};

struct Noop;

impl Guest for Noop {
    fn handle_batch(msgs: Vec<Message>) -> Vec<Result<(), Failure>> {
        msgs.iter().map(|_| Ok(())).collect()
    }
}

export!(Noop);
