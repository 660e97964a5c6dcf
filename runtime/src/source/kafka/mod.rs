//! Apache Kafka as a source: several weir processes in one consumer group share a topic's
//! partitions, and Kafka moves partitions between them as processes come and go.
//!
//! ```text
//!  poller thread ──▶ per-partition buffers ──fetch──▶ engine partition tasks
//!  (BaseConsumer::poll; runs the rebalance        │
//!   callbacks: on revoke it waits for the engine   └─commit──▶ committer thread
//!   to drain and commit the revoked partitions)                (idempotent or transactional
//!                                                               producer; offsets stored, or
//!                                                               sent in the transaction)
//! ```
//!
//! - Offsets: `enable.auto.offset.store=false`. The engine's commit point (everything below it
//!   finished, outputs delivered) is stored after the outputs' delivery reports came back, and
//!   librdkafka commits stored offsets every `auto.commit.interval.ms`, on revoke and on close.
//! - Exactly-once (`--exactly-once`): the outputs of a commit and the consumer offsets it moves
//!   are one Kafka transaction (`send_offsets_to_transaction`), so a `read_committed` reader sees
//!   an input's outputs exactly once however often the input was handled.
//! - Rebalances are cooperative-sticky: a revoke stops only the revoked partitions, which finish
//!   their in-flight calls and commit before the callback returns.
//!
//! The rest of weir does not name rdkafka: this module is the only one that does.

mod admin;
pub mod bench;
mod broker;
mod group;
mod lifecycle;
mod publisher;

use super::{Commit, GroupEvent, Record, Source, SourceError, TopicStats};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use admin::{Admin, Reader};
pub use broker::KafkaBroker;
pub use publisher::Publisher;

/// How to reach the brokers, and what to pass through to librdkafka.
#[derive(Debug, Clone, Default)]
pub struct KafkaConfig {
    /// `host:port,...` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    /// Any librdkafka property (`security.protocol`, `sasl.*`, `ssl.*`, ...), passed through.
    pub properties: BTreeMap<String, String>,
}

/// Properties weir sets itself and a user may not change: each one is what a guarantee rests on.
const OWNED: &[(&str, &str)] = &[
    (
        "enable.auto.offset.store",
        "weir stores an offset only after the messages below it finished",
    ),
    (
        "enable.idempotence",
        "outputs and dead letters are written by an idempotent producer",
    ),
    ("group.id", "pass --group instead"),
    (
        "transactional.id",
        "weir gives each member its own (from group.instance.id when set) for --exactly-once",
    ),
    ("bootstrap.servers", "pass --brokers instead"),
];

/// The batch size on Kafka unless the user sets one: each commit waits for the brokers to ack
/// its outputs, so a bigger batch means fewer round trips (3x the throughput of 256 on the mock
/// cluster).
pub const BATCH_SIZE: usize = 1000;

/// Kafka settles by committed offset, assigns partitions to a group's members, and has
/// transactions; it keeps no dedupe marks or delivery counts.
pub(crate) const CAPABILITIES: super::Capabilities = super::Capabilities {
    groups: true,
    transactions: true,
    batch_size: Some(BATCH_SIZE),
    ..super::Capabilities::LOG
};

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// What librdkafka counts beyond key, payload and headers when it checks a message's size
/// (its framing); kept off the limit so a record that passes [`Source::fits`] is never refused.
const MESSAGE_OVERHEAD: usize = 512;

/// How long a metadata, watermark or offset request may take before it is an error.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

impl KafkaConfig {
    /// From `kafka://host:port,host:port` and the `--source-property` settings (librdkafka
    /// properties), checked.
    pub fn from_spec(
        spec: &crate::source::connect::SourceSpec,
    ) -> Result<KafkaConfig, SourceError> {
        let brokers = spec.url.split_once("://").map_or("", |(_, rest)| rest);
        let cfg = KafkaConfig {
            brokers: brokers.trim_end_matches('/').to_string(),
            properties: spec.properties.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the pass-through properties: one weir owns is refused with the reason.
    pub fn validate(&self) -> Result<(), SourceError> {
        if self.brokers.trim().is_empty() {
            return Err(SourceError::Invalid(
                "Kafka: no brokers; pass --source kafka://host:port[,host:port...] (or --brokers host:port)".into(),
            ));
        }
        for k in self.properties.keys() {
            if let Some((_, why)) = OWNED.iter().find(|(name, _)| name == k) {
                return Err(SourceError::Invalid(format!(
                    "--source-property {k}: weir sets this itself ({why})"
                )));
            }
        }
        Ok(())
    }

    /// A client configuration with the brokers, weir's `defaults` (which the user's properties
    /// override) and then the user's properties.
    pub(crate) fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// librdkafka's log and error callbacks, forwarded to weir's log.
#[derive(Debug, Default, Clone)]
pub(crate) struct Logged;

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        error_librdkafka(&error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for Logged {}

pub(crate) fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "weir::kafka", facility = fac, "{message}")
        }
        L::Warning => tracing::warn!(target: "weir::kafka", facility = fac, "{message}"),
        L::Notice | L::Info => tracing::info!(target: "weir::kafka", facility = fac, "{message}"),
        L::Debug => tracing::debug!(target: "weir::kafka", facility = fac, "{message}"),
    }
}

pub(crate) fn error_librdkafka(error: &KafkaError, reason: &str) {
    // Transport errors are retried by librdkafka; they are worth a line, not an alarm.
    tracing::warn!(target: "weir::kafka", error = %error, "{reason}");
}

pub(crate) fn storage(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Broker {
        broker: "Kafka",
        detail: format!("{what}: {e}"),
    }
}

/// Kafka as the engine's [`Source`]: the admin side (metadata, watermarks, topics) always; the
/// consumer-group side once [`Source::join_group`] was called by `weir run`.
pub struct Kafka {
    admin: Admin,
    exactly_once: bool,
    /// The largest record the producer sends (librdkafka's `message.max.bytes`); a larger one
    /// fails locally with `MSG_SIZE_TOO_LARGE`, so it is refused before it reaches a commit.
    max_message_bytes: usize,
    /// Set by `join_group`, taken by `leave_group`.
    group: Mutex<Option<Arc<group::Group>>>,
}

impl Kafka {
    /// Connects to the brokers (lazily: nothing is sent until the first request).
    /// Creates `topic` with the brokers' default replication.
    pub fn create_topic(
        cfg: &KafkaConfig,
        topic: &str,
        partitions: u32,
    ) -> Result<(), SourceError> {
        Admin::connect(cfg)?.create_topic(topic, partitions, -1)
    }

    pub fn connect(cfg: &KafkaConfig, exactly_once: bool) -> Result<Kafka, SourceError> {
        let max_message_bytes = match cfg.properties.get("message.max.bytes") {
            None => DEFAULT_MESSAGE_MAX_BYTES,
            Some(v) => v.trim().parse().map_err(|_| {
                SourceError::Invalid(format!(
                    "--kafka-property message.max.bytes={v}: not a number of bytes"
                ))
            })?,
        };
        Ok(Kafka {
            admin: Admin::connect(cfg)?,
            exactly_once,
            max_message_bytes,
            group: Mutex::new(None),
        })
    }

    fn group(&self) -> Option<Arc<group::Group>> {
        self.group.lock().expect("group lock").clone()
    }

    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    pub fn stats(&self, topic: Option<&str>) -> Result<Vec<TopicStats>, SourceError> {
        let groups: Vec<String> = self
            .group()
            .map(|g| g.name().to_string())
            .into_iter()
            .collect();
        self.admin.stats(topic, &groups)
    }
}

impl Source for Kafka {
    fn capabilities(&self) -> super::Capabilities {
        CAPABILITIES
    }

    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        self.admin.partitions(topic)
    }

    fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<u64, SourceError> {
        match self.group() {
            Some(g) if g.name() == group => g.committed(topic, partition),
            _ => self.admin.committed(group, topic, partition),
        }
    }

    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, SourceError> {
        self.admin.end_offset(topic, partition)
    }

    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<super::Delivery>, SourceError> {
        match self.group() {
            Some(g) => Ok(g.fetch(topic, partition, from, max, max_bytes)),
            None => Err(SourceError::Invalid(
                "fetching from Kafka needs a consumer group (weir run)".into(),
            )),
        }
    }

    fn at_end(&self, topic: &str, partition: u32, _next: u64) -> Result<bool, SourceError> {
        match self.group() {
            Some(g) => g.at_end(&self.admin, topic, partition),
            None => Ok(true),
        }
    }

    fn transactional(&self) -> bool {
        self.exactly_once
    }

    fn commit(&self, group: &str, commit: Commit) -> Result<(), SourceError> {
        if !commit.replayed.is_empty() || !commit.dedupe_done.is_empty() {
            return Err(SourceError::Invalid(
                "dead-letter replay marks and dedupe marks are not kept on Kafka yet".into(),
            ));
        }
        match self.group() {
            Some(g) if g.name() == group => g.commit(commit),
            _ => Err(SourceError::Invalid(format!(
                "commit for group `{group}`, which this process has not joined"
            ))),
        }
    }

    fn topic_exists(&self, topic: &str) -> bool {
        self.admin.topic_exists(topic)
    }

    fn fits(&self, record: &Record) -> Result<(), String> {
        crate::source::within_limits(record)?;
        let size = crate::source::wire_size(record);
        let max = self.max_message_bytes.saturating_sub(MESSAGE_OVERHEAD);
        if size > max {
            return Err(format!(
                "a record of {size} bytes (key, payload and headers); the producer's \
                 message.max.bytes allows {max} (raise it with --kafka-property, and the \
                 brokers' and topics' limits with it)"
            ));
        }
        Ok(())
    }

    fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), SourceError> {
        self.admin.ensure_topic(topic, partitions)
    }

    fn dedupe_done(&self, _group: &str, _key: &[u8], _now_ms: u64) -> Result<bool, SourceError> {
        Err(SourceError::Invalid(
            "--dedupe is not available on Kafka yet: it needs a shared dedupe store".into(),
        ))
    }

    fn evict_dedupe(&self, _now_ms: u64, _max: usize) -> Result<usize, SourceError> {
        Ok(0)
    }

    fn join_group(
        &self,
        group: &str,
        topics: &[String],
        revoke_timeout: Duration,
    ) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<GroupEvent>>, SourceError> {
        let mut slot = self.group.lock().expect("group lock");
        if slot.is_some() {
            return Err(SourceError::Invalid(
                "this process already joined a group".into(),
            ));
        }
        let (g, events) = group::Group::join(
            self.admin.config(),
            group,
            topics,
            self.exactly_once,
            revoke_timeout,
        )?;
        *slot = Some(Arc::new(g));
        Ok(Some(events))
    }

    fn leave_group(&self) -> Result<(), SourceError> {
        let g = self.group.lock().expect("group lock").take();
        match g {
            Some(g) => group::Group::leave(g),
            None => Ok(()),
        }
    }
}
