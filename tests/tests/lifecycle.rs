//! Topic and group lifecycle beyond the embedded log (issue 35): `weir groups seek` on Kafka's
//! mock cluster and on a real Kafka-protocol broker (noida-db: by time, with the group listed,
//! described and deleted, and retention set as topic configs), `weir topics delete` on Kafka and
//! RabbitMQ, and a clear refusal where a broker has no such verb.

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use weir_tests::{Broker, Weir, guest, wait_until};

fn now_ms() -> u64 {
    weir_tests::now_ms()
}

/// Waits until the clock has passed `ms`, and returns it: a moment between two batches.
fn moment_after(ms: u64) -> u64 {
    wait_until("the clock moves on", Duration::from_secs(5), || {
        now_ms() > ms
    });
    ms
}

fn committed_sum(w: &Weir, group: &str) -> u64 {
    let out = w.ok(&["groups", "describe", group, "--json"]);
    let g: Value = serde_json::from_slice(&out.stdout).expect("groups describe --json");
    g["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["committed"].as_u64().unwrap_or(0))
        .sum()
}

/// On the mock cluster: a group that never ran is placed (partition 0 at the earliest record,
/// partition 1 at offset 25) and a drain handles exactly what lies after; once it has run,
/// the mock keeps its member for good, so a second seek is refused with an error that says
/// why. (The mock neither looks offsets up by time nor lists groups: those are tested on a
/// real broker below.)
#[test]
fn kafka_mock_seek_places_a_group_and_refuses_one_with_members() {
    let w = Weir::kafka_mock();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 2);
    w.ok(&["produce", "orders", "--count", "60", "--size", "100"]);
    let ends: Vec<u64> = w
        .offsets("orders", "nobody")
        .iter()
        .map(|(e, _)| *e)
        .collect();
    w.ok(&[
        "groups",
        "seek",
        "g",
        "orders",
        "--earliest",
        "--partition",
        "0",
    ]);
    w.ok(&[
        "groups",
        "seek",
        "g",
        "orders",
        "--offset",
        "25",
        "--partition",
        "1",
    ]);
    let placed: Vec<u64> = w.offsets("orders", "g").iter().map(|(_, c)| *c).collect();
    assert_eq!(placed, vec![0, 25.min(ends[1])]);
    w.drain(&guest("orders"), "orders", "g", &[]);
    let per_id = w.confirmations_per_id();
    assert_eq!(per_id.values().sum::<u64>(), 60 - 25.min(ends[1]));
    assert!(per_id.values().all(|&c| c == 1));
    let refused = w.fails(&["groups", "seek", "g", "orders", "--earliest"], 2);
    assert!(refused.contains("live members"), "{refused}");
    let refused = w.fails(&["groups", "list"], 2);
    assert!(refused.contains("mock cluster"), "{refused}");
}

/// On a real Kafka-protocol broker (`WEIR_TEST_KAFKA_BROKERS`, noida-db here): retention set at
/// creation and changed with `topics alter` lands in the topic's configs (read back with
/// librdkafka's admin client); a group is listed and described; `groups seek --time` moves it
/// to the second of two batches, and a drain gives that batch's outputs again, once; the group
/// and the topic are deleted.
#[test]
fn kafka_lifecycle_on_a_real_broker() {
    let Some(brokers) = std::env::var("WEIR_TEST_KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
    else {
        weir_tests::skip("WEIR_TEST_KAFKA_BROKERS is not set: scripts/services.sh starts noida-db");
        return;
    };
    let w = Weir::on(Broker::External(brokers.clone()));
    let id = format!("{}-{}", std::process::id(), now_ms());
    let (input, output, group) = (
        format!("lc-orders-{id}"),
        format!("lc-conf-{id}"),
        format!("lc-g-{id}"),
    );
    w.ok(&[
        "topics",
        "create",
        &input,
        "--partitions",
        "2",
        "--retention",
        "2h",
    ]);
    w.ok(&["topics", "create", &output, "--partitions", "2"]);
    assert_eq!(topic_config(&brokers, &input, "retention.ms"), "7200000");
    w.ok(&["topics", "alter", &input, "--retention-bytes", "1GiB"]);
    assert_eq!(topic_config(&brokers, &input, "retention.ms"), "7200000");
    assert_eq!(
        topic_config(&brokers, &input, "retention.bytes"),
        "1073741824"
    );
    let refused = w.fails(
        &["topics", "alter", &input, "--retention-policy", "interest"],
        2,
    );
    assert!(refused.contains("embedded log"), "{refused}");

    w.ok(&["produce", &input, "--count", "40", "--size", "100"]);
    let between = moment_after(now_ms());
    w.ok(&[
        "produce", &input, "--count", "20", "--start", "40", "--size", "100",
    ]);
    let run = |module: &str| {
        let m = guest(module);
        w.ok(&[
            "run",
            "--module",
            m.to_str().unwrap(),
            "--topic",
            &input,
            "--group",
            &group,
            "--handler-config",
            &format!("output-topic={output}"),
            "--drain",
            "--json",
        ]);
    };
    run("orders");
    assert_eq!(committed_sum(&w, &group), 60);
    let listed = String::from_utf8_lossy(&w.ok(&["groups", "list"]).stdout).to_string();
    assert!(listed.contains(&group), "{listed}");
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(between));
    w.ok(&[
        "groups",
        "seek",
        &group,
        &input,
        "--time",
        &time.to_string(),
    ]);
    assert_eq!(
        committed_sum(&w, &group),
        40,
        "the second batch begins after {time}"
    );
    run("orders-v2");
    let per_id = keys(&brokers, &output, 80);
    for i in 0..60 {
        let want = if i < 40 { 1 } else { 2 };
        assert_eq!(
            per_id.get(&format!("m-{i}")).copied().unwrap_or(0),
            want,
            "m-{i}"
        );
    }
    w.ok(&["groups", "delete", &group]);
    let listed = String::from_utf8_lossy(&w.ok(&["groups", "list"]).stdout).to_string();
    assert!(!listed.contains(&group), "{listed}");
    w.ok(&["topics", "delete", &input]);
    wait_until("the topic is gone", Duration::from_secs(30), || {
        !w.output(&["topics", "list", &input]).status.success()
    });
}

/// `weir topics delete` on RabbitMQ deletes the queue; verbs a queue has no use for say so.
#[test]
fn rabbitmq_topics_delete_and_groups_refused() {
    let w = Weir::rabbitmq();
    w.create_topic("jobs", 1);
    w.ok(&["produce", "jobs", "--count", "5"]);
    w.ok(&["topics", "delete", "jobs"]);
    let gone = w.fails(&["produce", "jobs", "--count", "1"], 2);
    assert!(gone.contains("jobs"), "{gone}");
    let refused = w.fails(&["groups", "list"], 2);
    assert!(refused.contains("RabbitMQ"), "{refused}");
}

/// A topic config as the brokers describe it.
fn topic_config(brokers: &str, topic: &str, name: &str) -> String {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let spec = ResourceSpecifier::Topic(topic);
    let r =
        futures_executor::block_on(admin.describe_configs([&spec], &AdminOptions::new())).unwrap();
    let res = r.into_iter().next().unwrap().unwrap();
    res.get(name)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("{topic} has no config {name}"))
}

/// How many records of each key `topic` holds, read from the beginning until `expect` are seen.
fn keys(brokers: &str, topic: &str, expect: u64) -> HashMap<String, u64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    reader.assign(&tpl).unwrap();
    let mut per_key: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while per_key.values().sum::<u64>() < expect && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
            let k = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
            *per_key.entry(k).or_default() += 1;
        }
    }
    per_key
}
