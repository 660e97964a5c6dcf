//! `weir bench --source amqp://...`: the same orders through weir's RabbitMQ path and through a
//! bare lapin loop doing the same native work (`source::rabbitmq::bench`), on the same server in
//! the same run, so the ratio holds on a noisy machine. Each side drains a queue of `--count`
//! orders published beforehand; its rate is the orders over its wall time.

use super::produce::{FaultMix, synthetic_order_mixed};
use crate::config::RunOptions;
use crate::engine::{self, Stats};
use crate::host::{Handler, Module};
use crate::source::connect::{ConsumerOptions, SourceSpec};
use crate::source::rabbitmq::{self, AmqpConfig};
use crate::source::{Record, Source};
use anyhow::{Context, ensure};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub struct AmqpReport {
    pub url: String,
    pub messages: u64,
    pub message_bytes: usize,
    /// `basic.qos` of both (weir's is --max-in-flight).
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

/// One RabbitMQ row: what to run, on which server.
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

pub fn run(row: Row<'_>) -> anyhow::Result<AmqpReport> {
    let cfg = AmqpConfig::from_spec(row.spec)?;
    let mut broker = row.spec.broker()?;
    // Fresh queue names, so old messages do not mix in.
    let input = format!("weir-bench-{:08x}", rand::random::<u32>());
    let (out_bare, out_weir, mixed) = (
        format!("{input}-bare"),
        format!("{input}-weir"),
        format!("{input}-mixed"),
    );
    let with_mix = row.mix != FaultMix::default();
    let mut queues = vec![input.clone(), out_bare.clone(), out_weir.clone()];
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
    probe.topic = Some(vec![input.clone()]);
    probe.group = Some("bench".into());
    let prefetch = probe.check_for(&rabbitmq::NAMING)?.max_in_flight;

    produce(&mut broker, &input, FaultMix::default())?;
    let bare = rabbitmq::bench::bare(
        &cfg,
        &input,
        &out_bare,
        row.count,
        prefetch.clamp(1, u16::MAX as usize) as u16,
    )?;
    produce(&mut broker, &input, FaultMix::default())?;
    let clean = weir(&row, &input, &out_weir, FaultMix::default())?;
    let rate = |d: Duration| row.count as f64 / d.as_secs_f64().max(1e-3);
    let mixed_rate = if with_mix {
        produce(&mut broker, &mixed, row.mix)?;
        Some(rate(weir(&row, &mixed, &format!("{mixed}-weir"), row.mix)?))
    } else {
        None
    };
    for q in &queues {
        // Best effort: the bench's queues are its own.
        let _ = broker.delete_topic(q);
        let _ = broker.delete_topic(&format!("{q}.dlq"));
    }
    Ok(AmqpReport {
        url: rabbitmq::redact(&cfg.url),
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
        crate::config::resolve(options, handler_config, row.data_dir, &rabbitmq::NAMING)?;
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
    ensure!(
        summary.processed == row.count - rejected && summary.dead_lettered == rejected,
        "weir handled {} and dead-lettered {} of {} orders ({rejected} to reject)",
        summary.processed,
        summary.dead_lettered,
        row.count
    );
    Ok(took)
}
