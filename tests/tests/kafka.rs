//! Kafka as the source, on librdkafka's in-process mock cluster: several weir processes in one
//! consumer group, a member killed with `kill -9`, and broker errors injected on produce,
//! fetch and commit. (The behaviours both sources share are in `conformance`.)

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use weir_tests::{Broker, Weir, guest, scaled, wait_until};

fn run_args(module: &str) -> Vec<&str> {
    vec![
        "run",
        "--module",
        module,
        "--topic",
        "orders",
        "--group",
        "g",
        "--batch-size",
        "32",
        "--instances",
        "1",
    ]
}

/// Order id → the partition of `orders` it was produced to.
fn partition_of_ids(w: &Weir) -> HashMap<String, u64> {
    w.messages("orders")
        .iter()
        .map(|m| {
            (
                m["key"]
                    .as_str()
                    .expect("orders are keyed by id")
                    .to_string(),
                m["partition"].as_u64().expect("a partition"),
            )
        })
        .collect()
}

fn all_committed(w: &Weir) -> bool {
    w.offsets("orders", "g").iter().all(|(end, c)| end == c)
}

/// Issue 4's acceptance test: messages over 6 partitions, two members; one is killed halfway
/// and a third joins. Nothing is lost, the duplicates are bounded by what the killed member had
/// handled past its committed offsets, and every partition ends committed. (The issue ran
/// 100,000 messages; `WEIR_TEST_SCALE=8` does.)
#[test]
fn a_member_killed_halfway_loses_nothing_and_duplicates_only_its_uncommitted_work() {
    let n = scaled(12_000, 6_000);
    let w = Weir::kafka_mock();
    w.create_topic("orders", 6);
    w.create_topic("confirmations", 6);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    assert_eq!(w.end("orders"), n);
    let module = guest("orders");
    let args = run_args(module.to_str().unwrap());
    let mut a = w.spawn(&args);
    let mut b = w.spawn(&args);
    wait_until(
        "half the orders are confirmed",
        Duration::from_secs(240),
        || w.end("confirmations") >= n / 2,
    );
    a.kill();
    // Right after the kill: the killed member's partitions stand still until the group notices
    // (its session times out), so what it handled past its committed offsets is fixed now.
    let committed_at_kill: Vec<u64> = w.offsets("orders", "g").iter().map(|(_, c)| *c).collect();
    let partition_of = partition_of_ids(&w);
    let mut outputs_at_kill = [0u64; 6];
    for (id, n) in w.confirmations_per_id() {
        outputs_at_kill[partition_of[&id] as usize] += n;
    }
    let in_flight: u64 = (0..6)
        .map(|p| outputs_at_kill[p].saturating_sub(committed_at_kill[p]))
        .sum();
    let done_at_kill: u64 = committed_at_kill.iter().sum();
    assert!(
        done_at_kill < n,
        "everything was committed before the kill; the test proves nothing"
    );

    let mut c = w.spawn(&args);
    wait_until(
        "every partition is committed to its end",
        Duration::from_secs(240),
        || all_committed(&w),
    );
    assert!(b.is_running() && c.is_running());
    for r in [b, c] {
        let out = r.terminate();
        assert!(out.status.success(), "a member exited with {}", out.status);
    }
    let per_id = w.confirmations_per_id();
    let lost: Vec<u64> = (0..n)
        .filter(|i| !per_id.contains_key(&format!("m-{i}")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} orders lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let duplicates: u64 = per_id.values().map(|c| c - 1).sum();
    eprintln!(
        "committed at the kill: {done_at_kill}; handled past the commit point: {in_flight}; duplicates: {duplicates}"
    );
    assert!(
        duplicates <= in_flight,
        "{duplicates} duplicates, but only {in_flight} messages were handled and uncommitted at the kill"
    );
    assert!(all_committed(&w));
}

/// Retriable broker errors on produce, fetch and offset commit, injected mid-run: the run
/// goes on, loses nothing, and commits every partition to its end.
#[test]
fn broker_errors_on_produce_fetch_and_commit_are_survived() {
    let n = scaled(8_000, 4_000);
    let w = Weir::kafka_mock();
    w.create_topic("orders", 3);
    w.create_topic("confirmations", 3);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    let module = guest("orders");
    let log = w.path("run.log");
    let mut args = run_args(module.to_str().unwrap());
    args.extend(["--kafka-property", "auto.commit.interval.ms=200"]);
    // A small fetch buffer, so that the run keeps fetching while the errors are injected
    // (with the default 16 MiB it had every order in memory before they were set).
    args.extend(["--kafka-property", "queued.max.messages.kbytes=64"]);
    let mut run = w.spawn_logged(&args, &log);
    wait_until(
        "some orders are confirmed",
        Duration::from_secs(120),
        || w.end("confirmations") >= n / 10,
    );
    let Broker::Mock(cluster) = w.broker() else {
        unreachable!("a mock cluster test")
    };
    use RDKafkaRespErr as E;
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            E::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            E::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            // Not retried inside librdkafka: reaches weir's commit callback, and the stored
            // offsets go out with the next periodic commit.
            E::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED,
        ],
    );
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            "every partition is committed to its end",
            Duration::from_secs(60),
            || all_committed(&w),
        )
    }));
    if let Err(e) = waited {
        eprintln!(
            "{}\nthe run's log:\n{}",
            w.stats(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
    assert!(run.is_running(), "the run stopped on a broker error");
    let out = run.terminate();
    assert!(out.status.success());
    let per_id = w.confirmations_per_id();
    for i in 0..n {
        assert!(
            per_id.contains_key(&format!("m-{i}")),
            "order m-{i} was lost"
        );
    }
    // The log shows that the injected errors were met: the commit failures, and the
    // connection the mock dropped for the transport error.
    let log = std::fs::read_to_string(&log).expect("read the run's log");
    assert!(
        log.contains("committing offsets failed"),
        "no commit failure in the log:\n{log}"
    );
    assert!(
        log.contains("Disconnected"),
        "no dropped connection in the log:\n{log}"
    );
}

/// Settings weir owns are refused, with the reason, before anything connects.
#[test]
fn properties_weir_owns_are_refused() {
    let w = Weir::new();
    let err = w.fails(
        &[
            "--brokers",
            "127.0.0.1:1",
            "--kafka-property",
            "enable.auto.offset.store=true",
            "topics",
            "list",
        ],
        2,
    );
    assert!(
        err.contains("enable.auto.offset.store") && err.contains("weir sets this itself"),
        "{err}"
    );
    let err = w.fails(&["--kafka-property", "acks=all", "topics", "list"], 2);
    assert!(err.contains("the source is the embedded log"), "{err}");
}

/// The same summary a real cluster gives: `topics list` shows a group's lag on Kafka.
#[test]
fn topics_list_shows_lag_per_partition_on_kafka() {
    let w = Weir::kafka_mock();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 2);
    w.ok(&["produce", "orders", "--count", "500"]);
    let module = guest("orders");
    let s = w.drain(&module, "orders", "g", &[]);
    assert_eq!(s["processed"], 500, "{s}");
    let out = w.ok(&["topics", "list", "orders", "--group", "g", "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    for p in stats[0]["partitions"].as_array().unwrap() {
        assert_eq!(p["groups"][0]["lag"], 0, "{stats}");
        assert_eq!(p["groups"][0]["committed"], p["end_offset"], "{stats}");
    }
    assert_eq!(w.end("confirmations"), 500);
}

/// Against a real Kafka-protocol broker in its own process (`WEIR_TEST_KAFKA_BROKERS`; CI
/// starts tansu when it is installed): topics created over the protocol, orders produced, two
/// members in one group, and every order confirmed. Topic names are unique per run, since the
/// broker outlives the test.
///
/// The check reads the group's committed offsets and the output topic with its own consumer,
/// as a user's downstream would. The broker is `WEIR_TEST_KAFKA_BROKERS` (noida-db, which
/// scripts/services.sh starts); without one the test is skipped, and fails under CI=true.
#[test]
fn real_broker_two_members_confirm_every_order() {
    const N: u64 = 3_000;
    let Some(on) = OnBroker::new("WEIR_TEST_KAFKA_BROKERS", N, 4, 2) else {
        return;
    };
    let args = on.run_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let w = &on.w;
    let (a, b) = (w.spawn(&args), w.spawn(&args));
    wait_until(
        "the group has committed every order",
        Duration::from_secs(180),
        || on.committed() >= N,
    );
    for r in [a, b] {
        assert!(r.terminate().status.success());
    }
    let seen = keys_in(&on.brokers, &on.output, 2, N, false);
    let lost: Vec<u64> = (0..N)
        .filter(|n| !seen.contains_key(&format!("m-{n}")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} orders not confirmed, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// `--exactly-once` on the mock cluster: every commit goes through a transaction (begin,
/// produce, send offsets, commit) and each input's output appears once. What this does *not*
/// show is exactly-once under a crash: the mock accepts `TxnOffsetCommit` without storing the
/// offsets and never hides aborted records, so the group's offsets are not checked here (see
/// `txn_broker_exactly_once_survives_a_kill`).
#[test]
fn exactly_once_commits_through_transactions_on_the_mock_cluster() {
    const N: u64 = 3_000;
    let w = Weir::kafka_mock();
    w.create_topic("orders", 3);
    w.create_topic("confirmations", 3);
    w.ok(&["produce", "orders", "--count", &N.to_string()]);
    let module = guest("orders");
    let log = w.path("run.log");
    let mut args = run_args(module.to_str().unwrap());
    args.extend(["--exactly-once", "--drain", "--json"]);
    let run = w.spawn_logged(&args, &log);
    let out = run.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.status.success(), "{log}");
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["processed"], N, "{s}");
    assert!(log.contains("exactly_once=true"), "{log}");
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.len() as u64, N);
    assert!(per_id.values().all(|&c| c == 1));
    // The offsets went through the transactions (TxnOffsetCommit), never OffsetCommit: the
    // mock answers the former without storing it, so the group's committed offsets stay unset,
    // where a run that committed them outside a transaction (at-least-once) leaves N.
    assert_eq!(
        w.committed("orders", "g"),
        0,
        "offsets committed outside a transaction"
    );
}

/// Issue 4's exactly-once acceptance test, on a broker that implements transactions
/// (`WEIR_TEST_KAFKA_TXN_BROKERS`, noida-db here): a member with `--exactly-once` is killed
/// mid-run and started again, three times; a `read_committed` reader sees every order's
/// confirmation exactly once, while a `read_uncommitted` one sees the aborted copies too (so a
/// kill did land inside a transaction). The member has a static identity (`group.instance.id`), as a pod of
/// a StatefulSet does: started again, it takes its partitions back at once and fences the dead
/// one's producer, which aborts its open transaction.
///
/// One member, not two: noida-db 0.2.3 neither evicts a dead dynamic member nor aborts a dead
/// producer's transaction at its timeout, and a static member that rejoins beside another is
/// sometimes handed the other's partitions (seen here: both held 1, 3 and 5, nobody 0, 2 and 4,
/// for two minutes). docs/kafka.md says what this broker shows and what it does not.
#[test]
fn txn_broker_exactly_once_survives_a_kill() {
    // noida-db runs transactions fast (about 10,000 orders a second here, with small batches):
    // the kills must land while most orders are still to come.
    let n = scaled(50_000, 50_000);
    let Some(on) = OnBroker::new("WEIR_TEST_KAFKA_TXN_BROKERS", n, 6, 3) else {
        return;
    };
    // Small batches, so many transactions: the run takes seconds, and the kill lands in one.
    let args = on.run_args(&[
        "--exactly-once",
        "--batch-size",
        "4",
        "--kafka-property",
        "group.instance.id=member-0",
        // Used only without --exactly-once: a run that committed its offsets the plain way
        // would show its progress (and its kills their duplicates) as this one does.
        "--kafka-property",
        "auto.commit.interval.ms=100",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let w = &on.w;
    let committed = || on.committed();
    // Six kills, each a moment later in the input. A kill lands after a transaction's outputs
    // were delivered and before its commit some of the time: with each flush taking 100 ms
    // (rdkafka's flush, until 2026-12-07) almost always, now that a flush returns with its
    // delivery reports about half the time; three kills once all missed (the check below
    // failed with 'the kill aborted no transaction'), six make it all but sure.
    const KILLS: usize = 6;
    let logs: Vec<_> = (0..=KILLS)
        .map(|i| w.path(&format!("run-{i}.log")))
        .collect();
    let mut run = w.spawn_logged(&args, &logs[0]);
    let mut before = 0;
    for i in 0..KILLS {
        // Each run is killed once it has made some progress of its own.
        wait_until("the run commits", Duration::from_secs(240), || {
            committed() >= before + n / 50
        });
        run.kill();
        before = committed();
        assert!(before < n, "everything was committed before kill {i}");
        run = w.spawn_logged(&args, &logs[i + 1]);
    }
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("every order is committed", Duration::from_secs(120), || {
            committed() >= n
        })
    }));
    if let Err(e) = done {
        for l in &logs {
            let text = std::fs::read_to_string(l).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains("CONFWARN")).collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!("--- {}:\n{}", l.display(), tail.join("\n"));
        }
        eprintln!("committed {} of {n}", committed());
        std::panic::resume_unwind(e);
    }
    assert!(run.terminate().status.success());
    let raw: u64 = keys_in(&on.brokers, &on.output, 3, n, false).values().sum();
    assert!(
        raw > n,
        "{raw} outputs for {n} orders in read_uncommitted: the kill aborted no transaction, so the test shows nothing"
    );
    let per_id = keys_in(&on.brokers, &on.output, 3, n, true);
    assert_eq!(per_id.len() as u64, n, "orders without a confirmation");
    let twice: Vec<_> = per_id.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "{} orders confirmed more than once",
        twice.len()
    );
}

/// How often each key appears in `topic` on a real broker, read from the beginning by a
/// consumer of its own (`read_committed` when asked): until `expect` keys were seen and a poll
/// came back empty (so a late duplicate is seen too), or a minute and a half passed.
fn keys_in(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expect: u64,
    read_committed: bool,
) -> HashMap<String, u64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let isolation = if read_committed {
        "read_committed"
    } else {
        "read_uncommitted"
    };
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    reader.assign(&tpl).unwrap();
    let mut per_key: HashMap<String, u64> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        match reader.poll(Duration::from_millis(500)) {
            Some(m) => {
                let m = m.unwrap();
                *per_key
                    .entry(String::from_utf8_lossy(m.key().unwrap()).into_owned())
                    .or_default() += 1;
            }
            None if per_key.len() as u64 >= expect => break,
            None => {}
        }
    }
    per_key
}

/// A test's topics and group on a real broker (named by `env`), named uniquely since the broker
/// outlives the test, with `n` orders produced to the input. `None` (the test skipped, which
/// fails it under CI=true) when `env` names no broker.
struct OnBroker {
    w: Weir,
    brokers: String,
    input: String,
    output: String,
    group: String,
}

impl OnBroker {
    fn new(env: &str, n: u64, input_partitions: u32, output_partitions: u32) -> Option<OnBroker> {
        let Some(brokers) = std::env::var(env).ok().filter(|b| !b.is_empty()) else {
            weir_tests::skip(&format!(
                "{env} is not set: scripts/services.sh starts noida-db and sets it"
            ));
            return None;
        };
        let w = Weir::on(Broker::External(brokers.clone()));
        let id = format!("{}-{}", std::process::id(), weir_tests::now_ms());
        let on = OnBroker {
            w,
            brokers,
            input: format!("orders-{id}"),
            output: format!("conf-{id}"),
            group: format!("g-{id}"),
        };
        for (t, p) in [
            (&on.input, input_partitions),
            (&on.output, output_partitions),
        ] {
            on.w.ok(&["topics", "create", t, "--partitions", &p.to_string()]);
        }
        on.w.ok(&["produce", &on.input, "--count", &n.to_string()]);
        Some(on)
    }

    /// `weir run` of the orders handler over the input, emitting to the output, plus `extra`.
    fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let module = guest("orders").to_str().unwrap().to_string();
        let mut args: Vec<String> = [
            "run",
            "--module",
            &module,
            "--topic",
            &self.input,
            "--group",
            &self.group,
            "--handler-config",
            &format!("output-topic={}", self.output),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// The group's committed offsets on the input, summed (read from the group).
    fn committed(&self) -> u64 {
        self.w
            .offsets(&self.input, &self.group)
            .iter()
            .map(|(_, c)| c)
            .sum()
    }
}

/// `weir consume` outlives a lost connection as the run does: librdkafka reconnects, and the
/// reader polls on (a verification read once failed here on errors left for the next fetch).
#[test]
fn consume_waits_out_a_lost_connection() {
    let w = Weir::kafka_mock();
    w.create_topic("orders", 1);
    w.ok(&["produce", "orders", "--count", "10"]);
    let Broker::Mock(cluster) = w.broker() else {
        unreachable!("a mock cluster test")
    };
    use RDKafkaRespErr as E;
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    assert_eq!(w.messages("orders").len(), 10);
}
