//! Consuming the partitions a broker's group protocol assigns to this process (Kafka):
//! partition tasks started and stopped as assignments and revocations arrive, and when a
//! `--drain` of a group is done.

use super::{Ctx, DRAIN_UNANSWERED, EngineError, partition};
use crate::source::{GroupEvent, SourceError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How often `--drain` looks again at partitions behind that were taken from this process.
const DRAIN_RECHECK: Duration = Duration::from_millis(500);
/// How long `--drain` waits for partitions taken from this process to come back (or to be
/// drained by whoever got them) before it counts only its own.
const DRAIN_REJOIN_WAIT: Duration = Duration::from_secs(60);

/// A revocation waiting for its partitions' tasks to end.
struct Revoking {
    left: HashSet<(Arc<str>, u32)>,
    deadline: tokio::time::Instant,
    done: std::sync::mpsc::SyncSender<()>,
}

/// Consumes the partitions the broker assigns to this process, starting and stopping partition
/// tasks as assignments and revocations arrive. A revoked partition finishes its in-flight
/// calls and commits (its backing-off messages stay uncommitted, for the next owner) before
/// the source is told it may let go; past `revoke_timeout` the task is abandoned.
pub(super) async fn assigned_partitions(
    ctx: &Arc<Ctx>,
    partitions: &[(Arc<str>, u32)],
    mut events: mpsc::UnboundedReceiver<GroupEvent>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), EngineError> {
    type Key = (Arc<str>, u32);
    let mut tasks = tokio::task::JoinSet::new();
    // Each running partition: its own stop flag and its task's handle.
    let mut running: HashMap<Key, (watch::Sender<bool>, tokio::task::AbortHandle)> = HashMap::new();
    let mut ids: HashMap<tokio::task::Id, Key> = HashMap::new();
    let mut revoking: Vec<Revoking> = Vec::new();
    // Every partition this process owns now, running or drained.
    let mut owned: HashSet<Key> = HashSet::new();
    let mut stopping = *shutdown.borrow();
    let mut assigned = false;
    let mut failed = None;
    // `--drain` with partitions behind that were revoked from this process and not assigned
    // back (the group took them while a session timed out, and gives them back on rejoining):
    // when to look again. Each such partition with when it was revoked: waited for up to
    // DRAIN_REJOIN_WAIT; another member's partitions are that member's to drain.
    let mut recheck: Option<tokio::time::Instant> = None;
    let mut taken: HashMap<Key, tokio::time::Instant> = HashMap::new();
    // Since when the drain check has had no answer from the broker.
    let mut unanswered: Option<tokio::time::Instant> = None;
    let stop_all = |running: &HashMap<Key, (watch::Sender<bool>, tokio::task::AbortHandle)>| {
        for (stop, _) in running.values() {
            let _ = stop.send(true);
        }
    };
    loop {
        revoking.retain(|r| {
            if r.left.is_empty() {
                let _ = r.done.send(());
            }
            !r.left.is_empty()
        });
        if tasks.is_empty() && stopping {
            break;
        }
        if tasks.is_empty()
            && ctx.cfg.drain
            && assigned
            && revoking.is_empty()
            && recheck.is_none_or(|at| at <= tokio::time::Instant::now())
        {
            // Every partition was drained once; outputs or requeued retries may have landed in
            // a topic we consume since, so go again where something arrived. Done only when
            // every partition of the group's topics is committed to its end, not only the ones
            // this process owns now: a group that took them away (a session that timed out
            // while the broker was unreachable) gives them back, and another member's may
            // still be behind.
            let (src, group) = (ctx.source.clone(), ctx.cfg.group.clone());
            let now = tokio::time::Instant::now();
            taken.retain(|k, at| {
                let waiting = !owned.contains(k) && now.duration_since(*at) < DRAIN_REJOIN_WAIT;
                if !waiting && !owned.contains(k) {
                    tracing::warn!(topic = %k.0, partition = k.1, "--drain stops waiting for a partition the group took from this process; it is left to the member that has it");
                }
                waiting
            });
            let keys: Vec<Key> = partitions
                .iter()
                .filter(|k| owned.contains(*k) || taken.contains_key(*k))
                .cloned()
                .collect();
            let mine = owned.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let (mut behind, mut elsewhere) = (Vec::new(), false);
                // A transaction's closing marker takes an offset no commit passes.
                let marker = u64::from(src.transactional());
                for (t, p) in keys {
                    let next = src.committed(&group, &t, p)?;
                    if mine.contains(&(t.clone(), p)) {
                        if !src.at_end(&t, p, next)? {
                            behind.push((t, p));
                        }
                    // Taken from this process: `at_end` speaks of what this consumer fetched,
                    // so the group's committed offset against the end says it (with
                    // transactions, one short counts as done: the closing marker).
                    } else if next + marker < src.end_offset(&t, p)? {
                        elsewhere = true;
                    }
                }
                Ok::<_, SourceError>((behind, elsewhere))
            })
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?;
            let (behind, elsewhere) = match checked {
                Ok(c) => {
                    unanswered = None;
                    c
                }
                // The broker does not answer (a lost link): ask again soon, as a partition
                // would; that costs the run nothing, up to DRAIN_UNANSWERED.
                Err(e @ SourceError::Broker { .. })
                    if unanswered.is_none_or(|t| now.duration_since(t) < DRAIN_UNANSWERED) =>
                {
                    tracing::warn!(error = %e, "--drain cannot tell yet whether everything is consumed; asking again");
                    unanswered.get_or_insert(now);
                    recheck = Some(now + DRAIN_RECHECK);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if behind.is_empty() && !elsewhere {
                break;
            }
            recheck = (behind.is_empty() && elsewhere)
                .then(|| tokio::time::Instant::now() + ctx.cfg.idle_poll.max(DRAIN_RECHECK));
            for key in behind {
                let (stop, stop_rx) = watch::channel(false);
                let h = tasks.spawn(partition::consume(
                    ctx.clone(),
                    key.0.clone(),
                    key.1,
                    stop_rx,
                ));
                ids.insert(h.id(), key.clone());
                running.insert(key, (stop, h));
            }
        }
        let deadline = revoking.iter().map(|r| r.deadline).min();
        tokio::select! {
            ev = events.recv(), if !stopping => match ev {
                Some(GroupEvent::Assigned(ps)) => {
                    assigned = true;
                    for key in ps {
                        owned.insert(key.clone());
                        if running.contains_key(&key) {
                            continue;
                        }
                        let (stop, stop_rx) = watch::channel(false);
                        let h = tasks.spawn(partition::consume(ctx.clone(), key.0.clone(), key.1, stop_rx));
                        ids.insert(h.id(), key.clone());
                        running.insert(key, (stop, h));
                    }
                }
                Some(GroupEvent::Revoked { partitions, done }) => {
                    let mut left = HashSet::new();
                    for key in partitions {
                        owned.remove(&key);
                        taken.insert(key.clone(), tokio::time::Instant::now());
                        if let Some((stop, _)) = running.get(&key) {
                            let _ = stop.send(true);
                            left.insert(key);
                        }
                    }
                    revoking.push(Revoking {
                        left,
                        deadline: tokio::time::Instant::now() + ctx.cfg.revoke_timeout,
                        done,
                    });
                }
                None => {
                    stopping = true;
                    stop_all(&running);
                }
            },
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let (id, result) = match joined {
                    Ok((id, r)) => (id, r),
                    Err(e) if e.is_cancelled() => (e.id(), Ok(())),
                    Err(e) => (e.id(), Err(EngineError::Join(e.to_string()))),
                };
                if let Some(key) = ids.remove(&id) {
                    running.remove(&key);
                    for r in &mut revoking {
                        r.left.remove(&key);
                    }
                }
                if let Err(e) = result {
                    // One partition failing (a broker or storage error) stops the run.
                    failed.get_or_insert(e);
                    stopping = true;
                    tasks.abort_all();
                }
            }
            _ = tokio::time::sleep_until(recheck.unwrap_or_else(tokio::time::Instant::now)), if recheck.is_some() && tasks.is_empty() => {}
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                let now = tokio::time::Instant::now();
                for r in revoking.iter_mut().filter(|r| r.deadline <= now) {
                    for key in r.left.drain() {
                        if let Some((_, h)) = running.remove(&key) {
                            tracing::warn!(topic = %key.0, partition = key.1, "revoked partition did not finish in time; abandoning its in-flight messages to the next owner");
                            h.abort();
                        }
                    }
                }
            }
            changed = shutdown.changed(), if !stopping => {
                if changed.is_err() || *shutdown.borrow() {
                    stopping = true;
                    stop_all(&running);
                }
            }
        }
    }
    for r in revoking {
        let _ = r.done.send(());
    }
    failed.map_or(Ok(()), Err)
}
