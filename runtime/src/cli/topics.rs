use super::Globals;
use clap::Subcommand;
use std::process::ExitCode;
use weir_core::retention::{Policy, RetentionChange};

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create a topic
    Create {
        /// Topic name, by the broker's rules (embedded and Kafka: letters, digits, `.`, `_`, `-`;
        /// RabbitMQ: any UTF-8 up to 255 bytes; see docs/sources.md)
        topic: String,
        /// Number of partitions [default: 1]
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Kafka: replicas per partition [default: the brokers' default]
        #[arg(long)]
        replication_factor: Option<i32>,
        /// Every consumer group gets every message (pub/sub). Logs, Redis Streams and
        /// JetStream do that for every topic; on RabbitMQ the topic is a fanout exchange with a
        /// queue per group; SQS needs SNS for it (not supported)
        #[arg(long)]
        fanout: bool,
        /// With --fanout: declare these groups' queues now, so they keep what is published
        /// before they first run (RabbitMQ binds a group's queue when it first runs otherwise)
        #[arg(long = "group", requires = "fanout")]
        groups: Vec<String>,
        /// RabbitMQ: a priority queue, messages with a higher priority (0..=N, `weir produce
        /// --priority`, or the AMQP priority another client sets) delivered first
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=255))]
        max_priority: Option<u8>,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Change what a topic keeps: retention by age or size (the embedded log and Kafka), or
    /// by interest (the embedded log)
    Alter {
        topic: String,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Delete a topic, its records and (on the embedded log) every group's offsets on it;
    /// refused while a run reads or writes it
    Delete { topic: String },
    /// What a topic keeps and holds (the embedded log): retention, segments, bytes on disk,
    /// the oldest record's age, and each partition's first kept offset
    Describe {
        topic: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List topics with each partition's depth and each consumer group's committed offset and lag
    List {
        /// Only this topic [default: all]
        topic: Option<String>,
        /// Only this consumer group's offsets [default: every group]
        #[arg(long)]
        group: Option<String>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

impl TopicsCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let mut log = g.source.broker()?;
        match self {
            TopicsCommand::Create {
                topic,
                partitions,
                replication_factor,
                fanout,
                groups,
                max_priority,
                retention,
            } => {
                let spec = crate::source::broker::TopicSpec {
                    fanout,
                    groups,
                    max_priority,
                    retention: retention.change()?,
                };
                log.create_topic_with(&topic, partitions, replication_factor, &spec)?;
                if fanout {
                    eprintln!(
                        "created fan-out topic {topic} with {partitions} partition(s): every group gets every message"
                    );
                } else {
                    eprintln!("created topic {topic} with {partitions} partition(s)");
                }
            }
            TopicsCommand::Alter { topic, retention } => {
                let change = retention.change()?;
                if change.is_empty() {
                    return Err(super::bad_input(
                        "weir topics alter: say what to change: --retention, --retention-bytes, --retention-policy or --segment-bytes",
                    ));
                }
                log.alter_topic(&topic, &change)?;
                let now = log.usage(Some(&topic))?;
                let keeps = now.first().map_or("?", |u| u.retention.as_str());
                eprintln!("topic {topic} now keeps: {keeps}");
            }
            TopicsCommand::Describe { topic, json } => {
                let Some(u) = log.usage(Some(&topic))?.into_iter().next() else {
                    return Err(super::bad_input(format!(
                        "weir topics describe shows the embedded log's retention; {} keeps \
                         messages by its own rules (see docs/sources.md)",
                        log.name()
                    )));
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&u)?);
                } else {
                    println!("topic:     {}", u.topic);
                    println!("keeps:     {}", u.retention);
                    println!("segments:  {}", u.segments);
                    println!("bytes:     {}", u.bytes);
                    let age = u
                        .oldest_age_s
                        .map_or("-".into(), |s| format!("{s:.0}s ago"));
                    println!("oldest:    {age}");
                    println!("starts:    {:?}", u.starts);
                }
            }
            TopicsCommand::Delete { topic } => {
                log.delete_topic(&topic)?;
                eprintln!("deleted topic {topic}");
            }
            TopicsCommand::List { topic, group, json } => {
                let stats = log.stats(topic.as_deref(), group.as_deref())?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&stats)?);
                } else {
                    println!(
                        "{:<24} {:>9} {:>12}  {:<20} {:>12} {:>10}",
                        "TOPIC", "PARTITION", "END", "GROUP", "COMMITTED", "LAG"
                    );
                    for t in &stats {
                        for p in &t.partitions {
                            if p.groups.is_empty() {
                                println!(
                                    "{:<24} {:>9} {:>12}  {:<20} {:>12} {:>10}",
                                    t.topic, p.partition, p.end_offset, "-", "-", "-"
                                );
                            }
                            for gr in &p.groups {
                                // (the committed offset and lag as the broker keeps them)
                                println!(
                                    "{:<24} {:>9} {:>12}  {:<20} {:>12} {:>10}",
                                    t.topic,
                                    p.partition,
                                    p.end_offset,
                                    gr.group,
                                    gr.committed,
                                    gr.lag
                                );
                            }
                        }
                    }
                    let usage = log.usage(topic.as_deref())?;
                    if !usage.is_empty() {
                        println!();
                        println!(
                            "{:<24} {:<30} {:>8} {:>12} {:>12}",
                            "TOPIC", "KEEPS", "SEGMENTS", "BYTES", "OLDEST"
                        );
                        for u in usage {
                            let oldest = u
                                .oldest_age_s
                                .map_or("-".to_string(), |s| format!("{s:.0}s ago"));
                            println!(
                                "{:<24} {:<30} {:>8} {:>12} {:>12}",
                                u.topic, u.retention, u.segments, u.bytes, oldest
                            );
                        }
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// What a topic keeps (`topics create` and `alter`; the embedded log).
#[derive(Debug, clap::Args)]
pub(super) struct RetentionArgs {
    /// Delete records older than this (`7d`, `12h`), or `forever`. New topics keep 7 days
    #[arg(long, value_name = "AGE|forever")]
    retention: Option<String>,
    /// Delete the oldest records past this many bytes on disk (`10GiB`), or `unlimited`
    #[arg(long, value_name = "SIZE|unlimited")]
    retention_bytes: Option<String>,
    /// `limits` (age and size decide) or `interest` (a record goes once every group that reads
    /// the topic has committed past it; age and size do not delete what a group needs)
    #[arg(long, value_name = "limits|interest")]
    retention_policy: Option<String>,
    /// Bytes a segment takes before the next begins (retention deletes whole segments)
    /// [default: a twentieth of --retention-bytes, 1 MiB to 256 MiB; 128 MiB without it]
    #[arg(long, value_name = "SIZE")]
    segment_bytes: Option<String>,
}

impl RetentionArgs {
    pub fn change(&self) -> anyhow::Result<RetentionChange> {
        use weir_core::config::{parse_duration, parse_size};
        let bad = |e: weir_core::config::ConfigError| super::bad_input(e.to_string());
        let mut c = RetentionChange::default();
        if let Some(a) = &self.retention {
            c.max_age_ms = Some(match a.as_str() {
                "forever" => None,
                a => Some(parse_duration("--retention", a).map_err(bad)?.as_millis() as u64),
            });
            if c.max_age_ms == Some(Some(0)) {
                return Err(super::bad_input(
                    "--retention 0 would delete everything; give an age, or `forever`",
                ));
            }
        }
        if let Some(b) = &self.retention_bytes {
            c.max_bytes = Some(match b.as_str() {
                "unlimited" => None,
                b => Some(parse_size("--retention-bytes", b).map_err(bad)? as u64),
            });
        }
        if let Some(p) = &self.retention_policy {
            c.policy = Some(match p.as_str() {
                "limits" => Policy::Limits,
                "interest" => Policy::Interest,
                other => {
                    return Err(super::bad_input(format!(
                        "--retention-policy {other}: use `limits` or `interest`"
                    )));
                }
            });
        }
        if let Some(b) = &self.segment_bytes {
            let n = parse_size("--segment-bytes", b).map_err(bad)? as u64;
            if n < 4096 {
                return Err(super::bad_input(format!(
                    "--segment-bytes {b} is under 4KiB; every segment is a set of files, give at least 4KiB"
                )));
            }
            c.segment_bytes = Some(Some(n));
        }
        Ok(c)
    }
}
