use super::Globals;
use crate::config::{RunOptions, parse_pair};
use crate::engine;
use crate::host::Module;
use crate::source::connect::ConsumerOptions;
use crate::source::embedded::local;
use crate::source::{Source, SourceError};
use clap::Args;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Run a handler module over topics of the embedded log (or of a broker, with --source). Acks each message only after the
/// handler succeeded and its outputs were written. Runs until SIGINT/SIGTERM (then commits what
/// finished and exits 0), or with --drain until nothing is left.
#[derive(Debug, Args)]
pub struct RunCommand {
    #[command(flatten)]
    options: RunOptions,
    /// KEY=VALUE the handler reads through its config import; repeat for more (over
    /// `[handler-config]` in the file) [default: none]
    #[arg(long = "handler-config", value_name = "KEY=VALUE")]
    handler_config: Vec<String>,
    /// Print the summary as JSON on standard output
    #[arg(long)]
    json: bool,
    /// Reload the module when its file changes: new work goes to the new module, calls in
    /// flight finish on the old; a file that does not load is refused and the old module
    /// keeps running
    #[arg(long)]
    watch: bool,
}

impl RunCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let json = self.json;
        let mut handler_config = g.file.handler_config;
        for pair in &self.handler_config {
            let (k, v) = parse_pair("--handler-config", pair)?;
            handler_config.insert(k, v);
        }
        let caps = g.source.capabilities();
        let options = self
            .options
            .or(g.file.run)
            .with_batch_default(caps.batch_size);
        let settings =
            crate::config::resolve(options, handler_config, &g.data_dir, &g.source.naming())?;
        // Check the module before touching the data directory: a bad module changes nothing.
        let module_path = settings.module.clone();
        if !module_path.is_file() {
            return Err(super::bad_input(format!(
                "cannot read handler module {}: no such file; build it first (see README)",
                module_path.display()
            )));
        }
        if settings.max_depth.is_some() && !g.source.is_embedded() {
            return Err(super::bad_input(format!(
                "--max-depth applies to the embedded log; on {}, the broker's own limits bound a topic",
                g.source.name()
            )));
        }
        if settings.exactly_once && !caps.transactions {
            return Err(super::bad_input(format!(
                "--exactly-once needs broker transactions, which weir does not use on {} yet; \
                 use --dedupe with a shared store for outputs once per idempotency key",
                g.source.name()
            )));
        }
        if !caps.dedupe_marks
            && settings
                .engine
                .dedupe
                .as_ref()
                .is_some_and(|d| d.store.is_none())
        {
            return Err(super::bad_input(format!(
                "--dedupe on {} needs a store the group's processes share: add --dedupe-store redis://host:port",
                g.source.name()
            )));
        }
        // The embedded log is owned by this process (others reach it through its socket); a
        // broker is shared by every member of the group.
        let (source, log): (Arc<dyn Source>, _) = if g.source.is_embedded() {
            let log = local::open_owned(&g.data_dir)?;
            log.keep_retention();
            (log.clone(), Some(log))
        } else {
            let e = &settings.engine;
            let opts = ConsumerOptions {
                group: e.group.clone(),
                topics: e.topics.clone(),
                retry_topics: match e.retry_mode {
                    engine::RetryMode::Requeue => e.topics.iter().map(|t| e.retry_for(t)).collect(),
                    engine::RetryMode::Blocking => Vec::new(),
                },
                dlq_topics: e.topics.iter().map(|t| e.dlq_for(t)).collect(),
                exactly_once: settings.exactly_once,
                at_most_once: e.delivery == engine::DeliveryMode::AtMostOnce,
                prefetch: e.max_in_flight,
            };
            (g.source.consumer(&opts)?, None)
        };
        for t in &settings.engine.topics {
            source.partitions(t)?;
        }
        let exists = crate::source::output_check(source.clone());
        let module = Module::load(&module_path, &settings.host, exists)?;
        // What the run reads (its topics, their retry topics) and where its dead letters go:
        // not deleted under it through the socket.
        let mut touched = settings.engine.topics.clone();
        for t in &settings.engine.topics {
            touched.push(settings.engine.dlq_for(t));
            touched.push(settings.engine.retry_for(t));
        }
        let served = local::Served {
            max_depth: settings.max_depth,
            group: settings.engine.group.clone(),
            topics: settings.engine.topics.clone(),
            guarded: touched,
        };
        let runtime = super::io_runtime()?;
        let started = Instant::now();
        let stats = Arc::new(engine::Stats::default());
        let loaded_ms = engine::now_ms();
        let reloader: crate::admin::Reloader = {
            let (stats, host, source) = (stats.clone(), settings.host.clone(), source.clone());
            Arc::new(move |path: &std::path::Path| {
                let exists = crate::source::output_check(source.clone());
                match Module::load(path, &host, exists) {
                    Ok(m) => {
                        let (name, digest) = (m.name().to_string(), m.digest().to_string());
                        stats.module.set(m.into());
                        stats.module.reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(module = %name, digest = %digest, path = %path.display(), "module reloaded: new work runs on it, calls in flight finish on the old one");
                        Ok((name, digest))
                    }
                    Err(e) => {
                        stats.module.reload_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(path = %path.display(), error = %e, "module reload refused; the running module stays");
                        Err(e.to_string())
                    }
                }
            })
        };
        let admin = settings.admin.map(|a| {
            (
                a.addr,
                crate::admin::Admin {
                    stats: stats.clone(),
                    source: source.clone(),
                    log: log.clone(),
                    brokers: (!g.source.is_embedded())
                        .then(|| Arc::new(crate::admin::Brokers::new(g.source.clone()))),
                    max_depth: Some(served.clone()),
                    group: settings.engine.group.clone(),
                    topics: settings.engine.topics.clone(),
                    started_ms: loaded_ms,
                    reload: Some(reloader.clone()),
                    reload_dir: a.reload_dir,
                    policy: a.policy,
                },
            )
        });
        let summary = runtime.block_on(async {
            let _admin = match admin {
                None => None,
                Some((addr, admin)) => match crate::admin::serve(admin, addr).await {
                    Ok((bound, task)) => {
                        tracing::info!(address = %format!("http://{bound}"), "admin server listening (metrics, status, dashboard)");
                        Some(AbortOnDrop(task))
                    }
                    Err(e) => {
                        tracing::warn!(address = %addr, error = %e, "cannot start the admin server; running without it (choose another with --admin HOST:PORT, or --admin off)");
                        None
                    }
                },
            };
            let _socket = log.clone().and_then(|log| local::serve(log, served));
            let _watch = self
                .watch
                .then(|| AbortOnDrop(tokio::spawn(watch(module_path.clone(), reloader))));
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            // A failed write to the data directory (disk full, I/O error) stops the run: the
            // log takes no more writes, so nothing more can be committed.
            let _storage = log.clone().map(|log| {
                let stop = stop_tx.clone();
                AbortOnDrop(tokio::spawn(async move {
                    log.failed().await;
                    tracing::error!("stopping: the data directory cannot be written");
                    let _ = stop.send(true);
                }))
            });
            // Owns the signal handlers; flips the shutdown flag every partition task watches.
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down: finishing in-flight calls and committing");
                let _ = stop_tx.send(true);
            });
            engine::run(source, module, settings.engine, stop_rx, stats).await
        })?;
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        if let Some(first) = log.as_ref().and_then(|l| l.failure()) {
            return Err(SourceError::Storage {
                dir: g.data_dir.display().to_string(),
                detail: format!(
                    "{first}; the run stopped. Free space (or fix the disk), then start it \
                     again: what was committed is kept, the rest runs again"
                ),
            }
            .into());
        }
        let secs = started.elapsed().as_secs_f64();
        if json {
            let mut v = serde_json::to_value(summary)?;
            v["seconds"] = serde_json::json!(secs);
            println!("{v}");
        } else {
            eprintln!(
                "processed {} message(s), emitted {}, failed {} (dead-lettered), retried {}, instance faults {}, duplicates skipped {} in {:.2}s ({:.0} msg/s)",
                summary.processed,
                summary.emitted,
                summary.dead_lettered,
                summary.retries,
                summary.faults,
                summary.deduped,
                secs,
                (summary.processed + summary.dead_lettered + summary.deduped) as f64
                    / secs.max(1e-9)
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// How often `--watch` looks at the module file.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// `--watch`: reloads the module when its file's size or modification time changes and then
/// holds still for one more look (so a file being written is not loaded half-way).
async fn watch(path: std::path::PathBuf, reload: crate::admin::Reloader) {
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut loaded = stamp(&path);
    let mut seen = loaded;
    tracing::info!(path = %path.display(), "watching the module file for changes");
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let now = stamp(&path);
        if now.is_some() && now != loaded && now == seen {
            loaded = now;
            let (p, r) = (path.clone(), reload.clone());
            let _ = tokio::task::spawn_blocking(move || r(&p)).await;
        }
        seen = now;
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
