//! The main job on the embedded log: consume, emit, commit, drain; producing while a run is live.

use serde_json::Value;
use std::time::Duration;
use weir_tests::{Weir, guest, header, wait_until};

#[test]
fn ten_thousand_orders_over_four_partitions_each_produce_one_confirmation() {
    let w = Weir::new();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 2);
    w.ok(&["produce", "orders", "--count", "10000"]);

    let summary = w.drain(&guest("orders"), "orders", "shipping", &[]);
    assert_eq!(summary["processed"], 10_000, "{summary}");
    assert_eq!(summary["emitted"], 10_000, "{summary}");
    assert_eq!(summary["dead_lettered"], 0, "{summary}");

    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len(), 10_000);
    for n in 0..10_000 {
        assert_eq!(per_id.get(&format!("m-{n}")), Some(&1), "order m-{n}");
    }
    let offsets = w.offsets("orders", "shipping");
    assert_eq!(offsets.len(), 4);
    assert_eq!(offsets.iter().map(|(end, _)| end).sum::<u64>(), 10_000);
    for (p, (end, committed)) in offsets.iter().enumerate() {
        assert!(*end > 0, "partition {p} got no messages");
        assert_eq!(committed, end, "partition {p} is committed to its end");
    }

    // The group is done: a second run finds nothing to do and emits nothing.
    let again = w.drain(&guest("orders"), "orders", "shipping", &[]);
    assert_eq!(again["processed"], 0, "{again}");
    assert_eq!(w.messages("confirmations").len(), 10_000);
    // Another group starts from the beginning.
    let other = w.drain(&guest("noop"), "orders", "audit", &[]);
    assert_eq!(other["processed"], 10_000, "{other}");
}

#[test]
fn confirmations_carry_the_order_and_its_source_offset() {
    let w = Weir::new();
    w.create_topic("orders", 1);
    w.create_topic("receipts", 1);
    w.ok(&[
        "produce",
        "orders",
        r#"{"id":"o-1","customer":"ada","amount_cents":1250}"#,
        "--key",
        "o-1",
        "--header",
        "trace=abc",
    ]);
    w.drain(
        &guest("orders"),
        "orders",
        "g",
        &["--handler-config", "output-topic=receipts"],
    );
    let out = w.messages("receipts");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["key"], "o-1");
    assert_eq!(header(&out[0], "source-offset"), Some("0"));
    let c: Value = serde_json::from_str(out[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        c,
        serde_json::json!({"order_id": "o-1", "customer": "ada", "amount_cents": 1250, "status": "confirmed"})
    );
    let input = w.messages("orders");
    assert_eq!(header(&input[0], "trace"), Some("abc"));
}

#[test]
fn invalid_orders_are_dead_lettered_and_transient_ones_retried() {
    let w = Weir::new();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 1);
    let input = w.path("orders.jsonl");
    std::fs::write(
        &input,
        "{\"id\":\"a\",\"customer\":\"x\",\"amount_cents\":5}\nnot json\n{\"id\":\"t\",\"customer\":\"y\",\"amount_cents\":7,\"transient\":true}\n",
    )
    .unwrap();
    w.ok(&["produce", "orders", "--file", input.to_str().unwrap()]);
    let s = w.drain(
        &guest("orders"),
        "orders",
        "g",
        &["--backoff-base", "1ms", "--jitter", "none"],
    );
    assert_eq!(
        (
            s["processed"].as_u64(),
            s["dead_lettered"].as_u64(),
            s["retries"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{s}"
    );
    let dlq = w.messages("orders.dlq");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["payload"], "not json");
    assert_eq!(header(&dlq[0], "weir.dlq.error-kind"), Some("rejected"));
    assert!(
        header(&dlq[0], "weir.dlq.error")
            .unwrap()
            .contains("not a valid order")
    );
    assert_eq!(header(&dlq[0], "weir.dlq.topic"), Some("orders"));
    assert_eq!(w.messages("confirmations").len(), 2);
}

#[test]
fn produce_reaches_a_running_weir_and_sigterm_commits_what_finished() {
    let w = Weir::new();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 1);
    let module = guest("orders");
    let run = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "live",
        "--json",
    ]);
    // The run owns the data directory; `produce` goes through its socket.
    wait_until("the run serves its socket", Duration::from_secs(60), || {
        w.data_dir().join("weir.sock").exists()
    });
    w.ok(&["produce", "orders", "--count", "500"]);
    wait_until("all 500 are committed", Duration::from_secs(60), || {
        w.offsets("orders", "live")
            .iter()
            .all(|(end, committed)| end == committed)
            && w.offsets("orders", "live")
                .iter()
                .map(|(e, _)| e)
                .sum::<u64>()
                == 500
    });
    let out = run.terminate();
    assert!(
        out.status.success(),
        "weir run exits 0 on SIGTERM, got {}",
        out.status
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["processed"], 500, "{summary}");
    assert!(
        !w.data_dir().join("weir.sock").exists(),
        "the socket is removed on exit"
    );
    assert_eq!(w.messages("confirmations").len(), 500);
}
