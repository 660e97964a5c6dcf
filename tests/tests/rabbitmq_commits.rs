//! RabbitMQ commits that must neither lose nor double (issue 34): requeue mode, where each
//! message's queue and its retry queue are consumed side by side, and an output queue deleted
//! while weir publishes to it, with publisher confirms and in AMQP transactions; at-most-once
//! bounded by the prefetch; a classic queue's redeliveries counted.

use super::rabbitmq::{confirmed_per_id, order, publish, runtime, take_all};
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use weir_tests::{Broker, Weir, guest, queue_state, scaled, wait_until};

/// Order `i`, a third of them transient (the `orders` handler asks for one retry: the retry
/// queue is as busy as the orders queue) and 1% not JSON (it rejects them: dead-lettered).
fn mixed(i: u64) -> String {
    match i % 100 {
        3 => format!("not an order {i}"),
        n if n % 3 == 1 => order(i).replace('}', r#","transient":true}"#),
        _ => order(i),
    }
}

fn rejected(i: u64) -> bool {
    i % 100 == 3
}

fn url(w: &Weir) -> String {
    let Broker::Rabbit(v) = w.broker() else {
        unreachable!("a RabbitMQ test")
    };
    v.url()
}

/// With no fault at all, requeue mode must write each output once. Each queue (`orders` and
/// `orders.retry`) is its own partition with its own commits: when both shared one channel,
/// one commit's `multiple` ack covered another's messages before their outputs were published,
/// the owner's own ack then hit an unknown tag (406) and closed the channel, and everything
/// unacked ran again (issue 34: about half of all outputs twice).
fn requeue_mode_writes_each_output_once(exactly_once: bool) {
    let n = scaled(4_000, 2_000);
    let w = Weir::rabbitmq();
    let url = url(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    publish(&url, "orders", n, mixed);
    let module = guest("orders");
    let mut args = vec![
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
        "--retry-mode",
        "requeue",
        "--backoff-base",
        "10ms",
        "--batch-size",
        "4",
        "--max-in-flight",
        "500",
        "--drain",
        "--json",
    ];
    if exactly_once {
        args.push("--exactly-once");
    }
    let log = w.path("run.log");
    let out = w.spawn_logged(&args, &log).wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.status.success(), "the run failed:\n{log}");
    assert!(
        !log.contains("lost the RabbitMQ link"),
        "the link broke without a fault:\n{log}"
    );
    let per_id = confirmed_per_id(&url);
    let twice: Vec<_> = per_id.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "confirmed more than once: {twice:?}");
    for i in (0..n).filter(|i| !rejected(*i)) {
        assert!(
            per_id.contains_key(&format!("m-{i}")),
            "order m-{i} was lost"
        );
    }
    let dead = (0..n).filter(|i| rejected(*i)).count() as u64;
    assert_eq!(queue_state(&url, "orders.dlq").0, dead, "dead letters");
    assert_eq!(queue_state(&url, "orders"), (0, 0), "orders left");
    assert_eq!(queue_state(&url, "orders.retry"), (0, 0), "retries left");
}

#[test]
fn requeue_mode_without_faults_writes_each_output_once() {
    requeue_mode_writes_each_output_once(false);
}

#[test]
fn requeue_mode_with_exactly_once_writes_each_output_once() {
    requeue_mode_writes_each_output_once(true);
}

/// The output queue is deleted while weir publishes to it: the run stops with a message that
/// names the queue, and every order is either back in its queue or had its confirmation in
/// the queue when it went. In a transaction an output to a missing queue used to be dropped
/// while its input's ack committed: orders lost.
fn an_output_queue_deleted_mid_run_loses_nothing(exactly_once: bool) {
    let n = scaled(4_000, 4_000);
    let w = Weir::rabbitmq();
    let url = url(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    publish(&url, "orders", n, order);
    let module = guest("orders");
    // Small batches: many commits, so the deletion lands between two of them.
    let mut args = vec![
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
        "--batch-size",
        "8",
        "--lanes",
        "2",
        "--drain",
    ];
    if exactly_once {
        args.push("--exactly-once");
    }
    let log = w.path("run.log");
    let run = w.spawn_logged(&args, &log);
    wait_until(
        "a quarter of the orders are confirmed",
        Duration::from_secs(60),
        || queue_state(&url, "confirmations").0 >= n / 4,
    );
    // Deleting a queue deletes what waits in it: the confirmations so far (nobody reads them).
    let deleted = runtime().block_on(async {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let ch = conn.create_channel().await.expect("a channel");
        let deleted = ch
            .queue_delete("confirmations".into(), QueueDeleteOptions::default())
            .await
            .expect("delete the output queue");
        let _ = conn.close(200, "deleted".into()).await;
        u64::from(deleted)
    });
    let out = run.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !out.status.success(),
        "the run went on after its output queue was deleted:\n{log}"
    );
    assert!(
        log.contains("confirmations"),
        "the error names no queue:\n{log}"
    );
    // Whatever was not confirmed is back in `orders`, unacked by the stopped run.
    let left: HashSet<String> = take_all(&url, "orders")
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    // An order whose handler emitted after weir learned the queue was gone had its output
    // refused (an output to a missing topic is the message's failure): it is dead-lettered,
    // with the reason, not lost.
    let dead = queue_state(&url, "orders.dlq").0;
    assert!(deleted < n, "the deletion came after the last order");
    // Outputs on their way into the queue when it is deleted go with it, and the broker
    // confirms them (it took them): at most what the run holds in flight, 2 x batch x lanes =
    // 32 (seen: up to 17). Before the fix a transaction went on publishing into nothing for
    // every order after the deletion, and the run did not stop.
    const IN_FLIGHT: u64 = 32;
    let gone = n - left.len() as u64;
    assert!(
        gone <= deleted + dead + IN_FLIGHT,
        "{gone} orders left their queue, but only {deleted} confirmations were in theirs, \
         {dead} orders were dead-lettered and {IN_FLIGHT} may be in flight: {} acked with \
         nothing to show",
        gone - deleted - dead - IN_FLIGHT
    );
}

#[test]
fn an_output_queue_deleted_mid_run_loses_nothing_with_confirms() {
    an_output_queue_deleted_mid_run_loses_nothing(false);
}

#[test]
fn an_output_queue_deleted_mid_run_loses_nothing_in_transactions() {
    an_output_queue_deleted_mid_run_loses_nothing(true);
}

/// The broker drops every connection twice while a run works (issue 34): each close costs a
/// reconnect, never the run; nothing is lost; with `--exactly-once` nothing is written twice
/// (a message the lost link delivered runs again, and only then are its outputs published);
/// otherwise at most what was in flight at each close (the prefetch) runs twice.
fn a_lost_link_costs_a_reconnect(extra: &[&str], exactly_once: bool) {
    let n = scaled(20_000, 20_000);
    let w = Weir::rabbitmq();
    let url = url(&w);
    let Broker::Rabbit(vhost) = w.broker() else {
        unreachable!()
    };
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let requeue = extra.contains(&"requeue");
    publish(&url, "orders", n, if requeue { mixed } else { order });
    let module = guest("orders");
    let group = format!("g-{}-{}", std::process::id(), weir_tests::now_ms());
    let mut args = vec![
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        &group,
        "--max-in-flight",
        "500",
        "--backoff-base",
        "10ms",
        "--drain",
        "--json",
    ];
    args.extend_from_slice(extra);
    let log_path = w.path("run.log");
    let mut run = w.spawn_logged(&args, &log_path);
    let show = |what: &str| {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "{what}; orders {:?}, confirmations {:?}; the run's log, last 40 lines:\n{}",
            queue_state(&url, "orders"),
            queue_state(&url, "confirmations"),
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    };
    let steps = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for part in [4, 2] {
            wait_until("orders are confirmed", Duration::from_secs(120), || {
                queue_state(&url, "confirmations").0 >= n / part
            });
            vhost.close_connections();
        }
        wait_until("the run drains", Duration::from_secs(120), || {
            !run.is_running()
        });
    }));
    if let Err(e) = steps {
        show("stuck");
        std::panic::resume_unwind(e);
    }
    let out = run.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        out.status.success(),
        "the run stopped on a lost link:\n{log}"
    );
    let reconnects = log.matches("reconnected to RabbitMQ").count();
    assert!(reconnects >= 1, "no reconnect in the log:\n{log}");
    let per_id = confirmed_per_id(&url);
    let lost: Vec<u64> = (0..n)
        // (Rejected orders are dead-lettered, not confirmed.)
        .filter(|i| !(requeue && rejected(*i)))
        .filter(|i| !per_id.contains_key(&format!("m-{i}")))
        .collect();
    if !lost.is_empty() {
        show("lost");
    }
    assert!(
        lost.is_empty(),
        "{} orders lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let twice: u64 = per_id.values().map(|c| c - 1).sum();
    eprintln!("{reconnects} reconnects; {twice} confirmations twice");
    if exactly_once {
        assert_eq!(twice, 0, "written twice under --exactly-once");
    } else {
        assert!(
            twice <= 2 * 500,
            "{twice} written twice; two closes of 500 in flight"
        );
    }
    assert_eq!(queue_state(&url, "orders"), (0, 0), "orders left");
}

#[test]
fn a_lost_link_costs_a_reconnect_at_least_once() {
    a_lost_link_costs_a_reconnect(&[], false);
}

#[test]
fn a_lost_link_costs_a_reconnect_with_exactly_once() {
    a_lost_link_costs_a_reconnect(&["--exactly-once"], true);
}

#[test]
fn a_lost_link_costs_a_reconnect_with_exactly_once_and_dedupe() {
    a_lost_link_costs_a_reconnect(
        &[
            "--exactly-once",
            "--dedupe",
            "header",
            "--dedupe-store",
            "redis://127.0.0.1:6379",
        ],
        true,
    );
}

#[test]
fn a_lost_link_costs_a_reconnect_in_requeue_mode() {
    a_lost_link_costs_a_reconnect(&["--retry-mode", "requeue"], false);
}

/// Runs `weir run ... --drain --json` with `extra` on a queue of `n` orders (and `copies` of
/// each), waits for it within a deadline, and returns its summary and the confirmations per id.
fn drain_orders(extra: &[&str], n: u64, copies: u64) -> (serde_json::Value, HashMap<String, u64>) {
    let w = Weir::rabbitmq();
    let url = url(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    for _ in 0..copies {
        publish(&url, "orders", n, order);
    }
    let module = guest("orders");
    let group = format!("g-{}-{}", std::process::id(), weir_tests::now_ms());
    let mut args = vec![
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        &group,
        "--drain",
        "--json",
    ];
    args.extend_from_slice(extra);
    let log = w.path("run.log");
    let mut run = w.spawn_logged(&args, &log);
    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the run drains", Duration::from_secs(120), || {
            !run.is_running()
        })
    }));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Err(e) = ended {
        eprintln!("{text}");
        std::panic::resume_unwind(e);
    }
    let out = run.wait();
    assert!(out.status.success(), "the run failed:\n{text}");
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("run --json prints a JSON summary");
    let per_id = confirmed_per_id(&url);
    assert_eq!(queue_state(&url, "orders"), (0, 0), "orders left");
    (summary, per_id)
}

/// At-most-once on a queue: acked on delivery, each order handled once, its output published,
/// and `--drain` ends.
#[test]
fn at_most_once_publishes_every_output_and_drains() {
    let n = 2_000;
    let (s, per_id) = drain_orders(&["--delivery", "at-most-once"], n, 1);
    assert_eq!(s["processed"], n, "{s}");
    assert_eq!(per_id.len() as u64, n);
    assert!(per_id.values().all(|&c| c == 1), "an order confirmed twice");
}

/// Dedupe through Redis without `--exactly-once`: outputs are published (and confirmed) before
/// their done marks and acks, in a commit of their own; each id runs once.
#[test]
fn dedupe_without_exactly_once_runs_each_id_once() {
    let n = 2_000;
    let (s, per_id) = drain_orders(
        &[
            "--dedupe",
            "header",
            "--dedupe-store",
            "redis://127.0.0.1:6379",
            "--dedupe-window",
            "10m",
        ],
        n,
        2,
    );
    assert_eq!(
        (s["processed"].as_u64(), s["deduped"].as_u64()),
        (Some(n), Some(n)),
        "{s}"
    );
    assert_eq!(per_id.len() as u64, n);
    assert!(per_id.values().all(|&c| c == 1), "an order confirmed twice");
}

/// At-most-once takes no more from the broker than its in-flight bound (issue 34): an
/// auto-ack consumer, which RabbitMQ does not hold to the prefetch, had the whole queue pushed
/// into weir's memory at once. Stopped (SIGSTOP) mid-run, weir holds at most its prefetch
/// twice over (the engine's share and the buffer's) besides what it confirmed; the rest is
/// still ready in the queue.
#[test]
fn at_most_once_takes_no_more_than_its_prefetch() {
    const PREFETCH: u64 = 50;
    let n = 20_000;
    let w = Weir::rabbitmq();
    let url = url(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    publish(&url, "orders", n, order);
    let module = guest("orders");
    let log = w.path("run.log");
    let prefetch = PREFETCH.to_string();
    let mut run = w.spawn_logged(
        &[
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "orders",
            "--group",
            "g",
            "--delivery",
            "at-most-once",
            "--max-in-flight",
            &prefetch,
            "--drain",
        ],
        &log,
    );
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &run.id().to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {sig}");
    };
    wait_until("orders are confirmed", Duration::from_secs(60), || {
        queue_state(&url, "confirmations").0 >= 100
    });
    signal("-STOP");
    let confirmed = queue_state(&url, "confirmations").0;
    let ready = queue_state(&url, "orders").0;
    signal("-CONT");
    assert!(
        ready + confirmed + 3 * PREFETCH >= n,
        "{ready} ready and {confirmed} confirmed of {n}: weir took more than its prefetch"
    );
    wait_until("the run drains", Duration::from_secs(120), || {
        !run.is_running()
    });
    let per_id = confirmed_per_id(&url);
    assert_eq!(per_id.len() as u64, n, "every order confirmed");
    assert!(per_id.values().all(|&c| c == 1), "an order confirmed twice");
}

/// A classic queue counts no deliveries, only a `redelivered` flag: a message that kept
/// coming back (a handler that crashes the process, a lost link, a `consumer_timeout`) was
/// attempt 2 every time and never reached its DLQ (issue 34). weir counts for it: each lost
/// link here redelivers the message, and its third attempt is its last. A quorum queue counts
/// itself (`x-delivery-count`), to the same end.
fn redeliveries_are_counted_until_the_dlq(queue_type: &str) {
    let w = Weir::rabbitmq();
    let url = url(&w);
    let Broker::Rabbit(vhost) = w.broker() else {
        unreachable!()
    };
    let ty = format!("queue-type={queue_type}");
    w.ok(&["--source-property", &ty, "topics", "create", "in"]);
    w.create_topic("out", 1);
    publish(&url, "in", 1, |_| "flaky forever".to_string());
    let module = guest("flaky");
    let log_path = w.path("run.log");
    // Every attempt fails, and waits 30 s for the next: only a redelivery brings it back.
    let mut run = w.spawn_logged(
        &[
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "in",
            "--group",
            "g",
            "--handler-config",
            "fail-attempts=100",
            "--max-attempts",
            "3",
            "--backoff-base",
            "30s",
            "--backoff-factor",
            "1",
            "--jitter",
            "none",
        ],
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let failures = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .matches("message failed")
            .count()
    };
    for attempt in 1..=2 {
        wait_until(
            &format!("attempt {attempt} fails"),
            Duration::from_secs(20),
            || {
                assert!(run.is_running(), "the run ended:\n{}", log());
                failures() >= attempt
            },
        );
        vhost.close_connections();
    }
    wait_until(
        "the message is dead-lettered",
        Duration::from_secs(60),
        || w.queue_state("in.dlq").0 == 1,
    );
    let out = run.terminate();
    assert!(out.status.success());
    assert_eq!(failures(), 3, "three attempts, no more:\n{}", log());
    let letter = take_all(&url, "in.dlq");
    assert_eq!(letter.len(), 1);
    assert_eq!(letter[0], b"flaky forever");
}

#[test]
fn a_classic_queue_counts_redeliveries_until_the_dlq() {
    redeliveries_are_counted_until_the_dlq("classic");
}

#[test]
fn a_quorum_queue_counts_redeliveries_until_the_dlq() {
    redeliveries_are_counted_until_the_dlq("quorum");
}
