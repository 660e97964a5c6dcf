//! `weir bench`'s Kafka row: the same orders through weir's Kafka path and through a bare
//! rdkafka loop doing the same native work, against the same brokers in the same run, so the
//! ratio holds on a noisy machine.
//!
//! The bare loop is what a team writes by hand: a consumer in a group, parse the order, build the
//! confirmation, produce it with an idempotent producer, and store offsets after each flush
//! (at-least-once, as weir is). Both rates come from the output topics' timestamps (first to
//! last confirmation), so joining the group (which the mock cluster delays by 3 s) counts for
//! neither.

use super::produce::{FaultMix, synthetic_order, synthetic_order_mixed};
use crate::config::RunOptions;
use crate::engine::{self, Stats};
use crate::host::{Handler, Module};
use crate::source::Source;
use crate::source::kafka::bench::{self as kb, Mock};
use crate::source::kafka::{Kafka, KafkaConfig};
use anyhow::ensure;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Serialize)]
pub struct KafkaReport {
    pub brokers: String,
    pub mock_cluster: bool,
    pub messages: u64,
    pub message_bytes: usize,
    pub partitions: u32,
    pub module: String,
    /// The hand-written rdkafka loop, msg/s (first to last output).
    pub bare_messages_per_second: f64,
    /// weir with the module, msg/s (first to last output).
    pub weir_messages_per_second: f64,
    /// weir / bare.
    pub ratio: f64,
    pub retry_percent: f64,
    pub reject_percent: f64,
    /// weir on input with that mix of failures, msg/s (`None` without one).
    pub weir_mixed_messages_per_second: Option<f64>,
    /// That over the clean weir run, measured in the same run.
    pub mixed_over_clean: Option<f64>,
}

/// One Kafka row: what to run, on which brokers.
pub struct Row<'a> {
    /// The brokers; `None`: a mock cluster in this process.
    pub kafka: Option<&'a KafkaConfig>,
    pub module_path: &'a Path,
    pub native: Option<crate::host::native::Native>,
    pub options: RunOptions,
    pub count: u64,
    pub size: usize,
    pub partitions: u32,
    /// With failures in it, weir also runs a second input with this mix (the bare loop and
    /// the first weir run see clean orders).
    pub mix: FaultMix,
    pub data_dir: &'a Path,
}

/// Runs both on `kafka` (or on a mock cluster of its own when `kafka` is `None`).
pub fn run(row: Row<'_>) -> anyhow::Result<KafkaReport> {
    let mock = match row.kafka {
        Some(_) => None,
        None => Some(Mock::start()?),
    };
    let cfg = match (row.kafka, &mock) {
        (Some(k), _) => k.clone(),
        (None, Some(m)) => KafkaConfig {
            brokers: m.brokers(),
            properties: BTreeMap::new(),
        },
        (None, None) => unreachable!("a mock cluster when no brokers are given"),
    };
    // Fresh topic names, so a real cluster's old data does not mix in.
    let run_id = format!("{:08x}", rand::random::<u32>());
    let input = format!("weir-bench-{run_id}");
    let mixed = format!("{input}-mixed");
    let (out_weir, out_bare, out_mixed) = (
        format!("{input}-weir"),
        format!("{input}-bare"),
        format!("{mixed}-weir"),
    );
    let with_mix = row.mix != FaultMix::default();
    let mut topics = vec![
        input.clone(),
        format!("{input}.dlq"),
        out_weir.clone(),
        out_bare.clone(),
    ];
    if with_mix {
        topics.extend([mixed.clone(), format!("{mixed}.dlq"), out_mixed.clone()]);
    }
    for t in &topics {
        match &mock {
            Some(m) => m.create_topic(t, row.partitions)?,
            None => Kafka::create_topic(&cfg, t, row.partitions)?,
        }
    }
    let (count, size, mix) = (row.count, row.size, row.mix);
    kb::produce(&cfg, &input, count, |n| synthetic_order(n, size))?;
    kb::bare(&cfg, &input, &out_bare, count)?;
    let bare_span = kb::span(&cfg, &out_bare, count)?;
    let weir_span = weir(&row, &cfg, &input, &out_weir, FaultMix::default())?;
    let rate = |d: Duration, n: u64| n as f64 / d.as_secs_f64().max(1e-3);
    let weir_rate = rate(weir_span, count);
    let mixed_rate = if with_mix {
        kb::produce(&cfg, &mixed, count, |n| synthetic_order_mixed(n, size, mix))?;
        let span = weir(&row, &cfg, &mixed, &out_mixed, mix)?;
        // Its rate counts every order handled, rejected ones too, over the outputs' span.
        Some(rate(span, count))
    } else {
        None
    };
    Ok(KafkaReport {
        brokers: cfg.brokers.clone(),
        mock_cluster: mock.is_some(),
        messages: count,
        message_bytes: size,
        partitions: row.partitions,
        module: row.module_path.display().to_string(),
        bare_messages_per_second: rate(bare_span, count),
        weir_messages_per_second: weir_rate,
        ratio: weir_rate / rate(bare_span, count),
        retry_percent: mix.retry_percent,
        reject_percent: mix.reject_percent,
        weir_mixed_messages_per_second: mixed_rate,
        mixed_over_clean: mixed_rate.map(|m| m / weir_rate),
    })
}

/// weir drains `input` into `output`; returns the span of the outputs' timestamps.
fn weir(
    row: &Row<'_>,
    cfg: &KafkaConfig,
    input: &str,
    output: &str,
    mix: FaultMix,
) -> anyhow::Result<Duration> {
    let mut options = row.options.clone();
    options.batch_size = options
        .batch_size
        .or(Some(crate::source::kafka::BATCH_SIZE));
    options.module = Some(row.module_path.to_path_buf());
    options.topic = Some(vec![input.to_string()]);
    options.group = Some(format!("{input}-weir"));
    options.drain = Some(true);
    options.admin = Some("off".into());
    let mut handler_config = BTreeMap::new();
    handler_config.insert("output-topic".to_string(), output.to_string());
    let settings = crate::config::resolve(
        options,
        handler_config,
        row.data_dir,
        &weir_core::topic::Naming::KAFKA,
    )?;
    let source: Arc<dyn Source> = Arc::new(Kafka::connect(cfg, false)?);
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
    runtime.shutdown_timeout(Duration::from_secs(1));
    let rejected = (0..row.count).filter(|&n| mix.pick(n).1).count() as u64;
    ensure!(
        summary.processed == row.count - rejected && summary.dead_lettered == rejected,
        "weir handled {} and dead-lettered {} of {} orders ({rejected} to reject)",
        summary.processed,
        summary.dead_lettered,
        row.count
    );
    kb::span(cfg, output, row.count - rejected)
}
