use super::Globals;
use clap::Subcommand;
use std::process::ExitCode;

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
            } => {
                let spec = crate::source::broker::TopicSpec {
                    fanout,
                    groups,
                    max_priority,
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
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
