//! Which lane a message waits in, and which of a lane's messages run next.

use super::Work;
use crate::source::Delivery;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use tokio::time::Instant;

pub(super) fn lane_of(d: &Delivery, lanes: usize, round_robin: &mut usize) -> usize {
    match &d.record.key {
        Some(k) => {
            // Not the partitioner's hash: with it, every key of a partition could share a lane.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.hash(&mut h);
            (h.finish() % lanes as u64) as usize
        }
        None => {
            *round_robin = (*round_robin + 1) % lanes;
            *round_robin
        }
    }
}

/// Takes the next run of a lane: messages that may run now, in queue order, up to `max`.
///
/// A message waiting out a backoff blocks its key, not the lane: it is skipped, and so is every
/// later message with the same key, so per-key order holds while other keys go on. (Keyless
/// messages carry no order and are never blocked by others.) `wake` learns the earliest
/// backoff end among the messages looked at.
///
/// It looks only as far as it takes: a failed message at the front of a lane puts the rest of
/// its run back, so this runs once per failure, and a pass over the whole lane each time made
/// 7% retries CPU-bound. When a run is taken, what lies behind it is looked at again once the
/// run finishes (the loop goes round on every finished run); when none is, everything was
/// looked at and `wake` is complete.
pub(super) fn take_run(
    queue: &mut VecDeque<Work>,
    max: usize,
    now: Instant,
    wake: &mut Option<Instant>,
) -> Vec<Work> {
    let n = max.min(queue.len());
    // The common case: nothing at the front waits (so nothing there is blocked either), and
    // nothing there runs again after a failure.
    if queue
        .iter()
        .take(n)
        .all(|w| w.not_before.is_none_or(|nb| nb <= now) && !w.again)
    {
        return queue.drain(..n).collect();
    }
    let mut blocked: Vec<Vec<u8>> = Vec::new();
    let mut take = Vec::new();
    let mut keep = Vec::new();
    while take.len() < max {
        let Some(w) = queue.pop_front() else { break };
        let key = w.msg.record.key.as_deref();
        let waiting = w.not_before.filter(|nb| *nb > now);
        if let Some(nb) = waiting {
            *wake = Some(wake.map_or(nb, |x| x.min(nb)));
        }
        let key_blocked = key.is_some_and(|k| blocked.iter().any(|b| b.as_slice() == k));
        if waiting.is_some() || key_blocked {
            if let Some(k) = key
                && !key_blocked
            {
                blocked.push(k.to_vec());
            }
            keep.push(w);
            continue;
        }
        // Messages that failed here run apart from the others: a run of them, or a run
        // without them.
        if take.first().is_some_and(|t: &Work| t.again != w.again) {
            keep.push(w);
            break;
        }
        take.push(w);
    }
    // The skipped go back in front, in their order.
    for w in keep.into_iter().rev() {
        queue.push_front(w);
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Delivery, Record};
    use std::sync::Arc;
    use std::time::Duration;

    fn work(offset: u64, key: Option<&str>, waiting: bool, now: Instant) -> Work {
        Work {
            msg: Delivery {
                topic: Arc::from("t"),
                partition: 0,
                offset,
                redeliveries: 0,
                record: Record {
                    key: key.map(|k| k.as_bytes().to_vec()),
                    ..Record::default()
                },
            },
            at: offset,
            attempt: 1,
            not_before: waiting.then(|| now + Duration::from_secs(1)),
            first_failure_ms: None,
            dedupe_key: None,
            claimed: false,
            again: false,
        }
    }

    fn offsets(v: &[Work]) -> Vec<u64> {
        v.iter().map(|w| w.at).collect()
    }

    #[test]
    fn a_backing_off_key_blocks_only_itself() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = [
            work(0, Some("a"), true, now),
            work(1, Some("b"), false, now),
            work(2, Some("a"), false, now),
            work(3, None, false, now),
            work(4, Some("b"), false, now),
        ]
        .into_iter()
        .collect();
        let mut wake = None;
        let run = take_run(&mut q, 10, now, &mut wake);
        assert_eq!(offsets(&run), vec![1, 3, 4], "b and keyless go on; a waits");
        assert_eq!(q.iter().map(|w| w.at).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(wake, Some(now + Duration::from_secs(1)));
    }

    #[test]
    fn a_run_behind_a_waiting_message_stops_at_the_batch_size() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = [
            work(0, Some("a"), true, now),
            work(1, Some("b"), false, now),
            work(2, Some("c"), false, now),
            work(3, Some("d"), false, now),
            work(4, Some("a"), false, now),
        ]
        .into_iter()
        .collect();
        let mut wake = None;
        let run = take_run(&mut q, 2, now, &mut wake);
        assert_eq!(offsets(&run), vec![1, 2]);
        // The waiting one back in front, then what was not looked at, in order.
        assert_eq!(q.iter().map(|w| w.at).collect::<Vec<_>>(), vec![0, 3, 4]);
        assert_eq!(wake, Some(now + Duration::from_secs(1)));
        // Once it is due, it leads again, and its key follows in order.
        let later = now + Duration::from_secs(2);
        let run = take_run(&mut q, 9, later, &mut wake);
        assert_eq!(offsets(&run), vec![0, 3, 4]);
    }

    #[test]
    fn messages_that_failed_here_run_apart_from_first_attempts() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = (0..6).map(|o| work(o, None, false, now)).collect();
        for i in [0, 1, 4] {
            q[i].again = true;
        }
        let mut wake = None;
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![0, 1]);
        // A run of first attempts stops before the next retry, which then runs apart.
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![2, 3]);
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![4]);
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![5]);
    }

    #[test]
    fn runs_respect_the_batch_size_and_keep_queue_order() {
        let now = Instant::now();
        let mut q: VecDeque<Work> = (0..5).map(|o| work(o, Some("k"), false, now)).collect();
        let mut wake = None;
        assert_eq!(offsets(&take_run(&mut q, 2, now, &mut wake)), vec![0, 1]);
        assert_eq!(offsets(&take_run(&mut q, 9, now, &mut wake)), vec![2, 3, 4]);
        assert!(q.is_empty() && wake.is_none());
    }
}
