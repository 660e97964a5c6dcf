//! Redis Streams (issue 16) beyond the conformance suite: entries written by another client (the
//! redis crate, as a user's producer would), two weir processes in one consumer group with one
//! killed and started again, and a call longer than `claim-idle` that no other consumer takes.

use std::collections::HashMap;
use std::time::Duration;
use weir_tests::{Broker, RedisNs, Weir, guest, scaled, wait_until};

fn ns(w: &Weir) -> &RedisNs {
    let Broker::Redis(ns) = w.broker() else {
        unreachable!("a Redis test")
    };
    ns
}

/// `XADD`s `n` orders to `topic` as a user's producer would: the JSON in a `payload` field and
/// an `idempotency-key` field (weir reads it as a header).
fn xadd_orders(ns: &RedisNs, topic: &str, n: u64) {
    let mut c = RedisNs::connection();
    let key = ns.key(topic);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("payload")
                .arg(format!(
                    r#"{{"id":"m-{i}","customer":"c-{}","amount_cents":{}}}"#,
                    i % 97,
                    i % 10_000 + 1
                ))
                .arg("idempotency-key")
                .arg(format!("m-{i}"))
                .ignore();
        }
        pipe.query::<()>(&mut c).expect("XADD");
    }
}

/// An entry as XRANGE answers: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// Confirmations per order id, read with XRANGE.
fn confirmed(ns: &RedisNs) -> HashMap<String, u64> {
    let mut c = RedisNs::connection();
    let mut per: HashMap<String, u64> = HashMap::new();
    let mut start = "-".to_string();
    loop {
        let page: Vec<Entry> = redis::cmd("XRANGE")
            .arg(ns.key("confirmations"))
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(5000)
            .query(&mut c)
            .expect("XRANGE");
        let Some((last, _)) = page.last() else { break };
        start = format!("({last}");
        for (_, fields) in &page {
            let payload = &fields
                .iter()
                .find(|(n, _)| n == "payload")
                .expect("payload")
                .1;
            let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
            *per.entry(v["order_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    per
}

fn len(ns: &RedisNs, topic: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(ns.key(topic))
        .query(&mut RedisNs::connection())
        .expect("XLEN")
}

/// Two processes in one group, one killed with `kill -9` at a quarter and started again: every
/// order confirmed exactly once, with or without `--dedupe`, since each commit writes the
/// outputs and `XACK`s their entries in one script; the killed process's pending entries are
/// taken over after `claim-idle` (2 s here); nothing pending at the end.
fn two_processes_and_a_kill(dedupe: bool) {
    let w = Weir::redis();
    let ns = ns(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = scaled(50_000, 20_000);
    xadd_orders(ns, "orders", n);
    let module = guest("orders");
    // A group of its own: Redis keeps dedupe marks across test runs.
    let group = format!("g-{}-{}", std::process::id(), rand::random::<u32>());
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
        "--admin",
        "off",
        "--drain",
        "--json",
    ];
    if dedupe {
        // The killed process's dedupe claims block their keys until they expire.
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
        || len(ns, "confirmations") >= n / 4,
    );
    a.kill();
    let at_kill = len(ns, "confirmations");
    assert!(
        at_kill < n,
        "the runs finished before the kill; the test proves nothing"
    );
    let a = w.spawn(&args);
    for run in [a, b] {
        let out = run.wait();
        assert!(out.status.success(), "a run failed: {out:?}");
    }
    let per_id = confirmed(ns);
    let lost: Vec<u64> = (0..n)
        .filter(|i| !per_id.contains_key(&format!("m-{i}")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} orders lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let twice: u64 = per_id.values().map(|c| c - 1).sum();
    assert_eq!(twice, 0, "orders confirmed twice");
    assert_eq!(ns.pending("orders", &group), 0, "entries left pending");
    assert_eq!(w.offsets("orders", &group), vec![(n, n)]);
}

#[test]
fn two_processes_one_killed_every_order_once() {
    two_processes_and_a_kill(false);
}

#[test]
fn two_processes_one_killed_every_order_once_with_dedupe() {
    two_processes_and_a_kill(true);
}

/// A call that runs past `claim-idle` (2 s) is renewed while it runs, so the other process of
/// the group never takes its entry over: each of 6 entries is delivered once (its delivery
/// count stays 1, read with XPENDING all along) and handled once across both processes.
#[test]
fn a_long_call_is_not_handed_to_a_second_consumer() {
    const N: u64 = 6;
    let w = Weir::redis();
    let ns = ns(&w);
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    let mut c = RedisNs::connection();
    for i in 0..N {
        redis::cmd("XADD")
            .arg(ns.key("in"))
            .arg("*")
            .arg("payload")
            .arg(format!("m-{i}"))
            .query::<()>(&mut c)
            .unwrap();
    }
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
    // The most deliveries any entry had, while the calls run.
    let mut most = 0;
    wait_until("every entry is handled", Duration::from_secs(120), || {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(ns.key("in"))
            .arg("g")
            .arg("-")
            .arg("+")
            .arg(100)
            .query(&mut c)
            .unwrap_or_default();
        most = rows.iter().map(|r| r.3).max().unwrap_or(0).max(most);
        len(ns, "out") >= N && rows.is_empty()
    });
    let mut processed = 0;
    for run in [a, b] {
        let out = run.wait();
        assert!(out.status.success(), "a run failed: {out:?}");
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        processed += s["processed"].as_u64().unwrap();
    }
    assert_eq!(most, 1, "an entry was delivered again while its call ran");
    assert_eq!(processed, N, "handled across both processes");
    assert_eq!(len(ns, "out"), N);
}

/// At-most-once reads with `NOACK`: nothing is pending, and every output is still written.
#[test]
fn at_most_once_writes_every_output_and_leaves_nothing_pending() {
    let w = Weir::redis();
    let ns = ns(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = 2_000;
    xadd_orders(ns, "orders", n);
    let s = w.drain(
        &guest("orders"),
        "orders",
        "g",
        &["--delivery", "at-most-once"],
    );
    assert_eq!(s["processed"], n, "{s}");
    let per_id = confirmed(ns);
    assert_eq!(per_id.len() as u64, n);
    assert!(per_id.values().all(|c| *c == 1), "written twice");
    assert_eq!(ns.pending("orders", "g"), 0);
}

/// A process with a fixed consumer name (`consumer=...`), killed while it holds many more
/// entries than one read takes, reads them back at its restart, page after page, at once
/// (not after claim-idle): every order once, none dead-lettered.
#[test]
fn a_fixed_consumer_name_reads_back_what_it_held() {
    let w = Weir::redis();
    let ns = ns(&w);
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    let n = scaled(10_000, 5_000);
    xadd_orders(ns, "orders", n);
    let module = guest("orders");
    // Beside the harness's own properties (weir takes them from both sides of `run`).
    let mut args = vec![
        "--source-property",
        "consumer=fixed",
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
        // Small reads, many held: the restart reads its history in many pages.
        "--batch-size",
        "8",
        "--max-in-flight",
        "400",
        "--admin",
        "off",
    ];
    let mut run = w.spawn(&args);
    wait_until(
        "a quarter of the orders are confirmed",
        Duration::from_secs(120),
        || len(ns, "confirmations") >= n / 4,
    );
    run.kill();
    let held = ns.pending("orders", "g");
    assert!(
        len(ns, "confirmations") < n,
        "the run finished before the kill"
    );
    args.extend(["--drain", "--json"]);
    let out = w.ok(&args);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let per_id = confirmed(ns);
    let lost = (0..n)
        .filter(|i| !per_id.contains_key(&format!("m-{i}")))
        .count();
    assert_eq!(lost, 0, "orders lost ({held} were pending at the kill)");
    assert!(per_id.values().all(|c| *c == 1), "written twice");
    assert_eq!(s["dead_lettered"], 0, "{s}");
    assert_eq!(ns.pending("orders", "g"), 0);
}
