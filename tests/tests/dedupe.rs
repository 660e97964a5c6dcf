//! Idempotent dedupe on the embedded log: duplicates are acked without running the handler,
//! copies in flight at once do not both run, and with a crash the outputs stay exactly-once.

use std::time::Duration;
use weir_tests::{Weir, guest, scaled, wait_until};

#[test]
fn ten_thousand_ids_produced_three_times_run_once_each() {
    // The ten thousand the name promises (more with WEIR_TEST_SCALE).
    let ids = scaled(10_000, 10_000);
    let w = Weir::new();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 2);
    // Keyless, so the copies of one id land in different partitions and may be in flight at once.
    for _ in 0..3 {
        w.ok(&["produce", "orders", "--count", &ids.to_string(), "--no-key"]);
    }
    let s = w.drain(&guest("orders"), "orders", "g", &["--dedupe", "header"]);
    assert_eq!(
        (s["processed"].as_u64(), s["deduped"].as_u64()),
        (Some(ids), Some(2 * ids)),
        "{s}"
    );
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, ids);
    assert!(per_id.values().all(|&n| n == 1), "an id ran twice");
    // The marks outlive the run: the same ids again are all duplicates.
    w.ok(&["produce", "orders", "--count", "100", "--no-key"]);
    let again = w.drain(&guest("orders"), "orders", "g", &["--dedupe", "header"]);
    assert_eq!(
        (again["processed"].as_u64(), again["deduped"].as_u64()),
        (Some(0), Some(100)),
        "{again}"
    );
    // Without dedupe, the copies do run.
    let plain = w.drain(&guest("noop"), "orders", "other", &[]);
    assert_eq!(plain["processed"], 3 * ids + 100);
}

#[test]
fn a_message_without_the_key_is_processed_normally() {
    let w = Weir::new();
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let order = r#"{"id":"x","customer":"c","amount_cents":1}"#;
    w.ok(&["produce", "orders", order]);
    w.ok(&["produce", "orders", order]);
    let s = w.drain(&guest("orders"), "orders", "g", &["--dedupe", "header"]);
    assert_eq!(
        (s["processed"].as_u64(), s["deduped"].as_u64()),
        (Some(2), Some(0)),
        "{s}"
    );
    // Keyed by payload instead, the second copy is a duplicate.
    let s = w.drain(&guest("orders"), "orders", "h", &["--dedupe", "payload"]);
    assert_eq!(
        (s["processed"].as_u64(), s["deduped"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
}

#[test]
fn expired_marks_let_a_key_run_again() {
    let w = Weir::new();
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    w.ok(&["produce", "orders", "--count", "5"]);
    let s = w.drain(
        &guest("orders"),
        "orders",
        "g",
        &["--dedupe", "key", "--dedupe-window", "1ms"],
    );
    assert_eq!(s["processed"], 5, "{s}");
    w.ok(&["produce", "orders", "--count", "5"]);
    // The window (1 ms) passed while the second produce ran: the same keys run again.
    let s = w.drain(
        &guest("orders"),
        "orders",
        "g",
        &["--dedupe", "key", "--dedupe-window", "1ms"],
    );
    assert_eq!(
        (s["processed"].as_u64(), s["deduped"].as_u64()),
        (Some(5), Some(0)),
        "{s}"
    );
}

#[test]
fn with_dedupe_a_kill_9_leaves_every_output_exactly_once() {
    // A debug build handles about 20,000 a second here: enough that the kill lands mid-run.
    let n = scaled(20_000, 20_000);
    let w = Weir::new();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 4);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    let module = guest("orders");
    let args = [
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
        "--dedupe",
        "key",
        "--batch-size",
        "32",
        "--instances",
        "1",
    ];
    let mut run = w.spawn(&args);
    wait_until(
        "the run has committed some messages",
        Duration::from_secs(120),
        || w.committed("orders", "g") >= n / 8,
    );
    run.kill();
    let at_kill = w.committed("orders", "g");
    assert!(
        at_kill < n,
        "the run finished before it was killed; the test proves nothing"
    );
    let s = w.drain(&module, "orders", "g", &["--dedupe", "key"]);
    // Outputs, done marks and offsets are one write: what was handled but not yet passed by the
    // commit point at the kill is a duplicate now, not a second output.
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, n);
    assert!(
        per_id.values().all(|&c| c == 1),
        "an order was confirmed twice"
    );
    assert_eq!(
        s["processed"].as_u64().unwrap() + s["deduped"].as_u64().unwrap(),
        n - at_kill,
        "{s}"
    );
}

#[test]
fn twenty_kill_9s_at_random_moments_leave_every_output_exactly_once() {
    // The 20 kill points add up to about 4,100 messages, plus what each run does before its
    // kill lands (a round overshoots by up to a couple of thousand): 50,000 leave input for
    // every round.
    let n = scaled(50_000, 50_000);
    let w = Weir::new();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 4);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    let module = guest("orders");
    let args = [
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
        "--dedupe",
        "key",
        // Small runs over several lanes: messages finish out of order, so outputs and their
        // done marks are often written before the commit point passes them (the case dedupe
        // exists for), and each run advances slowly enough for 20 kills within the input.
        "--batch-size",
        "2",
        "--lanes",
        "4",
        "--instances",
        "2",
    ];
    let mut kills = 0;
    let mut before = 0;
    for round in 0..20u64 {
        let mut run = w.spawn(&args);
        // A moment that differs each round: after 20 to about 420 more messages are committed.
        let step = 20 + (round * 7919 + 13) % 400;
        let target = (before + step).min(n);
        wait_until("the run makes progress", Duration::from_secs(120), || {
            w.committed("orders", "g") >= target
        });
        run.kill();
        before = w.committed("orders", "g");
        kills += 1;
        if before == n {
            break;
        }
    }
    assert_eq!(
        kills, 20,
        "the input ran out before 20 kills; the test proves less than it says"
    );
    eprintln!("20 kills; {before} of {n} messages committed by the last");
    w.drain(&module, "orders", "g", &["--dedupe", "key"]);
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, n, "an order was lost");
    let twice: Vec<_> = per_id.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "confirmed more than once: {twice:?}");
}
