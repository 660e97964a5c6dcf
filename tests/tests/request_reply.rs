//! Request/reply (issue 18): `weir request` on the logs, `POST /topics/T/request` on the
//! admin server, and an AMQP client's `reply_to` on RabbitMQ, against the `answer` handler.

use std::time::Duration;
use weir_tests::{Broker, Weir, guest, scaled, wait_until};

/// `args` and, on librdkafka's mock cluster, a short fetch wait: the mock holds a fetch that
/// finds nothing for the whole `fetch.wait.max.ms` (500 ms) and does not answer it when a record
/// arrives, as a broker does, so each request and each answer would wait up to half a second.
fn with_fetch_wait<'a>(w: &Weir, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    if matches!(w.broker(), Broker::Mock(_)) {
        all.extend_from_slice(&["--source-property", "fetch.wait.max.ms=10"]);
    }
    all
}

/// Request/reply: `weir request` calls, eight at a time, against a running `answer` handler:
/// each gets its own answer (the handler upper-cases the payload, and the answer is matched by
/// its correlation id); a request the handler rejects gets the error at once, not a timeout;
/// with no handler running, a request times out with exit code 124.
fn request_reply(w: Weir) {
    w.create_topic("ask", 2);
    if !matches!(w.broker(), Broker::Sqs(_)) {
        // Created up front: the mock cluster takes topics only from the harness. (On SQS each
        // call has a queue of its own.)
        w.create_topic("ask.replies", 1);
    }
    let module = guest("answer");
    let run = w.spawn(&with_fetch_wait(
        &w,
        &[
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "ask",
            "--group",
            "answerers",
            "--admin",
            "off",
        ],
    ));
    if matches!(w.broker(), Broker::Embedded) {
        // Requests reach the log through the run once it owns the data directory; one sent
        // before would open the directory itself and keep the run out.
        wait_until("the run serves the log", Duration::from_secs(60), || {
            w.data_dir().join("weir.sock").exists()
        });
    }
    let n = scaled(64, 8).div_ceil(8) * 8;
    let mut failures = Vec::new();
    for round in 0..n / 8 {
        let calls: Vec<(String, std::process::Child)> = (0..8)
            .map(|j| {
                let q = format!("request-{}", round * 8 + j);
                let child = w
                    .cmd(&with_fetch_wait(
                        &w,
                        &["request", "ask", &q, "--timeout", "30s"],
                    ))
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
    // Stopped cleanly: everything handled so far is committed, so what the drain below
    // handles is the late request alone.
    let stopped = run.terminate();
    assert!(stopped.status.success(), "{stopped:?}");
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
        // The caller gave up (on RabbitMQ and SQS its reply queue is gone with it); answered
        // later, the request still succeeds: the late answer costs only itself.
        let s = w.drain(&module, "ask", "answerers", &with_fetch_wait(&w, &[]));
        assert_eq!(s["processed"], 1, "{s}");
        assert_eq!(s["dead_lettered"], 0, "{s}");
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

/// Request/reply over HTTP: `POST /topics/ask/request` calls, four at a time, against a running
/// `answer` handler, each answered with its own reply (payload and correlation id checked); a
/// request the handler rejects is a 502 with the error; a topic no handler answers is a 504 after
/// the timeout; an unknown topic a 400.
fn admin_requests(w: Weir, n: u64) {
    w.create_topic("ask", 2);
    w.create_topic("idle", 1);
    if !matches!(w.broker(), Broker::Sqs(_)) {
        w.create_topic("ask.replies", 1);
        w.create_topic("idle.replies", 1);
    }
    let module = guest("answer");
    let log = w.data_dir().with_extension("log");
    let (mut run, addr) = w.spawn_with_admin(
        &with_fetch_wait(
            &w,
            &[
                "run",
                "--module",
                module.to_str().unwrap(),
                "--topic",
                "ask",
                "--group",
                "answerers",
            ],
        ),
        &log,
    );
    let (failures, mut took): (Vec<String>, Vec<Duration>) = std::thread::scope(|s| {
        let callers: Vec<_> = (0..4)
            .map(|t| {
                let addr = &addr;
                s.spawn(move || {
                    let (mut failures, mut took) = (Vec::new(), Vec::new());
                    for i in (t..n).step_by(4) {
                        let q = format!("q-{i}");
                        let started = std::time::Instant::now();
                        let (status, body) = weir_tests::http(
                            "POST",
                            addr,
                            "/topics/ask/request?timeout=30s",
                            Some(&q),
                        );
                        took.push(started.elapsed());
                        let v: serde_json::Value =
                            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                        if status != 200
                            || v["payload"] != q.to_uppercase()
                            || v["headers"]["correlation-id"] != v["correlation_id"]
                            || !v["correlation_id"].is_string()
                        {
                            failures.push(format!("{q}: {status} {body}"));
                        }
                    }
                    (failures, took)
                })
            })
            .collect();
        callers
            .into_iter()
            .map(|c| c.join().expect("caller thread"))
            .fold((Vec::new(), Vec::new()), |(mut f, mut t), (f1, t1)| {
                f.extend(f1);
                t.extend(t1);
                (f, t)
            })
    });
    took.sort();
    // A figure for docs/patterns.md (run with --no-capture), not a bound: timing is a benchmark's.
    eprintln!(
        "{n} calls, 4 at a time: p50 {:?}, p99 {:?}",
        took[took.len() / 2],
        took[took.len() * 99 / 100]
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let (status, body) = weir_tests::http(
        "POST",
        &addr,
        "/topics/ask/request?timeout=30s",
        Some("fail"),
    );
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

#[test]
fn admin_requests_get_their_own_answers() {
    admin_requests(Weir::new(), scaled(1_000, 100));
}

#[test]
fn admin_requests_kafka() {
    admin_requests(Weir::kafka_mock(), scaled(200, 40));
}

#[test]
fn admin_requests_rabbitmq() {
    admin_requests(Weir::rabbitmq(), scaled(200, 40));
}

#[test]
fn admin_requests_nats() {
    admin_requests(Weir::nats(), scaled(200, 40));
}

#[test]
fn admin_requests_sqs() {
    admin_requests(Weir::sqs(), scaled(40, 20));
}

#[test]
fn request_reply_sqs() {
    request_reply(Weir::sqs());
}

#[test]
fn admin_requests_redis() {
    admin_requests(Weir::redis(), scaled(200, 40));
}

/// RabbitMQ's direct reply-to: a client consumes the pseudo-queue `amq.rabbitmq.reply-to` and
/// publishes its request with `reply_to` naming it on the same channel (no queue declared); the
/// `answer` handler's reply reaches it, with the correlation id.
#[test]
fn rabbitmq_answers_a_direct_reply_to_request() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
    let w = Weir::rabbitmq();
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!()
    };
    let url = v.url();
    w.create_topic("ask", 1);
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (payload, id) = rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut answers = ch
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "caller".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let props = lapin::BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id("c-9".into());
        ch.basic_publish(
            "".into(),
            "ask".into(),
            BasicPublishOptions::default(),
            b"direct",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(60), answers.next())
            .await
            .expect("an answer within 60 s")
            .expect("the consumer is open")
            .expect("a delivery");
        (
            d.data.clone(),
            d.properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
        )
    });
    assert_eq!(payload, b"DIRECT");
    assert_eq!(id.as_deref(), Some("c-9"));
    run.kill();
}

/// On RabbitMQ `weir request` declares an exclusive reply queue of its own (RabbitMQ's RPC
/// pattern), so callers never read each other's answers.
#[test]
fn request_reply_rabbitmq() {
    request_reply(Weir::rabbitmq());
}
