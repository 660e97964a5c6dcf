//! A link to RabbitMQ (one connection, a channel per consumed queue) and the supervisor that
//! moves its deliveries into the queues' buffers and puts up a new link when one breaks.

use super::broker::{channel, connect, declare, depth};
use super::consumer::Shared;
use super::settle::recount_on;
use super::uncounted_redelivery;
use super::{AmqpConfig, broker_error};
use crate::source::connect::ConsumerOptions;
use crate::source::{Record, SourceError};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The longest pause between two attempts to reconnect.
const RECONNECT_MAX_WAIT: Duration = Duration::from_secs(5);

/// One connection with its channels.
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) conn: Connection,
    /// Each consumed queue's channel: its consumer, its acks and (`tx` mode) its transaction.
    pub(super) channels: HashMap<String, Channel>,
    /// Confirm mode, shared by every queue's commits (each publish is confirmed on its own);
    /// in `tx` mode each queue's channel publishes its outputs instead.
    pub(super) publish: Option<Channel>,
    /// Per queue: held while its channel's transaction is open (`tx` mode), by a commit, a
    /// release, or a counted copy ([`recount`]): a transaction is the channel's, and two on
    /// one channel would commit each other's halves.
    pub(super) tx_locks: HashMap<String, tokio::sync::Mutex<()>>,
    /// Each consumed queue's consumer tag.
    pub(super) consumer_tags: HashMap<String, String>,
}

/// A delivery waiting to be fetched.
pub(super) struct Buffered {
    pub(super) record: Record,
    pub(super) redeliveries: u32,
    pub(super) generation: u64,
    pub(super) tag: u64,
}

/// Connects, checks the queues, and starts a consumer on each.
pub(super) async fn open(
    cfg: &AmqpConfig,
    opts: &ConsumerOptions,
    group_queues: &HashMap<String, String>,
    generation: u64,
) -> Result<(Arc<Link>, Vec<(String, Consumer)>), SourceError> {
    let conn = connect(&cfg.url).await?;
    let queue = |t: &str| {
        group_queues
            .get(t)
            .cloned()
            .unwrap_or_else(|| t.to_string())
    };
    for t in &opts.topics {
        if depth(&conn, &queue(t)).await?.is_none() {
            return Err(SourceError::UnknownTopic(t.clone()));
        }
    }
    for t in &opts.retry_topics {
        declare(&conn, t, &cfg.queue_type).await?;
    }
    let prefetch = opts.prefetch.clamp(1, u16::MAX as usize) as u16;
    let publish = if opts.exactly_once {
        None
    } else {
        let p = channel(&conn).await?;
        p.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker_error("enabling publisher confirms", e))?;
        Some(p)
    };
    let mut consumers = Vec::new();
    let mut channels = HashMap::new();
    let mut tx_locks = HashMap::new();
    let mut consumer_tags = HashMap::new();
    for (i, t) in opts.topics.iter().chain(&opts.retry_topics).enumerate() {
        // A channel per queue: the prefetch, the tags and the transaction are the queue's.
        let consume = channel(&conn).await?;
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| broker_error("setting the prefetch", e))?;
        if opts.exactly_once {
            consume
                .tx_select()
                .await
                .map_err(|e| broker_error("starting transactions", e))?;
        }
        // Unique per consumer (the broker closes the connection otherwise).
        let tag = format!(
            "weir-{}-{}-{generation}-{i}",
            opts.group,
            std::process::id()
        );
        let c = consume
            .basic_consume(
                queue(t).as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(&format!("consuming {t}"), e))?;
        consumers.push((t.clone(), c));
        channels.insert(t.clone(), consume);
        tx_locks.insert(t.clone(), tokio::sync::Mutex::new(()));
        consumer_tags.insert(t.clone(), tag);
    }
    let link = Arc::new(Link {
        generation,
        conn,
        channels,
        publish,
        tx_locks,
        consumer_tags,
    });
    Ok((link, consumers))
}

/// Moves deliveries into the buffers, and reconnects when the link breaks.
pub(super) async fn supervise(
    shared: Arc<Shared>,
    cfg: AmqpConfig,
    opts: ConsumerOptions,
    first: (Arc<Link>, Vec<(String, Consumer)>),
) {
    let mut next = Some(first);
    let mut generation = 1;
    let mut wait = Duration::from_millis(100);
    while !shared.stopping.load(Ordering::Relaxed) {
        let (link, consumers) = match next.take() {
            Some(l) => l,
            None => match open(&cfg, &opts, &shared.group_queues, generation).await {
                Ok(l) => {
                    tracing::info!(generation, "reconnected to RabbitMQ");
                    l
                }
                Err(SourceError::UnknownTopic(q)) => {
                    shared.state.lock().expect("state").failed = Some(format!(
                        "queue {q} no longer exists (it was deleted while weir consumed it)"
                    ));
                    shared.signal.notify_waiters();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot reach RabbitMQ; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RECONNECT_MAX_WAIT);
                    continue;
                }
            },
        };
        wait = Duration::from_millis(100);
        {
            let mut st = shared.state.lock().expect("state");
            st.generation = link.generation;
            for q in st.queues.values_mut() {
                q.outstanding.clear();
            }
        }
        shared.released.store(false, Ordering::Relaxed);
        shared.link.send_replace(Some(link.clone()));
        let mut streams = futures_util::stream::select_all(
            consumers
                .into_iter()
                .map(|(t, c)| c.map(move |d| (t.clone(), d))),
        );
        let why = loop {
            match streams.next().await {
                Some((topic, Ok(d))) => {
                    let recount =
                        !opts.at_most_once && uncounted_redelivery(&d.properties, d.redelivered);
                    let (record, redeliveries) =
                        super::from_amqp(&d.properties, d.data, d.redelivered);
                    let arrived = Buffered {
                        record,
                        redeliveries,
                        generation: link.generation,
                        tag: d.delivery_tag,
                    };
                    if recount {
                        // Beside the deliveries that follow (a lost link redelivers a whole
                        // prefetch); `--drain` waits for it (`Queue::recounting`).
                        {
                            let mut st = shared.state.lock().expect("state");
                            let q = st.queues.entry(topic.clone()).or_default();
                            q.recounting += 1;
                            // Outstanding from now, before any later commit's `multiple` ack
                            // could cover it; the recount takes it out once acked.
                            q.outstanding.insert(arrived.tag);
                        }
                        let (shared, link) = (shared.clone(), link.clone());
                        tokio::spawn(async move {
                            let mut links = shared.link.subscribe();
                            let generation = link.generation;
                            let r = tokio::select! {
                                r = recount_on(
                                    &shared,
                                    &link,
                                    &topic,
                                    &arrived.record,
                                    arrived.redeliveries,
                                    arrived.tag,
                                ) => r,
                                // The link went: so did the message (the broker has it again),
                                // and a confirm it waits for may never come.
                                _ = links.wait_for(|l| {
                                    l.as_ref().is_none_or(|l| l.generation != generation)
                                }) => Err(broker_error("counting a redelivery", "the link was lost")),
                            };
                            if let Err(e) = &r {
                                tracing::warn!(queue = %topic, error = %e, "could not publish a counted copy of a redelivered message; it runs as attempt {}", arrived.redeliveries + 1);
                            }
                            let mut st = shared.state.lock().expect("state");
                            let q = st.queues.entry(topic.clone()).or_default();
                            q.recounting -= 1;
                            drop(st);
                            // The counted copy comes back in its turn; without one, this runs.
                            if r.is_err() {
                                buffer(&shared, topic, arrived, false);
                            }
                        });
                        continue;
                    }
                    buffer(&shared, topic, arrived, opts.at_most_once);
                }
                Some((topic, Err(e))) => break format!("consuming {topic}: {e}"),
                // Every consumer was cancelled by `release` (a stop): nothing to reconnect for.
                None if shared.released.load(Ordering::Relaxed) => return,
                None => break "the broker cancelled the consumer".to_string(),
            }
        };
        shared.link.send_replace(None);
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!(reason = %why, "lost the RabbitMQ link; reconnecting (unacked messages go back to their queues)");
        if why.contains("delivery acknowledgement") {
            tracing::warn!(
                "the broker's consumer_timeout closed the channel: a message was held unacked \
                 longer than it allows (a slow handler, or a blocking retry waiting out its \
                 backoff). It comes back counted as another attempt. Raise consumer_timeout \
                 on the broker (or per queue with x-consumer-timeout on RabbitMQ 3.12+), or \
                 use --retry-mode requeue, which holds no message while it waits"
            );
        }
        {
            // What the old link delivered and the engine has not fetched is requeued by the
            // broker: drop it here, or it would run twice.
            let mut st = shared.state.lock().expect("state");
            for q in st.queues.values_mut() {
                q.buffer.clear();
                q.buffered_bytes = 0;
                q.outstanding.clear();
            }
        }
        let _ = link.conn.close(200, "reconnecting".into()).await;
        generation += 1;
    }
}

/// Puts a delivery in its queue's buffer for the engine to fetch.
pub(super) fn buffer(shared: &Shared, topic: String, b: Buffered, at_most_once: bool) {
    let mut st = shared.state.lock().expect("state");
    let q = st.queues.entry(topic).or_default();
    if !at_most_once {
        q.outstanding.insert(b.tag);
    }
    q.buffered_bytes += crate::source::wire_size(&b.record);
    q.buffer.push_back(b);
    drop(st);
    shared.signal.notify_waiters();
}

/// Stops handing out `link` once it is known broken (the supervisor puts up the next one).
pub(super) fn forget(shared: &Shared, link: &Link) {
    shared.link.send_if_modified(|l| {
        if l.as_ref().is_some_and(|l| l.generation == link.generation) {
            *l = None;
            true
        } else {
            false
        }
    });
}
