//! `weir bench`'s SQS row: the loop a competent user writes with aws-sdk-sqs, to run next to
//! weir on the same server in the same run.
//!
//! The loop, in `receivers` tasks at once (as AWS advises, to keep a consumer busy): receive up
//! to 10 with long polling; per message parse the order and build the confirmation; send the
//! confirmations with one `SendMessageBatch`, then delete the batch with one
//! `DeleteMessageBatch`. At-least-once, as weir is.

use super::client::{self, Outgoing};
use super::{SqsConfig, error};
use crate::host::native::{Confirmation, Order};
use crate::source::{Record, SourceError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Consumes `count` orders from `input`, confirming each to `output`; returns the time from the
/// first receive to the last delete.
pub fn bare(
    cfg: &SqsConfig,
    input: &str,
    output: &str,
    count: u64,
) -> Result<Duration, SourceError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| error("starting a runtime", e))?;
    let cfg = cfg.clone();
    let (input, output) = (cfg.queue(input), cfg.queue(output));
    rt.block_on(async move {
        let c = client::connect(&cfg).await?;
        let find = |name: String| {
            let c = c.clone();
            async move {
                client::queue_url(&c, &name)
                    .await?
                    .ok_or_else(|| error("finding a queue", name))
            }
        };
        let (input, output) = (find(input).await?, find(output).await?);
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..cfg.receivers {
            let (c, input, output, done) = (c.clone(), input.clone(), output.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while done.load(Ordering::Relaxed) < count {
                    let got = client::receive(&c, &input, 10, Duration::from_secs(1), None)
                        .await
                        .map_err(|e| e.0)?;
                    if got.is_empty() {
                        continue;
                    }
                    let mut out = Vec::with_capacity(got.len());
                    for m in &got {
                        let order: Order = serde_json::from_slice(&m.record.payload)
                            .map_err(|e| SourceError::Invalid(format!("not an order: {e}")))?;
                        let payload = serde_json::to_vec(&Confirmation {
                            order_id: &order.id,
                            customer: &order.customer,
                            amount_cents: order.amount_cents,
                            status: "confirmed",
                        })
                        .expect("a struct of strings serialises");
                        out.push(Outgoing {
                            message: super::encode(&Record {
                                payload,
                                ..Record::default()
                            }),
                            group: None,
                            dedupe_id: None,
                        });
                    }
                    client::send(&c, &output, &out).await?;
                    let handles: Vec<String> = got.iter().map(|m| m.handle.clone()).collect();
                    client::delete(&c, &input, &handles).await?;
                    done.fetch_add(got.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, SourceError>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| error("a receiver", e))??;
        }
        Ok(start.elapsed())
    })
}
