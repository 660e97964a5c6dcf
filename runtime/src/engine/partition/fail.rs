//! A message's failure: retried in place, requeued to the retry topic, or dead-lettered.

use super::{Later, Pending, Work};
use crate::engine::dlq::{self, Origin};
use crate::engine::offsets::OffsetTracker;
use crate::engine::{Ctx, DeliveryMode as Mode, RetryMode, now_ms};
use crate::host::Outcome;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// What went wrong with a message, as the log and the DLQ envelope name it.
fn failure_kind(stop: &Outcome, exhausted: bool) -> (&'static str, String) {
    match stop {
        Outcome::Reject { reason } => ("rejected", reason.clone()),
        Outcome::Retry { reason, .. } if exhausted => ("retries-exhausted", reason.clone()),
        Outcome::Retry { reason, .. } => ("retry", reason.clone()),
        Outcome::Fault { kind, detail } => (kind.as_str(), detail.clone()),
        Outcome::InvalidOutput { detail } => ("invalid-output", detail.clone()),
        Outcome::Ok => ("ok", String::new()),
    }
}

/// One message's failure: retried in place (returned, to wait in its lane), or settled now
/// (requeued to the retry topic or dead-lettered).
pub(super) fn fail(
    ctx: &Ctx,
    topic: &Arc<str>,
    is_retry_topic: bool,
    tracker: &mut OffsetTracker,
    pending: &mut Pending,
    mut w: Work,
    stop: Outcome,
) -> Option<Work> {
    let cfg = &ctx.cfg;
    let now = now_ms();
    let first = *w.first_failure_ms.get_or_insert(now);
    let retryable = matches!(
        stop,
        Outcome::Retry { .. } | Outcome::Fault { .. } | Outcome::InvalidOutput { .. }
    );
    let exhausted = retryable && !cfg.backoff.may_retry(w.attempt);
    let (kind, error) = failure_kind(&stop, exhausted);
    ctx.stats.metrics.count(
        topic,
        if kind == "retries-exhausted" {
            "retry"
        } else {
            kind
        },
        1,
    );
    let key = w.msg.record.key.as_deref().map(String::from_utf8_lossy);
    tracing::warn!(
        topic = %w.msg.topic, partition = w.msg.partition, offset = w.msg.offset,
        key = key.as_deref().unwrap_or(""), attempt = w.attempt, kind, error = %error,
        "message failed"
    );
    let origin_topic = if is_retry_topic {
        w.msg.topic.clone()
    } else {
        topic.clone()
    };
    let origin = Origin {
        topic: origin_topic.clone(),
        partition: w.msg.partition,
        offset: w.msg.offset,
    };
    if retryable && !exhausted && cfg.delivery == Mode::AtLeastOnce {
        let requested = match &stop {
            Outcome::Retry { delay, .. } => *delay,
            _ => None,
        };
        let delay = cfg
            .backoff
            .delay(w.attempt, requested, rand::random::<f64>());
        ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
        if cfg.retry_mode == RetryMode::Requeue && ctx.source.capabilities().delayed_retry {
            // The broker delays it: given back with the commit, delivered again after the
            // delay with its delivery count (the next attempt's number) one higher.
            if w.claimed
                && let Some(key) = w.dedupe_key.take()
            {
                pending.release.push(key);
            }
            pending
                .commit
                .delayed
                .push((topic.clone(), w.msg.partition, w.at, delay));
            tracker.give_back(w.at);
            return None;
        }
        if cfg.retry_mode == RetryMode::Requeue {
            let not_before = now + delay.as_millis() as u64;
            let copy = dlq::requeue(
                &w.msg,
                &origin,
                w.attempt + 1,
                not_before,
                first,
                cfg.retry_for(&origin_topic),
            );
            match ctx.source.fits(&copy.record) {
                Ok(()) => {
                    if w.claimed
                        && let Some(key) = w.dedupe_key.take()
                    {
                        pending.release.push(key);
                    }
                    pending.hold(w.at, w.at, Later::Letter(copy));
                    tracker.finish(w.at);
                    return None;
                }
                // Too large for the retry topic with its headers: retried in place.
                Err(e) => {
                    tracing::debug!(error = %e, "the retry copy does not fit; retrying in place")
                }
            }
        }
        w.attempt += 1;
        w.not_before = Some(Instant::now() + delay);
        w.again = true;
        return Some(w);
    }
    // The handler that ran it: the current one (a reload between the call and here is the one
    // case this names the newer module).
    let current = ctx.stats.module.get().unwrap_or_else(|| ctx.module.clone());
    let failure = dlq::Failure {
        origin: &origin,
        attempts: w.attempt,
        kind,
        error: &error,
        module: current.name(),
        digest: current.digest(),
        group: &cfg.group,
        first_failure_ms: first,
        last_failure_ms: now,
    };
    let letter = dlq::envelope(&w.msg, &failure, cfg.dlq_for(&origin_topic));
    pending.hold(
        w.at,
        w.at,
        Later::Letter(dlq::fit(letter, |r| ctx.source.fits(r))),
    );
    // A request that failed for good is answered with the error, so its caller learns it now
    // rather than at its timeout (with the dead letter, in the same commit).
    if let Some(answer) = crate::host::reply::error_answer(&w.msg.record.headers, kind, &error)
        && ctx.source.fits(&answer.record).is_ok()
    {
        pending.hold(w.at, w.at, Later::Answer(answer));
    }
    // Not done: a later copy of it may run.
    if w.claimed
        && let Some(key) = w.dedupe_key.take()
    {
        pending.release.push(key);
    }
    tracker.finish(w.at);
    pending.dead += 1;
    None
}
