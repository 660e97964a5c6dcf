//! Throughput of weir's Kafka path next to a bare rdkafka loop doing the same native work,
//! against the same broker in the same run, so the ratio holds on a noisy machine.
//!
//! The bare loop is what a team writes by hand: a consumer in a group, parse the order, build
//! the confirmation, produce it with an idempotent producer, and store offsets after each
//! flush (at-least-once, as weir is). weir runs the `orders` component with `--drain`.
//!
//! Both rates are taken from the output topic's timestamps (first to last confirmation), so
//! the group join, which the mock cluster delays by 3 s, counts for neither.
//!
//! Usage: kafka-bench [--count N] [--partitions P] [--size BYTES] [--weir PATH] [--module PATH]
//! (build weir and the guest in release first; see the README's Performance section).

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(serde::Deserialize)]
struct Order {
    id: String,
    customer: String,
    amount_cents: u64,
}

#[derive(serde::Serialize)]
struct Confirmation<'a> {
    order_id: &'a str,
    customer: &'a str,
    amount_cents: u64,
    status: &'static str,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let count: u64 = arg("--count").map_or(Ok(200_000), |s| s.parse())?;
    let partitions: i32 = arg("--partitions").map_or(Ok(6), |s| s.parse())?;
    let size: usize = arg("--size").map_or(Ok(100), |s| s.parse())?;
    let root = weir_tests::root();
    let weir = arg("--weir").map_or_else(|| root.join("target/release/weir"), PathBuf::from);
    let module = arg("--module").map_or_else(
        || root.join("guest-examples/target/wasm32-wasip2/release/orders.wasm"),
        PathBuf::from,
    );
    anyhow::ensure!(weir.is_file(), "no weir binary at {}", weir.display());
    anyhow::ensure!(
        module.is_file(),
        "no orders component at {}",
        module.display()
    );

    let cluster = MockCluster::new(1)?;
    let brokers = cluster.bootstrap_servers();
    for t in [
        "orders",
        "orders.dlq",
        "confirmations",
        "bare-confirmations",
    ] {
        cluster.create_topic(t, partitions, 1)?;
    }
    let status = Command::new(&weir)
        .args(["produce", "orders", "--count", &count.to_string()])
        .args(["--size", &size.to_string(), "--brokers", &brokers])
        .status()?;
    anyhow::ensure!(status.success(), "weir produce failed");

    let started = Instant::now();
    bare(&brokers, count)?;
    let bare_wall = started.elapsed();
    let bare_span = span(&brokers, "bare-confirmations", count)?;

    // More `weir run` flags to try, e.g. WEIR_BENCH_ARGS="--instances 1 --batch-size 64".
    let extra = std::env::var("WEIR_BENCH_ARGS").unwrap_or_default();
    let started = Instant::now();
    let out = Command::new(&weir)
        .args(["run", "--module"])
        .arg(&module)
        .args(["--topic", "orders", "--group", "weir", "--drain", "--json"])
        .args(["--brokers", &brokers])
        .args(extra.split_whitespace())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "weir run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weir_wall = started.elapsed();
    let weir_span = span(&brokers, "confirmations", count)?;

    let rate = |span: Duration| count as f64 / span.as_secs_f64().max(1e-3);
    println!("{count} orders of {size} B over {partitions} partitions, mock cluster, same run");
    println!(
        "bare rdkafka loop: {:>9.0} msg/s (first to last output {:.2}s; wall {:.2}s)",
        rate(bare_span),
        bare_span.as_secs_f64(),
        bare_wall.as_secs_f64()
    );
    println!(
        "weir + orders.wasm: {:>8.0} msg/s (first to last output {:.2}s; wall {:.2}s)",
        rate(weir_span),
        weir_span.as_secs_f64(),
        weir_wall.as_secs_f64()
    );
    println!(
        "ratio weir / bare: {:.2}",
        rate(weir_span) / rate(bare_span)
    );
    Ok(())
}

/// The hand-written loop: consume in a group, handle, produce, store offsets after delivery.
fn bare(brokers: &str, count: u64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bare")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    consumer.subscribe(&["orders"])?;
    let mut done = 0u64;
    let mut unflushed: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while done < count {
        anyhow::ensure!(Instant::now() < deadline, "the bare loop timed out");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let order: Order = serde_json::from_slice(m.payload().unwrap_or_default())?;
                let payload = serde_json::to_vec(&Confirmation {
                    order_id: &order.id,
                    customer: &order.customer,
                    amount_cents: order.amount_cents,
                    status: "confirmed",
                })?;
                let offset = m.offset().to_string();
                let headers = OwnedHeaders::new().insert(Header {
                    key: "source-offset",
                    value: Some(offset.as_bytes()),
                });
                let mut rec = BaseRecord::to("bare-confirmations")
                    .key(order.id.as_bytes())
                    .payload(&payload)
                    .headers(headers);
                loop {
                    match producer.send(rec) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            rec = back;
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
                unflushed.insert(m.partition(), m.offset() + 1);
                done += 1;
                if done.is_multiple_of(1000) || done == count {
                    store(&consumer, &producer, &mut unflushed)?;
                }
            }
            Some(Err(e)) => anyhow::bail!("consume: {e}"),
            None => store(&consumer, &producer, &mut unflushed)?,
        }
    }
    consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}

fn store(
    consumer: &BaseConsumer,
    producer: &BaseProducer,
    unflushed: &mut HashMap<i32, i64>,
) -> anyhow::Result<()> {
    if unflushed.is_empty() {
        return Ok(());
    }
    producer.flush(Duration::from_secs(60))?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in unflushed.drain() {
        tpl.add_partition_offset("orders", p, Offset::Offset(o))?;
    }
    consumer.store_offsets(&tpl)?;
    Ok(())
}

/// First to last create-time of the messages in `topic` (which should hold `count`).
fn span(brokers: &str, topic: &str, count: u64) -> anyhow::Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut first, mut last, mut seen) = (i64::MAX, i64::MIN, 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen < count && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let ts = m?.timestamp().to_millis().unwrap_or(0);
            first = first.min(ts);
            last = last.max(ts);
            seen += 1;
        }
    }
    anyhow::ensure!(seen >= count, "{topic} holds {seen} of {count} outputs");
    Ok(Duration::from_millis((last - first).max(1) as u64))
}
