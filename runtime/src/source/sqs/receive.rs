//! A consumed queue's state, and the receivers that long poll it into a buffer in the
//! background, within a bound of messages buffered and held.

use super::client::{self, Received};
use super::error;
use crate::source::receipts::Receipts;
use aws_sdk_sqs::Client;
use sha2::Digest;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub(super) struct Receipt {
    pub(super) handle: String,
    /// The message's id, the same at every receive (FIFO outputs' deduplication ids).
    pub(super) id: String,
}

pub(super) struct Buffered {
    pub(super) msg: Received,
    /// When its visibility runs out (received, or last extended, plus the lease).
    pub(super) visible_until: Instant,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) receipts: Receipts<Receipt>,
    pub(super) buffer: VecDeque<Buffered>,
    /// When the visibility of each held message (by sequence number) runs out, as far as
    /// this process made it: an extension skips those with most of a lease left.
    pub(super) until: HashMap<u64, Instant>,
    /// Held messages a commit is settling (deleting, or delaying as a retry): not extended.
    pub(super) settling: std::collections::HashSet<u64>,
}

/// A consumed queue: its state, shared with its receivers.
pub(super) struct Topic {
    pub(super) url: String,
    pub(super) state: Mutex<Queue>,
    /// Messages a receiver is asking for now (so that receivers together stay in the bound).
    pub(super) reserved: AtomicUsize,
    pub(super) arrived: tokio::sync::Notify,
    pub(super) room: tokio::sync::Notify,
    /// Since when receiving has failed, why, and whether trying again can help.
    pub(super) failing: Mutex<Option<(Instant, String, bool)>>,
}

/// A FIFO group id of a key: the key itself where SQS takes it (printable ASCII, 128 at most),
/// else a digest of it. `None` without a key.
pub(super) fn group_id(key: Option<&[u8]>) -> Option<String> {
    let k = key?;
    let printable = !k.is_empty() && k.len() <= 128 && k.iter().all(|b| b.is_ascii_graphic());
    Some(if printable {
        String::from_utf8_lossy(k).into_owned()
    } else {
        format!("k-{}", hex::encode(sha2::Sha256::digest(k)))
    })
}

/// One receiver of `t`: long polls while the queue's buffered, held and asked-for messages
/// stay under `bound`.
pub(super) async fn receiver(
    client: Client,
    t: Arc<Topic>,
    bound: usize,
    wait: Duration,
    lease: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut pause = Duration::from_millis(200);
    while !stop.load(Ordering::Relaxed) {
        // Reserved under the lock, so receivers together stay within the bound.
        let n = {
            let q = t.state.lock().expect("state");
            let used = q.buffer.len() + q.receipts.held() + t.reserved.load(Ordering::Relaxed);
            let n = bound.saturating_sub(used).min(10);
            t.reserved.fetch_add(n, Ordering::Relaxed);
            n
        };
        if n == 0 {
            let _ = tokio::time::timeout(Duration::from_secs(1), t.room.notified()).await;
            continue;
        }
        let asked = Instant::now();
        let got = tokio::time::timeout(
            wait + Duration::from_secs(15),
            client::receive(&client, &t.url, n, wait, None),
        )
        .await;
        // Nothing, and sooner than the wait (short polling, `wait=0s`; a FIFO queue whose groups
        // are all held): a pause, rather than asking again at once.
        let early_and_empty = matches!(&got, Ok(Ok(m)) if m.is_empty())
            && asked.elapsed() + Duration::from_millis(100) < wait.max(Duration::from_millis(200));
        let received_at = Instant::now();
        t.reserved.fetch_sub(n, Ordering::Relaxed);
        match got {
            Ok(Ok(msgs)) => {
                if let Some((since, _, _)) = t.failing.lock().expect("failing").take() {
                    tracing::info!(after = ?since.elapsed(), "SQS: receiving again");
                }
                pause = Duration::from_millis(200);
                if msgs.is_empty() {
                    if early_and_empty {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                }
                t.state
                    .lock()
                    .expect("state")
                    .buffer
                    .extend(msgs.into_iter().map(|msg| Buffered {
                        msg,
                        visible_until: received_at + lease,
                    }));
                t.arrived.notify_one();
            }
            failed => {
                let (e, transient) = match failed {
                    Ok(Err(f)) => f,
                    _ => (error("receiving", "no answer past the wait"), true),
                };
                {
                    let mut f = t.failing.lock().expect("failing");
                    if f.is_none() {
                        tracing::warn!(error = %e, "SQS: a receive failed; trying again");
                        *f = Some((Instant::now(), e.to_string(), transient));
                    } else if let Some(x) = f.as_mut() {
                        x.1 = e.to_string();
                        x.2 = transient;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}
