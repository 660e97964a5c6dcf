//! `weir bench`'s NATS row: the loop a competent user writes with async-nats, to run next to
//! weir on the same server in the same run.
//!
//! The loop: a durable pull consumer; pull a batch; per message parse the order and publish the
//! confirmation to JetStream; wait for the batch's publish acks, then ack the batch's messages.
//! At-least-once, as weir is.

use super::{NatsConfig, error};
use crate::host::native::{Confirmation, Order};
use crate::source::SourceError;
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

/// Consumes `count` orders from `input`, confirming each to `output`, `batch` per pull; returns
/// the time from the first message to the last ack.
pub fn bare(
    cfg: &NatsConfig,
    input: &str,
    output: &str,
    count: u64,
    batch: usize,
) -> Result<Duration, SourceError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| error("starting a runtime", e))?;
    let (stream, subject) = (cfg.stream(input), cfg.subject(output));
    let (url, options) = (cfg.url.clone(), cfg.options());
    rt.block_on(async move {
        let client = options
            .connect(url.as_str())
            .await
            .map_err(|e| error("connecting", e))?;
        let js = jetstream::new(client.clone());
        let s = js
            .get_stream(&stream)
            .await
            .map_err(|e| error("finding the stream", e))?;
        let c: consumer::PullConsumer = s
            .get_or_create_consumer(
                "bare",
                consumer::pull::Config {
                    durable_name: Some("bare".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| error("making the consumer", e))?;
        let (mut done, mut started) = (0u64, None);
        while done < count {
            let mut msgs = c
                .batch()
                .max_messages(batch)
                .expires(Duration::from_millis(100))
                .messages()
                .await
                .map_err(|e| error("pulling", e))?;
            let mut got = Vec::with_capacity(batch);
            let mut acks = Vec::with_capacity(batch);
            while let Some(m) = msgs.next().await {
                let m = m.map_err(|e| error("pulling", e))?;
                started.get_or_insert_with(Instant::now);
                let order: Order = serde_json::from_slice(&m.payload)
                    .map_err(|e| SourceError::Invalid(format!("not an order: {e}")))?;
                let payload = serde_json::to_vec(&Confirmation {
                    order_id: &order.id,
                    customer: &order.customer,
                    amount_cents: order.amount_cents,
                    status: "confirmed",
                })
                .expect("a struct of strings serialises");
                acks.push(
                    js.publish(subject.clone(), payload.into())
                        .await
                        .map_err(|e| error("publishing", e))?,
                );
                got.push(m);
            }
            for a in acks {
                a.await.map_err(|e| error("publishing", e))?;
            }
            for m in &got {
                m.ack().await.map_err(|e| error("acking", e))?;
            }
            done += got.len() as u64;
        }
        client.flush().await.map_err(|e| error("acking", e))?;
        Ok(started.map_or(Duration::ZERO, |s| s.elapsed()))
    })
}
