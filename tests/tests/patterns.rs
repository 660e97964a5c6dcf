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

/// Request/reply: `weir request` calls, eight at a time, against a running `answer` handler:
/// each gets its own answer (the handler upper-cases the payload, and the answer is matched by
/// its correlation id); a request the handler rejects gets the error at once, not a timeout;
/// with no handler running, a request times out with exit code 124.
fn request_reply(w: Weir) {
    w.create_topic("ask", 2);
    // Created up front: the mock cluster takes topics only from the harness.
    w.create_topic("ask.replies", 1);
    let module = guest("answer");
    let mut run = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "ask",
        "--group",
        "answerers",
        "--admin",
        "off",
    ]);
    if matches!(w.broker(), Broker::Embedded) {
        // Requests reach the log through the run once it owns the data directory; one sent
        // before would open the directory itself and keep the run out.
        wait_until("the run serves the log", Duration::from_secs(60), || {
            w.data_dir().join("weir.sock").exists()
        });
    }
    let n = 64;
    let mut failures = Vec::new();
    for round in 0..n / 8 {
        let calls: Vec<(String, std::process::Child)> = (0..8)
            .map(|j| {
                let q = format!("request-{}", round * 8 + j);
                let child = w
                    .cmd(&["request", "ask", &q, "--timeout", "30s"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("start weir request");
                (q, child)
            })
            .collect();
        for (q, child) in calls {
            let out = child.wait_with_output().expect("wait for weir request");
            let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || got != q.to_uppercase() {
                failures.push(format!("{q}: {got:?} {out:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    let out = w.output(&["request", "ask", "fail", "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rejected: asked to fail"),
        "{out:?}"
    );
    run.kill();
    let out = w.output(&["request", "ask", "nobody", "--timeout", "1s"]);
    if matches!(w.broker(), Broker::Embedded) {
        // Nothing serves the data directory: refused at once rather than hold it.
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no `weir run` serves"),
            "{out:?}"
        );
    } else {
        assert_eq!(out.status.code(), Some(124), "{out:?}");
    }
}

#[test]
fn request_reply_embedded() {
    request_reply(Weir::new());
}

#[test]
fn request_reply_kafka() {
    request_reply(Weir::kafka_mock());
}

#[test]
fn request_reply_redis() {
    request_reply(Weir::redis());
}

#[test]
fn request_reply_nats() {
    request_reply(Weir::nats());
}

/// Request/reply with another AMQP client: it publishes a request with AMQP's own `reply_to` (a
/// queue) and `correlation_id`, as RabbitMQ's RPC tutorial does; the `answer` handler's reply
/// reaches that queue with the correlation id as an AMQP property.
#[test]
fn rabbitmq_answers_an_amqp_clients_request() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions};
    let w = Weir::rabbitmq();
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!()
    };
    let url = v.url();
    w.create_topic("ask", 1);
    w.create_topic("answers", 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let props = lapin::BasicProperties::default()
            .with_reply_to("answers".into())
            .with_correlation_id("c-7".into());
        ch.basic_publish(
            "".into(),
            "ask".into(),
            BasicPublishOptions::default(),
            b"hello",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = conn.close(200, "sent".into()).await;
    });
    let s = w.drain(&guest("answer"), "ask", "g", &[]);
    assert_eq!(s["processed"], 1, "{s}");
    let (payload, id) = rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let got = ch
            .basic_get("answers".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("an answer in the reply queue");
        let d = got.delivery;
        (
            d.data.clone(),
            d.properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
        )
    });
    assert_eq!(payload, b"HELLO");
    assert_eq!(id.as_deref(), Some("c-7"));
}

/// Request/reply over HTTP: 1,000 `POST /topics/ask/request` calls against a running `answer`
/// handler, each answered with its own reply (payload and correlation id checked); a request
/// the handler rejects is a 502 with the error; a topic no handler answers is a 504 after the
/// timeout; an unknown topic a 400.
#[test]
fn admin_requests_get_their_own_answers() {
    let w = Weir::new();
    w.create_topic("ask", 2);
    w.create_topic("idle", 1);
    let module = guest("answer");
    let log = w.data_dir().with_extension("log");
    let (mut run, addr) = w.spawn_with_admin(
        &[
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "ask",
            "--group",
            "answerers",
        ],
        &log,
    );
    for i in 0..1_000 {
        let q = format!("q-{i}");
        let (status, body) = weir_tests::http("POST", &addr, "/topics/ask/request", Some(&q));
        assert_eq!(status, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["payload"], q.to_uppercase(), "{body}");
        assert_eq!(
            v["headers"]["correlation-id"], v["correlation_id"],
            "{body}"
        );
    }
    let (status, body) = weir_tests::http("POST", &addr, "/topics/ask/request", Some("fail"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("rejected: asked to fail"), "{body}");
    let (status, body) = weir_tests::http(
        "POST",
        &addr,
        "/topics/idle/request?timeout=300ms",
        Some("x"),
    );
    assert_eq!(status, 504, "{body}");
    let (status, body) =
        weir_tests::http("POST", &addr, "/topics/nope/request?timeout=1s", Some("x"));
    assert_eq!(status, 400, "{body}");
    run.kill();
}
