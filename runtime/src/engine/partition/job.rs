//! A lane's job: one run of messages through the instance pool.
//!
//! The host stops a call at the first message that fails (what comes after it did not run).
//! The job then goes on with the rest of the run in another call, leaving out the messages
//! whose key failed, so per-key order holds and one failure costs one more call rather than
//! putting the rest of the run back in the lane to be taken again (with 7% retries and runs
//! of 256, every message was taken about 20 times).

use crate::engine::EngineError;
use crate::engine::pool::Pool;
use crate::host::Outcome;
use crate::source::{Delivery, Output};

/// What happened to one message of a run.
#[derive(Debug, PartialEq)]
pub(super) enum Fate {
    Done,
    Failed(Outcome),
    /// Not run: its key failed earlier in the run, or the run gave way to a higher priority.
    Held,
}

/// A finished run: each message's fate, in the run's order, and the outputs of those done,
/// per call, with the indexes (in the run) of the messages done in that call: a call's outputs
/// are not told apart by message, so they belong to all of those together.
#[derive(Debug)]
pub(super) struct Ran {
    pub fates: Vec<Fate>,
    pub outputs: Vec<(Vec<usize>, Vec<Output>)>,
}

/// Runs `msgs` (with their attempt numbers) at priority `level` and hands them back in the
/// same order.
pub(super) async fn run(
    pool: &Pool,
    level: usize,
    msgs: Vec<Delivery>,
    attempts: Vec<u32>,
) -> Result<(Vec<Delivery>, Ran), EngineError> {
    run_with(msgs, attempts, |m, a| pool.run(level, m, a)).await
}

/// [`run`] over any caller of the host (the unit tests give a scripted one).
async fn run_with<F, Fut>(
    msgs: Vec<Delivery>,
    attempts: Vec<u32>,
    mut call: F,
) -> Result<(Vec<Delivery>, Ran), EngineError>
where
    F: FnMut(Vec<Delivery>, Vec<u32>) -> Fut,
    Fut: Future<Output = Result<(Vec<Delivery>, crate::host::RunResult), EngineError>>,
{
    let n = msgs.len();
    let mut slots: Vec<Option<Delivery>> = msgs.into_iter().map(Some).collect();
    let mut fates: Vec<Fate> = (0..n).map(|_| Fate::Held).collect();
    let mut outputs = Vec::new();
    let mut failed_keys: Vec<Vec<u8>> = Vec::new();
    let mut todo: Vec<usize> = (0..n).collect();
    while !todo.is_empty() {
        let batch = todo
            .iter()
            .map(|&i| {
                slots[i]
                    .take()
                    .expect("each message is in one call at a time")
            })
            .collect();
        let tries = todo.iter().map(|&i| attempts[i]).collect();
        let (back, r) = call(batch, tries).await?;
        for (&i, d) in todo.iter().zip(back) {
            slots[i] = Some(d);
        }
        let done = r.done.min(todo.len());
        for &i in &todo[..done] {
            fates[i] = Fate::Done;
        }
        if done > 0 {
            match r
                .ends
                .filter(|e| e.len() == done && e.last() == Some(&r.outputs.len()))
            {
                // Each message's own outputs, where the call told them apart.
                Some(ends) => {
                    let mut rest = r.outputs.into_iter();
                    let mut from = 0;
                    for (&i, end) in todo[..done].iter().zip(ends) {
                        outputs.push((vec![i], rest.by_ref().take(end - from).collect()));
                        from = end;
                    }
                }
                None => outputs.push((todo[..done].to_vec(), r.outputs)),
            }
        }
        let (Some(stop), Some(&f)) = (r.stop, todo.get(r.done)) else {
            break;
        };
        fates[f] = Fate::Failed(stop);
        let key = |i: usize| slots[i].as_ref().and_then(|d| d.record.key.as_deref());
        if let Some(k) = key(f) {
            failed_keys.push(k.to_vec());
        }
        todo = todo[r.done + 1..]
            .iter()
            .copied()
            .filter(|&i| key(i).is_none_or(|k| !failed_keys.iter().any(|f| f == k)))
            .collect();
    }
    let msgs = slots
        .into_iter()
        .map(|d| d.expect("every message came back"))
        .collect();
    Ok((msgs, Ran { fates, outputs }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::RunResult;
    use crate::source::Record;
    use std::cell::RefCell;
    use std::sync::Arc;

    fn msg(offset: u64, key: Option<&str>) -> Delivery {
        Delivery {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            redeliveries: 0,
            record: Record {
                key: key.map(|k| k.as_bytes().to_vec()),
                payload: offset.to_string().into_bytes(),
                ..Record::default()
            },
        }
    }

    /// Runs a run against a host that fails the offsets in `fail` (stopping there, as the host
    /// does) and emits one output per message done; returns the fates and each call's offsets.
    fn ran(run: &[(u64, Option<&str>)], fail: &[u64]) -> (Vec<Fate>, Vec<Vec<u64>>, Vec<u64>) {
        let calls = RefCell::new(Vec::new());
        let msgs: Vec<Delivery> = run.iter().map(|&(o, k)| msg(o, k)).collect();
        let attempts = vec![1; msgs.len()];
        let fut = run_with(msgs, attempts, |m: Vec<Delivery>, _| {
            calls
                .borrow_mut()
                .push(m.iter().map(|d| d.offset).collect());
            let mut r = RunResult::default();
            for d in &m {
                if fail.contains(&d.offset) {
                    r.stop = Some(Outcome::Reject {
                        reason: "no".into(),
                    });
                    break;
                }
                r.done += 1;
                r.outputs.push(Output {
                    topic: "out".into(),
                    record: d.record.clone(),
                });
            }
            async move { Ok((m, r)) }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (back, ran) = rt.block_on(fut).unwrap();
        let offsets: Vec<u64> = back.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, run.iter().map(|r| r.0).collect::<Vec<_>>());
        let out: Vec<u64> = ran
            .outputs
            .iter()
            .flat_map(|(done, outs)| {
                // Each call's outputs belong to the messages done in it.
                let done: Vec<u64> = done.iter().map(|&i| run[i].0).collect();
                outs.iter().map(move |o| {
                    let n: u64 = String::from_utf8_lossy(&o.record.payload).parse().unwrap();
                    assert!(
                        done.contains(&n),
                        "output of {n}, done in the call: {done:?}"
                    );
                    n
                })
            })
            .collect();
        (ran.fates, calls.into_inner(), out)
    }

    fn failed() -> Fate {
        Fate::Failed(Outcome::Reject {
            reason: "no".into(),
        })
    }

    #[test]
    fn a_clean_run_is_one_call() {
        let (fates, calls, out) = ran(&[(0, Some("a")), (1, None), (2, Some("b"))], &[]);
        assert_eq!(fates, [Fate::Done, Fate::Done, Fate::Done]);
        assert_eq!(calls, [vec![0, 1, 2]]);
        assert_eq!(out, [0, 1, 2]);
    }

    #[test]
    fn a_failure_holds_its_key_and_the_rest_goes_on() {
        let run = [
            (0, Some("a")),
            (1, Some("b")),
            (2, Some("a")),
            (3, None),
            (4, Some("c")),
            (5, Some("b")),
        ];
        let (fates, calls, out) = ran(&run, &[1, 4]);
        assert_eq!(
            fates,
            [
                Fate::Done,
                failed(),
                Fate::Done,
                Fate::Done,
                failed(),
                Fate::Held
            ]
        );
        // After 1 (key b) fails, 5 (key b) never runs; after 4 fails nothing of c is left.
        assert_eq!(calls, [vec![0, 1, 2, 3, 4, 5], vec![2, 3, 4]]);
        assert_eq!(out, [0, 2, 3]);
    }

    #[test]
    fn a_keyless_failure_holds_nothing() {
        let (fates, calls, _) = ran(&[(0, None), (1, None), (2, Some("a"))], &[0]);
        assert_eq!(fates, [failed(), Fate::Done, Fate::Done]);
        assert_eq!(calls, [vec![0, 1, 2], vec![1, 2]]);
    }
}
