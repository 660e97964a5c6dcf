//! `--source URL`: which broker a command talks to. The URL's scheme picks it; this is the one
//! file that lists the brokers, and each broker's folder parses the rest of its URL and its
//! `--source-property` settings itself.
//!
//! | URL | broker |
//! |---|---|
//! | `embedded` (the default) | the embedded log in `--data-dir` |
//! | `kafka://host:port,host:port` (or `--brokers host:port,...`) | Apache Kafka |
//! | `amqp://user:pass@host:port/vhost`, `amqps://...` | RabbitMQ (AMQP 0-9-1) |
//! | `redis://[user:pass@]host:port[/db]` | Redis Streams |
//! | `nats://[user:pass@]host:port` | NATS JetStream |
//! | `sqs://REGION`, `sqs://` | Amazon SQS (endpoint and credentials from the AWS environment) |

use super::broker::Broker;
use super::{Source, SourceError, kafka, nats, rabbitmq, redis, sqs};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The brokers weir speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedded,
    Kafka,
    RabbitMq,
    Redis,
    Nats,
    Sqs,
}

/// Where the topics live, as the flags and `weir.toml` said.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub kind: Kind,
    /// The URL as given (`kafka://` for `--brokers`); `embedded` for the default.
    pub url: String,
    /// `--source-property KEY=VALUE` and `[source.properties]`: the broker's client settings.
    pub properties: BTreeMap<String, String>,
    /// The embedded log's directory (also where a run keeps its compile cache).
    pub data_dir: PathBuf,
}

/// What a run asks of the consumer it opens.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub group: String,
    pub topics: Vec<String>,
    /// Topics weir owns and consumes too (requeue mode's retry topics): created when missing.
    pub retry_topics: Vec<String>,
    /// The consumed topics' dead-letter topics.
    pub dlq_topics: Vec<String>,
    /// Outputs and the settlement of their input in one broker transaction.
    pub exactly_once: bool,
    /// The broker forgets a message when it hands it over (auto-ack).
    pub at_most_once: bool,
    /// Messages handed over and not yet settled, at most (the in-flight bound).
    pub prefetch: usize,
}

impl SourceSpec {
    /// Reads `url`; the embedded log when it is `None` or `embedded`.
    pub fn parse(
        url: Option<&str>,
        properties: BTreeMap<String, String>,
        data_dir: PathBuf,
    ) -> Result<SourceSpec, SourceError> {
        let url = url.map(str::trim).unwrap_or("embedded");
        let scheme = url.split_once("://").map_or(url, |(s, _)| s);
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "embedded" => Kind::Embedded,
            "kafka" => Kind::Kafka,
            "amqp" | "amqps" => Kind::RabbitMq,
            "redis" | "rediss" => Kind::Redis,
            "nats" => Kind::Nats,
            "sqs" => Kind::Sqs,
            _ => {
                return Err(SourceError::Invalid(format!(
                    "--source {url}: unknown broker; pass embedded, kafka://host:port[,host:port], \
                     amqp://user:pass@host:port[/vhost], redis://host:port[/db], nats://host:port or \
                     sqs://REGION"
                )));
            }
        };
        if kind == Kind::Embedded && !properties.is_empty() {
            return Err(SourceError::Invalid(
                "--source-property is given but the source is the embedded log, which has none; \
                 pass --source URL (or --brokers) for a broker"
                    .into(),
            ));
        }
        let spec = SourceSpec {
            kind,
            url: url.to_string(),
            properties,
            data_dir,
        };
        // Check the URL and the properties now, so a typo is an error before anything starts.
        match kind {
            Kind::Embedded => {}
            Kind::Kafka => {
                kafka::KafkaConfig::from_spec(&spec)?;
            }
            Kind::RabbitMq => {
                rabbitmq::AmqpConfig::from_spec(&spec)?;
            }
            Kind::Redis => {
                redis::RedisConfig::from_spec(&spec)?;
            }
            Kind::Nats => {
                nats::NatsConfig::from_spec(&spec)?;
            }
            Kind::Sqs => {
                sqs::SqsConfig::from_spec(&spec)?;
            }
        }
        Ok(spec)
    }

    /// The broker's name as messages give it.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Embedded => "the embedded log",
            Kind::Kafka => "Kafka",
            Kind::RabbitMq => "RabbitMQ",
            Kind::Redis => "Redis",
            Kind::Nats => "NATS",
            Kind::Sqs => "SQS",
        }
    }

    /// What the broker does natively (known without connecting).
    pub fn capabilities(&self) -> super::Capabilities {
        match self.kind {
            Kind::Embedded => super::embedded::CAPABILITIES,
            Kind::Kafka => kafka::CAPABILITIES,
            Kind::RabbitMq => rabbitmq::CAPABILITIES,
            Kind::Redis => redis::CAPABILITIES,
            Kind::Nats => nats::CAPABILITIES,
            Kind::Sqs => sqs::CAPABILITIES,
        }
    }

    /// The broker's topic names: its rules, and its default dead-letter and retry names.
    pub fn naming(&self) -> weir_core::topic::Naming {
        match self.kind {
            Kind::Embedded | Kind::Kafka => weir_core::topic::Naming::KAFKA,
            Kind::RabbitMq => rabbitmq::NAMING,
            Kind::Redis => redis::NAMING,
            Kind::Nats => nats::NAMING,
            Kind::Sqs => sqs::NAMING,
        }
    }

    pub fn is_embedded(&self) -> bool {
        self.kind == Kind::Embedded
    }

    /// The broker for `topics`, `produce` and `consume`: the embedded log through its owner's
    /// socket when a run holds it.
    pub fn broker(&self) -> Result<Box<dyn Broker>, SourceError> {
        Ok(match self.kind {
            Kind::Embedded => Box::new(super::embedded::local::open(&self.data_dir)?),
            Kind::Kafka => Box::new(kafka::KafkaBroker::connect(kafka::KafkaConfig::from_spec(
                self,
            )?)?),
            Kind::RabbitMq => Box::new(rabbitmq::Rabbit::connect(
                rabbitmq::AmqpConfig::from_spec(self)?,
            )?),
            Kind::Redis => Box::new(redis::RedisBroker::connect(redis::RedisConfig::from_spec(
                self,
            )?)?),
            Kind::Nats => Box::new(nats::NatsBroker::connect(nats::NatsConfig::from_spec(
                self,
            )?)?),
            Kind::Sqs => Box::new(sqs::SqsBroker::connect(sqs::SqsConfig::from_spec(self)?)?),
        })
    }

    /// The consumer `weir run` takes messages from, for a broker (not the embedded log, which
    /// a run opens as its owner).
    pub fn consumer(&self, opts: &ConsumerOptions) -> Result<Arc<dyn Source>, SourceError> {
        Ok(match self.kind {
            Kind::Embedded => {
                return Err(SourceError::Invalid(
                    "the embedded log is opened by its owner, not as a consumer".into(),
                ));
            }
            Kind::Kafka => Arc::new(kafka::Kafka::connect(
                &kafka::KafkaConfig::from_spec(self)?,
                opts.exactly_once,
            )?),
            Kind::RabbitMq => Arc::new(rabbitmq::RabbitSource::start(
                rabbitmq::AmqpConfig::from_spec(self)?,
                opts,
            )?),
            Kind::Redis => Arc::new(redis::RedisSource::start(
                redis::RedisConfig::from_spec(self)?,
                opts,
            )?),
            Kind::Nats => Arc::new(nats::NatsSource::start(
                nats::NatsConfig::from_spec(self)?,
                opts,
            )?),
            Kind::Sqs => Arc::new(sqs::SqsSource::start(
                sqs::SqsConfig::from_spec(self)?,
                opts,
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_picks_the_broker() {
        let cases: &[(Option<&str>, Result<Kind, &str>)] = &[
            (None, Ok(Kind::Embedded)),
            (Some("embedded"), Ok(Kind::Embedded)),
            (Some("kafka://127.0.0.1:9092"), Ok(Kind::Kafka)),
            (Some("kafka://a:1,b:2"), Ok(Kind::Kafka)),
            (
                Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
                Ok(Kind::RabbitMq),
            ),
            (Some("AMQPS://host"), Ok(Kind::RabbitMq)),
            (Some("redis://127.0.0.1:6379"), Ok(Kind::Redis)),
            (Some("rediss://127.0.0.1:6379"), Ok(Kind::Redis)),
            (Some("nats://127.0.0.1:4222"), Ok(Kind::Nats)),
            (Some("sqs://us-east-1"), Ok(Kind::Sqs)),
            (Some("sqs://"), Ok(Kind::Sqs)),
            (Some("mqtt://x"), Err("unknown broker")),
            (Some("kafka://"), Err("no brokers")),
        ];
        for (url, want) in cases {
            let got = SourceSpec::parse(*url, BTreeMap::new(), PathBuf::from("d"));
            match (got, want) {
                (Ok(s), Ok(k)) => assert_eq!(s.kind, *k, "{url:?}"),
                (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{url:?}: {e}"),
                (got, want) => panic!("{url:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn properties_need_a_broker() {
        let props = BTreeMap::from([("a".to_string(), "b".to_string())]);
        let e = SourceSpec::parse(None, props, PathBuf::from("d")).unwrap_err();
        assert!(e.to_string().contains("--source-property"), "{e}");
    }
}
