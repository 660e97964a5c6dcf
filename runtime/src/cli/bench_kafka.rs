//! `weir bench`'s Kafka row: the same orders through weir's Kafka path and through a bare
//! rdkafka loop doing the same native work, against the same brokers in the same run, so the
//! ratio holds on a noisy machine.
//!
//! The bare loop is what a team writes by hand: a consumer in a group, parse the order, build the
//! confirmation, produce it with an idempotent producer, and store offsets after each flush
//! (at-least-once, as weir is). Both rates come from the output topics' timestamps (first to
//! last confirmation), so joining the group (which the mock cluster delays by 3 s) counts for
//! neither.

use super::produce::synthetic_order;
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
}

/// Runs both on `kafka` (or on a mock cluster of its own when `kafka` is `None`).
#[allow(clippy::too_many_arguments)]
pub fn run(
    kafka: Option<&KafkaConfig>,
    module_path: &Path,
    native: Option<crate::host::native::Native>,
    options: RunOptions,
    count: u64,
    size: usize,
    partitions: u32,
    data_dir: &Path,
) -> anyhow::Result<KafkaReport> {
    let mock = match kafka {
        Some(_) => None,
        None => Some(Mock::start()?),
    };
    let cfg = match (kafka, &mock) {
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
    let (out_weir, out_bare) = (format!("{input}-weir"), format!("{input}-bare"));
    let topics = [
        input.clone(),
        format!("{input}.dlq"),
        out_weir.clone(),
        out_bare.clone(),
    ];
    match &mock {
        Some(m) => {
            for t in &topics {
                m.create_topic(t, partitions)?;
            }
        }
        None => {
            for t in &topics {
                Kafka::create_topic(&cfg, t, partitions)?;
            }
        }
    }
    kb::produce(&cfg, &input, count, |n| synthetic_order(n, size))?;

    kb::bare(&cfg, &input, &out_bare, count)?;
    let bare_span = kb::span(&cfg, &out_bare, count)?;

    let mut options = options.on_kafka();
    options.module = Some(module_path.to_path_buf());
    options.topic = Some(vec![input.clone()]);
    options.group = Some(format!("{input}-weir"));
    options.drain = Some(true);
    options.admin = Some("off".into());
    let mut handler_config = BTreeMap::new();
    handler_config.insert("output-topic".to_string(), out_weir.clone());
    let settings = options.resolve(handler_config, data_dir)?;
    let source: Arc<dyn Source> = Arc::new(Kafka::connect(&cfg, false)?);
    let module: Handler = match native {
        Some(twin) => Handler::Native {
            twin,
            output_topic: Arc::from(out_weir.as_str()),
        },
        None => {
            let exists = crate::source::output_check(source.clone());
            Module::load(module_path, &settings.host, exists)?.into()
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
    ensure!(
        summary.processed == count,
        "weir handled {} of {count} orders",
        summary.processed
    );
    let weir_span = kb::span(&cfg, &out_weir, count)?;
    let rate = |d: Duration| count as f64 / d.as_secs_f64().max(1e-3);
    Ok(KafkaReport {
        brokers: cfg.brokers.clone(),
        mock_cluster: mock.is_some(),
        messages: count,
        message_bytes: size,
        partitions,
        module: module_path.display().to_string(),
        bare_messages_per_second: rate(bare_span),
        weir_messages_per_second: rate(weir_span),
        ratio: rate(weir_span) / rate(bare_span),
    })
}
