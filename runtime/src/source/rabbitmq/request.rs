//! `weir request` on RabbitMQ, as RabbitMQ's RPC pattern does it: the caller declares an
//! exclusive, server-named reply queue, publishes the request with `reply_to` naming it and a
//! `correlation_id`, and consumes the queue until the answer with its id comes or the timeout
//! passes. The queue goes with the caller's connection. (Not direct reply-to: weir's handler
//! publishes the answer from another connection, through its outputs.)

use super::broker::{Rabbit, channel, publish_confirmed};
use super::broker_error;
use crate::host::reply::{CORRELATION_ID, REPLY_TO};
use crate::source::{Record, SourceError};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::time::Duration;

impl Rabbit {
    pub(super) fn request_over_amqp(
        &mut self,
        topic: &str,
        mut request: Record,
        timeout: Duration,
    ) -> Result<Option<Record>, SourceError> {
        let fanouts = self.fanouts([topic])?;
        let publisher = self.publisher()?;
        let (conn, topic) = (self.conn.clone(), topic.to_string());
        let id = request
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n == CORRELATION_ID)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        self.rt.run(async move {
            let ch = channel(&conn).await?;
            let q = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| broker_error("declaring a reply queue", e))?;
            let reply_queue = q.name().as_str().to_string();
            let mut answers = ch
                .basic_consume(
                    reply_queue.as_str().into(),
                    "weir-request".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| broker_error("consuming the reply queue", e))?;
            request.headers.retain(|(n, _)| n != REPLY_TO);
            request
                .headers
                .push((REPLY_TO.to_string(), reply_queue.clone().into_bytes()));
            publish_confirmed(&publisher, &[(topic.as_str(), &request)], &fanouts).await?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, answers.next()).await {
                    Err(_) | Ok(None) => return Ok(None),
                    Ok(Some(Err(e))) => return Err(broker_error("reading the reply queue", e)),
                    Ok(Some(Ok(d))) => {
                        let (answer, _) = super::from_amqp(&d.properties, d.data, false);
                        let mine = answer
                            .headers
                            .iter()
                            .any(|(n, v)| n == CORRELATION_ID && *v == id);
                        if mine {
                            return Ok(Some(answer));
                        }
                    }
                }
            }
        })
    }
}
