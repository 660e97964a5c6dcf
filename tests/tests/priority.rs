//! Priority (issue 18): urgent work overtakes a routine backlog, across topics
//! (`--priority`, every source; tested on the embedded log) and within one RabbitMQ priority
//! queue (`--max-priority`, `produce --priority`). Counted from the handler's own timestamps
//! (`sleepy` with `stamp=true`).

use std::time::Duration;
use weir_tests::{Weir, guest, wait_until};

/// Priority across topics: a backlog of 50,000 routine messages is being worked through when
/// 1,000 urgent ones arrive. With `--priority urgent,routine` (strict) the urgent ones overtake
/// the backlog: counted from the handler's own timestamps (`sleepy` with `stamp=true`), fewer
/// than 1% of the backlog (500) is handled between the first urgent append and the last
/// urgent message handled; the issue asks for under 5%. Without `--priority` the same run
/// handled 1,300-2,000 routine messages in that window here, and strict priority without
/// lower jobs giving way between slices 1,900 (docs/patterns.md).
#[test]
fn urgent_work_overtakes_a_routine_backlog() {
    let w = Weir::new();
    for t in ["routine", "urgent", "out"] {
        w.create_topic(t, 1);
    }
    let backlog = 50_000;
    w.ok(&["produce", "routine", "--count", &backlog.to_string()]);
    let module = guest("sleepy");
    let mut run = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "routine",
        "--topic",
        "urgent",
        "--priority",
        "urgent,routine",
        "--group",
        "g",
        "--instances",
        "4",
        "--admin",
        "off",
        "--handler-config",
        "wait-ms=1",
        "--handler-config",
        "stamp=true",
        "--handler-config",
        "output-topic=out",
    ]);
    wait_until(
        "the backlog is being worked",
        Duration::from_secs(60),
        || w.end("out") >= 2_000,
    );
    w.ok(&["produce", "urgent", "--count", "1000"]);
    wait_until(
        "every urgent message is handled",
        Duration::from_secs(60),
        || w.committed("urgent", "g") >= 1_000,
    );
    run.kill();
    let out = w.messages("out");
    let (between, urgent, window_ms) =
        overtaken(&out, |m| m["headers"]["from-topic"] == "urgent", None);
    eprintln!("routine handled meanwhile: {between}; urgent within {window_ms} ms");
    assert_eq!(urgent, 1_000, "every urgent message has its output");
    assert!(
        out.len() - urgent < backlog,
        "the backlog was done before the urgent messages came; the test proves nothing"
    );
    assert!(
        between < backlog / 100,
        "{between} routine messages handled while the urgent ones waited or ran (urgent \
         handled within {window_ms} ms)"
    );
}

/// Of `sleepy`'s stamped outputs: how many routine messages were handled between the first
/// urgent message's append and the last urgent one's handling, how many urgent ones there are,
/// and that window in milliseconds.
///
/// `since_us`: when the urgent messages were produced, where the broker keeps no append time
/// (a RabbitMQ message has only what its producer set); a little before their append, so it
/// counts a little more.
fn overtaken(
    out: &[serde_json::Value],
    is_urgent: impl Fn(&serde_json::Value) -> bool,
    since_us: Option<u64>,
) -> (usize, usize, u64) {
    let num = |m: &serde_json::Value, h: &str| -> u64 {
        m["headers"][h]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect(h)
    };
    let urgent: Vec<&serde_json::Value> = out.iter().filter(|m| is_urgent(m)).collect();
    if urgent.is_empty() {
        return (0, 0, 0);
    }
    let first_append_us = since_us.unwrap_or_else(|| {
        urgent
            .iter()
            .map(|m| num(m, "appended-at-ms"))
            .min()
            .unwrap()
            * 1000
    });
    let last_urgent_us = urgent.iter().map(|m| num(m, "handled-at")).max().unwrap();
    let between = out
        .iter()
        .filter(|m| !is_urgent(m))
        .map(|m| num(m, "handled-at"))
        .filter(|t| (first_append_us..=last_urgent_us).contains(t))
        .count();
    (
        between,
        urgent.len(),
        last_urgent_us.saturating_sub(first_append_us) / 1000,
    )
}

/// The same on one RabbitMQ priority queue (`topics create --max-priority`): 1,000 messages
/// produced with `--priority 9` into a backlog of 50,000 without one overtake it, within what
/// weir has already taken off the queue (`--max-in-flight 200`).
#[test]
fn rabbitmq_priority_queue_lets_urgent_messages_overtake() {
    let w = Weir::rabbitmq();
    w.ok(&["topics", "create", "work", "--max-priority", "10"]);
    w.create_topic("out", 1);
    let backlog = 50_000;
    w.ok(&[
        "produce",
        "work",
        "--count",
        &backlog.to_string(),
        "--no-key",
    ]);
    let module = guest("sleepy");
    let mut run = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "work",
        "--group",
        "g",
        "--instances",
        "4",
        "--max-in-flight",
        "200",
        "--admin",
        "off",
        "--handler-config",
        "wait-ms=1",
        "--handler-config",
        "stamp=true",
        "--handler-config",
        "output-topic=out",
    ]);
    wait_until(
        "the backlog is being worked",
        Duration::from_secs(120),
        || w.end("out") >= 2_000,
    );
    let before = w.end("out");
    let since_us = weir_tests::now_ms() * 1000;
    w.ok(&[
        "produce",
        "work",
        "--count",
        "1000",
        "--no-key",
        "--start",
        "1000000",
        "--priority",
        "9",
    ]);
    // Until 5% of the backlog more than the urgent messages is handled: by then every urgent
    // one must be.
    wait_until(
        "the urgent messages and 5% more",
        Duration::from_secs(120),
        || w.end("out") >= before + 1_000 + backlog / 20,
    );
    run.kill();
    let urgent_id = |m: &serde_json::Value| -> bool {
        let p: serde_json::Value =
            serde_json::from_str(m["payload"].as_str().expect("text")).expect("an order");
        p["id"]
            .as_str()
            .and_then(|i| i.strip_prefix("m-")?.parse::<u64>().ok())
            .is_some_and(|n| n >= 1_000_000)
    };
    let out = w.messages("out");
    let (between, urgent, window_ms) = overtaken(&out, urgent_id, Some(since_us));
    eprintln!("routine handled meanwhile: {between}; urgent within {window_ms} ms");
    assert_eq!(
        urgent, 1_000,
        "every urgent message handled before 5% more of the backlog ({between} routine meanwhile)"
    );
    // (The wait above bounds this near 5% already; what weir has taken off the queue, the
    // prefetch of 200, is what it can hand out before the urgent ones: 180-207 measured.)
    assert!(
        between < 1_000,
        "{between} routine messages handled while the urgent ones waited or ran (urgent \
         handled within {window_ms} ms)"
    );
}
