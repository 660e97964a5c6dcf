//! `orders`: the example handler of weir's README, written with the `weir-guest` SDK.
//!
//! Reads an order as JSON, emits a confirmation to the output topic (config key `output-topic`,
//! default `confirmations`), asks for a retry while a transient condition holds, and rejects
//! what can never succeed.
//!
//! Input:  `{"id": "o-1", "customer": "ada", "amount_cents": 1250}`
//! Output: `{"order_id": "o-1", "customer": "ada", "amount_cents": 1250, "status": "confirmed"}`
//!
//! An order with `"transient": true` fails with `retry` on its first attempt (a stand-in for a
//! downstream that is briefly unavailable) and succeeds on the next. An order with
//! `"trap": true` panics, which the host sees as a trap (to show what it does then). The same
//! handler exists in Python, JavaScript and C under `guest-examples/`. Confirmations also carry
//! a `handler-version` header naming the build (`orders`, or `orders-v2`: the same source built
//! as a second crate, for the hot-reload test).

use std::time::Duration;
use weir_guest::{Failure, Message, Outcome};

#[derive(serde::Deserialize)]
struct Order {
    id: String,
    customer: String,
    amount_cents: u64,
    #[serde(default)]
    transient: bool,
    #[serde(default)]
    trap: bool,
}

#[derive(serde::Serialize)]
struct Confirmation<'a> {
    order_id: &'a str,
    customer: &'a str,
    amount_cents: u64,
    status: &'static str,
}

/// Which build confirmed an order: `orders`, or `orders-v2` (the same source built as another
/// crate, which the hot-reload test swaps in).
const VERSION: &str = env!("CARGO_PKG_NAME");

fn handle(msg: Message) -> Outcome {
    let order: Order = serde_json::from_slice(&msg.payload)
        .map_err(|e| Failure::reject(format!("not a valid order: {e}")))?;
    if order.amount_cents == 0 {
        return Err(Failure::reject(format!("order {} has no amount", order.id)));
    }
    if order.trap {
        panic!("asked to trap at offset {}", msg.offset);
    }
    if order.transient && msg.attempt < 2 {
        return Err(Failure::retry_after(
            format!("payment service busy for order {}", order.id),
            Duration::from_millis(10),
        ));
    }
    let confirmation = Confirmation {
        order_id: &order.id,
        customer: &order.customer,
        amount_cents: order.amount_cents,
        status: "confirmed",
    };
    let payload = serde_json::to_vec(&confirmation).expect("a struct of strings serialises");
    let topic = weir_guest::config("output-topic").unwrap_or_else(|| "confirmations".to_string());
    let offset = msg.offset.to_string();
    weir_guest::emit(
        &topic,
        Some(order.id.as_bytes()),
        &payload,
        &[
            ("source-offset", offset.as_bytes()),
            ("handler-version", VERSION.as_bytes()),
        ],
    )
    .map_err(Failure::retry)?;
    // A request (`weir request`, a `reply-to` header) gets the confirmation as its answer.
    if msg.headers.iter().any(|(n, _)| n == "reply-to") {
        weir_guest::reply(&payload, &[]).map_err(Failure::reject)?;
    }
    weir_guest::debug!("confirmed order {}", order.id);
    Ok(())
}

weir_guest::export_handler!(handle);

#[cfg(test)]
mod tests {
    //! Plain `cargo test` (on the machine's own target): the SDK's stub stands in for weir.
    use super::handle;
    use weir_guest::testing::{self, Emitted};
    use weir_guest::{Failure, Message};

    #[test]
    fn a_valid_order_is_confirmed_once() {
        let run = testing::run(
            handle,
            Message::new(r#"{"id":"o-1","customer":"ada","amount_cents":1250}"#),
        );
        assert_eq!(run.outcome, Ok(()));
        assert_eq!(
            run.emitted,
            vec![Emitted {
                topic: "confirmations".into(),
                key: Some(b"o-1".to_vec()),
                payload: br#"{"order_id":"o-1","customer":"ada","amount_cents":1250,"status":"confirmed"}"#.to_vec(),
                headers: vec![
                    ("source-offset".into(), b"0".to_vec()),
                    ("handler-version".into(), super::VERSION.as_bytes().to_vec()),
                ],
            }]
        );
    }

    #[test]
    fn the_output_topic_comes_from_config() {
        testing::set_config("output-topic", "receipts");
        let run = testing::run(
            handle,
            Message::new(r#"{"id":"o-2","customer":"bo","amount_cents":5}"#),
        );
        assert_eq!(run.emitted[0].topic, "receipts");
    }

    #[test]
    fn transient_orders_retry_once_then_succeed() {
        let order = r#"{"id":"o-3","customer":"cy","amount_cents":7,"transient":true}"#;
        let first = testing::run(handle, Message::new(order));
        assert!(
            matches!(first.outcome, Err(Failure::Retry { .. })),
            "{first:?}"
        );
        assert!(first.emitted.is_empty());
        let second = testing::run(handle, Message::new(order).with_attempt(2));
        assert_eq!(second.outcome, Ok(()));
        assert_eq!(second.emitted.len(), 1);
    }

    #[test]
    fn invalid_orders_are_rejected() {
        for bad in [
            "not json",
            r#"{"id":"o-4","customer":"di","amount_cents":0}"#,
        ] {
            let run = testing::run(handle, Message::new(bad));
            assert!(
                matches!(run.outcome, Err(Failure::Reject(_))),
                "{bad}: {run:?}"
            );
        }
    }

    #[test]
    fn an_unknown_topic_is_retried() {
        testing::known_topics(&["elsewhere"]);
        let run = testing::run(
            handle,
            Message::new(r#"{"id":"o-5","customer":"ed","amount_cents":1}"#),
        );
        assert!(matches!(run.outcome, Err(Failure::Retry { .. })), "{run:?}");
    }
}
