//! `weir request` (and the admin server's `POST /topics/T/request`) on SQS. A queue hands each
//! message to one receiver, so callers cannot share a reply queue and skip each other's answers
//! (a message received and put back counts a receive, and hides from its owner meanwhile). Each
//! call gets a queue of its own, as AWS's temporary queue client does: `weir-reply-<random>`,
//! created before the request is sent, named in its `reply-to` header, and deleted when the call
//! ends, answered or not. A handler's answer to a queue that is gone is dropped (the message
//! succeeds), as an answer to a RabbitMQ caller's queue that is gone is. A caller killed while it
//! waits leaves its queue behind: delete `weir-reply-*` queues older than a call's timeout.

use super::broker::SqsBroker;
use super::client;
use crate::host::reply::{CORRELATION_ID, REPLY_TO};
use crate::source::broker::Broker;
use crate::source::{Record, SourceError};
use std::time::{Duration, Instant};

/// What a call's reply queue is named: this, then random hex.
const REPLY_PREFIX: &str = "weir-reply-";

/// Whether `topic` is a caller's reply queue (made by [`SqsBroker::request_over_sqs`]).
pub(super) fn is_reply_queue(topic: &str) -> bool {
    topic.starts_with(REPLY_PREFIX)
}

/// The longest single receive SQS allows (long polling).
const LONGEST_WAIT: Duration = Duration::from_secs(20);

impl SqsBroker {
    pub(super) fn request_over_sqs(
        &mut self,
        topic: &str,
        mut request: Record,
        timeout: Duration,
    ) -> Result<Option<Record>, SourceError> {
        let started = Instant::now();
        let id = request
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n == CORRELATION_ID)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let reply = format!("{REPLY_PREFIX}{}", hex::encode(rand::random::<[u8; 12]>()));
        self.create_topic(&reply, 1, None)?;
        let answer = self.await_answer(topic, &mut request, &reply, &id, started, timeout);
        let (cl, url) = (self.client.clone(), self.url(&reply));
        if let Err(e) = &url {
            tracing::warn!(queue = %reply, error = %e, "SQS: could not look up a request's reply queue to delete it; delete it by hand");
        }
        if let Ok(url) = url {
            let gone = self.rt.run(async move {
                cl.delete_queue()
                    .queue_url(url)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| client::fault("deleting a reply queue", e).0)
            });
            if let Err(e) = gone {
                tracing::warn!(queue = %reply, error = %e, "SQS: could not delete a request's reply queue; delete it by hand");
            }
        }
        answer
    }

    fn await_answer(
        &mut self,
        topic: &str,
        request: &mut Record,
        reply: &str,
        id: &[u8],
        started: Instant,
        timeout: Duration,
    ) -> Result<Option<Record>, SourceError> {
        request.headers.retain(|(n, _)| n != REPLY_TO);
        request
            .headers
            .push((REPLY_TO.to_string(), reply.as_bytes().to_vec()));
        self.append(topic, vec![request.clone()])?;
        let (cl, url) = (self.client.clone(), self.url(reply)?);
        let id = id.to_vec();
        self.rt.run(async move {
            loop {
                let left = timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Ok(None);
                }
                // Whole seconds (SQS's unit), at least one: a receive may end up to a second
                // past the timeout rather than spin.
                let wait = Duration::from_secs(left.as_secs().max(1)).min(LONGEST_WAIT);
                let got = client::retrying("receiving an answer", || {
                    client::receive(&cl, &url, 10, wait, None)
                })
                .await?;
                // The queue is this call's: anything in it is an answer to it, but only the one
                // with its correlation id is taken as such.
                if let Some(m) = got.into_iter().find(|m| {
                    m.record
                        .headers
                        .iter()
                        .any(|(n, v)| n == CORRELATION_ID && *v == id)
                }) {
                    return Ok(Some(m.record));
                }
            }
        })
    }
}
