//! Screening a lane's messages against dedupe before they run.
//!
//! A message whose idempotency key is done is acked without running (a duplicate); one whose
//! key another message holds (in this process or, with a shared store, in another) waits and is
//! screened again; otherwise it claims its key. While a shared store does not answer, keyed
//! messages wait: none runs unclaimed.
//!
//! The lookups (the embedded log's marks, the shared store's claims) are I/O: they run on the
//! blocking pool, one call per lane's screening, never on the async threads that fetch, commit
//! and serve the admin server (a slow Redis or disk then delays only the lane it screens).

use super::{Held, Lane, Pending};
use crate::engine::claims::Local;
use crate::engine::dedupe::Claim;
use crate::engine::offsets::OffsetTracker;
use crate::engine::{Ctx, EngineError, now_ms};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a message waits before its idempotency key, claimed by another copy, is checked again.
const DEDUPE_RECHECK: Duration = Duration::from_millis(5);
/// How long a message waits before a key claimed in another process is checked again.
const SHARED_RECHECK: Duration = Duration::from_millis(50);
/// How long keyed messages wait after the shared dedupe store failed to answer.
pub(super) const STORE_DOWN_WAIT: Duration = Duration::from_secs(1);

pub(super) async fn screen(
    ctx: &Arc<Ctx>,
    lane: &mut Lane,
    tracker: &mut OffsetTracker,
    pending: &mut Pending,
    held: &mut Held,
    now: Instant,
) -> Result<(), EngineError> {
    let Some(dedupe) = ctx.cfg.dedupe.as_ref() else {
        return Ok(());
    };
    // Only keyed messages that are neither claimed nor waiting are screened now.
    let due = |w: &super::Work| {
        w.dedupe_key.is_some() && !w.claimed && w.not_before.is_none_or(|nb| nb <= now)
    };
    if !lane.queue.iter().any(due) {
        return Ok(());
    }
    // Each key is claimed in this process first (so two lanes never claim it at once), then
    // looked up in one blocking call for all: in the embedded log's marks, or in the shared
    // store. Looking up first could miss a mark written just after the lookup, then find the
    // claim already let go, and run a copy again.
    let mut kept = VecDeque::with_capacity(lane.queue.len());
    // Positions in `kept` of the messages to look up.
    let mut ask: Vec<usize> = Vec::new();
    let down = match dedupe.store {
        Some(_) => *ctx.store_down_until.lock().expect("store lock"),
        None => None,
    };
    for mut w in lane.queue.drain(..) {
        if due(&w) {
            let key = w.dedupe_key.as_deref().expect("due messages are keyed");
            if let Some(until) = down.filter(|u| *u > now) {
                w.not_before = Some(until);
            } else {
                match ctx.claims.lock().expect("claims lock").claim(key) {
                    Local::Claimed => ask.push(kept.len()),
                    // Another copy is in flight: look again shortly; by then it is done or
                    // released.
                    Local::Busy => w.not_before = Some(now + DEDUPE_RECHECK),
                    // A copy of a message done here whose mark waits to be written.
                    Local::Duplicate => {
                        tracker.finish(w.at);
                        pending.deduped += 1;
                        continue;
                    }
                }
            }
        }
        kept.push_back(w);
    }
    let Some(store) = dedupe.store.clone() else {
        if ask.is_empty() {
            lane.queue = kept;
            return Ok(());
        }
        let keys: Vec<Vec<u8>> = ask
            .iter()
            .map(|&i| kept[i].dedupe_key.clone().expect("keyed"))
            .collect();
        let (source, group, wall) = (ctx.source.clone(), ctx.cfg.group.clone(), now_ms());
        let done = tokio::task::spawn_blocking(move || {
            keys.iter()
                .map(|k| source.dedupe_done(&group, k, wall))
                .collect::<Result<Vec<bool>, _>>()
        })
        .await
        .map_err(|e| EngineError::Join(e.to_string()))?;
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                // Nothing claimed here may stay claimed by a lookup that failed.
                let mut claims = ctx.claims.lock().expect("claims lock");
                for &i in &ask {
                    claims.remove(kept[i].dedupe_key.as_deref().expect("keyed"));
                }
                lane.queue = kept;
                return Err(e.into());
            }
        };
        let mut duplicates = Vec::new();
        {
            let mut claims = ctx.claims.lock().expect("claims lock");
            for (&i, done) in ask.iter().zip(done) {
                let w = &mut kept[i];
                let key = w.dedupe_key.as_deref().expect("keyed");
                if done {
                    claims.remove(key);
                    duplicates.push(i);
                } else {
                    held.hold(key);
                    w.claimed = true;
                }
            }
        }
        for i in duplicates.into_iter().rev() {
            let w = kept.remove(i).expect("index in range");
            tracker.finish(w.at);
            pending.deduped += 1;
        }
        lane.queue = kept;
        return Ok(());
    };
    if !ask.is_empty() {
        let keys: Vec<(Vec<u8>, String)> = ask
            .iter()
            .map(|&i| {
                let w = &kept[i];
                let key = w.dedupe_key.clone().expect("asked for keyed messages");
                (key, place(&w.msg.topic, w.msg.partition, w.msg.offset))
            })
            .collect();
        let (group, token, ttl) = (ctx.cfg.group.clone(), ctx.token.clone(), dedupe.claim_ttl);
        let answers = tokio::task::spawn_blocking(move || {
            let refs: Vec<(&[u8], &str)> = keys
                .iter()
                .map(|(k, p)| (k.as_slice(), p.as_str()))
                .collect();
            store.claim_many(&group, &refs, &token, ttl)
        })
        .await
        .map_err(|e| EngineError::Join(e.to_string()))?;
        let mut duplicates = Vec::new();
        {
            let mut claims = ctx.claims.lock().expect("claims lock");
            for (n, &i) in ask.iter().enumerate() {
                let w = &mut kept[i];
                let key = w.dedupe_key.as_ref().expect("keyed");
                let answer = answers.as_ref().map(|a| a[n]).map_err(|_| ());
                if answer != Ok(Claim::Mine) {
                    claims.remove(key);
                }
                match answer {
                    Ok(Claim::Mine) => {
                        held.hold(key);
                        w.claimed = true;
                    }
                    Ok(Claim::Done) => duplicates.push(i),
                    Ok(Claim::Busy) => w.not_before = Some(now + SHARED_RECHECK),
                    Err(()) => w.not_before = Some(now + STORE_DOWN_WAIT),
                }
            }
        }
        if let Err(e) = answers {
            let mut slot = ctx.store_down_until.lock().expect("store lock");
            if slot.is_none_or(|u| u <= now) {
                tracing::warn!(error = %e, "not running messages with an idempotency key until the dedupe store answers");
            }
            *slot = Some(now + STORE_DOWN_WAIT);
        }
        // Duplicates are acked without running.
        for i in duplicates.into_iter().rev() {
            let w = kept.remove(i).expect("index in range");
            tracker.finish(w.at);
            pending.deduped += 1;
        }
    }
    lane.queue = kept;
    Ok(())
}

/// Where a message is, as a shared store's claims name it: `topic/partition/offset`.
pub(super) fn place(topic: &str, partition: u32, offset: u64) -> String {
    format!("{topic}/{partition}/{offset}")
}
