//! The seed document's patterns (issue 18), end to end on each source that carries them.
//!
//! Fan-out: one topic, three groups, each gets every message once, and a slow group does not
//! hold back the others. On the logs, Redis Streams and JetStream every group reads a topic on
//! its own; on RabbitMQ the topic is a fanout exchange with a queue per group
//! (`weir topics create T --fanout`). SQS refuses `--fanout` (it needs SNS).

use std::collections::HashMap;
use std::time::Duration;
use weir_tests::{Broker, Weir, guest, wait_until};

/// Each payload of `topic` with how often it is there.
fn payloads(w: &Weir, topic: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for m in w.messages(topic) {
        *out.entry(m["payload"].as_str().expect("text").to_string())
            .or_default() += 1;
    }
    out
}

fn every_message_once(w: &Weir, topic: &str, n: u64) {
    let got = payloads(w, topic);
    assert_eq!(
        got.len() as u64,
        n,
        "{topic}: {} distinct of {n}",
        got.len()
    );
    let twice: Vec<_> = got.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "{topic}: twice: {twice:?}");
}

/// `weir run` of `group` with `sleepy` waiting `wait_ms` a message, writing to `out-<group>`.
fn group_args(module: &str, group: &str, wait_ms: u64, drain: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--module",
        module,
        "--topic",
        "events",
        "--group",
        group,
        "--instances",
        "1",
        "--admin",
        "off",
        "--handler-config",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("wait-ms={wait_ms}"));
    a.push("--handler-config".into());
    a.push(format!("output-topic=out-{group}"));
    if drain {
        a.extend(["--drain".to_string(), "--json".to_string()]);
    }
    a
}

fn refs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

fn fan_out(w: Weir) {
    let n = 300;
    // The groups' queues are named up front (RabbitMQ keeps what is published before a group
    // first runs only in a queue that is bound); the logs take --fanout as a plain topic.
    if matches!(w.broker(), Broker::Mock(_)) {
        w.create_topic("events", 2);
    } else {
        w.ok(&[
            "topics", "create", "events", "--fanout", "--group", "a", "--group", "b", "--group",
            "c",
        ]);
    }
    for g in ["a", "b", "c"] {
        w.create_topic(&format!("out-{g}"), 1);
    }
    w.ok(&["produce", "events", "--count", &n.to_string()]);
    let module = guest("sleepy");
    let module = module.to_str().unwrap();
    let args = |g, ms, drain| group_args(module, g, ms, drain);
    if matches!(w.broker(), Broker::Embedded) {
        // One process owns the data directory: the groups run one after another (several
        // groups in one process is issue 24's). Each still reads the whole topic on its own.
        for g in ["a", "b"] {
            w.ok(&refs(&args(g, 1, true)));
        }
        assert_eq!(
            w.committed("events", "c"),
            0,
            "c's offsets moved with a and b's"
        );
        w.ok(&refs(&args("c", 1, true)));
    } else {
        // The slow group (half a second a message, one at a time: far slower than the fast
        // ones, whatever the machine's load) starts first and is running before they start.
        let mut slow_args = args("c", 500, false);
        slow_args.extend(["--batch-size".to_string(), "1".to_string()]);
        let slow = w.spawn(&refs(&slow_args));
        wait_until(
            "the slow group has handled a message",
            Duration::from_secs(60),
            || w.end("out-c") > 0,
        );
        let fast: Vec<_> = ["a", "b"]
            .iter()
            .map(|g| w.spawn(&refs(&args(g, 4, true))))
            .collect();
        for f in fast {
            let out = f.wait();
            assert!(out.status.success(), "a fast group failed: {out:?}");
        }
        // The fast groups are done; the slow one is not (it needs 150 s for all).
        let slow_done = w.end("out-c");
        assert!(
            slow_done < n,
            "the slow group finished as soon as the fast ones ({slow_done} of {n})"
        );
        // A clean stop commits what it did; a fast run of the same group does the rest.
        let out = slow.terminate();
        assert!(out.status.success(), "the slow group's stop: {out:?}");
        w.ok(&refs(&args("c", 1, true)));
    }
    for g in ["a", "b", "c"] {
        every_message_once(&w, &format!("out-{g}"), n);
    }
}

#[test]
fn fan_out_embedded() {
    fan_out(Weir::new());
}

#[test]
fn fan_out_kafka() {
    fan_out(Weir::kafka_mock());
}

#[test]
fn fan_out_rabbitmq() {
    fan_out(Weir::rabbitmq());
}

#[test]
fn fan_out_redis() {
    fan_out(Weir::redis());
}

#[test]
fn fan_out_nats() {
    fan_out(Weir::nats());
}

/// SQS hands each message to one consumer: `--fanout` is refused with what to do instead.
#[test]
fn fan_out_is_refused_on_sqs() {
    let w = Weir::sqs();
    let out = w.output(&["topics", "create", "events", "--fanout"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SNS") && err.contains("without --fanout"),
        "{err}"
    );
}

/// RabbitMQ's fanout topics beyond consuming them: a handler's outputs to one reach every
/// group's queue; a dead letter of one group is replayed to that group's queue only (the
/// envelope names the group); and `--exactly-once` refuses to write to one (an AMQP
/// transaction has no confirms to tell an output no queue took), losing nothing.
#[test]
fn rabbitmq_fanout_outputs_dead_letters_and_exactly_once() {
    let w = Weir::rabbitmq();
    w.create_topic("in", 1);
    w.create_topic("out-a", 1);
    w.ok(&[
        "topics", "create", "events", "--fanout", "--group", "a", "--group", "b",
    ]);
    let lag = |g: &str| w.offsets("events", g)[0].0;
    weir_tests::produce_lines(&w, "in", None, &["one", "three"]);
    let poison = guest("poison");
    let poison = poison.to_str().unwrap();
    // --exactly-once: refused at the first commit, and every input stays in its queue.
    let out = w.output(&[
        "run",
        "--module",
        poison,
        "--topic",
        "in",
        "--group",
        "g",
        "--exactly-once",
        "--handler-config",
        "output-topic=events",
        "--drain",
    ]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write to fanout topic events"), "{err}");
    wait_until(
        "the inputs are back in their queue",
        Duration::from_secs(30),
        || w.queue_state("in") == (2, 0),
    );
    assert_eq!((lag("a"), lag("b")), (0, 0), "nothing reached the groups");
    // Confirmed publishes: each output reaches both groups' queues.
    let s = w.drain(
        &guest("poison"),
        "in",
        "g",
        &["--handler-config", "output-topic=events"],
    );
    assert_eq!(s["processed"], 2, "{s}");
    assert_eq!((lag("a"), lag("b")), (2, 2));
    // Group a dead-letters a poison message of its own; replayed, it goes back to a only.
    weir_tests::produce_lines(&w, "events", None, &["poison four"]);
    assert_eq!((lag("a"), lag("b")), (3, 3));
    let s = w.drain(
        &guest("poison"),
        "events",
        "a",
        &["--handler-config", "output-topic=out-a"],
    );
    assert_eq!(
        (s["processed"].as_u64(), s["dead_lettered"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    let letter = w.ok(&["dlq", "show", "events", "1"]);
    let letter = String::from_utf8_lossy(&letter.stdout);
    assert!(
        letter
            .lines()
            .any(|l| l.contains("weir.dlq.group") && l.trim_end().ends_with('a')),
        "{letter}"
    );
    w.ok(&["dlq", "replay", "events"]);
    assert_eq!(
        (lag("a"), lag("b")),
        (1, 3),
        "replayed to group a's queue only"
    );
}
