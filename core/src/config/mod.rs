//! Configuration: `weir.toml`, command-line flags and `WEIR_*` variables, under one set of
//! names (`--batch-size`, `batch-size = ...`, `WEIR_BATCH_SIZE`). A flag or variable wins over
//! the file; the file wins over the default. Everything is checked here ([`RunOptions::check`]),
//! before anything runs, so a bad value is reported with its name and never half-way through
//! a run; the runtime builds its settings from what passed.

use crate::retry::Jitter;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem: names the setting (and the file) and says what is expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The default data directory.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from("./weir-data")
}

/// `weir.toml`. Unknown keys are errors, so a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub run: RunOptions,
    /// What the handler reads through its `config` import.
    #[serde(default)]
    pub handler_config: BTreeMap<String, String>,
    /// Where the topics live when not in the embedded log: `[source]`.
    #[serde(default)]
    pub source: SourceFile,
}

/// `[source]` of `weir.toml`: `url = "amqp://..."` (as `--source`) and `[source.properties]`
/// (as `--source-property`), and a table per broker whose settings apply only when the URL
/// names that broker, so one file can hold several (switch with `--source`):
/// `[source.rabbitmq]` (`queue-type = "quorum"`) and `[source.kafka]` (`brokers`, and
/// librdkafka's settings under `[source.kafka.properties]`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SourceFile {
    pub url: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    pub kafka: Option<KafkaFile>,
    /// `[source.rabbitmq]`: `--source-property` settings for `amqp://` and `amqps://`.
    #[serde(default)]
    pub rabbitmq: BTreeMap<String, String>,
}

impl SourceFile {
    /// The settings for the source at `url` (`None`: the embedded log): `[source.properties]`,
    /// then the table of the broker the URL names.
    pub fn properties_for(&self, url: Option<&str>) -> BTreeMap<String, String> {
        let mut out = self.properties.clone();
        let scheme = url
            .and_then(|u| u.trim().split_once("://"))
            .map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("kafka") => {
                if let Some(k) = &self.kafka {
                    out.extend(k.properties.clone());
                }
            }
            Some("amqp" | "amqps") => out.extend(self.rabbitmq.clone()),
            _ => {}
        }
        out
    }
}

/// `[source.kafka]`: `brokers = "host:port,..."` and `[source.kafka.properties]`, any
/// librdkafka property (`"security.protocol" = "SASL_SSL"`, ...).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KafkaFile {
    pub brokers: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `weir run`'s settings as given: the `[run]` table of `weir.toml`, the command-line flags and
/// the `WEIR_*` variables are this one struct, so their names cannot drift apart. Every field is
/// optional here; [`RunOptions::or`] layers flags over the file and [`RunOptions::resolve`]
/// applies the defaults and validates.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunOptions {
    /// The handler component (.wasm)
    #[arg(long, env = "WEIR_MODULE")]
    pub module: Option<PathBuf>,
    /// Topic to consume; repeat for more (WEIR_TOPIC: comma-separated)
    #[arg(long, env = "WEIR_TOPIC", value_delimiter = ',')]
    pub topic: Option<Vec<String>>,
    /// Consumer group: where committed offsets are kept
    #[arg(long, env = "WEIR_GROUP")]
    pub group: Option<String>,
    /// Topics whose messages an idle instance takes first, highest first (urgent,routine);
    /// consumed topics not named come after them [default: all alike]
    #[arg(long, env = "WEIR_PRIORITY", value_delimiter = ',')]
    pub priority: Option<Vec<String>>,
    /// With --priority: share the instances by these weights, one per named topic (8,1),
    /// instead of strictly (where a lower topic waits while a higher one has work ready)
    #[arg(long, env = "WEIR_PRIORITY_WEIGHTS", value_delimiter = ',')]
    pub priority_weights: Option<Vec<u32>>,
    /// Exit 0 once every partition is consumed to its end and nothing is in flight [default: off]
    #[arg(long, env = "WEIR_DRAIN", num_args = 0..=1, default_missing_value = "true")]
    pub drain: Option<bool>,
    /// Messages per fetch and per call into the handler [default: 256]
    #[arg(long, env = "WEIR_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Handler instances running at once [default: number of CPUs]
    #[arg(long, env = "WEIR_INSTANCES")]
    pub instances: Option<usize>,
    /// Scale handler instances against consumer lag, from this many [default: 1 when
    /// --max-instances is given]
    #[arg(long, env = "WEIR_MIN_INSTANCES")]
    pub min_instances: Option<usize>,
    /// Scale handler instances against consumer lag, up to this many (instead of a fixed
    /// --instances) [default: off]
    #[arg(long, env = "WEIR_MAX_INSTANCES")]
    pub max_instances: Option<usize>,
    /// With scaling: run enough instances to clear the backlog within this long [default: 10s]
    #[arg(long, env = "WEIR_TARGET_DRAIN")]
    pub target_drain: Option<String>,
    /// With scaling: let instances go only after the backlog has been low this long
    /// [default: 30s]
    #[arg(long, env = "WEIR_SCALE_DOWN_DELAY")]
    pub scale_down_delay: Option<String>,
    /// The admin HTTP server (metrics, probes, status, dashboard): HOST:PORT, or `off`
    /// [default: 127.0.0.1:9464]
    #[arg(long, env = "WEIR_ADMIN")]
    pub admin: Option<String>,
    /// Admin server: writes (ingest, reload) need `Authorization: Bearer TOKEN` [default: none,
    /// and writes need only come from the server's own origin]
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Admin server: a host name it answers to besides IP addresses and localhost (for
    /// example the name a proxy or a Kubernetes service reaches it by); repeatable
    /// [default: none]
    #[arg(long, env = "WEIR_ADMIN_ALLOW_HOST", value_delimiter = ',')]
    pub admin_allow_host: Option<Vec<String>>,
    /// Admin server: `POST /module` loads modules from this directory only [default: the
    /// directory of --module]
    #[arg(long, env = "WEIR_RELOAD_DIR")]
    pub reload_dir: Option<PathBuf>,
    /// Embedded log: refuse appends through this run (`weir produce`, which then waits and
    /// retries) to a consumed topic while it holds more than this many uncommitted messages
    /// [default: no limit]
    #[arg(long, env = "WEIR_MAX_DEPTH")]
    pub max_depth: Option<u64>,
    /// Key-ordered lanes per partition (messages of one key share a lane)
    /// [default: --instances, or --max-instances when scaling]
    #[arg(long, env = "WEIR_LANES")]
    pub lanes: Option<usize>,
    /// Messages fetched and unfinished per partition before fetching pauses
    /// [default: 2 × batch size × lanes]
    #[arg(long, env = "WEIR_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Bytes (key, payload, headers) fetched and unfinished per partition before fetching
    /// pauses, so that large messages are bounded too [default: 64MiB]
    #[arg(long, env = "WEIR_MAX_IN_FLIGHT_BYTES")]
    pub max_in_flight_bytes: Option<String>,
    /// Where compiled handler modules are kept, so a restart loads one in milliseconds instead
    /// of compiling it again; runs with several data directories may share one (entries are
    /// keyed by the module's digest and the engine's settings) [default: DATA_DIR/compiled]
    #[arg(long, env = "WEIR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Linear memory one instance may use [default: 64MiB]
    #[arg(long, env = "WEIR_MEMORY_LIMIT")]
    pub memory_limit: Option<String>,
    /// Longest time one message may run in the handler [default: 5s]
    #[arg(long, env = "WEIR_CALL_TIMEOUT")]
    pub call_timeout: Option<String>,
    /// Let the handler send HTTP requests (wasi:http) to HOST, or only to HOST:PORT; repeat
    /// for more (WEIR_ALLOW_HTTP: comma-separated) [default: none: every request is refused]
    #[arg(long, env = "WEIR_ALLOW_HTTP", value_delimiter = ',')]
    pub allow_http: Option<Vec<String>>,
    /// Attempts per message, the first included, before it is dead-lettered [default: 5]
    #[arg(long, env = "WEIR_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Wait before the first retry [default: 100ms]
    #[arg(long, env = "WEIR_BACKOFF_BASE")]
    pub backoff_base: Option<String>,
    /// Longest wait between attempts, also the cap on a handler's requested delay [default: 30s]
    #[arg(long, env = "WEIR_BACKOFF_MAX")]
    pub backoff_max: Option<String>,
    /// Growth of the wait per attempt [default: 2]
    #[arg(long, env = "WEIR_BACKOFF_FACTOR")]
    pub backoff_factor: Option<f64>,
    /// Randomisation of the wait [default: full]
    #[arg(long, env = "WEIR_JITTER", value_enum)]
    pub jitter: Option<Jitter>,
    /// What a retryable failure does: `blocking` retries in place (the key waits, other keys go
    /// on); `requeue` acks and republishes to the retry topic (nothing waits, order is lost)
    /// [default: blocking]
    #[arg(long, env = "WEIR_RETRY_MODE", value_enum)]
    pub retry_mode: Option<RetryMode>,
    /// Retry topic for requeue mode; `{topic}` stands for the consumed topic [default: the
    /// broker's; {topic}.retry on every broker weir speaks today]
    #[arg(long, env = "WEIR_RETRY_TOPIC")]
    pub retry_topic: Option<String>,
    /// Dead-letter topic; `{topic}` stands for the consumed topic [default: the broker's;
    /// {topic}.dlq on every broker weir speaks today]
    #[arg(long, env = "WEIR_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// `at-least-once`: ack after success; `at-most-once`: ack before invoking, never retry
    /// [default: at-least-once]
    #[arg(long, env = "WEIR_DELIVERY", value_enum)]
    pub delivery: Option<DeliveryMode>,
    /// Idempotency key for dedupe: `header` (--dedupe-header), `key` (the message key),
    /// `payload` (a SHA-256 of the payload), or `off` [default: off]
    #[arg(long, env = "WEIR_DEDUPE", value_enum)]
    pub dedupe: Option<DedupeMode>,
    /// Header that holds the idempotency key, with `--dedupe header` [default: idempotency-key]
    #[arg(long, env = "WEIR_DEDUPE_HEADER")]
    pub dedupe_header: Option<String>,
    /// How long a handled idempotency key is remembered [default: 24h]
    #[arg(long, env = "WEIR_DEDUPE_WINDOW")]
    pub dedupe_window: Option<String>,
    /// Where dedupe keeps its marks: `embedded` (with the embedded log, in the same atomic
    /// write as outputs and offsets) or `redis://host:port[/db]`, shared by several processes
    /// (required on Kafka) [default: embedded]
    #[arg(long, env = "WEIR_DEDUPE_STORE")]
    pub dedupe_store: Option<String>,
    /// Kafka: commit each batch's outputs, dead letters and consumer offsets in one
    /// transaction, so `read_committed` readers see every input's outputs once. The embedded
    /// log always does this. [default: off]
    #[arg(long, env = "WEIR_EXACTLY_ONCE", num_args = 0..=1, default_missing_value = "true")]
    pub exactly_once: Option<bool>,
    /// Kafka: how long revoked partitions may take to finish their in-flight messages and
    /// commit before they are let go (keep it under the group's rebalance timeout) [default: 15s]
    #[arg(long, env = "WEIR_REVOKE_TIMEOUT")]
    pub revoke_timeout: Option<String>,
}

/// Where dedupe takes the idempotency key from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DedupeMode {
    Off,
    Header,
    Key,
    Payload,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        FileConfig::parse(&text, path)
    }

    /// Parses the text of the config file at `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            ConfigError(
                format!("config file {}: {}", path.display(), e.message().trim_end())
                    .replace('\n', " "),
            )
            .with_span(text, e.span())
        })
    }
}

impl ConfigError {
    fn with_span(self, text: &str, span: Option<std::ops::Range<usize>>) -> ConfigError {
        match span {
            Some(s) => {
                let line = text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                let what = text.get(s.clone()).unwrap_or("").trim();
                ConfigError(format!("{} (line {line}: `{what}`)", self.0))
            }
            None => self,
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h`, `7d` (a bare number is milliseconds).
pub fn parse_duration(name: &str, s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        ConfigError(format!(
            "{name}: `{s}` is not a duration; write it like 250ms, 5s or 2m"
        ))
    })?;
    let secs = match unit.trim() {
        "" | "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => {
            return Err(ConfigError(format!(
                "{name}: unknown unit `{other}` in `{s}`; use ms, s, m, h or d"
            )));
        }
    };
    if !secs.is_finite() || secs > 86_400.0 * 365.0 {
        return Err(ConfigError(format!("{name}: `{s}` is out of range")));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `64MiB`, `512KiB`, `1GiB`, `1000000` (bytes).
pub fn parse_size(name: &str, s: &str) -> Result<usize, ConfigError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| {
        ConfigError(format!(
            "{name}: `{s}` is not a size; write it like 64MiB or 1GiB"
        ))
    })?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        "TiB" | "T" | "TB" => 1 << 40,
        other => {
            return Err(ConfigError(format!(
                "{name}: unknown unit `{other}` in `{s}`; use KiB, MiB, GiB or TiB"
            )));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError(format!("{name}: `{s}` is too large")))
}

/// Parses `KEY=VALUE`.
pub fn parse_pair(name: &str, s: &str) -> Result<(String, String), ConfigError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(ConfigError(format!("{name}: `{s}` is not KEY=VALUE"))),
    }
}

/// Defaults of `weir run`, named so `--help`, the README and the code agree.
pub mod defaults {
    pub const BATCH_SIZE: usize = 256;
    pub const MEMORY_LIMIT: &str = "64MiB";
    pub const CALL_TIMEOUT: &str = "5s";
    pub const MAX_ATTEMPTS: u32 = 5;
    pub const BACKOFF_BASE: &str = "100ms";
    pub const BACKOFF_MAX: &str = "30s";
    pub const BACKOFF_FACTOR: f64 = 2.0;
    pub const DEDUPE_HEADER: &str = "idempotency-key";
    pub const DEDUPE_WINDOW: &str = "24h";
    pub const REVOKE_TIMEOUT: &str = "15s";
    pub const TARGET_DRAIN: &str = "10s";
    pub const ADMIN: &str = "127.0.0.1:9464";
    pub const SCALE_DOWN_DELAY: &str = "30s";
    /// Bytes in flight per partition: a few batches of ordinary messages, and a handful of
    /// large ones.
    pub const MAX_IN_FLIGHT_BYTES: &str = "64MiB";
    /// Lanes per partition default to the number of instances, so one partition can keep
    /// every instance busy.
    pub fn lanes(instances: usize) -> usize {
        instances
    }
    /// In flight per partition: enough for every lane to have a batch running and one waiting.
    pub fn max_in_flight(batch_size: usize, lanes: usize) -> usize {
        batch_size * lanes * 2
    }
    /// Instances default to the number of CPUs.
    pub fn instances() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// What a retryable failure does to the message.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum RetryMode {
    /// Retry in place after the backoff; later messages of the same lane (key) wait, other
    /// lanes go on. Per-key order is kept.
    Blocking,
    /// Ack it and republish it to the retry topic with a not-before time; nothing waits.
    /// Throughput is kept, order is not.
    Requeue,
}

/// When a message is acked relative to its handling.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// Ack after the handler succeeded and its outputs were written (or it was dead-lettered).
    AtLeastOnce,
    /// Ack when fetched, before the handler runs: never redelivered, never retried; a failure
    /// is dead-lettered, and a crash loses what was in flight.
    AtMostOnce,
}

/// Where the idempotency key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The value of this header.
    Header(String),
    /// The message key.
    MessageKey,
    /// SHA-256 of the payload.
    PayloadHash,
}

/// Scaling instances against lag (`--min-instances`/`--max-instances`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalerConfig {
    pub min: usize,
    pub max: usize,
    /// Clear the backlog within this long.
    pub target_drain: Duration,
    /// Scale down only to the highest recommendation of this last stretch of time.
    pub stabilization: Duration,
    /// Weight of the newest sample in the service-rate moving average (0..=1].
    pub rate_smoothing: f64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            min: 1,
            max: 64,
            target_drain: Duration::from_secs(10),
            stabilization: Duration::from_secs(30),
            rate_smoothing: 0.5,
        }
    }
}

mod check;
mod priority;
pub use check::{Checked, CheckedAdmin, parse_allow_http};
pub use priority::Priority;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_units() {
        assert_eq!(
            parse_duration("x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("x", "5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("x", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("x", "40").unwrap(),
            Duration::from_millis(40)
        );
        assert!(
            parse_duration("x", "5 parsecs")
                .unwrap_err()
                .0
                .contains("unknown unit")
        );
        assert!(parse_duration("x", "").is_err());
        assert_eq!(parse_size("x", "64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("x", "1024").unwrap(), 1024);
        assert!(parse_size("x", "99999999999999999999GiB").is_err());
    }

    #[test]
    fn each_brokers_table_applies_only_to_its_urls() {
        let f: SourceFile = toml::from_str(
            r#"
            url = "amqp://h/v"
            properties = { shared = "1" }
            rabbitmq = { queue-type = "quorum" }
            kafka = { brokers = "k:9092", properties = { "security.protocol" = "SSL" } }
            "#,
        )
        .unwrap();
        let keys =
            |url: Option<&str>| -> Vec<String> { f.properties_for(url).into_keys().collect() };
        // (URL, the settings it gets)
        let cases: &[(Option<&str>, &[&str])] = &[
            (Some("amqp://h/v"), &["queue-type", "shared"]),
            (Some("AMQPS://h/v"), &["queue-type", "shared"]),
            (Some("kafka://k:9092"), &["security.protocol", "shared"]),
            (Some("embedded"), &["shared"]),
            (None, &["shared"]),
        ];
        for (url, want) in cases {
            assert_eq!(keys(*url), *want, "{url:?}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors_that_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, "[run]\nbatch-sise = 5\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().0;
        assert!(
            err.contains("batch-sise") && err.contains("line 2"),
            "{err}"
        );
    }
}
