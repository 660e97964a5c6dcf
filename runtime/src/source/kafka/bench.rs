//! The rdkafka side of `weir bench`'s Kafka row (this module is where weir names rdkafka): a
//! mock cluster, producing the orders, the bare hand-written consumer loop weir is compared
//! with, and timing an output topic.

use super::KafkaConfig;
use anyhow::{Context, ensure};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::host::native::{Confirmation, Order};

/// A Kafka-protocol cluster in this process (librdkafka's mock).
pub struct Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>);

impl std::fmt::Debug for Mock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mock")
    }
}

impl Mock {
    pub fn start() -> anyhow::Result<Mock> {
        Ok(Mock(
            MockCluster::new(1).context("starting a mock cluster")?,
        ))
    }

    pub fn brokers(&self) -> String {
        self.0.bootstrap_servers()
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) -> anyhow::Result<()> {
        Ok(self.0.create_topic(topic, partitions as i32, 1)?)
    }
}

fn client(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Appends `count` messages made by `make` (keyed `m-<n>`), with an idempotent producer.
pub fn produce(
    cfg: &KafkaConfig,
    topic: &str,
    count: u64,
    make: impl Fn(u64) -> Vec<u8>,
) -> anyhow::Result<()> {
    let producer: BaseProducer = client(cfg)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    for n in 0..count {
        let (id, payload) = (format!("m-{n}"), (make)(n));
        send(
            &producer,
            BaseRecord::to(topic).key(id.as_bytes()).payload(&payload),
        );
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(())
}

/// Sends `rec`, serving delivery reports while the producer's queue is full.
fn send(producer: &BaseProducer, mut rec: BaseRecord<'_, [u8], Vec<u8>>) {
    loop {
        match producer.send(rec) {
            Ok(()) => return,
            Err((_, back)) => {
                rec = back;
                producer.poll(Duration::from_millis(10));
            }
        }
    }
}

/// The hand-written loop: consume in a group, handle, produce, store offsets after delivery.
pub fn bare(cfg: &KafkaConfig, input: &str, output: &str, count: u64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client(cfg)
        .set("group.id", format!("{input}-bare"))
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()?;
    let producer: BaseProducer = client(cfg)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    consumer.subscribe(&[input])?;
    let mut done = 0u64;
    let mut unflushed: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while done < count {
        ensure!(Instant::now() < deadline, "the bare loop timed out");
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
                send(
                    &producer,
                    BaseRecord::to(output)
                        .key(order.id.as_bytes())
                        .payload(&payload)
                        .headers(headers),
                );
                unflushed.insert(m.partition(), m.offset() + 1);
                done += 1;
                if done.is_multiple_of(1000) || done == count {
                    store(&consumer, &producer, input, &mut unflushed)?;
                }
            }
            Some(Err(e)) => anyhow::bail!("consume: {e}"),
            None => store(&consumer, &producer, input, &mut unflushed)?,
        }
    }
    consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}

fn store(
    consumer: &BaseConsumer,
    producer: &BaseProducer,
    topic: &str,
    unflushed: &mut HashMap<i32, i64>,
) -> anyhow::Result<()> {
    if unflushed.is_empty() {
        return Ok(());
    }
    producer.flush(Duration::from_secs(60))?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in unflushed.drain() {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
    }
    consumer.store_offsets(&tpl)?;
    Ok(())
}

/// First to last create-time of the messages in `topic` (which should hold `count`).
pub fn span(cfg: &KafkaConfig, topic: &str, count: u64) -> anyhow::Result<Duration> {
    let consumer: BaseConsumer = client(cfg)
        .set("group.id", format!("{topic}-reader"))
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
    ensure!(seen >= count, "{topic} holds {seen} of {count} outputs");
    Ok(Duration::from_millis((last - first).max(1) as u64))
}
