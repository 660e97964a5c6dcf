//! NATS JetStream (issue 16) beyond the conformance suite: messages published by another client
//! (async-nats, as a user's producer would), two weir processes on one durable consumer with one
//! killed and started again, a call longer than `ack_wait`, and requeue mode as a delayed `NAK`.

use std::collections::HashMap;
use std::time::Duration;
use weir_tests::{Broker, NatsNs, Weir, guest, scaled, wait_until};

fn ns(w: &Weir) -> &NatsNs {
    let Broker::Nats(ns) = w.broker() else {
        unreachable!("a NATS test")
    };
    ns
}

/// Publishes `n` orders to `topic` (acked by JetStream), each with an `idempotency-key` header;
/// `body(i)` is order `i`'s JSON.
fn publish(ns: &NatsNs, topic: &str, n: u64, body: impl Fn(u64) -> String) {
    let subject = ns.subject(topic);
    let bodies: Vec<String> = (0..n).map(body).collect();
    NatsNs::with(async move |js| {
        for (chunk_start, chunk) in bodies.chunks(1000).enumerate() {
            let mut acks = Vec::new();
            for (i, b) in chunk.iter().enumerate() {
                let mut h = async_nats::HeaderMap::new();
                h.insert(
                    "idempotency-key",
                    format!("m-{}", chunk_start * 1000 + i).as_str(),
                );
                acks.push(
                    js.publish_with_headers(subject.clone(), h, b.clone().into())
                        .await
                        .expect("publish"),
                );
            }
            for a in acks {
                a.await.expect("JetStream stored it");
            }
        }
    });
}

fn order(i: u64) -> String {
    format!(
        r#"{{"id":"m-{i}","customer":"c-{}","amount_cents":{}}}"#,
        i % 97,
        i % 10_000 + 1
    )
}

/// How many messages `topic`'s stream holds.
fn count(ns: &NatsNs, topic: &str) -> u64 {
    let stream = ns.stream(topic);
    NatsNs::with(async move |js| {
        let mut s = js.get_stream(&stream).await.expect("the stream");
        s.info().await.expect("stream info").state.messages
    })
}

/// Two processes on one durable consumer, one killed with `kill -9` at a quarter and started
/// again: nothing lost, each order confirmed once with or without `--dedupe`, nothing pending
/// or unacked at the end.
fn two_processes_and_a_kill(dedupe: bool) {
    let w = Weir::nats();
    let ns = ns(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = scaled(50_000, 20_000);
    publish(ns, "orders", n, order);
    let module = guest("orders");
    let group = format!("g-{}-{}", std::process::id(), rand::random::<u32>());
    // A lease the survivors keep renewed under load (2 s, the harness's, is for tests that
    // wait it out), beside the harness's properties.
    let mut args = vec![
        "--source-property",
        "ack-wait=10s",
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        &group,
        "--max-in-flight",
        "500",
        "--admin",
        "off",
        "--drain",
        "--json",
    ];
    if dedupe {
        args.extend([
            "--call-timeout",
            "2s",
            "--backoff-max",
            "1s",
            "--max-attempts",
            "2",
            "--dedupe",
            "header",
            "--dedupe-store",
            "redis://127.0.0.1:6379",
        ]);
    }
    let mut a = w.spawn(&args);
    let b = w.spawn(&args);
    wait_until(
        "a quarter of the orders are confirmed",
        Duration::from_secs(300),
        || count(ns, "confirmations") >= n / 4,
    );
    a.kill();
    assert!(
        count(ns, "confirmations") < n,
        "the runs finished before the kill"
    );
    let a = w.spawn(&args);
    for run in [a, b] {
        let out = run.wait();
        assert!(out.status.success(), "a run failed: {out:?}");
    }
    let per_id = w.confirmations_per_id();
    let lost = (0..n)
        .filter(|i| !per_id.contains_key(&format!("m-{i}")))
        .count();
    assert_eq!(lost, 0, "orders lost");
    // Outputs carry their message's stream sequence as `Nats-Msg-Id`: a message that runs
    // again (the killed process's, within the 2-minute duplicate window) publishes nothing new.
    let twice: u64 = per_id.values().map(|c| c - 1).sum();
    assert_eq!(twice, 0, "orders confirmed twice");
    assert_eq!(
        ns.pending("orders", &group),
        (0, 0),
        "(pending, unacked) at the end"
    );
}

#[test]
fn two_processes_one_killed_every_order_once() {
    two_processes_and_a_kill(false);
}

#[test]
fn two_processes_one_killed_every_order_once_with_dedupe() {
    two_processes_and_a_kill(true);
}

/// A call that runs past `ack_wait` (2 s) gets `+WPI` while it runs, so JetStream hands it to
/// no one else: the consumer redelivered nothing, and each of 6 messages was handled once
/// across both processes.
#[test]
fn a_long_call_is_not_handed_to_a_second_consumer() {
    const N: u64 = 6;
    let w = Weir::nats();
    let ns = ns(&w);
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    publish(ns, "in", N, |i| format!("m-{i}"));
    let module = guest("sleepy");
    let args = [
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "in",
        "--group",
        "g",
        "--handler-config",
        "wait-ms=5000",
        "--call-timeout",
        "20s",
        "--instances",
        "3",
        "--admin",
        "off",
        "--drain",
        "--json",
    ];
    let a = w.spawn(&args);
    let b = w.spawn(&args);
    let mut processed = 0;
    for run in [a, b] {
        let out = run.wait();
        assert!(out.status.success(), "a run failed: {out:?}");
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        processed += s["processed"].as_u64().unwrap();
    }
    let stream = ns.stream("in");
    let redelivered = NatsNs::with(async move |js| {
        let s = js.get_stream(&stream).await.unwrap();
        s.consumer_info("g").await.unwrap().num_redelivered
    });
    assert_eq!(
        redelivered, 0,
        "a message was delivered again while its call ran"
    );
    assert_eq!(processed, N, "handled across both processes");
    assert_eq!(count(ns, "out"), N);
}

/// Requeue mode on JetStream is the broker's own delayed redelivery (`NAK` with the backoff):
/// no retry stream; a transient order comes back as delivery 2 and is confirmed once.
#[test]
fn requeue_mode_naks_with_the_backoff() {
    let w = Weir::nats();
    let ns = ns(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = 300;
    publish(ns, "orders", n, |i| {
        if i % 10 == 3 {
            order(i).replace('}', r#","transient":true}"#)
        } else {
            order(i)
        }
    });
    let s = w.drain(
        &guest("orders"),
        "orders",
        "g",
        &[
            "--retry-mode",
            "requeue",
            "--backoff-base",
            "200ms",
            "--jitter",
            "none",
        ],
    );
    assert_eq!(s["processed"], n, "{s}");
    assert_eq!(s["retries"], n / 10, "{s}");
    let per_id: HashMap<String, u64> = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, n);
    assert!(per_id.values().all(|c| *c == 1), "confirmed twice");
    let topics = w.stats();
    assert!(
        !topics.to_string().contains("orders.retry"),
        "a retry stream was made: {topics}"
    );
    assert_eq!(ns.pending("orders", "g"), (0, 0));
}

/// Two groups read one topic and write to one output topic: each group's outputs are its own,
/// none dropped as the other's duplicate (an output's id names its group).
#[test]
fn two_groups_writing_to_one_topic_keep_every_output() {
    let w = Weir::nats();
    let ns = ns(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = 500;
    publish(ns, "orders", n, order);
    for g in ["billing", "audit"] {
        let s = w.drain(&guest("orders"), "orders", g, &[]);
        assert_eq!(s["processed"], n, "{g}: {s}");
    }
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, n);
    assert!(
        per_id.values().all(|c| *c == 2),
        "each order once per group"
    );
}

/// At-most-once: each message is acked (the ack confirmed) as it is handed over; every output
/// is written and nothing is left unacked.
#[test]
fn at_most_once_writes_every_output_and_leaves_nothing_unacked() {
    let w = Weir::nats();
    let ns = ns(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = 1_000;
    publish(ns, "orders", n, order);
    let s = w.drain(
        &guest("orders"),
        "orders",
        "g",
        &["--delivery", "at-most-once"],
    );
    assert_eq!(s["processed"], n, "{s}");
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, n);
    assert!(per_id.values().all(|c| *c == 1));
    assert_eq!(ns.pending("orders", "g"), (0, 0));
}
