//! Native twins of the `noop` and `orders` examples: the same logic as plain Rust, run by the
//! same engine in place of a component (`weir bench --native`), so the cost of the sandbox is a
//! ratio measured in one run rather than a guess.

use super::{Outcome, RunResult};
use crate::source::{Delivery, Output, Record};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Native {
    /// Acks every message (the `noop` example).
    Noop,
    /// Parses the order and emits a confirmation (the `orders` example).
    Orders,
    /// Takes 20 ms per message and acks it: a call that is still running when the engine's
    /// tests revoke its partition.
    #[cfg(test)]
    #[value(skip)]
    Slow,
    /// Asks for a retry, with no delay of its own, on a message's first attempt and acks it on
    /// any later one: the engine's backoff decides how long the message is held.
    #[cfg(test)]
    #[value(skip)]
    Busy,
    /// Acks each message once the test opens [`gate`]: a call as long as the test wants.
    #[cfg(test)]
    #[value(skip)]
    Gated,
}

/// What holds a [`Native::Gated`] call, for the engine's tests (one test at a time uses it).
#[cfg(test)]
pub mod gate {
    use std::sync::{Condvar, Mutex};

    /// (open, calls waiting)
    static GATE: Mutex<(bool, usize)> = Mutex::new((false, 0));
    static CHANGED: Condvar = Condvar::new();

    pub fn close() {
        GATE.lock().unwrap().0 = false;
    }

    pub fn open() {
        GATE.lock().unwrap().0 = true;
        CHANGED.notify_all();
    }

    /// Calls waiting at the gate now.
    pub fn waiting() -> usize {
        GATE.lock().unwrap().1
    }

    pub(super) fn pass() {
        let mut g = GATE.lock().unwrap();
        g.1 += 1;
        while !g.0 {
            g = CHANGED.wait(g).unwrap();
        }
        g.1 -= 1;
    }
}

/// An order as the `orders` example reads it (shared with the Kafka row's bare loop).
#[derive(serde::Deserialize)]
pub(crate) struct Order<'a> {
    #[serde(borrow)]
    pub id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub customer: std::borrow::Cow<'a, str>,
    pub amount_cents: u64,
    #[serde(default)]
    pub transient: bool,
}

/// The confirmation the `orders` example emits.
#[derive(serde::Serialize)]
pub(crate) struct Confirmation<'a> {
    pub order_id: &'a str,
    pub customer: &'a str,
    pub amount_cents: u64,
    pub status: &'static str,
}

impl Native {
    pub fn name(self) -> &'static str {
        match self {
            Native::Noop => "noop (native)",
            Native::Orders => "orders (native)",
            #[cfg(test)]
            Native::Slow => "slow (native)",
            #[cfg(test)]
            Native::Busy => "busy (native)",
            #[cfg(test)]
            Native::Gated => "gated (native)",
        }
    }

    /// Runs `msgs` in order, stopping at the first that does not succeed, as a component's
    /// single-message entry point does.
    pub fn run(self, msgs: &[Delivery], attempts: &[u32], output_topic: &str) -> RunResult {
        let mut out = RunResult::default();
        for (m, &attempt) in msgs.iter().zip(attempts) {
            match self {
                Native::Noop => {}
                #[cfg(test)]
                Native::Slow => std::thread::sleep(Duration::from_millis(20)),
                #[cfg(test)]
                Native::Busy if attempt < 2 => {
                    out.stop = Some(Outcome::Retry {
                        reason: "busy".into(),
                        delay: None,
                    });
                    return out;
                }
                #[cfg(test)]
                Native::Busy => {}
                #[cfg(test)]
                Native::Gated => gate::pass(),
                Native::Orders => match confirm(m, attempt, output_topic) {
                    Ok(o) => out.outputs.push(o),
                    Err(stop) => {
                        out.stop = Some(stop);
                        return out;
                    }
                },
            }
            out.done += 1;
        }
        out
    }
}

fn confirm(m: &Delivery, attempt: u32, topic: &str) -> Result<Output, Outcome> {
    let order: Order = serde_json::from_slice(&m.record.payload).map_err(|e| Outcome::Reject {
        reason: format!("not a valid order: {e}"),
    })?;
    if order.amount_cents == 0 {
        return Err(Outcome::Reject {
            reason: format!("order {} has no amount", order.id),
        });
    }
    if order.transient && attempt < 2 {
        return Err(Outcome::Retry {
            reason: format!("payment service busy for order {}", order.id),
            delay: Some(Duration::from_millis(10)),
        });
    }
    let payload = serde_json::to_vec(&Confirmation {
        order_id: &order.id,
        customer: &order.customer,
        amount_cents: order.amount_cents,
        status: "confirmed",
    })
    .expect("a struct of strings serialises");
    Ok(Output {
        topic: topic.to_string(),
        record: Record {
            key: Some(order.id.as_bytes().to_vec()),
            payload,
            headers: vec![("source-offset".into(), m.offset.to_string().into_bytes())],
            timestamp_ms: None,
        },
    })
}
