//! The embedded log for the long run (issue 35): retention deletes whole segments while a run
//! consumes, a group that fell behind skips what went and counts it once (across `kill -9`),
//! groups move with `weir groups seek`, and topics go with `weir topics delete`.

use rand::Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use weir_tests::{Weir, guest, scaled, wait_until};

fn run_args<'a>(module: &'a Path, group: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--module",
        module.to_str().expect("UTF-8 path"),
        "--topic",
        "orders",
        "--group",
        group,
        "--admin",
        "off",
    ]
}

/// `weir groups describe G --json`.
fn describe(w: &Weir, group: &str) -> Value {
    let out = w.ok(&["groups", "describe", group, "--json"]);
    serde_json::from_slice(&out.stdout).expect("groups describe --json prints JSON")
}

/// (sum of committed offsets, sum of starts, sum of skipped) of a group.
fn group_sums(g: &Value) -> (u64, u64, u64) {
    let parts = g["partitions"].as_array().expect("partitions");
    let sum = |k: &str| parts.iter().map(|p| p[k].as_u64().unwrap_or(0)).sum();
    (sum("committed"), sum("start"), sum("skipped_by_retention"))
}

/// Bytes of every file under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Orders produced through a run's socket in batches while `kill -9` lands at random moments,
/// with retention deleting segments under a 1 MiB bound all the while. Group `fast` runs; group
/// `slow` handled the first 100 and then runs only a moment after each kill of `fast`, so
/// retention deletes what it has not read, and `slow`'s own kills land around the commits that
/// count what it skipped.
/// After every kill the restarted run resumes at its committed offset (or the oldest kept
/// record), and the directory checks sound. At the end `slow` drains: each order it handled
/// has one confirmation from it, and what it skipped is exactly what its records' offsets
/// passed, counted once although kills landed between reading and committing.
#[test]
fn kill_9_while_retention_deletes_loses_nothing_kept_and_counts_skips_once() {
    let kills = scaled(5, 3);
    let w = Weir::new();
    w.ok(&[
        "topics",
        "create",
        "orders",
        "--partitions",
        "2",
        "--retention-bytes",
        "1MiB",
        "--segment-bytes",
        "64KiB",
    ]);
    w.create_topic("confirmations", 2);
    let module = guest("orders");
    // `slow` reads the first 100 and stops.
    w.ok(&["produce", "orders", "--count", "100", "--size", "300"]);
    w.drain(&module, "orders", "slow", &[]);
    let mut produced = 100u64;
    let mut rng = rand::rng();
    let mut deleted_seen = false;
    for round in 0..kills {
        let _ = std::fs::remove_file(w.data_dir().join("weir.sock"));
        let before = w.committed("orders", "fast");
        let mut run = w.spawn(&run_args(&module, "fast"));
        wait_until("the run serves the log", Duration::from_secs(60), || {
            w.data_dir().join("weir.sock").exists()
        });
        // The restart resumed where `fast` had committed, or later (never before it).
        let resumed = w.committed("orders", "fast");
        assert!(
            resumed >= before,
            "round {round}: fast went back from {before} to {resumed}"
        );
        let n = rng.random_range(3_000..6_000u64);
        w.ok(&[
            "produce",
            "orders",
            "--count",
            &n.to_string(),
            "--start",
            &produced.to_string(),
            "--size",
            "300",
        ]);
        produced += n;
        let from = w.committed("orders", "fast");
        let target = (from + rng.random_range(1..(produced - from).max(2))).min(produced);
        wait_until("fast commits more", Duration::from_secs(120), || {
            w.committed("orders", "fast") >= target
        });
        deleted_seen |= group_sums(&describe(&w, "slow")).1 > 0;
        run.kill();
        // `slow` starts from far behind: its first fetch jumps over what retention deleted,
        // and the kill lands before or after the commit that counts the jump.
        let _ = std::fs::remove_file(w.data_dir().join("weir.sock"));
        let slow_at = w.committed("orders", "slow");
        let mut slow = w.spawn(&run_args(&module, "slow"));
        wait_until("slow moves", Duration::from_secs(60), || {
            w.data_dir().join("weir.sock").exists() && w.committed("orders", "slow") > slow_at
        });
        slow.kill();
        let out = w.output(&["check-data"]);
        assert!(
            out.status.success(),
            "round {round}: check-data after the kill: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        deleted_seen,
        "retention deleted nothing while runs were up: the test shows nothing"
    );
    w.drain(&module, "orders", "fast", &[]);
    let bytes = du(&w.data_dir());
    // A run holds the topic to its bound (1 MiB, and the active segment of at most 64 KiB).
    let kept = || -> u64 {
        let out = w.ok(&["topics", "describe", "orders", "--json"]);
        let usage: Value = serde_json::from_slice(&out.stdout).expect("topics describe --json");
        usage["bytes"].as_u64().expect("bytes")
    };
    let mut run = w.spawn(&run_args(&module, "fast"));
    wait_until(
        "retention holds orders to 1 MiB",
        Duration::from_secs(30),
        || kept() <= (1 << 20) + (64 << 10),
    );
    run.kill();
    let (fast_committed, start, fast_skipped) = group_sums(&describe(&w, "fast"));
    assert_eq!(fast_committed, produced);
    // Now `slow` catches up: everything below the start is gone.
    let slow_before = 100;
    w.drain(&module, "orders", "slow", &[]);
    let (slow_committed, _, slow_skipped) = group_sums(&describe(&w, "slow"));
    assert_eq!(slow_committed, produced);
    assert!(slow_skipped > 0 && slow_skipped <= start - slow_before);
    // Confirmations: the first 100 orders by slow, every order fast did not skip, and every
    // order slow did not skip, once each: counts add up, and no order has more than two.
    let per_id: HashMap<String, u64> = w.confirmations_per_id();
    let total: u64 = per_id.values().sum();
    assert_eq!(
        total,
        100 + (produced - fast_skipped) + (produced - slow_before - slow_skipped),
        "confirmations do not add up: {produced} orders, fast skipped {fast_skipped}, slow \
         skipped {slow_skipped}"
    );
    assert!(
        per_id.values().all(|&c| c <= 2),
        "an order confirmed more than twice"
    );
    if fast_skipped == 0 {
        // Every order has fast's confirmation: those with two were handled by slow too, and
        // every other order slow's offset passed is one it skipped.
        let slow_handled = (100..produced)
            .filter(|i| per_id.get(&format!("m-{i}")) == Some(&2))
            .count() as u64;
        assert_eq!(slow_skipped, produced - 100 - slow_handled);
    }
    eprintln!(
        "{kills} kills, {produced} orders, oldest kept offsets sum {start}, fast skipped \
         {fast_skipped}, slow skipped {slow_skipped}, data directory {bytes} bytes"
    );
}

/// Orders appended in two batches, a moment apart; a group handles both, then `weir groups
/// seek --time` moves it to the second batch and a drain through a new module version gives
/// those outputs again, once; `--earliest` then replays all of it once more.
#[test]
fn seek_to_a_time_and_to_the_earliest_replays_once() {
    let w = Weir::new();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 2);
    let (v1, v2) = (guest("orders"), guest("orders-v2"));
    w.ok(&["produce", "orders", "--count", "50", "--size", "100"]);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    // A time after every record of the first batch.
    let first_done = now_ms() + 1;
    wait_until(
        "the clock passes the first batch",
        Duration::from_secs(5),
        || now_ms() > first_done,
    );
    w.ok(&[
        "produce", "orders", "--count", "30", "--start", "50", "--size", "100",
    ]);
    w.drain(&v1, "orders", "g", &[]);
    let rfc = humantime_rfc3339(first_done);
    let out = w.ok(&["groups", "seek", "g", "orders", "--time", &rfc]);
    let moved = String::from_utf8_lossy(&out.stdout).to_string();
    w.drain(&v2, "orders", "g", &[]);
    let per_id = w.confirmations_per_id();
    for i in 0..80 {
        let want = if i < 50 { 1 } else { 2 };
        assert_eq!(
            per_id.get(&format!("m-{i}")).copied().unwrap_or(0),
            want,
            "order m-{i} after seeking to {rfc} ({moved})"
        );
    }
    w.ok(&["groups", "seek", "g", "orders", "--earliest"]);
    w.drain(&v2, "orders", "g", &[]);
    let per_id = w.confirmations_per_id();
    assert!((0..80).all(|i| per_id[&format!("m-{i}")] == if i < 50 { 2 } else { 3 }));
    // While a run of the group consumes, seeking it is refused.
    let mut run = w.spawn(&run_args(&v1, "g"));
    wait_until("the run serves the log", Duration::from_secs(60), || {
        w.data_dir().join("weir.sock").exists()
    });
    let refused = w.fails(&["groups", "seek", "g", "orders", "--latest"], 2);
    assert!(refused.contains("stop it first"), "{refused}");
    run.kill();
}

/// `weir topics delete` on the embedded log: the topic, its records and the groups' offsets
/// go; a topic made again under the name starts empty.
#[test]
fn a_deleted_topic_takes_its_records_and_offsets() {
    let w = Weir::new();
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    w.ok(&["produce", "orders", "--count", "20", "--size", "100"]);
    w.drain(&guest("orders"), "orders", "g", &[]);
    w.ok(&["topics", "delete", "orders"]);
    let gone = w.fails(&["consume", "orders", "--from-beginning"], 2);
    assert!(gone.contains("does not exist"), "{gone}");
    w.create_topic("orders", 1);
    assert!(w.messages("orders").is_empty());
    assert_eq!(w.committed("orders", "g"), 0);
    let out = w.output(&["check-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// RFC 3339 of a time in ms since the epoch, in UTC, to the millisecond.
fn humantime_rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}
