//! Settling a queue's messages: publishing a commit's outputs and acking its inputs on the
//! queue's own channel, with publisher confirms or in one transaction.

use super::REQUEST_TIMEOUT;
use super::broker::{depth, publish_confirmed};
use super::broker_error;
use super::consumer::Shared;
use super::fanout::{is_reply_queue, route};
use super::link::Link;
use crate::source::{Record, SourceError};
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use std::collections::{BTreeSet, HashSet};

/// The acks that settle `tags` given the tags of the queue's channel handed over and not yet
/// acked (`outstanding`, which still holds `tags`: they leave it once the acks went out): one
/// `multiple` ack for every settled tag below the lowest unsettled one, and one each for the
/// rest. Tags not outstanding (acked already, or of another link) get none.
fn acks(outstanding: &BTreeSet<u64>, mut tags: Vec<u64>) -> Vec<(u64, bool)> {
    tags.retain(|t| outstanding.contains(t));
    tags.sort_unstable();
    tags.dedup();
    let floor = outstanding
        .iter()
        .find(|t| tags.binary_search(t).is_err())
        .copied()
        .unwrap_or(u64::MAX);
    let below = tags.partition_point(|t| *t < floor);
    let mut out = Vec::new();
    if below > 1 {
        out.push((tags[below - 1], true));
    } else if below == 1 {
        out.push((tags[0], false));
    }
    out.extend(tags[below..].iter().map(|t| (*t, false)));
    out
}

/// Publishes `outputs` and acks `tags` of `queue` on `link`: confirmed publishes then acks, or
/// one `tx` on the queue's own channel. The tags leave the queue's outstanding set once acked.
pub(super) async fn settle_on(
    shared: &Shared,
    link: &Link,
    queue: Option<&str>,
    outputs: &[crate::source::Output],
    tags: Vec<u64>,
    tx: bool,
    settle: bool,
) -> Result<(), SourceError> {
    // The queue's channel: it acks, and in `tx` mode publishes and commits. A commit of
    // outputs alone in confirm mode needs none.
    let ch = match queue {
        Some(q) => Some(
            link.channels
                .get(q)
                .ok_or_else(|| broker_error("settling", format!("weir does not consume {q}")))?,
        ),
        None => None,
    };
    let channel = || {
        ch.ok_or_else(|| {
            SourceError::Invalid("a transaction or an ack needs the queue it settles".into())
        })
    };
    let _tx = match queue.and_then(|q| link.tx_locks.get(q)) {
        Some(l) if tx => Some(l.lock().await),
        _ => None,
    };
    let to_ack = match queue {
        Some(queue) if settle => {
            let st = shared.state.lock().expect("state");
            match st.queues.get(queue) {
                Some(q) if st.generation == link.generation => acks(&q.outstanding, tags.clone()),
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    let fanouts = shared.fanouts.lock().expect("fanouts").clone();
    match &link.publish {
        Some(publish) => {
            let records: Vec<(&str, &Record)> = outputs
                .iter()
                .map(|o| (o.topic.as_str(), &o.record))
                .collect();
            publish_confirmed(publish, &records, &fanouts).await?;
        }
        None => {
            // A fanout exchange drops what no group's queue is bound to, and a transaction
            // has no confirms to say so: refused rather than lose outputs unseen.
            if let Some(o) = outputs.iter().find(|o| fanouts.contains(&o.topic)) {
                return Err(SourceError::Invalid(format!(
                    "--exactly-once on RabbitMQ cannot write to fanout topic {}: an AMQP \
                     transaction has no confirms, so an output no group's queue takes would be \
                     dropped unseen; run without --exactly-once (confirmed publishes) or write \
                     to a queue",
                    o.topic
                )));
            }
            let ch = channel()?;
            for o in outputs {
                let (exchange, key) = route(&o.topic, &fanouts);
                ch.basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions {
                        mandatory: !is_reply_queue(&o.topic),
                        ..BasicPublishOptions::default()
                    },
                    &o.record.payload,
                    super::to_amqp(&o.record),
                )
                .await
                .map_err(|e| broker_error(&format!("publishing to {}", o.topic), e))?;
            }
            // A transaction has no confirms: a publish to a queue that is gone would be dropped
            // while the acks commit. Each queue the outputs go to is looked up first; if one is
            // gone, the transaction is rolled back and nothing of the commit is acked. (A queue
            // deleted between this look and the commit is the one window left: AMQP 0-9-1 has
            // no confirms in `tx` mode.)
            let mut dests: Vec<&str> = outputs.iter().map(|o| o.topic.as_str()).collect();
            dests.sort_unstable();
            dests.dedup();
            // (A caller's reply queue cannot be looked up from here; its answer may drop.)
            for d in dests.into_iter().filter(|d| !is_reply_queue(d)) {
                if depth(&link.conn, d).await?.is_none() {
                    let _ = ch.tx_rollback().await;
                    shared.known.lock().expect("known").remove(d);
                    return Err(broker_error(
                        &format!("publishing to {d}"),
                        "the queue no longer exists (deleted while weir ran); nothing of this \
                         commit was acked: declare it again (weir topics create) and restart",
                    ));
                }
            }
        }
    }
    for (tag, multiple) in to_ack {
        channel()?
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| broker_error("acking", e))?;
    }
    if tx {
        tokio::time::timeout(REQUEST_TIMEOUT, channel()?.tx_commit())
            .await
            .map_err(|_| broker_error("committing the transaction", "no answer"))?
            .map_err(|e| broker_error("committing the transaction", e))?;
    }
    if settle && let Some(queue) = queue {
        let mut st = shared.state.lock().expect("state");
        if st.generation == link.generation
            && let Some(q) = st.queues.get_mut(queue)
        {
            for t in &tags {
                q.outstanding.remove(t);
            }
        }
    }
    Ok(())
}

/// A redelivered message of a queue that does not count deliveries (classic): publishes a
/// copy to the back of `queue` with `weir.deliveries` = `redeliveries`, then acks the
/// redelivered one (`tag`), confirmed or in one transaction. The tag is outstanding until then
/// (the supervisor puts it there as it arrives), so no commit's `multiple` ack covers it before
/// the copy is safe.
pub(super) async fn recount_on(
    shared: &Shared,
    link: &Link,
    queue: &str,
    record: &Record,
    redeliveries: u32,
    tag: u64,
) -> Result<(), SourceError> {
    let ch = link
        .channels
        .get(queue)
        .ok_or_else(|| broker_error("counting a redelivery", format!("no channel for {queue}")))?;
    let mut copy = record.clone();
    copy.headers.push((
        super::WEIR_DELIVERIES.to_string(),
        redeliveries.to_string().into_bytes(),
    ));
    let acked = || {
        let mut st = shared.state.lock().expect("state");
        if st.generation == link.generation {
            st.queues
                .entry(queue.to_string())
                .or_default()
                .outstanding
                .remove(&tag);
        }
    };
    // (Made outstanding by the supervisor when the delivery arrived.)
    let r = async {
        let ack = || ch.basic_ack(tag, BasicAckOptions { multiple: false });
        match &link.publish {
            Some(publish) => {
                // To the queue it came from (a fanout group's own, not the exchange).
                publish_confirmed(publish, &[(shared.queue(queue), &copy)], &HashSet::new())
                    .await?;
                ack().await.map_err(|e| broker_error("acking", e))
            }
            None => {
                let _tx = match link.tx_locks.get(queue) {
                    Some(l) => Some(l.lock().await),
                    None => None,
                };
                ch.basic_publish(
                    "".into(),
                    shared.queue(queue).into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &copy.payload,
                    super::to_amqp(&copy),
                )
                .await
                .map_err(|e| broker_error(&format!("publishing to {queue}"), e))?;
                ack().await.map_err(|e| broker_error("acking", e))?;
                tokio::time::timeout(REQUEST_TIMEOUT, ch.tx_commit())
                    .await
                    .map_err(|_| broker_error("committing the transaction", "no answer"))?
                    .map_err(|e| broker_error("committing the transaction", e))
            }
        }
    }
    .await;
    acked();
    r
}

impl super::consumer::RabbitSource {
    /// At-most-once: acks every delivery of `queue`'s channel up to `tag` (one `multiple`
    /// ack: the buffer hands them over in tag order) before the engine gets them, so none is
    /// delivered again. Not auto-ack: RabbitMQ ignores the prefetch of an auto-ack consumer,
    /// so its buffer had no bound. Whether the ack was written on the link that delivered them.
    pub(super) fn ack_handed_over(&self, queue: &str, generation: u64, tag: u64) -> bool {
        let link = self.shared.link.borrow().clone();
        let Some(ch) = link
            .filter(|l| l.generation == generation)
            .and_then(|l| l.channels.get(queue).cloned())
        else {
            return false;
        };
        let prefetch = self.opts.prefetch.clamp(1, u16::MAX as usize) as u16;
        self.rt
            .run(async move {
                ch.basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(|e| broker_error("acking", e))?;
                // An ack has no answer, and one lost with the link would requeue messages
                // already running. The broker takes a channel's frames in order: the answer to
                // this (unchanged) prefetch says the ack was taken.
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    ch.basic_qos(prefetch, lapin::options::BasicQosOptions::default()),
                )
                .await
                .map_err(|_| broker_error("acking", "no answer"))?
                .map_err(|e| broker_error("acking", e))
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::acks;
    use std::collections::BTreeSet;

    #[test]
    fn acks_take_one_multiple_below_the_lowest_unsettled_tag() {
        // (outstanding, settled now, acks sent, outstanding after)
        type Case<'a> = (&'a [u64], &'a [u64], &'a [(u64, bool)], &'a [u64]);
        let cases: &[Case] = &[
            (&[1, 2, 3], &[1, 2, 3], &[(3, true)], &[]),
            (&[1, 2, 3], &[1], &[(1, false)], &[2, 3]),
            (&[1, 2, 3], &[2, 3], &[(2, false), (3, false)], &[1]),
            (
                &[1, 2, 3, 4, 5],
                &[1, 2, 4],
                &[(2, true), (4, false)],
                &[3, 5],
            ),
            (&[1, 2], &[7], &[], &[1, 2]),
            // Another commit's tags (5, 6) stay outstanding until their acks went out: a later
            // commit's ack of 7 must not be `multiple`, or it acks them before their outputs
            // are published (a shared outstanding set, emptied early, did).
            (&[5, 6, 7], &[7], &[(7, false)], &[5, 6]),
            (&[5, 6], &[6, 5], &[(6, true)], &[]),
        ];
        for (outstanding, settled, want, left) in cases {
            let mut o: BTreeSet<u64> = outstanding.iter().copied().collect();
            let got = acks(&o, settled.to_vec());
            assert_eq!(got, *want, "{outstanding:?} {settled:?}");
            // The caller takes the settled tags out once their acks went out.
            for t in *settled {
                o.remove(t);
            }
            assert_eq!(o.into_iter().collect::<Vec<_>>(), *left);
        }
    }
}
