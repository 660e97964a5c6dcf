//! `weir bench`'s RabbitMQ row: the loop a competent user writes with lapin, to run next to
//! weir on the same server in the same run.
//!
//! The loop: one channel with `basic.qos` prefetch, a consumer; per delivery parse the order,
//! build the confirmation, publish it on a channel in confirm mode; every 100 deliveries (or
//! when the queue goes quiet) wait for the confirms, then ack everything up to the last tag with
//! one `multiple` ack. At-least-once, as weir is.

use super::broker::{channel, connect};
use super::{AmqpConfig, broker_error};
use crate::host::native::{Confirmation, Order};
use crate::source::SourceError;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

/// Confirms waited for, and acks sent, once per this many deliveries.
const ACK_EVERY: usize = 100;

/// Consumes `count` orders from `input`, confirming each to `output`; returns the time from
/// the first delivery to the last ack.
pub fn bare(
    cfg: &AmqpConfig,
    input: &str,
    output: &str,
    count: u64,
    prefetch: u16,
) -> Result<Duration, SourceError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| broker_error("starting a runtime", e))?;
    rt.block_on(async {
        let conn = connect(&cfg.url).await?;
        let consume = channel(&conn).await?;
        let publish = channel(&conn).await?;
        let err = |what: &'static str| move |e: lapin::Error| broker_error(what, e);
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(err("setting the prefetch"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("enabling confirms"))?;
        let mut deliveries = consume
            .basic_consume(
                input.into(),
                "bare".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err("consuming"))?;
        let (mut done, mut started) = (0u64, None);
        let mut confirms = Vec::new();
        let mut last_tag = None;
        while done < count {
            let next = tokio::time::timeout(Duration::from_millis(20), deliveries.next()).await;
            let quiet = next.is_err();
            if let Ok(d) = next {
                let d = d
                    .ok_or_else(|| broker_error("consuming", "the consumer was cancelled"))?
                    .map_err(err("consuming"))?;
                started.get_or_insert_with(Instant::now);
                let order: Order = serde_json::from_slice(&d.data)
                    .map_err(|e| SourceError::Invalid(format!("not an order: {e}")))?;
                let payload = serde_json::to_vec(&Confirmation {
                    order_id: &order.id,
                    customer: &order.customer,
                    amount_cents: order.amount_cents,
                    status: "confirmed",
                })
                .expect("a struct of strings serialises");
                let c = publish
                    .basic_publish(
                        "".into(),
                        output.into(),
                        BasicPublishOptions::default(),
                        &payload,
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(err("publishing"))?;
                confirms.push(c);
                last_tag = Some(d.delivery_tag);
                done += 1;
            }
            if confirms.len() >= ACK_EVERY || (quiet || done == count) && !confirms.is_empty() {
                for c in confirms.drain(..) {
                    c.await.map_err(err("waiting for a confirm"))?;
                }
                if let Some(tag) = last_tag.take() {
                    consume
                        .basic_ack(tag, BasicAckOptions { multiple: true })
                        .await
                        .map_err(err("acking"))?;
                }
            }
        }
        let took = started.map_or(Duration::ZERO, |s| s.elapsed());
        let _ = conn.close(200, "bench done".into()).await;
        Ok(took)
    })
}
