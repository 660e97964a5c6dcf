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
use weir_tests::{Broker, Weir, guest, wait_until};

const N: u64 = 50_000;
/// `--max-in-flight` of each process: the prefetch, so what one process can hold unacked.
const PREFETCH: u64 = 500;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Publishes `n` orders to `queue` with publisher confirms, each with an `idempotency-key`.
fn publish_orders(url: &str, queue: &str, n: u64) {
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
            let body = format!(
                r#"{{"id":"{id}","customer":"c-{}","amount_cents":{}}}"#,
                i % 97,
                i % 10_000 + 1
            );
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

/// Takes every message of `queue` (auto-ack) until it has been quiet for a second.
fn take_all(url: &str, queue: &str) -> Vec<Vec<u8>> {
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
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(1), c.next()).await {
            out.push(d.expect("a delivery").data);
        }
        let _ = conn.close(200, "read".into()).await;
        out
    })
}

/// (ready, unacked) of `queue` in the test's virtual host, from the broker itself.
fn queue_state(w: &Weir, queue: &str) -> (u64, u64) {
    let Broker::Rabbit(v) = w.broker() else {
        panic!("a RabbitMQ test")
    };
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", &v.name, "name", "messages_ready"])
        .args(["messages_unacknowledged"])
        .output()
        .expect("run rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&queue))
        .map(|f| (f[1].parse().unwrap(), f[2].parse().unwrap()))
        .unwrap_or_else(|| panic!("no queue {queue} in {text}"))
}

fn two_processes_and_a_kill(dedupe: bool) {
    let w = Weir::rabbitmq();
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!()
    };
    let url = v.url();
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    publish_orders(&url, "orders", N);
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
        "half the orders are confirmed",
        Duration::from_secs(300),
        || queue_state(&w, "confirmations").0 >= N / 2,
    );
    a.kill();
    let at_kill = queue_state(&w, "confirmations").0;
    assert!(
        at_kill < N,
        "the runs finished before the kill; the test proves nothing"
    );
    let a = w.spawn(&args);
    for run in [a, b] {
        let out = run.wait();
        assert!(out.status.success(), "a run failed: {out:?}");
    }
    // Everything left the input queue, and nothing is held unacked.
    wait_until("the input queue is empty", Duration::from_secs(30), || {
        queue_state(&w, "orders") == (0, 0)
    });
    let mut per_id: HashMap<String, u64> = HashMap::new();
    for body in take_all(&url, "confirmations") {
        let c: serde_json::Value = serde_json::from_slice(&body).expect("a JSON confirmation");
        *per_id
            .entry(c["order_id"].as_str().expect("an order_id").to_string())
            .or_default() += 1;
    }
    for n in 0..N {
        assert!(
            per_id.contains_key(&format!("m-{n}")),
            "order m-{n} was lost"
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
        queue_state(&w, "orders.dlq").0 == 0,
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
/// the error says how to name the default one.
#[test]
fn a_trailing_slash_in_the_url_gets_a_hint() {
    let w = Weir::new();
    let base = std::env::var("WEIR_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
    let url = format!("{}/", base.trim_end_matches('/'));
    let out = w.output(&["--source", &url, "topics", "list", "q"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("names the virtual host \"\""), "{stderr}");
    assert!(stderr.contains("%2f"), "{stderr}");
}
