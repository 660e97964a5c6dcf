//! `weir request` (and `POST /topics/T/request`) on Redis Streams: the request goes to the
//! topic's stream with `reply-to: <TOPIC>.replies`, and the caller waits on the reply stream
//! with `XREAD BLOCK` from the last entry id it had before sending. Ids, not positions: an
//! answer is found however the stream is trimmed (`maxlen`), and a call reads only what came
//! after it, however long the stream has grown.

use super::broker::RedisBroker;
use super::entries;
use crate::host::reply::{CORRELATION_ID, REPLY_TO};
use crate::source::broker::Broker;
use crate::source::{Record, SourceError};
use std::time::{Duration, Instant};

/// The longest single `XREAD BLOCK` (well inside the connection's read timeout).
const BLOCK: Duration = Duration::from_millis(1000);

impl RedisBroker {
    pub(super) fn request_over_streams(
        &mut self,
        topic: &str,
        mut request: Record,
        timeout: Duration,
    ) -> Result<Option<Record>, SourceError> {
        let started = Instant::now();
        let reply_to = format!("{topic}.replies");
        match self.create_topic(&reply_to, 1, None) {
            Ok(()) | Err(SourceError::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
        let key = self.cfg.key(&reply_to);
        let last: redis::Value = self.conns.with("reading a stream's last id", |c| {
            redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query(c)
        })?;
        let mut after = entries(last)?
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_string(), |(id, _)| id);
        let id = request
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n == CORRELATION_ID)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        request.headers.retain(|(n, _)| n != REPLY_TO);
        request
            .headers
            .push((REPLY_TO.to_string(), reply_to.into_bytes()));
        self.append(topic, vec![request])?;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            let block = left.min(BLOCK).as_millis().max(1) as u64;
            let v: redis::Value = self.conns.with("waiting for an answer", |c| {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(block)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&after)
                    .query(c)
            })?;
            for (entry, record) in streamed(v)? {
                after = entry;
                if let Some(r) = record
                    && r.headers
                        .iter()
                        .any(|(n, v)| n == CORRELATION_ID && *v == id)
                {
                    return Ok(Some(r));
                }
            }
        }
    }
}

/// The entries of an `XREAD` of one stream: `[[key, [[id, fields]...]]]`, or nil when the
/// block ran out.
fn streamed(v: redis::Value) -> Result<Vec<(String, Option<Record>)>, SourceError> {
    let redis::Value::Array(streams) = v else {
        return entries(v);
    };
    let mut out = Vec::new();
    for s in streams {
        if let redis::Value::Array(mut pair) = s
            && pair.len() == 2
        {
            out.extend(entries(pair.pop().expect("two items"))?);
        }
    }
    Ok(out)
}
