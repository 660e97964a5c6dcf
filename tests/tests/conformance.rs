//! One suite, every source: each behaviour here runs on the embedded log, on Kafka (the mock
//! cluster), on RabbitMQ (the machine's server, a virtual host per test) and on Redis Streams
//! (the machine's server, a key prefix per test), so all are held to
//! the same delivery semantics: outputs, retries, the dead-letter envelope, at-least-once under
//! `kill -9`, requeue mode, `--drain` and `weir dlq`. A new source is done when it passes this suite.

use super::conformance_links::a_lost_link_costs_a_reconnect;
use std::collections::HashMap;
use std::time::Duration;
use weir_tests::{
    Broker, Weir, guest, header, now_ms, produce_keyed, produce_lines, scaled, wait_until,
};

/// Generates a test for each behaviour on each source: `embedded`, `kafka`, `rabbitmq` and
/// `redis` unless the behaviour names its sources (`behaviour: [embedded, rabbitmq]`).
macro_rules! on_every_source {
    ($($behaviour:ident $(: [$($source:ident),+])?),* $(,)?) => {$(
        on_every_source!(@one $behaviour [$($($source),+)?]);
    )*};
    (@one $behaviour:ident []) => {
        on_every_source!(@one $behaviour [embedded, kafka, rabbitmq, redis]);
    };
    (@one $behaviour:ident [$($source:ident),+]) => {
        mod $behaviour {
            $(
                #[test]
                fn $source() {
                    super::$behaviour(on_every_source!(@weir $source));
                }
            )+
        }
    };
    (@weir embedded) => { weir_tests::Weir::new() };
    (@weir kafka) => { weir_tests::Weir::kafka_mock() };
    (@weir rabbitmq) => { weir_tests::Weir::rabbitmq() };
    (@weir redis) => { weir_tests::Weir::redis() };
    (@weir nats) => { weir_tests::Weir::nats() };
    (@weir sqs) => { weir_tests::Weir::sqs() };
    (@weir sqs_fifo) => { weir_tests::Weir::sqs_fifo() };
}

// NATS JetStream and SQS run every behaviour but these: requeue mode there is a delayed
// redelivery (a NAK with the delay, a visibility change), no retry topic (tests/tests/nats.rs,
// tests/tests/sqs.rs), and they have no transactions for `--exactly-once` (exactly-once
// outputs there come from `--dedupe` with `Nats-Msg-Id` or SQS FIFO deduplication ids). Order
// per key on SQS needs FIFO queues (`sqs_fifo`): a standard queue keeps no order.
on_every_source!(
    every_input_has_its_output_once: [embedded, kafka, rabbitmq, redis, nats, sqs],
    retries_back_off_then_succeed: [embedded, kafka, rabbitmq, redis, nats, sqs],
    dead_letters_carry_the_envelope: [embedded, kafka, rabbitmq, redis, nats, sqs],
    kill_9_loses_nothing: [embedded, kafka, rabbitmq, redis, nats, sqs],
    kill_9_with_exactly_once_writes_once: [embedded, rabbitmq, redis],
    requeue_mode_with_kill_9,
    requeue_moves_retries_to_the_retry_topic,
    each_key_keeps_its_order: [embedded, kafka, rabbitmq, redis, nats, sqs_fifo],
    // The embedded log runs in the process: it has no link to lose.
    a_lost_link_costs_a_reconnect: [kafka, rabbitmq, redis, nats, sqs],
);

fn all_committed(w: &Weir, topic: &str, group: &str) -> bool {
    w.offsets(topic, group).iter().all(|(end, c)| end == c)
}

fn every_input_has_its_output_once(w: Weir) {
    let n = w.volume(2_000);
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 2);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    let s = w.drain(&guest("orders"), "orders", "g", &[]);
    assert_eq!(s["processed"], n, "{s}");
    assert_eq!(s["emitted"], n, "{s}");
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, n);
    assert!(per_id.values().all(|&c| c == 1), "an order confirmed twice");
    assert!(all_committed(&w, "orders", "g"));
    // Outputs keep the input's key and carry its offset.
    let m = &w.messages("confirmations")[0];
    assert!(m["key"].as_str().unwrap().starts_with("m-"), "{m}");
    assert!(header(m, "source-offset").is_some(), "{m}");
}

fn retries_back_off_then_succeed(w: Weir) {
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    produce_lines(
        &w,
        "in",
        Some("k"),
        &["a", "flaky one", "b", "flaky two", "c"],
    );
    let l = w.drain_logged(
        &guest("flaky"),
        "in",
        "g",
        &[
            "--backoff-base",
            "200ms",
            "--jitter",
            "none",
            "--handler-config",
            "fail-attempts=3",
        ],
    );
    // Two flaky messages, each failing three times before it succeeds.
    assert_eq!(l.summary["retries"], 6, "{}", l.summary);
    assert_eq!(l.summary["processed"], 5, "{}", l.summary);
    assert_eq!(l.summary["dead_lettered"], 0, "{}", l.summary);
    let out: Vec<String> = w
        .messages("out")
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect();
    // One key, one lane: the retried messages hold back the ones after them.
    assert_eq!(out, ["a", "flaky one", "b", "flaky two", "c"]);
    // The attempts of one message are spaced by the backoff, 200 ms then 400 ms: each gap at
    // least its backoff, and under twice it and a second (room for a loaded machine; a backoff
    // that did not grow, or grew tenfold, fails one bound or the other).
    let mut at: HashMap<u64, Vec<u64>> = HashMap::new();
    for f in &l.failures {
        let offset = f["fields"]["offset"].as_u64().expect("an offset");
        at.entry(offset)
            .or_default()
            .push(f["at_ms"].as_u64().unwrap());
    }
    assert_eq!(at.len(), 2, "{:?}", l.failures);
    for times in at.values() {
        assert_eq!(times.len(), 3, "{times:?}");
        for (i, backoff) in [(1, 200), (2, 400)] {
            let gap = times[i] - times[i - 1];
            assert!(
                (backoff..2 * backoff + 1000).contains(&gap),
                "gap {i} of {times:?}: {gap} ms for a backoff of {backoff} ms"
            );
        }
    }
    assert!(all_committed(&w, "in", "g"));
}

fn dead_letters_carry_the_envelope(w: Weir) {
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    let before = now_ms();
    produce_lines(&w, "in", Some("b"), &["good", "poison pill", "fine"]);
    let s = w.drain(&guest("poison"), "in", "g", &[]);
    assert_eq!(s["dead_lettered"], 1, "{s}");
    assert_eq!(s["processed"], 2, "{s}");
    let dlq = w.messages(&w.dlq_of("in"));
    assert_eq!(dlq.len(), 1);
    let m = &dlq[0];
    assert_eq!(m["payload"], "poison pill");
    assert_eq!(m["key"], "b");
    assert_eq!(header(m, "weir.dlq.topic"), Some("in"));
    assert_eq!(header(m, "weir.dlq.partition"), Some("0"));
    assert_eq!(header(m, "weir.dlq.offset"), Some("1"));
    assert_eq!(header(m, "weir.dlq.attempts"), Some("1"));
    assert_eq!(header(m, "weir.dlq.error-kind"), Some("rejected"));
    assert_eq!(
        header(m, "weir.dlq.error"),
        Some("poison message at offset 1")
    );
    assert_eq!(header(m, "weir.dlq.module"), Some("poison"));
    let first: u64 = header(m, "weir.dlq.first-failure-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(first >= before && first <= now_ms());
    let out: Vec<_> = w
        .messages("out")
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(out, ["good", "fine"]);
    assert!(all_committed(&w, "in", "g"));

    // `weir dlq` lists, shows and replays it on every source.
    let listed = dlq_list(&w);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let l = &listed[0];
    assert_eq!(l["error_kind"], "rejected", "{l}");
    assert_eq!(l["replayed"], false, "{l}");
    let id = l["id"].as_str().expect("an id").to_string();
    let show = String::from_utf8(w.ok(&["dlq", "show", "in", &id]).stdout).unwrap();
    assert!(show.contains("payload   poison pill"), "{show}");
    assert!(show.contains("weir.dlq.error-kind: rejected"), "{show}");
    w.fails(&["dlq", "show", "in", "9:99"], 2);
    let replay = |extra: &[&str]| {
        let mut args = vec!["dlq", "replay", "in", "--to", "out"];
        args.extend_from_slice(extra);
        String::from_utf8(w.ok(&args).stderr).unwrap()
    };
    let e = replay(&["--dry-run"]);
    assert!(e.contains("1 dead letter(s) would be replayed"), "{e}");
    let e = replay(&[]);
    assert!(e.contains("replayed 1 dead letter(s)"), "{e}");
    let out: Vec<_> = w
        .messages("out")
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(out, ["good", "fine", "poison pill"]);
    // Replayed once: a log marks it, a queue lets it go; a second replay finds nothing.
    assert!(dlq_list(&w).iter().all(|l| l["replayed"] == true));
    let e = replay(&[]);
    assert!(e.contains("replayed 0 dead letter(s)"), "{e}");
    assert_eq!(w.messages("out").len(), 3);
}

fn dlq_list(w: &Weir) -> Vec<serde_json::Value> {
    String::from_utf8(w.ok(&["dlq", "list", "in", "--json"]).stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("dlq list --json prints JSON lines"))
        .collect()
}

fn kill_9_loses_nothing(w: Weir) {
    kill_9(w, false);
}

/// With `--exactly-once` a kill leaves exactly the committed inputs' outputs, on a queue too
/// (AMQP `tx` puts a message's outputs and its ack in one transaction), and the restart writes
/// each output once. (Kafka's transactions need a broker that keeps them: the mock cluster
/// answers `TxnOffsetCommit` without storing it; `kafka::txn_broker_...` runs on one.)
fn kill_9_with_exactly_once_writes_once(w: Weir) {
    kill_9(w, true);
}

fn kill_9(w: Weir, exactly_once: bool) {
    // The kill must land mid-run: a debug build on the embedded log handles about 20,000
    // messages a second, the brokers far fewer (and each costs them more to set up and read).
    let n = if matches!(w.broker(), Broker::Embedded) {
        scaled(20_000, 20_000)
    } else {
        w.volume(scaled(6_000, 4_000))
    };
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 4);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    let module = guest("orders");
    let mut args = vec![
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
    ];
    if exactly_once {
        args.push("--exactly-once");
    }
    let mut run = w.spawn(&args);
    wait_until(
        "some orders are confirmed",
        Duration::from_secs(120),
        || w.end("confirmations") >= n / 10,
    );
    run.kill();
    // What the killed run acked, per partition: on a log its committed offsets; on a queue what
    // left it once the broker has taken back what the dead consumer held unacked.
    let committed: Vec<u64> = if w.on_queue() {
        wait_until(
            "the broker took back what the killed run held",
            Duration::from_secs(30),
            || w.queue_state("orders").1 == 0,
        );
        vec![n - w.queue_state("orders").0]
    } else {
        w.offsets("orders", "g").iter().map(|(_, c)| *c).collect()
    };
    let at_kill: u64 = committed.iter().sum();
    assert!(
        at_kill < n,
        "the run finished before the kill; the test proves nothing"
    );
    // The outputs the kill left, per partition of their input (a queue has one).
    let partition_of: HashMap<String, usize> = if w.on_queue() {
        HashMap::new()
    } else {
        w.messages("orders")
            .iter()
            .map(|m| {
                let key = m["key"].as_str().expect("orders are keyed by id");
                (key.to_string(), m["partition"].as_u64().unwrap() as usize)
            })
            .collect()
    };
    let mut outputs_at_kill = vec![0u64; committed.len()];
    for (id, c) in w.confirmations_per_id() {
        outputs_at_kill[partition_of.get(&id).copied().unwrap_or(0)] += c;
    }
    for (p, (&o, &c)) in outputs_at_kill.iter().zip(&committed).enumerate() {
        assert!(
            o >= c,
            "partition {p}: {o} outputs for {c} committed inputs: a committed input lost its output"
        );
    }
    let s = w.drain(&module, "orders", "g", &[]);
    let per_id = w.confirmations_per_id();
    let lost: Vec<String> = (0..n)
        .map(|i| format!("m-{i}"))
        .filter(|id| !per_id.contains_key(id))
        .collect();
    if !lost.is_empty() {
        // Where did they go: still waiting in the input (the drain ended early), or taken
        // without an output?
        let left: Vec<String> = w
            .messages("orders")
            .iter()
            .filter_map(|m| m["key"].as_str().map(str::to_string))
            .collect();
        panic!(
            "orders lost: {lost:?}; {} confirmations for {} ids; the drain: {s}; \
             left in the input: {} ({:?})",
            per_id.values().sum::<u64>(),
            per_id.len(),
            left.len(),
            left.iter().filter(|k| lost.contains(k)).collect::<Vec<_>>(),
        );
    }
    let duplicates: u64 = per_id.values().map(|c| c - 1).sum();
    let in_flight: u64 = outputs_at_kill
        .iter()
        .zip(&committed)
        .map(|(o, c)| o - c)
        .sum();
    if exactly_once || matches!(w.broker(), Broker::Embedded) {
        // Outputs and offsets (or acks) are one atomic write, and an output waits for the
        // offset that passes its message: what the kill left is exactly the committed inputs'
        // outputs, and what runs again had written nothing.
        assert_eq!(
            in_flight, 0,
            "outputs beyond the committed inputs at the kill"
        );
        assert_eq!(duplicates, 0, "outputs written twice");
    }
    // Only what was handled and not yet committed at the kill is handled again.
    assert!(
        duplicates <= in_flight,
        "{duplicates} duplicates; {in_flight} were handled and uncommitted at the kill"
    );
    assert_eq!(s["processed"].as_u64().unwrap(), n - at_kill, "{s}");
    assert!(all_committed(&w, "orders", "g"));
}

/// Requeue mode on two topics in one process (each with its own retry topic, all four consumed
/// at once, so commits of different topics interleave), killed with `kill -9` mid-run, then
/// drained: every order confirmed or dead-lettered, exactly once on the log, on a broker at most
/// once more for each message the killed run held (on RabbitMQ, two queues on one channel once
/// acked each other's messages: issue 34). 7% of the orders are retried, 1% rejected.
fn requeue_mode_with_kill_9(w: Weir) {
    let n = if matches!(w.broker(), Broker::Embedded) {
        scaled(20_000, 20_000)
    } else {
        scaled(6_000, 4_000)
    };
    const TOPICS: [&str; 2] = ["orders", "refunds"];
    for t in TOPICS {
        w.create_topic(t, 4);
    }
    w.create_topic("confirmations", 4);
    // Half the orders on each topic, numbered apart (m-0.. and m-<n/2>..).
    for (i, t) in TOPICS.iter().enumerate() {
        w.ok(&[
            "produce",
            t,
            "--count",
            &(n / 2).to_string(),
            "--start",
            &(i as u64 * n / 2).to_string(),
            "--retry-percent",
            "7",
            "--reject-percent",
            "1",
        ]);
    }
    let n = n / 2 * 2;
    let module = guest("orders");
    const IN_FLIGHT: u64 = 100;
    let in_flight = IN_FLIGHT.to_string();
    let mut args = vec!["run", "--module", module.to_str().unwrap()];
    for t in TOPICS {
        args.extend(["--topic", t]);
    }
    args.extend([
        "--group",
        "g",
        "--retry-mode",
        "requeue",
        "--backoff-base",
        "10ms",
        "--jitter",
        "none",
        "--batch-size",
        "32",
        "--instances",
        "1",
        "--max-in-flight",
        &in_flight,
    ]);
    let consumed: Vec<String> = TOPICS
        .iter()
        .flat_map(|t| [t.to_string(), format!("{t}.retry")])
        .collect();
    let mut run = w.spawn(&args);
    wait_until(
        "some orders are confirmed",
        Duration::from_secs(120),
        || w.end("confirmations") >= n / 10,
    );
    run.kill();
    // What may run again: on a queue what the killed run held (its prefetch on each of the
    // four queues); on Kafka what was written (outputs, dead letters, retry copies) for inputs
    // whose offsets were not committed yet (librdkafka commits every few seconds).
    let may_run_again = if w.on_queue() {
        wait_until(
            "the broker took back what the killed run held",
            Duration::from_secs(30),
            || consumed.iter().all(|q| w.queue_state(q).1 == 0),
        );
        IN_FLIGHT * consumed.len() as u64
    } else {
        let written = w.end("confirmations")
            + TOPICS
                .iter()
                .map(|t| w.end(&format!("{t}.dlq")) + w.end(&format!("{t}.retry")))
                .sum::<u64>();
        let done: u64 = consumed.iter().map(|q| w.committed(q, "g")).sum();
        written.saturating_sub(done)
    };
    assert!(
        w.end("confirmations") < n,
        "the run finished before the kill; the test proves nothing"
    );
    args.push("--drain");
    w.ok(&args);
    let ids = |topics: &[String]| {
        let mut per: HashMap<String, u64> = HashMap::new();
        for m in topics.iter().flat_map(|t| w.messages(t)) {
            let v: serde_json::Value =
                serde_json::from_str(m["payload"].as_str().unwrap()).expect("JSON");
            let id = v["order_id"].as_str().or(v["id"].as_str()).unwrap();
            *per.entry(id.to_string()).or_default() += 1;
        }
        per
    };
    let confirmed = ids(&["confirmations".to_string()]);
    let dead = ids(&TOPICS.map(|t| format!("{t}.dlq")));
    for i in 0..n {
        let id = format!("m-{i}");
        let (c, d) = (confirmed.get(&id), dead.get(&id));
        assert!(
            c.is_some() != d.is_some(),
            "{id}: confirmed {c:?}, dead-lettered {d:?}"
        );
    }
    let twice: u64 = confirmed.values().chain(dead.values()).map(|c| c - 1).sum();
    if matches!(w.broker(), Broker::Embedded) {
        assert_eq!(twice, 0, "written twice on the log");
    } else {
        assert!(
            twice <= may_run_again,
            "{twice} written twice; {may_run_again} could run again after the kill"
        );
    }
    for q in &consumed {
        assert!(all_committed(&w, q, "g"), "{q} is not all committed");
    }
}

fn requeue_moves_retries_to_the_retry_topic(w: Weir) {
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    produce_lines(&w, "in", Some("k"), &["a", "b", "flaky c", "d"]);
    let l = w.drain_logged(
        &guest("flaky"),
        "in",
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
    assert_eq!(l.summary["processed"], 4, "{}", l.summary);
    assert_eq!(l.summary["retries"], 2, "{}", l.summary);
    let out = w.messages("out");
    let payloads: Vec<&str> = out.iter().map(|m| m["payload"].as_str().unwrap()).collect();
    // Nothing waited for the failing message: its key's later message went first.
    assert_eq!(payloads, ["a", "b", "d", "flaky c"]);
    // The handler saw the retried message as the origin's (offset 2, third attempt), which
    // only weir's retry headers can tell it: the copy it ran is offset 1 of the retry topic.
    // This holds on a queue too, where the retry copies are gone once consumed.
    let last = out.last().unwrap();
    assert_eq!(header(last, "seen-offset"), Some("2"), "{last}");
    assert_eq!(header(last, "seen-attempt"), Some("3"), "{last}");
    let retries = w.messages("in.retry");
    // A queue hands its messages over once: the retry copies were consumed and acked.
    assert_eq!(retries.len(), if w.on_queue() { 0 } else { 2 });
    for m in &retries {
        assert_eq!(header(m, "weir.retry.topic"), Some("in"));
        assert_eq!(header(m, "weir.retry.offset"), Some("2"));
    }
    assert!(all_committed(&w, "in", "g") && all_committed(&w, "in.retry", "g"));
}

/// Messages of one key reach the handler, and their outputs the output topic, in the order they
/// were produced, while other keys run beside them and some messages wait out retries. (On a
/// queue this holds within one weir process; processes on one queue compete.)
fn each_key_keeps_its_order(w: Weir) {
    const N: usize = 400;
    const KEYS: usize = 8;
    w.create_topic("in", 2);
    w.create_topic("out", 1);
    let lines: Vec<String> = (0..N)
        .map(|i| {
            let flaky = if i % 37 == 0 { " flaky" } else { "" };
            format!("k{}:{i}{flaky}", i % KEYS)
        })
        .collect();
    produce_keyed(&w, "in", ":", &lines);
    let s = w.drain(
        &guest("flaky"),
        "in",
        "g",
        &[
            "--backoff-base",
            "20ms",
            "--jitter",
            "none",
            "--max-in-flight",
            "64",
        ],
    );
    assert_eq!(s["processed"], N as u64, "{s}");
    assert!(s["retries"].as_u64().unwrap() > 0, "{s}");
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for m in w.messages("out") {
        let seq = m["payload"].as_str().unwrap().split(' ').next().unwrap();
        per_key
            .entry(m["key"].as_str().unwrap().to_string())
            .or_default()
            .push(seq.parse().unwrap());
    }
    assert_eq!(per_key.len(), KEYS);
    for (key, seqs) in &per_key {
        let k: usize = key[1..].parse().unwrap();
        let expected: Vec<usize> = (0..N).filter(|i| i % KEYS == k).collect();
        assert_eq!(seqs, &expected, "key {key} out of order");
    }
}
