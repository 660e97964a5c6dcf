//! Reading a consumed stream: the entries this consumer name held before, those taken over
//! from others (`XAUTOCLAIM`), and new ones (`XREADGROUP ... >`), into the stream's buffer.

use super::conns::REQUEST;
use super::consumer::RedisSource;
use super::{entries, error};
use crate::source::{Record, SourceError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

impl RedisSource {
    fn reader(&self, topic: &str) -> Arc<Mutex<Option<redis::Connection>>> {
        self.readers
            .lock()
            .expect("readers")
            .entry(topic.to_string())
            .or_default()
            .clone()
    }

    /// Reads more entries of `topic` into its buffer: held before, claimed, or new.
    pub(super) fn fill(&self, topic: &str, max: usize) -> Result<(), SourceError> {
        let key = self.cfg.key(topic);
        let (history, claim) = {
            let mut st = self.streams.lock().expect("streams");
            let s = st.entry(topic.to_string()).or_default();
            let claim = !self.opts.at_most_once
                && s.claimed_at
                    .is_none_or(|t| t.elapsed() >= self.cfg.claim_idle / 4);
            if claim {
                s.claimed_at = Some(Instant::now());
            }
            (!s.history_read, claim)
        };
        let reader = self.reader(topic);
        let mut guard = reader.lock().expect("reader");
        let block = self.cfg.block;
        let mut read = |args: &dyn Fn(&mut redis::Cmd)| -> Result<redis::Value, SourceError> {
            let mut cmd = redis::Cmd::new();
            args(&mut cmd);
            let mut last = None;
            for _ in 0..2 {
                if guard.is_none() {
                    match self.conns.connect(block + REQUEST) {
                        Ok(c) => *guard = Some(c),
                        Err(e) => {
                            last = Some(e);
                            continue;
                        }
                    }
                }
                match cmd.query::<redis::Value>(guard.as_mut().expect("connected")) {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        *guard = None;
                        if !super::conns::is_link(&e) {
                            return Err(error("reading the stream", e));
                        }
                        last = Some(e);
                    }
                }
            }
            Err(error(
                "reading the stream",
                last.map_or("no connection".into(), |e| e.to_string()),
            ))
        };
        let group_read = |cmd: &mut redis::Cmd, id: &str, count: usize, wait: bool| {
            cmd.arg("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.cfg.consumer)
                .arg("COUNT")
                .arg(count);
            if wait {
                cmd.arg("BLOCK").arg(block.as_millis() as u64);
            }
            if self.opts.at_most_once {
                cmd.arg("NOACK");
            }
            cmd.arg("STREAMS").arg(&key).arg(id);
        };
        // Entries that may have been delivered before: their counts come from XPENDING.
        let mut again: Vec<(String, Option<Record>)> = Vec::new();
        if history && !self.opts.at_most_once {
            let v = read(&|c| group_read(c, "0", max, false))?;
            again.extend(stream_entries(v)?);
            if again.len() < max {
                // All of this name's history is in hand (a short page is the last one).
                self.streams
                    .lock()
                    .expect("streams")
                    .entry(topic.to_string())
                    .or_default()
                    .history_read = true;
            }
        }
        if claim && again.is_empty() {
            let min_idle = self.cfg.claim_idle.as_millis() as u64;
            let v = read(&|c| {
                c.arg("XAUTOCLAIM")
                    .arg(&key)
                    .arg(&self.group)
                    .arg(&self.cfg.consumer)
                    .arg(min_idle)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(max);
            })?;
            // [next cursor, entries, deleted ids]: entries deleted while pending are dropped
            // from the pending list by the claim itself.
            if let redis::Value::Array(mut parts) = v
                && parts.len() >= 2
            {
                again.extend(entries(parts.swap_remove(1))?);
            }
        }
        let mut got: Vec<(String, u32, Record)> = Vec::new();
        if !again.is_empty() {
            let counts = self.counts(&key, &again)?;
            let mut gone = Vec::new();
            for (id, r) in again {
                match r {
                    Some(r) => {
                        let n = counts.get(&id).copied().unwrap_or(1);
                        got.push((id, n, r));
                    }
                    None => gone.push(id),
                }
            }
            if !gone.is_empty() {
                // Deleted from the stream while pending: nothing to run.
                self.conns.with("acking deleted entries", |c| {
                    redis::cmd("XACK")
                        .arg(&key)
                        .arg(&self.group)
                        .arg(&gone)
                        .query::<()>(c)
                })?;
            }
        } else {
            let v = read(&|c| group_read(c, ">", max, true))?;
            for (id, r) in stream_entries(v)? {
                // A new entry cannot have been deleted between XADD and this read's answer.
                if let Some(r) = r {
                    got.push((id, 1, r));
                }
            }
        }
        drop(guard);
        if !got.is_empty() {
            let mut st = self.streams.lock().expect("streams");
            st.entry(topic.to_string()).or_default().buffer.extend(got);
        }
        Ok(())
    }

    /// The delivery count of each of `entries`, from `XPENDING` for this consumer.
    fn counts(
        &self,
        key: &str,
        entries: &[(String, Option<Record>)],
    ) -> Result<HashMap<String, u32>, SourceError> {
        let ids: HashSet<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        // In id order (XAUTOCLAIM and XREADGROUP answer in order), within [first, last]; this
        // consumer's other pending entries in that range come too, and are skipped.
        let held = self.held(key);
        let rows: Vec<(String, String, u64, u32)> =
            self.conns.with("counting deliveries", |c| {
                redis::cmd("XPENDING")
                    .arg(key)
                    .arg(&self.group)
                    .arg(&first.0)
                    .arg(&last.0)
                    .arg(entries.len() + held)
                    .arg(&self.cfg.consumer)
                    .query(c)
            })?;
        Ok(rows
            .into_iter()
            .filter(|(id, ..)| ids.contains(id.as_str()))
            .map(|(id, _, _, n)| (id, n))
            .collect())
    }
}

/// The entries of an `XREADGROUP` reply (`[[key, entries]]`, or nil when none came).
fn stream_entries(v: redis::Value) -> Result<Vec<(String, Option<Record>)>, SourceError> {
    match v {
        redis::Value::Nil => Ok(Vec::new()),
        redis::Value::Array(mut streams) => match streams.pop() {
            Some(redis::Value::Array(mut kv)) if kv.len() == 2 => entries(kv.pop().expect("2")),
            None => Ok(Vec::new()),
            Some(other) => Err(error("reading the stream", format!("reply {other:?}"))),
        },
        redis::Value::Map(mut m) => match m.pop() {
            Some((_, v)) => entries(v),
            None => Ok(Vec::new()),
        },
        other => Err(error("reading the stream", format!("reply {other:?}"))),
    }
}
