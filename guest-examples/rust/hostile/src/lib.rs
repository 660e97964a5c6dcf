//! `hostile`: a test handler that emits what a careless or hostile guest could, to show that one
//! message only ever costs its own outcome. The payload is a command, `WHAT N`:
//!
//! - `header-name N` / `header-name-multibyte N`: an output with a header name of N bytes
//!   (ASCII `h`, or `é`, two bytes each, so a cut at a byte count lands inside a character);
//! - `header-value N`, `headers N` (N one-byte headers), `key N`, `payload N`: an output with a
//!   header value, a header count, a key or a payload of that size;
//! - `reject N`: a rejection whose reason is N bytes long;
//! - `sleep N`: waits N ms (WASI's clock: an instance busy without a CPU), then copies it;
//! - anything else: copied to the output topic as it is.
//!
//! Every output goes to the output topic (config `output-topic`, default `out`). The handler
//! ignores an `emit` refusal and returns `ok`, as a careless handler would: the host must still
//! fail the message (`invalid-output`) rather than lose the output or stop the run.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "consumer",
});

use exports::weir::stream::handler::Guest;
use weir::stream::types::{Failure, Message};
use weir::stream::{config, emit};

struct Handler;

impl Guest for Handler {
    fn handle(msg: Message) -> Result<(), Failure> {
        let topic = config::get("output-topic").unwrap_or_else(|| "out".into());
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        let mut words = text.split_whitespace();
        let what = words.next().unwrap_or("");
        let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut key = msg.key.clone();
        let mut payload = msg.payload.clone();
        let mut headers = msg.headers.clone();
        match what {
            "header-name" => headers.push(("h".repeat(n), b"v".to_vec())),
            // One byte, then two-byte characters: byte 16 falls inside a character (the old
            // error message's `&name[..16]` panicked there).
            "header-name-multibyte" => {
                headers.push((format!("a{}", "é".repeat(n / 2)), b"v".to_vec()))
            }
            "header-value" => headers.push(("big".into(), vec![b'v'; n])),
            "headers" => headers.extend((0..n).map(|i| (format!("h{i}"), vec![b'v']))),
            "key" => key = Some(vec![b'k'; n]),
            "payload" => payload = vec![b'p'; n],
            "reject" => return Err(Failure::Reject("r".repeat(n))),
            "sleep" => std::thread::sleep(std::time::Duration::from_millis(n as u64)),
            _ => {}
        }
        let _ = emit::send(&topic, key.as_deref(), &payload, &headers);
        Ok(())
    }
}

export!(Handler);
