//! Reading a consumed stream: the entries this consumer name holds already (its history: after
//! a restart under a fixed name, or after a read whose answer was lost), those taken over from
//! others (`XAUTOCLAIM`), and new ones (`XREADGROUP ... >`), into the stream's buffer.

use super::conns::REQUEST;
use super::consumer::RedisSource;
use super::{entries, error};
use crate::source::{Record, SourceError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A page of entries as read: id, and the record (`None`: deleted while pending).
type Page = Vec<(String, Option<Record>)>;

impl RedisSource {
    fn reader(&self, topic: &str) -> Arc<Mutex<Option<redis::Connection>>> {
        self.readers
            .lock()
            .expect("readers")
            .entry(topic.to_string())
            .or_default()
            .clone()
    }

    /// Reads more entries of `topic` into its buffer: its history first, then claimed, then new.
    pub(super) fn fill(&self, topic: &str, max: usize) -> Result<(), SourceError> {
        let key = self.cfg.key(topic);
        let noack = self.opts.at_most_once;
        // What to read: (history from this id, claim from this cursor), and what is in hand.
        let (history, claim, in_hand) = {
            let mut st = self.streams.lock().expect("streams");
            let s = st.entry(topic.to_string()).or_default();
            let claim = (!noack
                && s.claimed_at
                    .is_none_or(|t| t.elapsed() >= self.cfg.claim_idle / 4))
            .then(|| s.claim_cursor.clone());
            if claim.is_some() {
                s.claimed_at = Some(Instant::now());
            }
            let history = s.history_after.clone().filter(|_| !noack);
            // What this process holds, to skip if a history read or a claim returns it: built
            // only when one runs (a set of every held id on each read made reading slower the
            // more was held: 8,192 in flight, 6,000 msg/s).
            let in_hand: HashSet<String> = if history.is_some() || claim.is_some() {
                s.receipts
                    .receipts()
                    .chain(s.buffer.iter().map(|(id, ..)| id))
                    .cloned()
                    .collect()
            } else {
                HashSet::new()
            };
            (history, claim, in_hand)
        };
        let reader = self.reader(topic);
        let mut guard = reader.lock().expect("reader");
        let block = self.cfg.block;
        let mut link_lost = false;
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
                        // The read may have run: what it delivered is this consumer's now,
                        // unseen. The history read finds it.
                        link_lost = true;
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
            if noack {
                cmd.arg("NOACK");
            }
            cmd.arg("STREAMS").arg(&key).arg(id);
        };
        // Entries delivered before: their counts come from XPENDING.
        let mut again: Page = Vec::new();
        let mut history_next = None;
        let mut cursor_next = None;
        if let Some(after) = &history {
            let page = stream_entries(read(&|c| group_read(c, after, max, false))?)?;
            // A short page is the last; else read on after its last id next time.
            history_next = Some(
                page.last()
                    .filter(|_| page.len() >= max)
                    .map(|(id, _)| id.clone()),
            );
            again.extend(page.into_iter().filter(|(id, _)| !in_hand.contains(id)));
        }
        if let (Some(cursor), true) = (&claim, again.is_empty()) {
            let min_idle = self.cfg.claim_idle.as_millis() as u64;
            let v = read(&|c| {
                c.arg("XAUTOCLAIM")
                    .arg(&key)
                    .arg(&self.group)
                    .arg(&self.cfg.consumer)
                    .arg(min_idle)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(max);
            })?;
            // [next cursor, entries, deleted ids]: entries deleted while pending are dropped
            // from the pending list by the claim itself.
            if let redis::Value::Array(mut parts) = v
                && parts.len() >= 2
            {
                let claimed = entries(parts.swap_remove(1))?;
                cursor_next = Some(super::text(parts.swap_remove(0))?);
                again.extend(claimed.into_iter().filter(|(id, _)| !in_hand.contains(id)));
            }
        }
        let mut got: Vec<(String, u32, Record)> = Vec::new();
        if !again.is_empty() {
            let counts = self.counts(&key, &again)?;
            let mut gone = Vec::new();
            for (id, r) in again {
                match (r, counts.get(&id)) {
                    (Some(r), Some(n)) => got.push((id, *n, r)),
                    // Acked or taken by another meanwhile: not this consumer's to run.
                    (Some(_), None) => {}
                    (None, _) => gone.push(id),
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
        } else if history_next.is_none() {
            // Without BLOCK: the engine's loop waits in this call, and a read that waits for new
            // entries held up its finished jobs and commits (100 ms a fetch once the stream was
            // read to its end: 5,000 msg/s with 8,192 in flight). An empty answer makes the
            // engine poll again after its idle interval (20 ms) or as soon as a job finishes.
            let v = read(&|c| group_read(c, ">", max, false))?;
            for (id, r) in stream_entries(v)? {
                // A new entry cannot have been deleted between XADD and this read's answer.
                if let Some(r) = r {
                    got.push((id, 1, r));
                }
            }
        }
        drop(guard);
        let mut st = self.streams.lock().expect("streams");
        let s = st.entry(topic.to_string()).or_default();
        if let Some(next) = history_next {
            s.history_after = next;
        }
        if let Some(c) = cursor_next {
            s.claim_cursor = c;
        }
        if link_lost && !noack {
            s.history_after = Some("0".into());
        }
        s.buffer.extend(got);
        Ok(())
    }

    /// The delivery count of each of `entries` still pending to this consumer, from
    /// `XPENDING`; one that is not (acked or taken over meanwhile) is left out.
    fn counts(&self, key: &str, entries: &Page) -> Result<HashMap<String, u32>, SourceError> {
        let ids: HashSet<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        // Ids compare as (milliseconds, sequence), not as text (`5-10` comes after `5-9`).
        let order = |id: &String| {
            let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
            (
                ms.parse::<u64>().unwrap_or(0),
                seq.parse::<u64>().unwrap_or(0),
            )
        };
        let (Some(first), Some(last)) = (
            entries.iter().map(|e| &e.0).min_by_key(|id| order(id)),
            entries.iter().map(|e| &e.0).max_by_key(|id| order(id)),
        ) else {
            return Ok(HashMap::new());
        };
        // Within [first, last] this consumer may own other entries too (in flight): room for
        // them all, and they are skipped.
        let room = entries.len() + self.held(key) + 10_000;
        let rows: Vec<(String, String, u64, u32)> =
            self.conns.with("counting deliveries", |c| {
                redis::cmd("XPENDING")
                    .arg(key)
                    .arg(&self.group)
                    .arg(first)
                    .arg(last)
                    .arg(room)
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
fn stream_entries(v: redis::Value) -> Result<Page, SourceError> {
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
