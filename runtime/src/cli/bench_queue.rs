//! `weir bench --source amqp://...|redis://...|nats://...`: the same orders through weir and
//! through the bare loop a user would write with the broker's usual client doing the same
//! native work (`source::<broker>::bench`), on the same server in the same run, so the ratio
//! holds on a noisy machine. Each side drains a topic of its own holding `--count` orders
//! published beforehand; its rate is the orders over its wall time.

use super::produce::{FaultMix, synthetic_order_mixed};
use crate::config::RunOptions;
use crate::engine::{self, Stats};
use crate::host::{Handler, Module};
use crate::source::connect::{ConsumerOptions, Kind, SourceSpec};
use crate::source::{Record, Source, nats, rabbitmq, redis, sqs};
use anyhow::{Context, ensure};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub struct QueueReport {
    pub broker: &'static str,
    pub url: String,
    pub messages: u64,
    pub message_bytes: usize,
    /// What each may hold unacked: weir's --max-in-flight; the bare loop's prefetch (RabbitMQ)
    /// or batch (Redis, NATS: at most 1,000).
    pub prefetch: usize,
    pub module: String,
    pub bare_messages_per_second: f64,
    pub weir_messages_per_second: f64,
    /// weir / bare.
    pub ratio: f64,
    pub retry_percent: f64,
    pub reject_percent: f64,
    /// weir on input with that mix of failures (`None` without one).
    pub weir_mixed_messages_per_second: Option<f64>,
    /// That over the clean weir run, measured in the same run.
    pub mixed_over_clean: Option<f64>,
}

/// One queue row: what to run, on which server.
pub struct Row<'a> {
    pub spec: &'a SourceSpec,
    pub module_path: &'a Path,
    pub native: Option<crate::host::native::Native>,
    pub options: RunOptions,
    pub count: u64,
    pub size: usize,
    pub mix: FaultMix,
    pub data_dir: &'a Path,
}

/// The bare loop of `spec`'s broker: drains `count` orders of `input` into `output`.
fn bare(
    spec: &SourceSpec,
    input: &str,
    output: &str,
    count: u64,
    prefetch: usize,
) -> anyhow::Result<Duration> {
    Ok(match spec.kind {
        Kind::RabbitMq => rabbitmq::bench::bare(
            &rabbitmq::AmqpConfig::from_spec(spec)?,
            input,
            output,
            count,
            prefetch.clamp(1, u16::MAX as usize) as u16,
        )?,
        Kind::Redis => redis::bench::bare(
            &redis::RedisConfig::from_spec(spec)?,
            input,
            output,
            count,
            prefetch.clamp(1, 1000),
        )?,
        Kind::Nats => nats::bench::bare(
            &nats::NatsConfig::from_spec(spec)?,
            input,
            output,
            count,
            prefetch.clamp(1, 1000),
        )?,
        Kind::Sqs => sqs::bench::bare(&sqs::SqsConfig::from_spec(spec)?, input, output, count)?,
        Kind::Embedded | Kind::Kafka => anyhow::bail!("{} has rows of its own", spec.name()),
    })
}

pub fn run(row: Row<'_>) -> anyhow::Result<QueueReport> {
    let mut broker = row.spec.broker()?;
    // Fresh names, so old messages do not mix in; each side drains an input of its own (on a
    // stream, what one side consumed stays for the other's group to read).
    let base = format!("weir-bench-{:08x}", rand::random::<u32>());
    let (in_bare, in_weir, out_bare, out_weir, mixed) = (
        format!("{base}-in-bare"),
        format!("{base}-in-weir"),
        format!("{base}-bare"),
        format!("{base}-weir"),
        format!("{base}-mixed"),
    );
    let with_mix = row.mix != FaultMix::default();
    let mut queues = vec![
        in_bare.clone(),
        in_weir.clone(),
        out_bare.clone(),
        out_weir.clone(),
    ];
    if with_mix {
        queues.extend([mixed.clone(), format!("{mixed}-weir")]);
    }
    for q in &queues {
        broker.create_topic(q, 1, None)?;
    }
    let produce = |broker: &mut Box<dyn crate::source::broker::Broker>,
                   queue: &str,
                   mix: FaultMix|
     -> anyhow::Result<()> {
        let mut n = 0;
        while n < row.count {
            let upto = (n + 1000).min(row.count);
            let batch: Vec<Record> = (n..upto)
                .map(|i| Record {
                    key: Some(format!("m-{i}").into_bytes()),
                    payload: synthetic_order_mixed(i, row.size, mix),
                    headers: Vec::new(),
                    timestamp_ms: None,
                })
                .collect();
            broker
                .append(queue, batch)
                .with_context(|| format!("publishing orders to {queue}"))?;
            n = upto;
        }
        Ok(())
    };
    let mut probe = row.options.clone();
    probe.module = Some(row.module_path.to_path_buf());
    probe.topic = Some(vec![in_weir.clone()]);
    probe.group = Some("bench".into());
    let prefetch = probe.check_for(&row.spec.naming())?.max_in_flight;

    produce(&mut broker, &in_bare, FaultMix::default())?;
    produce(&mut broker, &in_weir, FaultMix::default())?;
    let bare = bare(row.spec, &in_bare, &out_bare, row.count, prefetch)?;
    let clean = weir(&row, &in_weir, &out_weir, FaultMix::default())?;
    let rate = |d: Duration| row.count as f64 / d.as_secs_f64().max(1e-3);
    let mixed_rate = if with_mix {
        produce(&mut broker, &mixed, row.mix)?;
        Some(rate(weir(&row, &mixed, &format!("{mixed}-weir"), row.mix)?))
    } else {
        None
    };
    for q in &queues {
        // Best effort: the bench's topics are its own.
        let _ = broker.delete_topic(q);
        let _ = broker.delete_topic(&format!("{q}.dlq"));
    }
    Ok(QueueReport {
        broker: row.spec.name(),
        url: rabbitmq::redact(&row.spec.url),
        messages: row.count,
        message_bytes: row.size,
        prefetch,
        module: row.module_path.display().to_string(),
        bare_messages_per_second: rate(bare),
        weir_messages_per_second: rate(clean),
        ratio: rate(clean) / rate(bare),
        retry_percent: row.mix.retry_percent,
        reject_percent: row.mix.reject_percent,
        weir_mixed_messages_per_second: mixed_rate,
        mixed_over_clean: mixed_rate.map(|m| m / rate(clean)),
    })
}

/// weir drains `input` into `output`; returns its wall time.
fn weir(row: &Row<'_>, input: &str, output: &str, mix: FaultMix) -> anyhow::Result<Duration> {
    let mut options = row.options.clone();
    options.module = Some(row.module_path.to_path_buf());
    options.topic = Some(vec![input.to_string()]);
    options.group = Some("bench".into());
    options.drain = Some(true);
    options.admin = Some("off".into());
    let mut handler_config = BTreeMap::new();
    handler_config.insert("output-topic".to_string(), output.to_string());
    let settings =
        crate::config::resolve(options, handler_config, row.data_dir, &row.spec.naming())?;
    let e = &settings.engine;
    let source: Arc<dyn Source> = row.spec.consumer(&ConsumerOptions {
        group: e.group.clone(),
        topics: e.topics.clone(),
        retry_topics: Vec::new(),
        dlq_topics: e.topics.iter().map(|t| e.dlq_for(t)).collect(),
        exactly_once: settings.exactly_once,
        at_most_once: e.delivery == engine::DeliveryMode::AtMostOnce,
        prefetch: e.max_in_flight,
    })?;
    let module: Handler = match row.native {
        Some(twin) => Handler::Native {
            twin,
            output_topic: Arc::from(output),
        },
        None => {
            let exists = crate::source::output_check(source.clone());
            Module::load(row.module_path, &settings.host, exists)?.into()
        }
    };
    let runtime = super::io_runtime()?;
    let started = Instant::now();
    let summary = runtime.block_on(async {
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        engine::run(
            source,
            module,
            settings.engine,
            stop_rx,
            Arc::new(Stats::default()),
        )
        .await
    })?;
    let took = started.elapsed();
    runtime.shutdown_timeout(Duration::from_secs(1));
    let rejected = (0..row.count).filter(|&n| mix.pick(n).1).count() as u64;
    // An SQS standard queue delivers a message twice now and then (at-least-once): more than
    // the count is no error there; fewer is, everywhere.
    let handled = if row.spec.kind == Kind::Sqs {
        summary.processed >= row.count - rejected && summary.dead_lettered >= rejected
    } else {
        summary.processed == row.count - rejected && summary.dead_lettered == rejected
    };
    ensure!(
        handled,
        "weir handled {} and dead-lettered {} of {} orders ({rejected} to reject)",
        summary.processed,
        summary.dead_lettered,
        row.count
    );
    Ok(took)
}

/// The queue row as `weir bench` prints it (without `--json`).
pub fn print(r: &QueueReport, kind: Kind) {
    println!(
        "{:<11} {}, {} orders of {} bytes, prefetch {}",
        r.broker.to_lowercase(),
        r.url,
        r.messages,
        r.message_bytes,
        r.prefetch
    );
    let how = match kind {
        Kind::Redis => "redis crate: XREADGROUP a batch, then one MULTI of its XADDs and XACK",
        Kind::Nats => "async-nats: pull a batch, publish and await the acks, ack the batch",
        Kind::Sqs => "aws-sdk-sqs: receivers receive 10, SendMessageBatch, DeleteMessageBatch",
        _ => "lapin consumer, confirmed publishes, one multiple-ack per 100",
    };
    println!(
        "bare loop   {:.0} msg/s ({how})",
        r.bare_messages_per_second
    );
    println!(
        "weir        {:.0} msg/s ({})",
        r.weir_messages_per_second, r.module
    );
    println!("ratio       {:.2} of the bare loop", r.ratio);
    if let (Some(m), Some(q)) = (r.weir_mixed_messages_per_second, r.mixed_over_clean) {
        println!(
            "with faults {m:.0} msg/s with {}% asking for one retry and {}% rejected: {q:.2} of the clean run",
            r.retry_percent, r.reject_percent
        );
    }
}
