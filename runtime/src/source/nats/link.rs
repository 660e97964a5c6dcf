//! Writes to JetStream that outlast a lost link: async-nats reconnects by itself, and what a
//! commit sent while the link was down is sent again on the new one, for up to a minute.
//!
//! Both are safe to send twice: an output carries its `Nats-Msg-Id`, which the stream's
//! duplicate window drops when it comes again, and an ack (or `NAK`) of a message already
//! settled changes nothing. Outputs without an id (a batch handler's) may be stored twice, as
//! at-least-once allows; at-most-once sends none again (it may lose, never double).

use super::error;
use crate::source::{Output, SourceError};
use async_nats::jetstream::{self, AckKind, context::PublishErrorKind};
use std::time::{Duration, Instant};

/// How long a request (a publish's ack, a flush, a consumer's info) may take.
pub(super) const REQUEST: Duration = Duration::from_secs(10);
/// How long a write whose link broke is tried again before the error is the run's.
pub(super) const RETRY_FOR: Duration = Duration::from_secs(60);

/// Whether a failed publish may succeed on the next try: the link or the server's answer was
/// lost, the client has too many publishes waiting, or no stream answered (async-nats's
/// "stream not found" is a 503 "no responders", which JetStream answers for a moment after a
/// restart; weir checked the output streams at start). An oversized message or a wrong
/// expected sequence stays so.
fn transient(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::Other
    )
}

/// Waits until the client is connected again (async-nats reconnects by itself), up to
/// `deadline`: sending into a client that is reconnecting only fills its queue.
async fn connected(client: &async_nats::Client, deadline: Instant) {
    while client.connection_state() != async_nats::connection::State::Connected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits before the next try: 50 ms, doubling up to 2 s; `Err` once `RETRY_FOR` has passed.
async fn pause(
    what: &str,
    start: Instant,
    pause: &mut Duration,
    e: &str,
) -> Result<(), SourceError> {
    if start.elapsed() >= RETRY_FOR {
        return Err(error(what, format!("{e} (tried again for {RETRY_FOR:?})")));
    }
    tracing::warn!(error = %e, "NATS: {what} failed; trying again once the link is back");
    tokio::time::sleep(*pause).await;
    *pause = (*pause * 2).min(Duration::from_secs(2));
    Ok(())
}

/// Publishes `outputs` (the `i`th with `ids[i]` as its `Nats-Msg-Id`, where it has one),
/// windows of 1,000 at a time, and waits for each to be stored. Those whose publish or ack
/// failed on the link are published again. `resend` false (at-most-once): they are dropped
/// with a warning instead. Returns how many were dropped.
pub(super) async fn publish(
    client: &async_nats::Client,
    js: &jetstream::Context,
    prefix: &str,
    outputs: &[Output],
    ids: &[Option<String>],
    resend: bool,
) -> Result<usize, SourceError> {
    const WHAT: &str = "publishing outputs";
    // One deadline for the whole: each send and each ack waits up to its own timeout, and a
    // window of them one after another must not outlast RETRY_FOR.
    let deadline = Instant::now() + RETRY_FOR + REQUEST;
    tokio::time::timeout_at(
        deadline.into(),
        publish_until(client, js, prefix, outputs, ids, resend, deadline),
    )
    .await
    .unwrap_or_else(|_| {
        Err(error(
            WHAT,
            format!("not all stored after trying for {RETRY_FOR:?}"),
        ))
    })
}

async fn publish_until(
    client: &async_nats::Client,
    js: &jetstream::Context,
    prefix: &str,
    outputs: &[Output],
    ids: &[Option<String>],
    resend: bool,
    deadline: Instant,
) -> Result<usize, SourceError> {
    const WHAT: &str = "publishing outputs";
    let (start, mut wait) = (Instant::now(), Duration::from_millis(50));
    let mut todo: Vec<usize> = (0..outputs.len()).collect();
    loop {
        connected(client, deadline).await;
        tracing::debug!(outputs = todo.len(), "NATS: publishing");
        let mut failed: Vec<usize> = Vec::new();
        let mut last = String::new();
        for chunk in todo.chunks(1000) {
            if !failed.is_empty()
                && client.connection_state() != async_nats::connection::State::Connected
            {
                failed.extend_from_slice(chunk);
                continue;
            }
            // A window of publishes, then their acks: async-nats lets 5,000 wait unacked.
            let mut acks = Vec::with_capacity(chunk.len());
            for (at, &i) in chunk.iter().enumerate() {
                let o = &outputs[i];
                let extra: Vec<(&str, String)> = ids
                    .get(i)
                    .cloned()
                    .flatten()
                    .map(|id| ("Nats-Msg-Id", id))
                    .into_iter()
                    .collect();
                let sent = tokio::time::timeout(
                    REQUEST,
                    js.publish_with_headers(
                        format!("{prefix}{}", o.topic),
                        super::headers(&o.record, &extra),
                        o.record.payload.clone().into(),
                    ),
                )
                .await;
                match sent {
                    Ok(Ok(ack)) => acks.push((i, ack)),
                    Ok(Err(e)) if !transient(e.kind()) => return Err(error(WHAT, e)),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "NATS: a publish failed");
                        last = e.to_string();
                        failed.push(i);
                    }
                    Err(_) => {
                        tracing::debug!("NATS: a publish was not taken in 10 s");
                        last = "the client took no publish for 10 s".into();
                        failed.push(i);
                    }
                }
                // The link is down: the rest of the window waits for the next round rather
                // than each waiting out its own timeout.
                if failed.last() == Some(&i)
                    && client.connection_state() != async_nats::connection::State::Connected
                {
                    failed.extend_from_slice(&chunk[at + 1..]);
                    break;
                }
            }
            // Awaited together: after a lost link each lost ack takes its whole timeout, and
            // one after another they held a commit for minutes.
            let answers = futures_util::future::join_all(
                acks.into_iter()
                    .map(|(i, ack)| async move { (i, tokio::time::timeout(REQUEST, ack).await) }),
            )
            .await;
            for (i, answer) in answers {
                match answer {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if !transient(e.kind()) => return Err(error(WHAT, e)),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "NATS: a publish's ack failed");
                        last = e.to_string();
                        failed.push(i);
                    }
                    Err(_) => {
                        last = "no ack in 10 s".into();
                        failed.push(i);
                    }
                }
            }
        }
        if failed.is_empty() {
            return Ok(0);
        }
        if !resend {
            tracing::warn!(outputs = failed.len(), error = %last, "NATS: outputs whose publish was not confirmed are not sent again (at-most-once); they may be lost");
            return Ok(failed.len());
        }
        failed.sort_unstable();
        pause(WHAT, start, &mut wait, &last).await?;
        todo = failed;
    }
}

/// Sends each message's ack (`+ACK`, `-NAK` with a delay, `+WPI`...) and flushes; while the
/// flush fails (the link is down), waits for the link and sends them all again, for up to
/// `patience`.
pub(super) async fn reply(
    client: &async_nats::Client,
    msgs: &[(jetstream::Message, AckKind)],
    what: &str,
    patience: Duration,
) -> Result<(), SourceError> {
    let start = Instant::now();
    let deadline = start + patience;
    let mut wait = Duration::from_millis(50);
    loop {
        tracing::debug!(messages = msgs.len(), "NATS: settling");
        let sent = tokio::time::timeout(REQUEST, async {
            for (m, kind) in msgs {
                m.ack_with(*kind).await.map_err(|e| e.to_string())?;
            }
            client.flush().await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("the server took nothing for 10 s".into()));
        match sent {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() + wait < deadline => {
                pause(what, start, &mut wait, &e).await?;
                connected(client, deadline).await;
            }
            Err(e) => return Err(error(what, e)),
        }
    }
}
