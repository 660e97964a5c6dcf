//! Crash safety: `kill -9` in the middle of a run loses nothing.

use std::time::Duration;
use weir_tests::{Weir, guest, http, offsets_in, produce_keyed, scaled, wait_until};

#[test]
fn kill_9_mid_run_then_restart_handles_every_message_at_least_once() {
    // A debug build handles about 20,000 a second here: enough that the kill lands mid-run.
    let n = scaled(30_000, 30_000);
    let w = Weir::new();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 4);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
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
        || w.committed("orders", "g") >= n / 10,
    );
    run.kill(); // SIGKILL

    let at_kill = w.committed("orders", "g");
    assert!(
        at_kill < n,
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
    for i in 0..n {
        assert!(
            per_id.contains_key(&format!("m-{i}")),
            "order m-{i} was lost"
        );
    }
    let duplicates: u64 = per_id.values().map(|c| c - 1).sum();
    // Only what was in flight (uncommitted but handled) at the kill may be handled twice.
    assert_eq!(
        summary["processed"].as_u64().unwrap(),
        n - at_kill,
        "{summary}"
    );
    assert_eq!(duplicates, outputs_at_kill - at_kill);
    assert!(
        offsets_in(&w.stats(), "orders", "g")
            .iter()
            .all(|(end, c)| end == c)
    );
}

/// A message waiting out a long retry holds its partition's offset while later keys finish.
/// Their outputs wait with it: killed then, the run has written none of them, and the restart
/// writes each once. (They used to be written with the offset below them, in the same atomic
/// write, and written again when the restart ran them again.)
#[test]
fn outputs_past_a_waiting_retry_are_written_once_across_a_kill() {
    const N: usize = 40;
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    let mut lines = vec!["a:first flaky".to_string()];
    lines.extend((1..=N).map(|i| format!("k{i}:order {i}")));
    produce_keyed(&w, "in", ":", &lines);
    let flaky = guest("flaky");
    let log = w.path("run.log");
    let (mut run, addr) = w.spawn_with_admin(
        &[
            "run",
            "--module",
            flaky.to_str().unwrap(),
            "--topic",
            "in",
            "--group",
            "g",
            "--handler-config",
            "fail-attempts=1",
            "--handler-config",
            "delay-ms=600000",
        ],
        &log,
    );
    // Everything but the first is handled; the first waits out its ten-minute retry.
    wait_until(
        "only the waiting message is in flight",
        Duration::from_secs(60),
        || {
            let (code, body) = http("GET", &addr, "/api/status", None);
            let failed = std::fs::read_to_string(&log).unwrap_or_default();
            code == 200
                && failed.contains("message failed")
                && serde_json::from_str::<serde_json::Value>(&body).unwrap()["in_flight"] == 1
        },
    );
    run.kill();
    assert_eq!(
        w.committed("in", "g"),
        0,
        "the offset passed the waiting message"
    );
    assert_eq!(w.end("out"), 0, "outputs written past the committed offset");
    // Restarted without the delay, everything runs: each output once.
    w.drain(&flaky, "in", "g", &["--handler-config", "fail-attempts=0"]);
    let mut out: Vec<String> = w
        .messages("out")
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    let mut expected: Vec<String> = (1..=N).map(|i| format!("order {i}")).collect();
    expected.push("first flaky".into());
    expected.sort();
    assert_eq!(out, expected);
}
