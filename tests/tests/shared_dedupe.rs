//! Dedupe shared by several processes through Redis: two members of one Kafka group (mock
//! cluster) with duplicate-laden input handle each id once; a Redis that stops answering stops
//! the acking (nothing runs unclaimed, nothing is marked silently) until it answers again.
//!
//! Uses the machine's Redis at 127.0.0.1:6379 (a group name of its own per test, so runs never
//! see each other's keys), and a private `redis-server` for the test that freezes it.

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weir_tests::{Weir, guest, now_ms, wait_until};

const REDIS: &str = "redis://127.0.0.1:6379";

fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), now_ms())
}

fn run_args<'a>(module: &'a str, group: &'a str, store: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--module",
        module,
        "--topic",
        "orders",
        "--group",
        group,
        "--dedupe",
        "header",
        "--dedupe-store",
        store,
        "--batch-size",
        "16",
        // The machine's Redis outlives the test: its marks need not.
        "--dedupe-window",
        "10m",
        "--json",
    ]
}

#[test]
fn two_members_on_kafka_run_each_id_once() {
    const IDS: u64 = 3_000;
    let w = Weir::kafka_mock();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 4);
    let group = unique("g");
    let module = guest("orders");
    let args = run_args(module.to_str().unwrap(), &group, REDIS);
    // Both members hold partitions before anything is produced: a member that took every
    // partition alone would show only in-process dedupe.
    let assigned = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("partitions assigned")
    };
    let (log_a, log_b) = (w.path("a.log"), w.path("b.log"));
    let a = w.spawn_logged(&args, &log_a);
    wait_until("a holds partitions", Duration::from_secs(60), || {
        assigned(&log_a)
    });
    let b = w.spawn_logged(&args, &log_b);
    wait_until("b holds partitions", Duration::from_secs(60), || {
        assigned(&log_b)
    });
    // Keyless: the three copies of an id land on different partitions, so on different members.
    for _ in 0..3 {
        w.ok(&["produce", "orders", "--count", &IDS.to_string(), "--no-key"]);
    }
    wait_until("every copy is committed", Duration::from_secs(180), || {
        w.offsets("orders", &group).iter().all(|(end, c)| end == c)
    });
    let mut per_member = Vec::new();
    for r in [a, b] {
        let out = r.terminate();
        assert!(out.status.success());
        let s: Value = serde_json::from_slice(&out.stdout).expect("a JSON summary");
        per_member.push((
            s["processed"].as_u64().unwrap(),
            s["deduped"].as_u64().unwrap(),
        ));
    }
    eprintln!("(processed, deduped) per member: {per_member:?}");
    // Both members handled copies (ran them or skipped them). With each member's dedupe on its
    // own, the ids whose copies went to both would run on both: the processed sum below would
    // pass the number of ids. (A member may process none: seen once, (0 processed, 1,716
    // skipped) beside (3,000, 4,284), every copy it got already run by the other.)
    assert!(
        per_member.iter().all(|(p, d)| p + d > 0),
        "a member handled nothing, so nothing was shared: {per_member:?}"
    );
    let processed: u64 = per_member.iter().map(|(p, _)| p).sum();
    let deduped: u64 = per_member.iter().map(|(_, d)| d).sum();
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, IDS);
    assert!(per_id.values().all(|&n| n == 1), "an id ran twice");
    assert_eq!((processed, deduped), (IDS, 2 * IDS));
}

/// A private Redis, killed when dropped.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        // A port free now (the system picks it), not one derived from the pid.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let r = PrivateRedis { child, port };
        wait_until("the private Redis answers", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        r
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_silent_redis_stops_acking_until_it_answers_again() {
    // Enough that Redis is stopped with most still to come (20,000 before issue 33).
    let n = weir_tests::scaled(5_000, 5_000);
    let redis = PrivateRedis::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let w = Weir::new();
    // One partition: one partition task, so once it has said the store is silent, every later
    // commit of it has to wait for a done mark.
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    let module = guest("orders");
    let log = w.path("run.log");
    let run = w.spawn_logged(&run_args(module.to_str().unwrap(), "g", &url), &log);
    wait_until("some orders are committed", Duration::from_secs(60), || {
        w.committed("orders", "g") >= n / 10
    });
    redis.signal("-STOP");
    let log_says = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
    };
    wait_until(
        "weir reports the silent store",
        Duration::from_secs(30),
        || log_says("until the dedupe store answers"),
    );
    // Acking has stopped: the committed offsets stand still while Redis is silent.
    let frozen = w.committed("orders", "g");
    assert!(frozen < n, "everything was committed before Redis stopped");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            w.committed("orders", "g"),
            frozen,
            "acked while Redis was silent"
        );
    }
    redis.signal("-CONT");
    wait_until("every order is committed", Duration::from_secs(120), || {
        w.committed("orders", "g") == n
    });
    let out = run.terminate();
    assert!(out.status.success());
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        if line.contains("dedupe store") {
            eprintln!("{line}");
        }
    }
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, n);
    assert!(per_id.values().all(|&c| c == 1), "a message ran twice");
}
