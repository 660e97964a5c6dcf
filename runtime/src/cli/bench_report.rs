//! What `weir bench` reports, and how it prints it.

use serde::Serialize;
use std::path::Path;

/// What `weir bench` reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub module: String,
    pub module_bytes: u64,
    /// `backlog` (produced first, drained at full speed) or `rate` (appended at --rate while
    /// consuming).
    pub mode: String,
    pub rate: Option<u64>,
    pub entry: &'static str,
    pub messages: u64,
    pub message_bytes: usize,
    pub partitions: u32,
    pub instances: usize,
    pub batch_size: usize,
    pub delivery: String,
    /// First load: compile and write the compiled cache.
    pub compile_ms: f64,
    /// `weir run` ready: data directory open and module loaded from the compiled cache.
    pub ready_ms: f64,
    /// A new instance from the pre-instantiated component.
    pub instantiate_us: f64,
    /// Resident memory one more instance costs after handling one message.
    pub idle_instance_kib: f64,
    /// Producing the messages (durable appends).
    pub produce_seconds: f64,
    /// The run: from start to the last commit of the drained topic.
    pub seconds: f64,
    pub messages_per_second: f64,
    pub mb_per_second: f64,
    /// Per message, wall time of the run over the messages.
    pub us_per_message: f64,
    /// CPU time (user + system) the process used during the run.
    pub cpu_seconds: f64,
    /// Peak resident memory during the run.
    pub peak_rss_mib: f64,
    /// Append to ack, from the run's histogram: the upper bounds of the buckets the
    /// percentiles fall in (append timestamps have millisecond precision).
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_p999_ms: Option<f64>,
    /// Most instances that ran at once.
    pub instances_peak: usize,
    pub processed: u64,
    pub emitted: u64,
    pub dead_lettered: u64,
    pub retries: u64,
    /// The input topic's retention (`forever` without the flags).
    pub retention: String,
    /// Records the group never read because retention deleted them first.
    pub skipped_by_retention: u64,
    /// Segments retention deleted during the run.
    pub segments_deleted: u64,
    /// The data directory's largest size, sampled every second during the run.
    pub data_dir_peak_mib: f64,
}

pub(super) fn print_report(r: &Report) {
    println!(
        "module      {} ({} bytes, {})",
        r.module, r.module_bytes, r.entry
    );
    println!(
        "load        compile {:.0} ms; ready from the compiled cache {:.1} ms; new instance {:.1} µs; idle instance {:.0} KiB",
        r.compile_ms, r.ready_ms, r.instantiate_us, r.idle_instance_kib
    );
    println!(
        "input       {} messages of {} bytes over {} partitions (produced in {:.2}s)",
        r.messages, r.message_bytes, r.partitions, r.produce_seconds
    );
    println!(
        "run         {} instances, batch {}, {}",
        r.instances, r.batch_size, r.delivery
    );
    println!(
        "result      {:.0} msg/s, {:.1} MB/s, {:.2} µs/msg; {:.2}s wall, {:.2}s CPU; peak RSS {:.0} MiB",
        r.messages_per_second,
        r.mb_per_second,
        r.us_per_message,
        r.seconds,
        r.cpu_seconds,
        r.peak_rss_mib
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("<={v:.2} ms"));
    println!(
        "latency     append to ack: p50 {}, p99 {}, p99.9 {} ({} mode{})",
        ms(r.latency_p50_ms),
        ms(r.latency_p99_ms),
        ms(r.latency_p999_ms),
        r.mode,
        r.rate.map(|r| format!(", {r} msg/s")).unwrap_or_default()
    );
    println!(
        "outcomes    processed {}, emitted {}, dead-lettered {}, retried {}; peak instances {}",
        r.processed, r.emitted, r.dead_lettered, r.retries, r.instances_peak
    );
    println!(
        "storage     input keeps {}; {} segments deleted, {} records skipped; data directory at most {:.0} MiB",
        r.retention, r.segments_deleted, r.skipped_by_retention, r.data_dir_peak_mib
    );
}

/// Bytes the files under `dir` take on disk (allocated blocks, as `du` counts them). Not their
/// lengths: fjall sets each new journal file's length to 64 MiB before writing it, and a length
/// counts those 64 MiB while the disk holds only what was written (in docs/performance.md's
/// 30-minute retention run, 654 MiB at most by length, 589 MiB by blocks).
pub(super) fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                Err(_) => {}
            }
        }
    }
    total
}
