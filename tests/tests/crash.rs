//! Crash safety: `kill -9` in the middle of a run loses nothing.

use std::time::Duration;
use weir_tests::{Weir, guest, offsets_in, wait_until};

#[test]
fn kill_9_mid_run_then_restart_handles_every_message_at_least_once() {
    const N: u64 = 50_000;
    let w = Weir::new();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 4);
    w.ok(&["produce", "orders", "--count", &N.to_string()]);
    let module = guest("orders");
    let mut run = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
        "--batch-size",
        "32",
        "--instances",
        "1",
    ]);
    wait_until(
        "the run has committed some messages",
        Duration::from_secs(120),
        || w.committed("orders", "g") >= 2_000,
    );
    run.kill(); // SIGKILL

    let at_kill = w.committed("orders", "g");
    assert!(
        at_kill < N,
        "the run finished before it was killed ({at_kill} committed); the test proves nothing"
    );
    let outputs_at_kill = w.messages("confirmations").len() as u64;
    // Outputs and offsets commit together, so no committed message lacks its output.
    assert!(
        outputs_at_kill >= at_kill,
        "{outputs_at_kill} outputs for {at_kill} committed inputs"
    );

    let summary = w.drain(&module, "orders", "g", &[]);
    let per_id = w.confirmations_per_id();
    for n in 0..N {
        assert!(
            per_id.contains_key(&format!("m-{n}")),
            "order m-{n} was lost"
        );
    }
    let duplicates: u64 = per_id.values().map(|c| c - 1).sum();
    // Only what was in flight (uncommitted but handled) at the kill may be handled twice.
    assert_eq!(
        summary["processed"].as_u64().unwrap(),
        N - at_kill,
        "{summary}"
    );
    assert_eq!(duplicates, outputs_at_kill - at_kill);
    assert!(
        offsets_in(&w.stats(), "orders", "g")
            .iter()
            .all(|(end, c)| end == c)
    );
}
