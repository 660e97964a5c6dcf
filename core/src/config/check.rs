//! `weir run`'s options checked: the defaults applied, every value parsed and in range, and
//! the combinations that make sense, each error naming its setting.

use super::{
    ConfigError, DedupeMode, DeliveryMode, KeySource, RetryMode, RunOptions, ScalerConfig,
    defaults, parse_duration, parse_size,
};
use crate::allow::AllowList;
use crate::retry::{Backoff, Jitter};
use std::path::PathBuf;
use std::time::Duration;

/// The admin server's options, checked.
#[derive(Debug, Clone)]
pub struct CheckedAdmin {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// `--admin-token`: a bearer token writes need.
    pub token: Option<String>,
    /// `--admin-allow-host`: host names it answers to besides IP addresses and localhost.
    pub allow_hosts: Vec<String>,
    /// Where `POST /module` may load modules from.
    pub reload_dir: PathBuf,
}

/// `weir run`'s options with the defaults applied and every value checked: what the runtime
/// builds a run's settings from.
#[derive(Debug, Clone)]
pub struct Checked {
    pub module: PathBuf,
    pub topics: Vec<String>,
    pub group: String,
    /// `--priority` and `--priority-weights`; `None`: every topic alike.
    pub priority: Option<super::Priority>,
    pub batch_size: usize,
    /// Instances at the start (the minimum when scaling).
    pub instances: usize,
    /// The most instances that may ever run (sizes the instance pool and the lanes).
    pub most: usize,
    pub autoscale: Option<ScalerConfig>,
    pub memory_limit: usize,
    pub call_timeout: Duration,
    pub backoff: Backoff,
    pub retry_mode: RetryMode,
    pub delivery: DeliveryMode,
    pub dlq_topic: String,
    pub retry_topic: String,
    pub lanes: usize,
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    /// Where dedupe takes the key from, and how long a done key is remembered.
    pub dedupe: Option<(KeySource, Duration)>,
    /// `--dedupe-store`: a `redis://` or `rediss://` URL; `None` keeps marks in the source.
    pub dedupe_store: Option<String>,
    /// How long a dedupe claim lives without its holder: longer than a message can take with
    /// all its attempts.
    pub claim_ttl: Duration,
    pub revoke_timeout: Duration,
    pub max_depth: Option<u64>,
    pub allow_http: AllowList,
    pub admin: Option<CheckedAdmin>,
    pub drain: bool,
    pub exactly_once: bool,
    /// `--cache-dir`; `None`: the data directory's `compiled/`.
    pub cache_dir: Option<PathBuf>,
}

impl RunOptions {
    /// The source's own default batch size where it has one, under what the user set.
    pub fn with_batch_default(mut self, batch_size: Option<usize>) -> RunOptions {
        self.batch_size = self.batch_size.or(batch_size);
        self
    }

    /// These options, with `lower`'s filling the gaps (flags over the file).
    pub fn or(self, lower: RunOptions) -> RunOptions {
        RunOptions {
            module: self.module.or(lower.module),
            topic: self.topic.or(lower.topic),
            group: self.group.or(lower.group),
            priority: self.priority.or(lower.priority),
            priority_weights: self.priority_weights.or(lower.priority_weights),
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

    /// Applies the defaults and checks every value, naming the setting of any that is wrong;
    /// topic names by Kafka's rules (the embedded log's and Kafka's).
    pub fn check(self) -> Result<Checked, ConfigError> {
        self.check_for(&crate::topic::Naming::KAFKA)
    }

    /// [`RunOptions::check`] for a broker that names topics its own way: its rules for every
    /// topic, and its default dead-letter and retry topic names.
    pub fn check_for(self, naming: &crate::topic::Naming) -> Result<Checked, ConfigError> {
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
            topic_name(naming, "--topic", t)?;
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
                Some(ScalerConfig {
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
        let dlq_topic = self.dlq_topic.unwrap_or(naming.dlq.into());
        let retry_topic = self.retry_topic.unwrap_or(naming.retry.into());
        // Every name a template gives is checked; the retry topic's only where there is one.
        let requeue = self.retry_mode == Some(RetryMode::Requeue);
        for t in &topics {
            topic_name(naming, "--dlq-topic", &dlq_topic.replace("{topic}", t))?;
            if requeue {
                topic_name(naming, "--retry-topic", &retry_topic.replace("{topic}", t))?;
            }
        }
        if topics.len() > 1 && !(retry_topic.contains("{topic}") && dlq_topic.contains("{topic}")) {
            return Err(ConfigError(
                "--retry-topic and --dlq-topic must contain `{topic}` (with several topics, each needs its own)".into(),
            ));
        }
        let priority = super::Priority::check(self.priority, self.priority_weights, &topics)?;
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
        let dedupe_store = match self.dedupe_store {
            None => None,
            Some(url) if url == "embedded" => None,
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => Some(url),
            Some(other) => {
                return Err(ConfigError(format!(
                    "--dedupe-store: `{other}` is neither `embedded` nor a redis:// URL"
                )));
            }
        };
        // A claim must outlive the longest a message can take with all its attempts.
        let claim_ttl = (call_timeout + max) * max_attempts + Duration::from_secs(30);
        let dedupe = source.map(|source| (source, dedupe_window));
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
        let reload_dir = self.reload_dir.unwrap_or_else(|| match module.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        });
        let admin = admin.map(|addr| CheckedAdmin {
            addr,
            token: self.admin_token,
            allow_hosts: self.admin_allow_host.unwrap_or_default(),
            reload_dir,
        });
        Ok(Checked {
            module,
            topics,
            group,
            priority,
            batch_size,
            instances,
            most,
            autoscale,
            memory_limit,
            call_timeout,
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
            lanes,
            max_in_flight,
            max_in_flight_bytes,
            dedupe,
            dedupe_store,
            claim_ttl,
            revoke_timeout,
            max_depth: self.max_depth,
            allow_http,
            admin,
            drain: self.drain.unwrap_or(false),
            exactly_once: self.exactly_once.unwrap_or(false),
            cache_dir: self.cache_dir,
        })
    }
}

/// A topic name for `flag`, checked by the broker's rules.
fn topic_name(naming: &crate::topic::Naming, flag: &str, name: &str) -> Result<(), ConfigError> {
    match (naming.problem)(name) {
        Some(why) => Err(ConfigError(format!(
            "{flag}: invalid topic name `{name}` on {}: {why}",
            naming.broker
        ))),
        None => Ok(()),
    }
}

/// Parses the `--allow-http` entries (`HOST` or `HOST:PORT`).
pub fn parse_allow_http(entries: &[String]) -> Result<AllowList, ConfigError> {
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.parse().map_err(ConfigError))
        .collect::<Result<Vec<_>, _>>()
        .map(AllowList)
}
