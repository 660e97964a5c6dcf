//! `weir bench`'s Redis row: the loop a competent user writes with the redis crate, to run next
//! to weir on the same server in the same run.
//!
//! The loop: a consumer group on the input stream; `XREADGROUP ... COUNT n BLOCK 20 >`; per
//! entry parse the order and build the confirmation; then one `MULTI` with every confirmation's
//! `XADD` and the `XACK` of the entries read. At-least-once, as weir is (weir checks ownership
//! of each entry in its commit, which this loop does not).

use super::{RedisConfig, error};
use crate::host::native::{Confirmation, Order};
use crate::source::SourceError;
use std::time::{Duration, Instant};

/// Consumes `count` orders from `input`, confirming each to `output`, `batch` per read; returns
/// the time from the first entry to the last ack.
pub fn bare(
    cfg: &RedisConfig,
    input: &str,
    output: &str,
    count: u64,
    batch: usize,
) -> Result<Duration, SourceError> {
    let err = |what: &'static str| move |e: redis::RedisError| error(what, e);
    let client = cfg.client()?;
    let mut c = client.get_connection().map_err(err("connecting"))?;
    let (input, output) = (cfg.key(input), cfg.key(output));
    match redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&input)
        .arg("bare")
        .arg("0")
        .query::<()>(&mut c)
    {
        Err(e) if e.code() != Some("BUSYGROUP") => return Err(error("creating the group", e)),
        _ => {}
    }
    let (mut done, mut started) = (0u64, None);
    while done < count {
        type Reply = Vec<(String, Vec<(String, Vec<(String, Vec<u8>)>)>)>;
        let got: Option<Reply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("bare")
            .arg("bare-1")
            .arg("COUNT")
            .arg(batch)
            .arg("BLOCK")
            .arg(20)
            .arg("STREAMS")
            .arg(&input)
            .arg(">")
            .query(&mut c)
            .map_err(err("reading"))?;
        let Some(entries) = got.and_then(|mut s| s.pop()).map(|(_, e)| e) else {
            continue;
        };
        started.get_or_insert_with(Instant::now);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut ids = Vec::with_capacity(entries.len());
        for (id, fields) in &entries {
            let body = fields
                .iter()
                .find(|(n, _)| n == "payload")
                .map(|(_, v)| v.as_slice())
                .unwrap_or_default();
            let order: Order = serde_json::from_slice(body)
                .map_err(|e| SourceError::Invalid(format!("not an order: {e}")))?;
            let payload = serde_json::to_vec(&Confirmation {
                order_id: &order.id,
                customer: &order.customer,
                amount_cents: order.amount_cents,
                status: "confirmed",
            })
            .expect("a struct of strings serialises");
            pipe.cmd("XADD")
                .arg(&output)
                .arg("*")
                .arg("payload")
                .arg(payload)
                .ignore();
            ids.push(id.clone());
        }
        pipe.cmd("XACK").arg(&input).arg("bare").arg(&ids).ignore();
        pipe.query::<()>(&mut c)
            .map_err(err("writing and acking"))?;
        done += entries.len() as u64;
    }
    Ok(started.map_or(Duration::ZERO, |s| s.elapsed()))
}
