//! What the admin server reports: Prometheus metrics (encoded by the Prometheus project's own
//! client, `prometheus-client`, as OpenMetrics text) and the JSON status the dashboard and
//! `weir status` read. Both are read at request time from the run's [`Stats`] and the source.

use super::Admin;
use crate::engine::metrics::Histogram;
use crate::engine::{Stats, now_ms};
use crate::source::lifecycle::TopicUsage;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// (topic, partition, end offset, committed offset) of a partition the run consumes.
#[derive(Debug, Clone)]
pub(super) struct Part {
    pub topic: String,
    pub partition: u32,
    pub end: u64,
    pub committed: u64,
}

/// Every partition the run consumes now, read from the source off the async threads.
pub(super) async fn partitions(admin: &Admin) -> Result<Vec<Part>, String> {
    let (source, group, topics) = (
        admin.source.clone(),
        admin.group.clone(),
        admin.topics.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for t in topics {
            let n = source.partitions(&t).map_err(|e| e.to_string())?;
            for p in 0..n {
                out.push(Part {
                    end: source.end_offset(&t, p).map_err(|e| e.to_string())?,
                    committed: source.committed(&group, &t, p).map_err(|e| e.to_string())?,
                    topic: t.clone(),
                    partition: p,
                });
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// What each topic of the embedded log holds on disk (empty on other sources).
pub(super) async fn usage(admin: &Admin) -> Vec<TopicUsage> {
    let Some(log) = admin.log.clone() else {
        return Vec::new();
    };
    tokio::task::spawn_blocking(move || log.usage(None).unwrap_or_default())
        .await
        .unwrap_or_default()
}

/// (name, digest, loaded at ms) of the handler running now.
fn module_info(stats: &Stats) -> (String, String, u64) {
    match stats.module.get() {
        Some(h) => (
            h.name().to_string(),
            h.digest().to_string(),
            stats.module.loaded_ms(),
        ),
        None => ("-".into(), "-".into(), 0),
    }
}

/// weir's latency histogram as the client encodes one (buckets not cumulative, +Inf last).
#[derive(Debug)]
struct Snapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl Snapshot {
    fn of(h: &Histogram) -> Snapshot {
        let (cumulative, count, sum) = h.snapshot();
        let mut buckets = Vec::with_capacity(cumulative.len() + 1);
        let mut below = 0;
        for (le, acc) in cumulative {
            buckets.push((le, acc - below));
            below = acc;
        }
        buckets.push((f64::INFINITY, count.saturating_sub(below)));
        Snapshot {
            sum,
            count,
            buckets,
        }
    }
}

impl EncodeMetric for Snapshot {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One scrape's worth of the run's state, encoded when the registry asks.
#[derive(Debug)]
struct Scrape {
    stats: Arc<Stats>,
    group: String,
    parts: Vec<Part>,
    usage: Vec<TopicUsage>,
}

/// A metric family's description, then one sample per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
    kind: MetricType,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in samples {
        if labels.is_empty() {
            return m.encode(e);
        }
        m.encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

fn one<M>(m: M) -> [(Vec<(&'static str, String)>, M); 1] {
    [(Vec::new(), m)]
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let counter = |v: u64| ConstCounter::new(v);
        let gauge = |v: u64| ConstGauge::new(v as i64);
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        family(
            &mut e,
            "weir_messages",
            "Messages by topic and outcome: ok, deduped and dlq are final; retry, rejected, trap, timeout, memory and invalid-output count failed attempts.",
            s.metrics
                .messages()
                .into_iter()
                .map(|((topic, outcome), n)| {
                    (
                        vec![("topic", topic), ("outcome", outcome.to_string())],
                        counter(n),
                    )
                }),
            MetricType::Counter,
        )?;
        for (name, help, v) in [
            (
                "weir_emitted",
                "Messages handlers emitted and weir published.",
                load(&s.emitted),
            ),
            (
                "weir_retries",
                "Failed attempts that were retried.",
                load(&s.retries),
            ),
            (
                "weir_dlq_writes",
                "Messages written to a dead-letter topic.",
                load(&s.dead_lettered),
            ),
            (
                "weir_dedupe_hits",
                "Duplicates acked without running the handler.",
                load(&s.deduped),
            ),
            (
                "weir_instance_faults",
                "Instances lost to a trap, timeout or memory fault.",
                load(&s.faults),
            ),
        ] {
            family(&mut e, name, help, one(counter(v)), MetricType::Counter)?;
        }
        for (name, help, h) in [
            (
                "weir_handler_duration_seconds",
                "Time in the handler per message (a batch call divided among its messages).",
                &s.metrics.handler,
            ),
            (
                "weir_end_to_end_latency_seconds",
                "From a message's append to its ack.",
                &s.metrics.end_to_end,
            ),
        ] {
            family(
                &mut e,
                name,
                help,
                one(Snapshot::of(h)),
                MetricType::Histogram,
            )?;
        }
        let per_part = |f: fn(&Part) -> u64, with_group: bool| {
            self.parts
                .iter()
                .map(|p| {
                    let mut labels = vec![
                        ("topic", p.topic.clone()),
                        ("partition", p.partition.to_string()),
                    ];
                    if with_group {
                        labels.push(("group", self.group.clone()));
                    }
                    (labels, gauge(f(p)))
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut e,
            "weir_log_bytes",
            "Bytes a topic of the embedded log holds on disk (what retention bounds).",
            self.usage
                .iter()
                .map(|u| (vec![("topic", u.topic.clone())], gauge(u.bytes))),
            MetricType::Gauge,
        )?;
        family(
            &mut e,
            "weir_log_oldest_record_age_seconds",
            "Age of the oldest record a topic of the embedded log keeps.",
            self.usage.iter().filter_map(|u| {
                u.oldest_age_s
                    .map(|a| (vec![("topic", u.topic.clone())], ConstGauge::new(a)))
            }),
            MetricType::Gauge,
        )?;
        family(
            &mut e,
            "weir_records_skipped_by_retention",
            "Records the group's offset passed because retention deleted them before it read them.",
            s.metrics
                .messages()
                .into_iter()
                .filter(|((_, o), _)| *o == "skipped-by-retention")
                .map(|((topic, _), n)| {
                    (
                        vec![("topic", topic), ("group", self.group.clone())],
                        counter(n),
                    )
                }),
            MetricType::Counter,
        )?;
        family(
            &mut e,
            "weir_consumer_lag",
            "Messages in a partition the group has not committed (end offset - committed offset).",
            per_part(|p| p.end.saturating_sub(p.committed), true),
            MetricType::Gauge,
        )?;
        family(
            &mut e,
            "weir_partition_end_offset",
            "The offset the next message appended to a partition gets (its depth since creation).",
            per_part(|p| p.end, false),
            MetricType::Gauge,
        )?;
        family(
            &mut e,
            "weir_committed_offset",
            "The group's committed offset (the next it reads) per partition.",
            per_part(|p| p.committed, true),
            MetricType::Gauge,
        )?;
        let size = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
        for (name, help, v) in [
            (
                "weir_in_flight_messages",
                "Messages fetched and not finished.",
                size(&s.in_flight),
            ),
            (
                "weir_instances",
                "Handler instances running.",
                size(&s.instances),
            ),
            (
                "weir_desired_instances",
                "Handler instances the scaler asks for (the fixed count without scaling).",
                size(&s.desired_instances),
            ),
            (
                "weir_paused_partitions",
                "Partitions whose fetching is paused at --max-in-flight.",
                size(&s.paused_partitions),
            ),
            (
                "weir_busy_lanes",
                "Key-ordered lanes with messages waiting or running.",
                size(&s.busy_lanes),
            ),
        ] {
            family(&mut e, name, help, one(gauge(v)), MetricType::Gauge)?;
        }
        let (name, digest, loaded_ms) = module_info(s);
        family(
            &mut e,
            "weir_module_info",
            "The handler module running (always 1), with its name and SHA-256 digest.",
            [(
                vec![("name", name), ("digest", format!("sha256:{digest}"))],
                gauge(1),
            )],
            MetricType::Gauge,
        )?;
        family(
            &mut e,
            "weir_module_loaded_timestamp_seconds",
            "When the running module was loaded (Unix time).",
            one(ConstGauge::new(loaded_ms as f64 / 1e3)),
            MetricType::Gauge,
        )?;
        family(
            &mut e,
            "weir_module_reloads",
            "Module reloads, by result: loaded, or refused (the running module stayed).",
            [
                (
                    vec![("result", "loaded".to_string())],
                    counter(load(&s.module.reloads)),
                ),
                (
                    vec![("result", "refused".to_string())],
                    counter(load(&s.module.reload_failures)),
                ),
            ],
            MetricType::Counter,
        )?;
        family(
            &mut e,
            "weir_ready",
            "1 while the run is consuming.",
            one(gauge(u64::from(s.ready.load(Ordering::Relaxed)))),
            MetricType::Gauge,
        )
    }
}

/// The OpenMetrics text of the run's metrics.
pub(super) fn metrics_text(admin: &Admin, parts: Vec<Part>, usage: Vec<TopicUsage>) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape {
        stats: admin.stats.clone(),
        group: admin.group.clone(),
        parts,
        usage,
    }));
    let mut out = String::with_capacity(8192);
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String does not fail");
    out
}

pub(super) fn status_json(admin: &Admin, parts: &[Part], usage: &[TopicUsage]) -> Value {
    let s = &admin.stats;
    let mut per_topic: serde_json::Map<String, Value> = serde_json::Map::new();
    for ((topic, outcome), n) in s.metrics.messages() {
        let e = per_topic
            .entry(topic)
            .or_insert_with(|| Value::Object(Default::default()));
        e[outcome] = json!(n);
    }
    let q = |h: &Histogram, q: f64| h.quantile(q).filter(|v| v.is_finite());
    let (name, digest, loaded_ms) = module_info(s);
    json!({
        "module": {
            "name": name,
            "digest": format!("sha256:{digest}"),
            "loaded_at_ms": loaded_ms,
            "reloads": s.module.reloads.load(Ordering::Relaxed),
            "reloads_refused": s.module.reload_failures.load(Ordering::Relaxed),
        },
        "group": admin.group,
        "ready": s.ready.load(Ordering::Relaxed),
        "now_ms": now_ms(),
        "uptime_seconds": now_ms().saturating_sub(admin.started_ms) as f64 / 1e3,
        "totals": s.summary(),
        "messages": per_topic,
        "instances": s.instances.load(Ordering::Relaxed),
        "desired_instances": s.desired_instances.load(Ordering::Relaxed),
        "in_flight": s.in_flight.load(Ordering::Relaxed),
        "paused_partitions": s.paused_partitions.load(Ordering::Relaxed),
        "busy_lanes": s.busy_lanes.load(Ordering::Relaxed),
        "latency": {
            "end_to_end_p50_seconds": q(&s.metrics.end_to_end, 0.5),
            "end_to_end_p99_seconds": q(&s.metrics.end_to_end, 0.99),
            "handler_p50_seconds": q(&s.metrics.handler, 0.5),
            "handler_p99_seconds": q(&s.metrics.handler, 0.99),
        },
        "partitions": parts.iter().map(|p| json!({
            "topic": p.topic,
            "partition": p.partition,
            "end_offset": p.end,
            "committed": p.committed,
            "lag": p.end.saturating_sub(p.committed),
        })).collect::<Vec<_>>(),
        "lag_note": admin.source.lag_note(),
        "storage": usage,
    })
}
