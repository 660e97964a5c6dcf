use super::Globals;
use crate::config::RunOverrides;
use crate::engine::{self, DeliveryMode, RetryMode, retry::Jitter};
use crate::host::Module;
use crate::source::Source;
use crate::source::embedded::local;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Run a handler module over topics of the embedded log. Acks each message only after the
/// handler succeeded and its outputs were written. Runs until SIGINT/SIGTERM (then commits what
/// finished and exits 0), or with --drain until nothing is left.
#[derive(Debug, Args)]
pub struct RunCommand {
    /// The handler component (.wasm) [env: WEIR_MODULE]
    #[arg(long, env = "WEIR_MODULE")]
    module: Option<PathBuf>,
    /// Topic to consume; repeat for more [env: WEIR_TOPIC, comma-separated]
    #[arg(long, env = "WEIR_TOPIC", value_delimiter = ',')]
    topic: Vec<String>,
    /// Consumer group: where committed offsets are kept [env: WEIR_GROUP]
    #[arg(long, env = "WEIR_GROUP")]
    group: Option<String>,
    /// Exit 0 once every partition is consumed to its end and nothing is in flight [default: off]
    #[arg(long, env = "WEIR_DRAIN")]
    drain: bool,
    /// Messages per fetch and per call into the handler [default: 256]
    #[arg(long, env = "WEIR_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Handler instances running at once [default: number of CPUs]
    #[arg(long, env = "WEIR_INSTANCES")]
    instances: Option<usize>,
    /// Linear memory one instance may use [default: 64MiB]
    #[arg(long, env = "WEIR_MEMORY_LIMIT")]
    memory_limit: Option<String>,
    /// Longest time one message may run in the handler [default: 5s]
    #[arg(long, env = "WEIR_CALL_TIMEOUT")]
    call_timeout: Option<String>,
    /// Attempts per message, the first included, before it is dead-lettered [default: 5]
    #[arg(long, env = "WEIR_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
    /// Wait before the first retry [default: 100ms]
    #[arg(long, env = "WEIR_BACKOFF_BASE")]
    backoff_base: Option<String>,
    /// Longest wait between attempts, also the cap on a handler's requested delay [default: 30s]
    #[arg(long, env = "WEIR_BACKOFF_MAX")]
    backoff_max: Option<String>,
    /// Growth of the wait per attempt [default: 2]
    #[arg(long, env = "WEIR_BACKOFF_FACTOR")]
    backoff_factor: Option<f64>,
    /// Randomisation of the wait [default: full]
    #[arg(long, env = "WEIR_JITTER", value_enum)]
    jitter: Option<Jitter>,
    /// Dead-letter topic; `{topic}` stands for the consumed topic [default: {topic}.dlq]
    #[arg(long, env = "WEIR_DLQ_TOPIC")]
    dlq_topic: Option<String>,
    /// What a retryable failure does: `blocking` retries in place (the key waits, other keys go
    /// on); `requeue` acks and republishes to the retry topic (nothing waits, order is lost)
    /// [default: blocking]
    #[arg(long, env = "WEIR_RETRY_MODE", value_enum)]
    retry_mode: Option<RetryMode>,
    /// Retry topic for requeue mode; `{topic}` stands for the consumed topic [default: {topic}.retry]
    #[arg(long, env = "WEIR_RETRY_TOPIC")]
    retry_topic: Option<String>,
    /// `at-least-once`: ack after success; `at-most-once`: ack before invoking, never retry
    /// [default: at-least-once]
    #[arg(long, env = "WEIR_DELIVERY", value_enum)]
    delivery: Option<DeliveryMode>,
    /// Key-ordered lanes per partition (messages of one key share a lane) [default: --instances]
    #[arg(long, env = "WEIR_LANES")]
    lanes: Option<usize>,
    /// Messages fetched and unfinished per partition before fetching pauses
    /// [default: 2 × batch size × lanes]
    #[arg(long, env = "WEIR_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    /// KEY=VALUE the handler reads through its config import; repeat for more [default: none]
    #[arg(long = "handler-config", value_name = "KEY=VALUE")]
    handler_config: Vec<String>,
    /// Print the summary as JSON on standard output
    #[arg(long)]
    json: bool,
}

impl RunCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let json = self.json;
        let overrides = RunOverrides {
            module: self.module,
            topic: self.topic,
            group: self.group,
            drain: self.drain,
            batch_size: self.batch_size,
            instances: self.instances,
            memory_limit: self.memory_limit,
            call_timeout: self.call_timeout,
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            backoff_factor: self.backoff_factor,
            jitter: self.jitter,
            dlq_topic: self.dlq_topic,
            retry_mode: self.retry_mode,
            retry_topic: self.retry_topic,
            delivery: self.delivery,
            lanes: self.lanes,
            max_in_flight: self.max_in_flight,
            handler_config: self.handler_config,
        };
        let settings = overrides.resolve(g.file, &g.data_dir)?;
        // Check the module before touching the data directory: a bad module changes nothing.
        let module_path = settings.module.clone();
        if !module_path.is_file() {
            return Err(super::bad_input(format!(
                "cannot read handler module {}: no such file; build it first (see README)",
                module_path.display()
            )));
        }
        let log = local::open_owned(&g.data_dir)?;
        for t in &settings.engine.topics {
            log.partitions(t)?;
        }
        let exists = {
            let log = log.clone();
            Arc::new(move |t: &str| log.topic_exists(t))
        };
        let module = Module::load(&module_path, &settings.host, exists)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("weir-io")
            .build()
            .context("starting the async runtime")?;
        let started = Instant::now();
        let summary = runtime.block_on(async {
            let _socket = local::serve(log.clone());
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            // Owns the signal handlers; flips the shutdown flag every partition task watches.
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down: finishing in-flight calls and committing");
                let _ = stop_tx.send(true);
            });
            let source: Arc<dyn Source> = log.clone();
            engine::run(source, module, settings.engine, stop_rx, Default::default()).await
        })?;
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        let secs = started.elapsed().as_secs_f64();
        if json {
            let mut v = serde_json::to_value(summary)?;
            v["seconds"] = serde_json::json!(secs);
            println!("{v}");
        } else {
            eprintln!(
                "processed {} message(s), emitted {}, failed {} (dead-lettered), retried {}, instance faults {} in {:.2}s ({:.0} msg/s)",
                summary.processed,
                summary.emitted,
                summary.dead_lettered,
                summary.retries,
                summary.faults,
                secs,
                (summary.processed + summary.dead_lettered) as f64 / secs.max(1e-9)
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
