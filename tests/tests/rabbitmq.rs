//! RabbitMQ as users run it: orders published by another client (lapin here, as a service
//! would), two weir processes competing on one queue, one of them killed with `kill -9` halfway
//! and started again. With `--exactly-once --dedupe` (AMQP `tx`, marks in Redis) every order is
//! confirmed exactly once;
//! without it, at least once with duplicates bounded by what the killed process held (its
//! prefetch). Either way the input queue ends empty with nothing unacked.

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::time::Duration;
use weir_tests::{Broker, Weir, guest, queue_state, scaled, wait_until};

/// Orders published: many times the prefetch, so the kill lands with most of them still to
/// come (50,000 before issue 33). Two processes on their own channels per queue get through
/// 6,000 before a poll sees half of them confirmed.
fn orders() -> u64 {
    scaled(20_000, 20_000)
}
/// `--max-in-flight` of each process: the prefetch, so what one process can hold unacked.
const PREFETCH: u64 = 500;

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The JSON of order `i`.
pub(crate) fn order(i: u64) -> String {
    format!(
        r#"{{"id":"m-{i}","customer":"c-{}","amount_cents":{}}}"#,
        i % 97,
        i % 10_000 + 1
    )
}

/// Publishes `n` orders to `queue` with publisher confirms, each with an `idempotency-key`.
fn publish_orders(url: &str, queue: &str, n: u64) {
    publish(url, queue, n, order);
}

/// Publishes `n` messages to `queue` with publisher confirms: message `i` is `body(i)` with the
/// `idempotency-key` `m-{i}`.
pub(crate) fn publish(url: &str, queue: &str, n: u64, body: impl Fn(u64) -> String) {
    runtime().block_on(async {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let ch = conn.create_channel().await.expect("a channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let mut confirms = Vec::new();
        for i in 0..n {
            let id = format!("m-{i}");
            let body = body(i);
            let mut headers = FieldTable::default();
            headers.insert(
                "idempotency-key".into(),
                AMQPValue::LongString(LongString::from(id.into_bytes())),
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers);
            let c = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .expect("publish");
            confirms.push(c);
            if confirms.len() == 1000 {
                for c in confirms.drain(..) {
                    c.await.expect("confirmed");
                }
            }
        }
        for c in confirms {
            c.await.expect("confirmed");
        }
        let _ = conn.close(200, "published".into()).await;
    });
}

/// Takes every message of `queue` (auto-ack): as many as it holds when called (nothing
/// publishes to it any more), with a deadline in case fewer arrive.
/// How often each order id was confirmed on `confirmations`, taking them off the queue.
pub(crate) fn confirmed_per_id(url: &str) -> HashMap<String, u64> {
    let mut per_id: HashMap<String, u64> = HashMap::new();
    for body in take_all(url, "confirmations") {
        let c: serde_json::Value = serde_json::from_slice(&body).expect("a JSON confirmation");
        *per_id
            .entry(c["order_id"].as_str().expect("an order_id").to_string())
            .or_default() += 1;
    }
    per_id
}

pub(crate) fn take_all(url: &str, queue: &str) -> Vec<Vec<u8>> {
    let (ready, consumers) = queue_state(url, queue);
    assert_eq!(consumers, 0, "{queue} is still consumed");
    runtime().block_on(async {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let ch = conn.create_channel().await.expect("a channel");
        let mut c = ch
            .basic_consume(
                queue.into(),
                "test-reader".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (out.len() as u64) < ready {
            match tokio::time::timeout_at(deadline, c.next()).await {
                Ok(Some(d)) => out.push(d.expect("a delivery").data),
                _ => panic!("{queue}: {} of {ready} messages arrived", out.len()),
            }
        }
        let _ = conn.close(200, "read".into()).await;
        out
    })
}

fn two_processes_and_a_kill(dedupe: bool) {
    let w = Weir::rabbitmq();
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!()
    };
    let url = v.url();
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = orders();
    publish_orders(&url, "orders", n);
    let module = guest("orders");
    // A group of its own: Redis keeps dedupe marks across test runs.
    let group = format!("g-{}-{}", std::process::id(), rand::random::<u32>());
    let prefetch = PREFETCH.to_string();
    let mut args = vec![
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        &group,
        "--max-in-flight",
        &prefetch,
        "--admin",
        "off",
        "--drain",
        "--json",
    ];
    if dedupe {
        // Exactly-once on RabbitMQ: outputs and acks in one AMQP transaction, plus dedupe for
        // copies the broker or a producer delivers twice.
        // The killed process's claims block its keys until they expire, (call timeout +
        // longest backoff) x attempts + 30 s: about 330 s by default, 36 s with these.
        args.extend([
            "--call-timeout",
            "2s",
            "--backoff-max",
            "1s",
            "--max-attempts",
            "2",
            "--exactly-once",
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
        || queue_state(&url, "confirmations").0 >= n / 4,
    );
    a.kill();
    let at_kill = queue_state(&url, "confirmations").0;
    assert!(
        at_kill < n,
        "the runs finished before the kill; the test proves nothing"
    );
    // The broker drops the dead consumer and puts back what it held in one step: once only b
    // consumes, those messages are ready again. (A `--drain` run sees ready messages only, so
    // one that looked before then could exit with the dead consumer's messages still held.)
    wait_until(
        "the broker took back what the killed run held",
        Duration::from_secs(30),
        || queue_state(&url, "orders").1 <= 1,
    );
    let a = w.spawn(&args);
    for run in [a, b] {
        let out = run.wait();
        assert!(out.status.success(), "a run failed: {out:?}");
    }
    // Everything left the input queue, and nothing is held unacked.
    let mut left = (0, 0);
    let settled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the input queue is empty", Duration::from_secs(30), || {
            left = queue_state(&url, "orders");
            left == (0, 0)
        })
    }));
    assert!(
        settled.is_ok(),
        "(ready, consumers) of the input queue stayed {left:?} after both runs exited"
    );
    let per_id = confirmed_per_id(&url);
    for i in 0..n {
        assert!(
            per_id.contains_key(&format!("m-{i}")),
            "order m-{i} was lost"
        );
    }
    let duplicates: u64 = per_id.values().map(|c| c - 1).sum();
    if dedupe {
        assert_eq!(duplicates, 0, "with --dedupe every order is confirmed once");
    } else {
        // Only what the killed process held unacked (at most its prefetch) runs again.
        assert!(
            duplicates <= PREFETCH,
            "{duplicates} duplicates; prefetch {PREFETCH}"
        );
    }
    assert!(
        queue_state(&url, "orders.dlq").0 == 0,
        "nothing was dead-lettered"
    );
}

#[test]
fn two_processes_one_killed_every_order_once_with_exactly_once_and_dedupe() {
    two_processes_and_a_kill(true);
}

#[test]
fn two_processes_one_killed_duplicates_bounded_by_the_prefetch() {
    two_processes_and_a_kill(false);
}

/// `amqp://host:5672/` names the virtual host "" (the AMQP URI spec), which the broker refuses;
/// the error says how to name the default one. A broker that cannot be reached at all gets no
/// such hint: it said nothing about the vhost.
#[test]
fn a_trailing_slash_in_the_url_gets_a_hint() {
    let w = Weir::new();
    let base = std::env::var("WEIR_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
    let base = base.trim_end_matches('/');
    // The broker answers on the default vhost: the refusal below is its own.
    runtime().block_on(async {
        let url = format!("{base}/%2f");
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ does not answer at {url}: {e}"));
        let _ = conn.close(200, "checked".into()).await;
    });
    let url = format!("{base}/");
    let out = w.output(&["--source", &url, "topics", "list", "q"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("names the virtual host \"\""), "{stderr}");
    assert!(stderr.contains("%2f"), "{stderr}");
    // Nothing listens on port 1: connection refused, and no word about the vhost.
    let out = w.output(&[
        "--source",
        "amqp://guest:guest@127.0.0.1:1/",
        "topics",
        "list",
        "q",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("virtual host"), "{stderr}");
}

/// `[source.rabbitmq]` in `weir.toml` holds RabbitMQ's settings, and only an `amqp://` source
/// takes them: here `queue-type = "quorum"` makes `topics create` declare a quorum queue,
/// while the same file's `[source.kafka.properties]` (not RabbitMQ settings: refused if
/// they were passed to it) are left to Kafka.
#[test]
fn source_rabbitmq_in_weir_toml_applies_to_amqp_only() {
    let w = Weir::rabbitmq();
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!()
    };
    let file = w.path("weir.toml");
    std::fs::write(
        &file,
        "[source.rabbitmq]\nqueue-type = \"quorum\"\n\n\
         [source.kafka.properties]\n\"security.protocol\" = \"SSL\"\n",
    )
    .unwrap();
    let out = w.output(&["--config", file.to_str().unwrap(), "topics", "create", "q"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The broker refuses a declare of another type (406) for a queue that exists.
    runtime().block_on(async {
        let conn = Connection::connect(&v.url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let ch = conn.create_channel().await.expect("a channel");
        let mut args = FieldTable::default();
        for (ty, refused) in [("quorum", false), ("classic", true)] {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from(ty)),
            );
            let ch = if refused {
                ch.clone()
            } else {
                conn.create_channel().await.unwrap()
            };
            let r = ch
                .queue_declare(
                    "q".into(),
                    lapin::options::QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args.clone(),
                )
                .await;
            assert_eq!(r.is_err(), refused, "declared as {ty}: {r:?}");
        }
    });
    // A bad value names the setting.
    std::fs::write(&file, "[source.rabbitmq]\nqueue-type = \"stream-ish\"\n").unwrap();
    let out = w.output(&["--config", file.to_str().unwrap(), "topics", "create", "r"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("queue-type=stream-ish"), "{stderr}");
}

/// The lag weir reports of a queue (issue 34): with `management-url`, every consumer's unacked
/// messages, as KEDA counts them; without it, only this process's (AMQP says nothing of
/// another consumer's), and `/status` says so. Another client holds five messages unacked
/// while weir holds three (each waiting out a 30 s backoff).
#[test]
fn lag_counts_every_consumers_unacked_messages_with_the_management_api() {
    let Ok(mgmt) = std::env::var("WEIR_TEST_RABBIT_MANAGEMENT") else {
        return weir_tests::skip(
            "no WEIR_TEST_RABBIT_MANAGEMENT (scripts/services.sh all enables RabbitMQ's management API)",
        );
    };
    let w = Weir::rabbitmq();
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!()
    };
    let url = v.url();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    publish(&url, "in", 5, |i| format!("fine {i}"));
    // The other consumer: five delivered, none acked (its connection lives until the end).
    let rt = runtime();
    let _other = rt.block_on(async {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let ch = conn.create_channel().await.expect("a channel");
        // Room for these five only: what weir gives back goes to weir again.
        ch.basic_qos(5, Default::default()).await.unwrap();
        let mut c = ch
            .basic_consume(
                "in".into(),
                "other".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..5 {
            c.next().await.expect("a delivery").expect("a delivery");
        }
        (conn, ch, c)
    });
    publish(&url, "in", 3, |_| "flaky".to_string());
    let module = guest("flaky");
    let lag = |addr: &str| {
        let (code, body) = weir_tests::http("GET", addr, "/api/status", None);
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let lag = v["partitions"][0]["lag"].as_u64();
        (lag, v["lag_note"].as_str().map(String::from))
    };
    let property = format!("management-url={mgmt}");
    for with_api in [true, false] {
        let mut args = vec![];
        if with_api {
            args.extend(["--source-property", property.as_str()]);
        }
        args.extend([
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "in",
            "--group",
            "g",
            "--handler-config",
            "fail-attempts=100",
            "--backoff-base",
            "30s",
            "--jitter",
            "none",
        ]);
        let (run, addr) = w.spawn_with_admin(&args, &w.path("run.log"));
        // Five the other consumer holds, and three weir holds. (The management API's figures
        // are refreshed every 5 s.)
        let want = if with_api { 8 } else { 3 };
        let mut seen = (None, None);
        wait_until(
            &format!("lag {want} (management API: {with_api})"),
            Duration::from_secs(30),
            || {
                seen = lag(&addr);
                seen.0 == Some(want)
            },
        );
        assert_eq!(seen.1.is_some(), !with_api, "{:?}", seen.1);
        let out = run.terminate();
        assert!(out.status.success());
    }
}

/// Queue names by RabbitMQ's rules, not Kafka's (issue 34): a queue named `orders:eu` (a colon
/// is no Kafka topic name) is consumed, its rejected orders go to `orders:eu.dlq`, and
/// `weir dlq list orders:eu` finds them; a name the broker keeps for itself is refused up front.
#[test]
fn queue_names_follow_rabbitmqs_rules() {
    const N: u64 = 200;
    let w = Weir::rabbitmq();
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!()
    };
    let url = v.url();
    w.create_topic("orders:eu", 1);
    w.create_topic("confirmations", 1);
    // Every 50th order is not JSON: the handler rejects it.
    publish(&url, "orders:eu", N, |i| {
        if i % 50 == 7 {
            format!("not an order {i}")
        } else {
            order(i)
        }
    });
    let s = w.drain(&guest("orders"), "orders:eu", "g", &[]);
    assert_eq!(s["processed"], N - N / 50, "{s}");
    assert_eq!(s["dead_lettered"], N / 50, "{s}");
    assert_eq!(queue_state(&url, "orders:eu"), (0, 0));
    assert_eq!(queue_state(&url, "orders:eu.dlq").0, N / 50);
    let listed = w.output(&["dlq", "list", "orders:eu", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).lines().count() as u64,
        N / 50
    );
    assert_eq!(confirmed_per_id(&url).len() as u64, N - N / 50);
    let refused = w.output(&[
        "run",
        "--module",
        guest("orders").to_str().unwrap(),
        "--topic",
        "orders:eu",
        "--group",
        "g",
        "--dlq-topic",
        "amq.{topic}",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid topic name `amq.orders:eu` on RabbitMQ"),
        "{stderr}"
    );
}
