//! Configuration: `weir.toml`, command-line flags and `WEIR_*` variables, under one set of
//! names (`--batch-size`, `batch-size = ...`, `WEIR_BATCH_SIZE`). A flag or variable wins over
//! the file; the file wins over the default. Everything is validated here, before anything
//! runs, so a bad value is reported with its name and never half-way through a run.

use crate::engine::dedupe::{DedupeConfig, KeySource};
use crate::engine::retry::{Backoff, Jitter};
use crate::engine::{DeliveryMode, RetryMode};
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
/// (as `--source-property`); `[source.kafka]` is the older spelling for Kafka.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SourceFile {
    pub url: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    pub kafka: Option<KafkaFile>,
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
    /// Retry topic for requeue mode; `{topic}` stands for the consumed topic [default: {topic}.retry]
    #[arg(long, env = "WEIR_RETRY_TOPIC")]
    pub retry_topic: Option<String>,
    /// Dead-letter topic; `{topic}` stands for the consumed topic [default: {topic}.dlq]
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

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number is milliseconds).
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
        other => {
            return Err(ConfigError(format!(
                "{name}: unknown unit `{other}` in `{s}`; use ms, s, m or h"
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
        other => {
            return Err(ConfigError(format!(
                "{name}: unknown unit `{other}` in `{s}`; use KiB, MiB or GiB"
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
    pub const DLQ_TOPIC: &str = "{topic}.dlq";
    pub const RETRY_TOPIC: &str = "{topic}.retry";
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

/// The admin server's settings, validated.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Who may call it.
    pub policy: crate::admin::Policy,
    /// Where `POST /module` may load modules from.
    pub reload_dir: PathBuf,
}

/// `weir run`'s settings after merging and validation.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub module: PathBuf,
    /// `--max-depth`: the most uncommitted messages a consumed topic may hold before appends
    /// through this run are told to slow down.
    pub max_depth: Option<u64>,
    /// The admin server; `None`: off.
    pub admin: Option<AdminSettings>,
    pub exactly_once: bool,
    pub engine: crate::engine::EngineConfig,
    pub host: crate::host::HostConfig,
}

impl RunOptions {
    /// The source's own default batch size where it has one ([`Capabilities::batch_size`]),
    /// under what the user set.
    ///
    /// [`Capabilities::batch_size`]: crate::source::Capabilities::batch_size
    pub fn with_source_defaults(mut self, caps: &crate::source::Capabilities) -> RunOptions {
        self.batch_size = self.batch_size.or(caps.batch_size);
        self
    }

    /// These options, with `lower`'s filling the gaps (flags over the file).
    pub fn or(self, lower: RunOptions) -> RunOptions {
        RunOptions {
            module: self.module.or(lower.module),
            topic: self.topic.or(lower.topic),
            group: self.group.or(lower.group),
            drain: self.drain.or(lower.drain),
            batch_size: self.batch_size.or(lower.batch_size),
            instances: self.instances.or(lower.instances),
            min_instances: self.min_instances.or(lower.min_instances),
            max_instances: self.max_instances.or(lower.max_instances),
            target_drain: self.target_drain.or(lower.target_drain),
            scale_down_delay: self.scale_down_delay.or(lower.scale_down_delay),
            max_depth: self.max_depth.or(lower.max_depth),
            admin: self.admin.or(lower.admin),
            admin_token: self.admin_token.or(lower.admin_token),
            admin_allow_host: self.admin_allow_host.or(lower.admin_allow_host),
            reload_dir: self.reload_dir.or(lower.reload_dir),
            lanes: self.lanes.or(lower.lanes),
            max_in_flight: self.max_in_flight.or(lower.max_in_flight),
            max_in_flight_bytes: self.max_in_flight_bytes.or(lower.max_in_flight_bytes),
            cache_dir: self.cache_dir.or(lower.cache_dir),
            memory_limit: self.memory_limit.or(lower.memory_limit),
            call_timeout: self.call_timeout.or(lower.call_timeout),
            allow_http: self.allow_http.or(lower.allow_http),
            max_attempts: self.max_attempts.or(lower.max_attempts),
            backoff_base: self.backoff_base.or(lower.backoff_base),
            backoff_max: self.backoff_max.or(lower.backoff_max),
            backoff_factor: self.backoff_factor.or(lower.backoff_factor),
            jitter: self.jitter.or(lower.jitter),
            retry_mode: self.retry_mode.or(lower.retry_mode),
            retry_topic: self.retry_topic.or(lower.retry_topic),
            dlq_topic: self.dlq_topic.or(lower.dlq_topic),
            delivery: self.delivery.or(lower.delivery),
            dedupe: self.dedupe.or(lower.dedupe),
            dedupe_header: self.dedupe_header.or(lower.dedupe_header),
            dedupe_window: self.dedupe_window.or(lower.dedupe_window),
            dedupe_store: self.dedupe_store.or(lower.dedupe_store),
            exactly_once: self.exactly_once.or(lower.exactly_once),
            revoke_timeout: self.revoke_timeout.or(lower.revoke_timeout),
        }
    }

    /// Applies the defaults and validates everything; `handler_config` is what the handler's
    /// `config` import will see.
    pub fn resolve(
        self,
        handler_config: BTreeMap<String, String>,
        data_dir: &Path,
    ) -> Result<RunSettings, ConfigError> {
        let module = self
            .module
            .ok_or_else(|| ConfigError("no handler module: pass --module handler.wasm (or `module` under [run] in weir.toml)".into()))?;
        let topics = self.topic.unwrap_or_default();
        if topics.is_empty() {
            return Err(ConfigError(
                "no topic to consume: pass --topic NAME (or `topic = [...]` under [run])".into(),
            ));
        }
        for t in &topics {
            crate::source::embedded::validate_topic_name(t)
                .map_err(|e| ConfigError(format!("--topic: {e}")))?;
        }
        let group = self.group.ok_or_else(|| {
            ConfigError("no consumer group: pass --group NAME (or `group` under [run])".into())
        })?;
        if group.is_empty() || group.contains('\0') {
            return Err(ConfigError("--group: must be a non-empty name".into()));
        }
        let batch_size = self.batch_size.unwrap_or(defaults::BATCH_SIZE);
        if !(1..=10_000).contains(&batch_size) {
            return Err(ConfigError(format!(
                "--batch-size: {batch_size} is not between 1 and 10000"
            )));
        }
        let autoscale = match (self.min_instances, self.max_instances) {
            (None, None) => {
                if self.target_drain.is_some() || self.scale_down_delay.is_some() {
                    return Err(ConfigError(
                        "--target-drain and --scale-down-delay apply to scaling: add --max-instances N".into(),
                    ));
                }
                None
            }
            (_, None) => {
                return Err(ConfigError(
                    "--min-instances needs --max-instances (scaling between the two)".into(),
                ));
            }
            (min, Some(max)) => {
                if self.instances.is_some() {
                    return Err(ConfigError(
                        "give either --instances (a fixed count) or --min-instances/--max-instances (scaled against lag), not both".into(),
                    ));
                }
                let min = min.unwrap_or(1);
                if min == 0 || min > max || max > 1024 {
                    return Err(ConfigError(format!(
                        "--min-instances {min} and --max-instances {max}: need 1 <= min <= max <= 1024"
                    )));
                }
                let target_drain = parse_duration(
                    "--target-drain",
                    self.target_drain
                        .as_deref()
                        .unwrap_or(defaults::TARGET_DRAIN),
                )?;
                let stabilization = parse_duration(
                    "--scale-down-delay",
                    self.scale_down_delay
                        .as_deref()
                        .unwrap_or(defaults::SCALE_DOWN_DELAY),
                )?;
                if target_drain.is_zero() {
                    return Err(ConfigError("--target-drain must be more than 0".into()));
                }
                Some(crate::engine::scaler::ScalerConfig {
                    min,
                    max,
                    target_drain,
                    stabilization,
                    rate_smoothing: 0.5,
                })
            }
        };
        let instances = match &autoscale {
            Some(a) => a.min,
            None => self.instances.unwrap_or_else(defaults::instances),
        };
        if !(1..=1024).contains(&instances) {
            return Err(ConfigError(format!(
                "--instances: {instances} is not between 1 and 1024"
            )));
        }
        // The most instances that may ever run (sizes the instance pool and the lanes).
        let most = autoscale.as_ref().map_or(instances, |a| a.max);
        let memory_limit = parse_size(
            "--memory-limit",
            &self.memory_limit.unwrap_or(defaults::MEMORY_LIMIT.into()),
        )?;
        if !((1 << 20)..=(4 << 30)).contains(&memory_limit) {
            return Err(ConfigError(
                "--memory-limit: must be between 1MiB and 4GiB".into(),
            ));
        }
        let call_timeout = parse_duration(
            "--call-timeout",
            &self.call_timeout.unwrap_or(defaults::CALL_TIMEOUT.into()),
        )?;
        if call_timeout.is_zero() {
            return Err(ConfigError("--call-timeout: must be more than 0".into()));
        }
        let max_attempts = self.max_attempts.unwrap_or(defaults::MAX_ATTEMPTS);
        if max_attempts == 0 {
            return Err(ConfigError(
                "--max-attempts: must be at least 1 (the first delivery)".into(),
            ));
        }
        let base = parse_duration(
            "--backoff-base",
            &self.backoff_base.unwrap_or(defaults::BACKOFF_BASE.into()),
        )?;
        let max = parse_duration(
            "--backoff-max",
            &self.backoff_max.unwrap_or(defaults::BACKOFF_MAX.into()),
        )?;
        if base > max {
            return Err(ConfigError(
                "--backoff-base: must not be more than --backoff-max".into(),
            ));
        }
        let factor = self.backoff_factor.unwrap_or(defaults::BACKOFF_FACTOR);
        if !(1.0..=100.0).contains(&factor) {
            return Err(ConfigError(format!(
                "--backoff-factor: {factor} is not between 1 and 100"
            )));
        }
        let jitter = self.jitter.unwrap_or(Jitter::Full);
        let dlq_topic = self.dlq_topic.unwrap_or(defaults::DLQ_TOPIC.into());
        crate::source::embedded::validate_topic_name(&dlq_topic.replace("{topic}", "t"))
            .map_err(|e| ConfigError(format!("--dlq-topic: {e}")))?;
        let retry_topic = self.retry_topic.unwrap_or(defaults::RETRY_TOPIC.into());
        crate::source::embedded::validate_topic_name(&retry_topic.replace("{topic}", "t"))
            .map_err(|e| ConfigError(format!("--retry-topic: {e}")))?;
        if topics.len() > 1 && !(retry_topic.contains("{topic}") && dlq_topic.contains("{topic}")) {
            return Err(ConfigError(
                "--retry-topic and --dlq-topic must contain `{topic}` (with several topics, each needs its own)".into(),
            ));
        }
        let lanes = self.lanes.unwrap_or_else(|| defaults::lanes(most));
        if !(1..=4096).contains(&lanes) {
            return Err(ConfigError(format!(
                "--lanes: {lanes} is not between 1 and 4096"
            )));
        }
        let max_in_flight = self
            .max_in_flight
            .unwrap_or_else(|| defaults::max_in_flight(batch_size, lanes));
        if max_in_flight == 0 {
            return Err(ConfigError("--max-in-flight: must be at least 1".into()));
        }
        let max_in_flight_bytes = parse_size(
            "--max-in-flight-bytes",
            self.max_in_flight_bytes
                .as_deref()
                .unwrap_or(defaults::MAX_IN_FLIGHT_BYTES),
        )?;
        if max_in_flight_bytes == 0 {
            return Err(ConfigError(
                "--max-in-flight-bytes: must be more than 0".into(),
            ));
        }
        let dedupe_window = parse_duration(
            "--dedupe-window",
            self.dedupe_window
                .as_deref()
                .unwrap_or(defaults::DEDUPE_WINDOW),
        )?;
        if dedupe_window.is_zero() {
            return Err(ConfigError("--dedupe-window: must be more than 0".into()));
        }
        let source = match self.dedupe.unwrap_or(DedupeMode::Off) {
            DedupeMode::Off => None,
            DedupeMode::Header => Some(KeySource::Header(
                self.dedupe_header
                    .unwrap_or_else(|| defaults::DEDUPE_HEADER.into()),
            )),
            DedupeMode::Key => Some(KeySource::MessageKey),
            DedupeMode::Payload => Some(KeySource::PayloadHash),
        };
        let revoke_timeout = parse_duration(
            "--revoke-timeout",
            self.revoke_timeout
                .as_deref()
                .unwrap_or(defaults::REVOKE_TIMEOUT),
        )?;
        let store: Option<std::sync::Arc<dyn crate::engine::dedupe::SharedStore>> =
            match self.dedupe_store.as_deref() {
                None | Some("embedded") => None,
                Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                    Some(std::sync::Arc::new(
                        crate::dedupe_store::RedisStore::new(url)
                            .map_err(|e| ConfigError(format!("--dedupe-store: {e}")))?,
                    ))
                }
                Some(other) => {
                    return Err(ConfigError(format!(
                        "--dedupe-store: `{other}` is neither `embedded` nor a redis:// URL"
                    )));
                }
            };
        // A claim must outlive the longest a message can take with all its attempts.
        let claim_ttl = (call_timeout + max) * max_attempts + Duration::from_secs(30);
        let dedupe = source.map(|source| DedupeConfig {
            source,
            window: dedupe_window,
            store,
            claim_ttl,
        });
        if self.max_depth == Some(0) {
            return Err(ConfigError(
                "--max-depth must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        let allow_http = parse_allow_http(self.allow_http.as_deref().unwrap_or_default())?;
        let admin = match self.admin.as_deref().unwrap_or(defaults::ADMIN) {
            "off" => None,
            a => Some(a.parse::<std::net::SocketAddr>().map_err(|_| {
                ConfigError(format!(
                    "--admin: `{a}` is not HOST:PORT (for example 127.0.0.1:9464, or 0.0.0.0:9464 to listen on every interface) or `off`"
                ))
            })?),
        };
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError(
                "--admin-token: empty; give a secret, or leave it out".into(),
            ));
        }
        let reload_dir = self
            .reload_dir
            .clone()
            .unwrap_or_else(|| match module.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            });
        let admin = admin.map(|addr| AdminSettings {
            addr,
            policy: crate::admin::Policy {
                token: self.admin_token.clone(),
                allow_hosts: self.admin_allow_host.clone().unwrap_or_default(),
            },
            reload_dir,
        });
        Ok(RunSettings {
            module,
            max_depth: self.max_depth,
            admin,
            engine: crate::engine::EngineConfig {
                group,
                topics,
                batch_size,
                instances,
                lanes,
                max_in_flight,
                max_in_flight_bytes,
                drain: self.drain.unwrap_or(false),
                backoff: Backoff {
                    base,
                    factor,
                    max,
                    jitter,
                    max_attempts,
                },
                retry_mode: self.retry_mode.unwrap_or(RetryMode::Blocking),
                delivery: self.delivery.unwrap_or(DeliveryMode::AtLeastOnce),
                dlq_topic,
                retry_topic,
                idle_poll: Duration::from_millis(20),
                retry_topics: Vec::new(),
                dedupe,
                revoke_timeout,
                autoscale,
            },
            exactly_once: self.exactly_once.unwrap_or(false),
            host: crate::host::HostConfig {
                memory_limit,
                call_timeout,
                max_instances: most as u32,
                cache_dir: Some(self.cache_dir.unwrap_or_else(|| data_dir.join("compiled"))),
                handler_config,
                capture_logs: false,
                allow_http,
            },
        })
    }
}

/// Parses the `--allow-http` entries (`HOST` or `HOST:PORT`).
pub fn parse_allow_http(entries: &[String]) -> Result<crate::host::http::AllowList, ConfigError> {
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.parse().map_err(ConfigError))
        .collect::<Result<Vec<_>, _>>()
        .map(crate::host::http::AllowList)
}

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

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileConfig =
            toml::from_str("[run]\nmodule = \"a.wasm\"\ntopic = [\"t\"]\ngroup = \"g\"\nbatch-size = 7\nmax-attempts = 2\n").unwrap();
        let flags = RunOptions {
            batch_size: Some(9),
            ..Default::default()
        };
        let s = flags
            .or(file.run)
            .resolve(file.handler_config, Path::new("d"))
            .unwrap();
        assert_eq!(s.engine.batch_size, 9);
        assert_eq!(s.engine.backoff.max_attempts, 2);
        assert_eq!(s.engine.backoff.base, Duration::from_millis(100));
        assert_eq!(s.module, PathBuf::from("a.wasm"));
    }

    #[test]
    fn missing_and_invalid_settings_are_named() {
        let err = RunOptions::default()
            .resolve(BTreeMap::new(), Path::new("d"))
            .unwrap_err()
            .0;
        assert!(err.contains("--module"), "{err}");
        let o = RunOptions {
            module: Some("m.wasm".into()),
            topic: Some(vec!["t".into()]),
            group: Some("g".into()),
            batch_size: Some(0),
            ..Default::default()
        };
        assert!(
            o.resolve(BTreeMap::new(), Path::new("d"))
                .unwrap_err()
                .0
                .contains("--batch-size")
        );
    }
}
