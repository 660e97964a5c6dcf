//! A run's JSON log: its summary and the failure events with their times.

use crate::Weir;
use serde_json::Value;
use std::path::Path;

/// What `weir run --json --log-format json` reported: its summary, and the `message failed`
/// events of its log (each with `at_ms`, the event's timestamp in ms since the epoch, added).
pub struct Logged {
    pub summary: Value,
    pub failures: Vec<Value>,
}

impl Weir {
    /// Runs `weir run ... --drain` with a JSON log, and returns the summary and failure events.
    pub fn drain_logged(&self, module: &Path, topic: &str, group: &str, extra: &[&str]) -> Logged {
        let mut args = vec![
            "--log-format",
            "json",
            "run",
            "--module",
            module.to_str().expect("UTF-8 path"),
            "--topic",
            topic,
            "--group",
            group,
            "--drain",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = self.ok(&args);
        let summary =
            serde_json::from_slice(&out.stdout).expect("run --json prints a JSON summary");
        let failures = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["fields"]["message"] == "message failed")
            .map(|mut e| {
                let at = rfc3339_ms(
                    e["timestamp"]
                        .as_str()
                        .expect("log events have a timestamp"),
                );
                e["at_ms"] = Value::from(at);
                e
            })
            .collect();
        Logged { summary, failures }
    }
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp as tracing prints it
/// (`2026-11-28T01:02:03.123456Z`).
pub fn rfc3339_ms(ts: &str) -> u64 {
    let num = |r: std::ops::Range<usize>| -> i64 {
        ts[r]
            .parse()
            .unwrap_or_else(|_| panic!("bad timestamp {ts}"))
    };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    let (hh, mm) = (num(11..13), num(14..16));
    let secs: f64 = ts[17..ts.len() - 1]
        .parse()
        .unwrap_or_else(|_| panic!("bad timestamp {ts}"));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + hh * 3600 + mm * 60) * 1000) as u64 + (secs * 1000.0).round() as u64
}
