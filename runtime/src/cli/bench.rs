//! `weir bench`: the whole pipeline (embedded log, dispatch, the call into the component,
//! durable commits) over synthetic messages in a data directory of its own, with the figures
//! users compare: throughput, CPU, peak memory, and the costs of a module (compile, ready from
//! the compiled cache, a new instance, an idle instance).

use super::Globals;
use super::bad_input;
use super::bench_report::{Report, dir_bytes, print_report};
use super::produce::{FaultMix, synthetic_order, synthetic_order_mixed};
use crate::config::RunOptions;
use crate::engine::{self, Stats};
use crate::host::{Handler, Module};
use crate::source::embedded::local;
use crate::source::{Delivery, Record, Source};
use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Measure a handler on the full pipeline: produce --count synthetic orders of --size bytes into
/// a fresh embedded log (in a temporary directory), run them through the module with the `run`
/// flags given (delivery mode, instances, batch size, dedupe, ...), and report messages/s,
/// MB/s, CPU seconds, peak resident memory, and what loading and instantiating the module costs.
#[derive(Debug, Args)]
pub struct BenchCommand {
    #[command(flatten)]
    options: RunOptions,
    /// Messages to produce and handle
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Bytes per message (synthetic orders padded to this size)
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Partitions of the input topic
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Topics the handler emits to, created before the run
    #[arg(
        long = "output-topic",
        default_value = "confirmations",
        value_delimiter = ','
    )]
    output_topics: Vec<String>,
    /// KEY=VALUE the handler reads through its config import; repeat for more
    #[arg(long = "handler-config", value_name = "KEY=VALUE")]
    handler_config: Vec<String>,
    /// Instances created to measure instantiation and idle memory
    #[arg(long, default_value_t = 200)]
    probe_instances: usize,
    /// Run a native twin of an example in the same pipeline instead of --module (the WASM
    /// cost is the ratio of the two runs)
    #[arg(long, value_enum)]
    native: Option<crate::host::native::Native>,
    /// The Kafka row: the orders through weir's Kafka path and through a bare rdkafka loop doing
    /// the same native work, on a mock cluster in this process (or on --brokers when given)
    #[arg(long)]
    kafka_mock: bool,
    /// Latency mode: append --count messages at this rate (messages/s) while the run consumes,
    /// instead of a backlog at full speed
    #[arg(long)]
    rate: Option<u64>,
    /// This per cent of the orders ask for one retry (the `orders` example's `"transient":true`)
    #[arg(long, default_value_t = 0.0)]
    retry_percent: f64,
    /// This per cent of the orders are rejected (`"amount_cents":0`) and dead-lettered
    #[arg(long, default_value_t = 0.0)]
    reject_percent: f64,
    /// Print the report as JSON on standard output
    #[arg(long)]
    json: bool,
    /// Retention of the input topic (`--retention-bytes 500MiB`, `--retention-policy interest`,
    /// `--segment-bytes`), enforced while the run consumes [default: keep everything]
    #[command(flatten)]
    retention: super::topics::RetentionArgs,
}

impl BenchCommand {
    /// The handler of a broker's row: --module or --native, one of them.
    fn row_module(&self, row: &str) -> anyhow::Result<PathBuf> {
        let module = match (&self.options.module, self.native) {
            (Some(m), None) => m.clone(),
            (None, Some(n)) => PathBuf::from(n.name()),
            _ => {
                return Err(bad_input(format!(
                    "the {row} row needs --module path/to/orders.wasm (or --native orders)"
                )));
            }
        };
        if self.native.is_none() && !module.is_file() {
            return Err(bad_input(format!(
                "cannot read handler module {}: no such file",
                module.display()
            )));
        }
        Ok(module)
    }

    fn mix(&self) -> anyhow::Result<FaultMix> {
        let mix = FaultMix {
            retry_percent: self.retry_percent,
            reject_percent: self.reject_percent,
        };
        mix.check().map_err(bad_input)?;
        Ok(mix)
    }

    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        if g.source.kind == crate::source::connect::Kind::Kafka || self.kafka_mock {
            return self.kafka(g);
        }
        if matches!(
            g.source.kind,
            crate::source::connect::Kind::RabbitMq
                | crate::source::connect::Kind::Redis
                | crate::source::connect::Kind::Nats
                | crate::source::connect::Kind::Sqs
        ) {
            return self.queue(g);
        }
        if self.count == 0 {
            return Err(bad_input("--count must be at least 1"));
        }
        if self.size > 1 << 20 {
            return Err(bad_input("--size is at most 1MiB for a benchmark"));
        }
        if self.rate == Some(0) {
            return Err(bad_input("--rate must be at least 1 message/s"));
        }
        let module_path = match (&self.options.module, self.native) {
            (Some(_), Some(_)) => {
                return Err(bad_input(
                    "give --module (a component) or --native (a twin in Rust), not both",
                ));
            }
            (None, Some(n)) => PathBuf::from(n.name()),
            (Some(m), None) => m.clone(),
            (None, None) => {
                return Err(bad_input(
                    "weir bench needs --module path/to/handler.wasm (or --native noop|orders)",
                ));
            }
        };
        if self.native.is_none() && !module_path.is_file() {
            return Err(bad_input(format!(
                "cannot read handler module {}: no such file",
                module_path.display()
            )));
        }
        let dir = TempDir::new()?;
        let mut handler_config = g.file.handler_config.clone();
        for pair in &self.handler_config {
            let (k, v) = crate::config::parse_pair("--handler-config", pair)?;
            handler_config.insert(k, v);
        }
        let mut options = self.options.clone();
        options.module = Some(module_path.clone());
        options.topic = Some(vec!["bench".into()]);
        options.group = Some("bench".into());
        options.drain = Some(self.rate.is_none());
        options.admin = Some("off".into());
        let mut settings = crate::config::resolve(
            options,
            handler_config,
            dir.path(),
            &weir_core::topic::Naming::KAFKA,
        )?;
        // Room in the instance pool for the probe's instances, kept alive together.
        settings.host.max_instances = settings
            .host
            .max_instances
            .max(self.probe_instances as u32 + 4);

        // Compile once (fills the compiled cache), then measure what `weir run` does at start.
        let compile_started = Instant::now();
        if self.native.is_none() {
            Module::load(&module_path, &settings.host, crate::source::limits_only())?;
        }
        let compile_ms = ms(compile_started.elapsed());
        let ready_started = Instant::now();
        let log = local::open_owned(dir.path())?;
        let source: Arc<dyn Source> = log.clone();
        let exists = crate::source::output_check(source.clone());
        let module: Handler = match self.native {
            Some(twin) => Handler::Native {
                twin,
                output_topic: Arc::from(
                    settings
                        .host
                        .handler_config
                        .get("output-topic")
                        .map_or("confirmations", String::as_str),
                ),
            },
            None => Module::load(&module_path, &settings.host, exists)?.into(),
        };
        let ready_ms = ms(ready_started.elapsed());

        let retention = self
            .retention
            .change()?
            .apply(weir_core::retention::Retention::FOREVER);
        log.create_topic_retained("bench", self.partitions, retention)?;
        for t in &self.output_topics {
            log.ensure_topic(t, self.partitions)?;
        }
        let (instantiate_us, idle_instance_kib) = probe_instances(&module, self.probe_instances)?;

        let size = self.size;
        let mix = self.mix()?;
        let make = move |range: std::ops::Range<u64>| -> Vec<Record> {
            range
                .map(|i| {
                    let id = format!("m-{i}").into_bytes();
                    Record {
                        key: Some(id.clone()),
                        payload: synthetic_order_mixed(i, size, mix),
                        headers: vec![("idempotency-key".into(), id)],
                        timestamp_ms: None,
                    }
                })
                .collect()
        };
        let produce_started = Instant::now();
        if self.rate.is_none() {
            let mut n = 0u64;
            while n < self.count {
                let chunk = (self.count - n).min(10_000);
                log.append("bench", make(n..n + chunk))
                    .context("producing the messages")?;
                n += chunk;
            }
        }
        let produce_seconds = produce_started.elapsed().as_secs_f64();
        if retention != weir_core::retention::Retention::FOREVER {
            log.keep_retention();
        }
        let dir_peak = Arc::new(std::sync::atomic::AtomicU64::new(0));

        let runtime = super::io_runtime()?;
        let instances = settings.engine.instances;
        let batch_size = settings.engine.batch_size;
        let delivery = match settings.engine.delivery {
            engine::DeliveryMode::AtLeastOnce => "at-least-once",
            engine::DeliveryMode::AtMostOnce => "at-most-once",
        }
        .to_string();
        reset_peak_rss();
        let cpu_before = cpu_seconds();
        let started = Instant::now();
        let stats = Arc::new(Stats::default());
        let count = self.count;
        let handled = {
            let (stats, log) = (stats.clone(), log.clone());
            // Records retention deleted before the run read them are done with too.
            move || {
                stats.processed.load(Ordering::Relaxed)
                    + stats.dead_lettered.load(Ordering::Relaxed)
                    + stats.deduped.load(Ordering::Relaxed)
                    + log.skipped_by_retention()
            }
        };
        let bar = progress_bar(count);
        let summary = runtime.block_on(async {
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            // Latency mode: a producer thread appends at the rate; the run stops once every
            // message is handled.
            let producer = self.rate.map(|rate| {
                let log = log.clone();
                std::thread::spawn(move || -> Result<(), crate::source::SourceError> {
                    let started = Instant::now();
                    let mut sent = 0u64;
                    while sent < count {
                        let due =
                            ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(count);
                        if due > sent {
                            let upto = due.min(sent + 5_000);
                            log.append("bench", make(sent..upto))?;
                            sent = upto;
                        } else {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                    Ok(())
                })
            });
            let watcher = {
                let (handled, bar) = (handled.clone(), bar.clone());
                let drain = self.rate.is_none();
                let (dir, peak) = (dir.path().to_path_buf(), dir_peak.clone());
                tokio::spawn(async move {
                    for tick in 0u64.. {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if tick % 10 == 0 {
                            peak.fetch_max(dir_bytes(&dir), Ordering::Relaxed);
                        }
                        let h = handled();
                        bar.set_position(h);
                        if !drain && h >= count {
                            let _ = stop_tx.send(true);
                            return;
                        }
                    }
                })
            };
            let r = engine::run(
                source,
                module.clone(),
                settings.engine,
                stop_rx,
                stats.clone(),
            )
            .await;
            watcher.abort();
            if let Some(p) = producer {
                p.join()
                    .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?
                    .context("producing at --rate")?;
            }
            r.map_err(anyhow::Error::from)
        })?;
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_before;
        let peak = peak_rss_kib() as f64 / 1024.0;
        runtime.shutdown_timeout(Duration::from_secs(1));
        let handled = summary.processed + summary.dead_lettered + summary.deduped;
        let q = |p: f64| stats.metrics.end_to_end.quantile(p).map(|s| s * 1e3);
        let report = Report {
            module: module_path.display().to_string(),
            module_bytes: std::fs::metadata(&module_path).map_or(0, |m| m.len()),
            mode: if self.rate.is_some() {
                "rate"
            } else {
                "backlog"
            }
            .to_string(),
            rate: self.rate,
            latency_p50_ms: q(0.5),
            latency_p99_ms: q(0.99),
            latency_p999_ms: q(0.999),
            instances_peak: summary.instances_peak,
            entry: match (&module, module.is_batch()) {
                (Handler::Native { .. }, _) => "native",
                (_, true) => "batch-handler",
                (_, false) => "handler",
            },
            messages: self.count,
            message_bytes: self.size,
            partitions: self.partitions,
            instances,
            batch_size,
            delivery,
            compile_ms,
            ready_ms,
            instantiate_us,
            idle_instance_kib,
            produce_seconds,
            seconds,
            messages_per_second: handled as f64 / seconds.max(1e-9),
            mb_per_second: (handled as f64 * self.size as f64) / seconds.max(1e-9) / 1e6,
            us_per_message: seconds * 1e6 / handled.max(1) as f64,
            cpu_seconds: cpu,
            peak_rss_mib: peak,
            processed: summary.processed,
            emitted: summary.emitted,
            dead_lettered: summary.dead_lettered,
            retries: summary.retries,
            retention: retention.describe(),
            skipped_by_retention: log.skipped_by_retention(),
            segments_deleted: log.segments_dropped(),
            data_dir_peak_mib: dir_peak.load(Ordering::Relaxed).max(dir_bytes(dir.path())) as f64
                / (1 << 20) as f64,
        };
        if self.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_report(&report);
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl BenchCommand {
    /// The Kafka row (see [`super::bench_kafka`]).
    fn kafka(self, g: Globals) -> anyhow::Result<ExitCode> {
        if self.rate.is_some() {
            return Err(bad_input(
                "--rate is for the embedded log; the Kafka row measures throughput",
            ));
        }
        let module = self.row_module("Kafka")?;
        let dir = TempDir::new()?;
        let kafka = match g.source.kind {
            crate::source::connect::Kind::Kafka => {
                Some(crate::source::kafka::KafkaConfig::from_spec(&g.source)?)
            }
            _ => None,
        };
        let r = super::bench_kafka::run(super::bench_kafka::Row {
            kafka: kafka.as_ref(),
            module_path: &module,
            native: self.native,
            options: self.options.clone(),
            count: self.count,
            size: self.size,
            partitions: self.partitions,
            mix: self.mix()?,
            data_dir: dir.path(),
        })?;
        if self.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "kafka       {} ({}), {} orders of {} bytes over {} partitions",
                r.brokers,
                if r.mock_cluster {
                    "librdkafka's mock cluster in this process"
                } else {
                    "brokers"
                },
                r.messages,
                r.message_bytes,
                r.partitions
            );
            println!(
                "bare loop   {:.0} msg/s (rdkafka consumer + idempotent producer, native work)",
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
        Ok(ExitCode::SUCCESS)
    }
}

impl BenchCommand {
    /// The RabbitMQ row: weir next to a bare lapin loop on the same server.
    fn queue(self, g: Globals) -> anyhow::Result<ExitCode> {
        let name = g.source.name();
        if self.rate.is_some() {
            return Err(bad_input(format!(
                "--rate is for the embedded log; the {name} row measures throughput"
            )));
        }
        let module = self.row_module(name)?;
        let dir = TempDir::new()?;
        let r = super::bench_queue::run(super::bench_queue::Row {
            spec: &g.source,
            module_path: &module,
            native: self.native,
            options: self.options.clone(),
            count: self.count,
            size: self.size,
            mix: self.mix()?,
            data_dir: dir.path(),
        })?;
        if self.json {
            println!("{}", serde_json::to_string(&r)?);
            return Ok(ExitCode::SUCCESS);
        }
        super::bench_queue::print(&r, g.source.kind);
        Ok(ExitCode::SUCCESS)
    }
}

/// Average time of a new instance, and the resident memory one more costs after it handled a
/// message (the instances are kept alive while measuring).
fn probe_instances(module: &Handler, n: usize) -> anyhow::Result<(f64, f64)> {
    if matches!(module, Handler::Native { .. }) || n == 0 {
        return Ok((0.0, 0.0));
    }
    let mut msg = Delivery {
        topic: Arc::from("bench"),
        partition: 0,
        offset: 0,
        record: Record {
            key: Some(b"m-0".to_vec()),
            payload: synthetic_order(0, 100),
            headers: vec![("idempotency-key".into(), b"m-0".to_vec())],
            timestamp_ms: Some(0),
        },
        redeliveries: 0,
    };
    let runtime = super::local_runtime()?;
    // Warm up the allocator and the pool's first slots.
    drop(
        runtime
            .block_on(module.instantiate())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
    );
    let before = rss_kib();
    let mut kept = Vec::with_capacity(n);
    let mut spent = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        let mut i = runtime
            .block_on(module.instantiate())
            .map_err(|e| anyhow::anyhow!("instantiating the module failed: {e:?}"))?;
        spent += t.elapsed();
        runtime.block_on(i.run(std::slice::from_mut(&mut msg), &[1]));
        kept.push(i);
    }
    let after = rss_kib();
    drop(kept);
    Ok((
        spent.as_secs_f64() * 1e6 / n as f64,
        after.saturating_sub(before) as f64 / n as f64,
    ))
}

/// A progress bar on a terminal; hidden when standard error is not one.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} messages ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// Resets the kernel's peak-RSS mark (Linux 4.0+), so the peak is the run's, not production's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process (from /proc; clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; the first after the name is field 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("weir-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
