//! `orders`: the example handler of weir's README.
//!
//! Reads an order as JSON, emits a confirmation to the output topic (config key `output-topic`,
//! default `confirmations`), asks for a retry while a transient condition holds, and rejects
//! what can never succeed.
//!
//! Input:  `{"id": "o-1", "customer": "ada", "amount_cents": 1250}`
//! Output: `{"order_id": "o-1", "customer": "ada", "amount_cents": 1250, "status": "confirmed"}`
//!
//! An order with `"transient": true` fails with `retry` on its first attempt (a stand-in for a
//! downstream that is briefly unavailable) and succeeds on the next.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "consumer",
});

use exports::weir::stream::handler::Guest;
use weir::stream::types::{Failure, Message, RetryRequest};
use weir::stream::{config, emit, log};

#[derive(serde::Deserialize)]
struct Order {
    id: String,
    customer: String,
    amount_cents: u64,
    #[serde(default)]
    transient: bool,
}

#[derive(serde::Serialize)]
struct Confirmation<'a> {
    order_id: &'a str,
    customer: &'a str,
    amount_cents: u64,
    status: &'static str,
}

struct Orders;

impl Guest for Orders {
    fn handle(msg: Message) -> Result<(), Failure> {
        let order: Order = serde_json::from_slice(&msg.payload)
            .map_err(|e| Failure::Reject(format!("not a valid order: {e}")))?;
        if order.amount_cents == 0 {
            return Err(Failure::Reject(format!("order {} has no amount", order.id)));
        }
        if order.transient && msg.attempt < 2 {
            return Err(Failure::Retry(RetryRequest {
                reason: format!("payment service busy for order {}", order.id),
                delay_ms: Some(10),
            }));
        }
        let confirmation = Confirmation {
            order_id: &order.id,
            customer: &order.customer,
            amount_cents: order.amount_cents,
            status: "confirmed",
        };
        let payload = serde_json::to_vec(&confirmation).expect("a struct of strings serialises");
        let topic = config::get("output-topic").unwrap_or_else(|| "confirmations".to_string());
        emit::send(
            &topic,
            Some(order.id.as_bytes()),
            &payload,
            &[(
                "source-offset".to_string(),
                msg.offset.to_string().into_bytes(),
            )],
        )
        .map_err(|e| {
            Failure::Retry(RetryRequest {
                reason: e,
                delay_ms: None,
            })
        })?;
        log::log(log::Level::Debug, &format!("confirmed order {}", order.id));
        Ok(())
    }
}

export!(Orders);
