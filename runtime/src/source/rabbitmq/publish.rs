//! Publishing with confirms: what commands and commits send, each publish confirmed.

use super::{REQUEST_TIMEOUT, broker_error, fanout};
use crate::source::{Record, SourceError};
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};
use std::collections::HashSet;

/// Publishes `records` to their queues (or, for the names in `fanouts`, their fanout
/// exchanges) on `ch` (in confirm mode) and waits for every confirm.
pub(crate) async fn publish_confirmed(
    ch: &Channel,
    records: &[(&str, &Record)],
    fanouts: &HashSet<String>,
) -> Result<(), SourceError> {
    let mut confirms = Vec::new();
    for &(queue, r) in records {
        super::fits(r).map_err(SourceError::Invalid)?;
        let (exchange, key) = fanout::route(queue, fanouts);
        let c = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    // An answer to a caller's own reply queue that is gone (the caller gave
                    // up) is dropped, as RabbitMQ's RPC pattern expects: never an error.
                    mandatory: !fanout::is_reply_queue(queue),
                    ..BasicPublishOptions::default()
                },
                &r.payload,
                super::to_amqp(r),
            )
            .await
            .map_err(|e| broker_error(&format!("publishing to {queue}"), e))?;
        confirms.push((queue.to_string(), c));
    }
    for (queue, c) in confirms {
        let confirmed = tokio::time::timeout(REQUEST_TIMEOUT, c)
            .await
            .map_err(|_| broker_error(&format!("publishing to {queue}"), "no confirm"))?
            .map_err(|e| broker_error(&format!("publishing to {queue}"), e))?;
        match confirmed {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(returned)) if fanouts.contains(&queue) => {
                // Mandatory and unroutable: no group's queue is bound to the exchange.
                return Err(broker_error(
                    &format!("publishing to fanout topic {queue}"),
                    format!(
                        "returned by the broker ({}): no group's queue is bound to it yet, so \
                         nothing would receive it; start a group on it, or name the groups \
                         with weir topics create {queue} --fanout --group NAME",
                        returned.reply_text
                    ),
                ));
            }
            Confirmation::Ack(Some(returned)) => {
                // Mandatory and unroutable: the queue is gone.
                return Err(broker_error(
                    &format!("publishing to {queue}"),
                    format!(
                        "returned by the broker ({}); does the queue exist?",
                        returned.reply_text
                    ),
                ));
            }
            Confirmation::Nack(_) => {
                return Err(broker_error(
                    &format!("publishing to {queue}"),
                    "refused by the broker (nack)",
                ));
            }
            Confirmation::NotRequested => {}
        }
    }
    Ok(())
}
