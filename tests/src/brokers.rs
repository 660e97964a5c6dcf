//! Where a test's topics live: the embedded log, a mock Kafka cluster, a real Kafka-protocol
//! broker, or a RabbitMQ virtual host of the test's own.

use std::process::{Command, Stdio};

/// Where a test's topics live.
pub enum Broker {
    /// The embedded log in the test's data directory.
    Embedded,
    /// librdkafka's in-process mock cluster, one per test, on a loopback port. It cannot create
    /// topics over the protocol, so the harness creates them with the mock's own API.
    Mock(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    /// A real Kafka-protocol broker (`WEIR_TEST_KAFKA_BROKERS`).
    External(String),
    /// The machine's RabbitMQ (`WEIR_TEST_AMQP`, default 127.0.0.1:5672 as guest), in a virtual
    /// host of the test's own, so that tests share no queues.
    Rabbit(Vhost),
    /// The machine's Redis (`WEIR_TEST_REDIS`, default redis://127.0.0.1:6379), under a key
    /// prefix of the test's own.
    Redis(RedisNs),
    /// The machine's NATS with JetStream (`WEIR_TEST_NATS`, default nats://127.0.0.1:4222),
    /// under a subject prefix of the test's own.
    Nats(NatsNs),
    /// moto's SQS server (`WEIR_TEST_SQS`), under a queue-name prefix of the test's own.
    Sqs(crate::sqs::SqsNs),
}

/// A subject prefix made for one test (`--source-property prefix=...`); its streams are
/// deleted after.
pub struct NatsNs {
    pub prefix: String,
    /// weir reaches the server through this relay, so a test can cut its links.
    pub relay: crate::Relay,
}

impl Default for NatsNs {
    fn default() -> NatsNs {
        NatsNs::new()
    }
}

impl NatsNs {
    pub fn new() -> NatsNs {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let server = NatsNs::url();
        // host:port, without the scheme or credentials.
        let server = server
            .rsplit(['/', '@'])
            .next()
            .unwrap_or(&server)
            .to_string();
        NatsNs {
            prefix: format!("wt{}-{n}-{}.", std::process::id(), crate::now_ms()),
            relay: crate::Relay::new(&server),
        }
    }

    /// The URL weir is given: the relay's.
    pub fn weir_url(&self) -> String {
        format!("nats://{}", self.relay.addr())
    }

    pub fn url() -> String {
        std::env::var("WEIR_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    /// Runs `f` with a JetStream context of a client of its own (not weir's).
    pub fn with<T>(f: impl AsyncFnOnce(async_nats::jetstream::Context) -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async {
            let client = async_nats::connect(NatsNs::url())
                .await
                .expect("connect to NATS (is it running? scripts/services.sh starts it)");
            f(async_nats::jetstream::new(client)).await
        })
    }

    /// The subject of `topic`, and the name of its stream.
    pub fn subject(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    pub fn stream(&self, topic: &str) -> String {
        self.subject(topic).replace('.', "_")
    }

    /// (not delivered yet, delivered and not acked) of `group`'s consumer on `topic`.
    pub fn pending(&self, topic: &str, group: &str) -> (u64, u64) {
        let (stream, group) = (self.stream(topic), group.to_string());
        NatsNs::with(async move |js| {
            let s = js.get_stream(&stream).await.expect("the stream");
            let i = s.consumer_info(&group).await.expect("the group's consumer");
            (i.num_pending, i.num_ack_pending as u64)
        })
    }
}

impl Drop for NatsNs {
    fn drop(&mut self) {
        use futures_util::StreamExt;
        let prefix = self.prefix.replace('.', "_");
        let _ = std::panic::catch_unwind(|| {
            NatsNs::with(async move |js| {
                let mut names = js.stream_names();
                let mut mine = Vec::new();
                while let Some(Ok(n)) = names.next().await {
                    if n.starts_with(&prefix) {
                        mine.push(n);
                    }
                }
                for n in mine {
                    let _ = js.delete_stream(&n).await;
                }
            })
        });
    }
}

/// A key prefix made for one test (`--source-property prefix=...`); its keys are deleted after.
pub struct RedisNs {
    pub prefix: String,
}

impl Default for RedisNs {
    fn default() -> RedisNs {
        RedisNs::new()
    }
}

impl RedisNs {
    pub fn new() -> RedisNs {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RedisNs {
            prefix: format!("weir-test-{}-{n}-{}:", std::process::id(), crate::now_ms()),
        }
    }

    pub fn url() -> String {
        std::env::var("WEIR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// A connection to the test's Redis, as any client (not weir) has one.
    pub fn connection() -> redis::Connection {
        redis::Client::open(RedisNs::url())
            .and_then(|c| c.get_connection())
            .expect("connect to Redis (is it running? scripts/services.sh starts it)")
    }

    /// The key of `topic`.
    pub fn key(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// Closes every connection weir made for this test (they carry the prefix in their client
    /// names), as a Redis restart or a network cut would.
    pub fn close_connections(&self) {
        let mut c = RedisNs::connection();
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
        for line in list.lines() {
            let field = |f: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(&format!("{f}=")))
                    .unwrap_or("")
                    .to_string()
            };
            if field("name").contains(&self.prefix) {
                let _: Result<(), _> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(field("id"))
                    .query(&mut c);
            }
        }
    }

    /// How many entries of `topic` are pending in `group` (delivered, not acked).
    pub fn pending(&self, topic: &str, group: &str) -> u64 {
        let mut c = RedisNs::connection();
        let v: redis::Value = redis::cmd("XPENDING")
            .arg(self.key(topic))
            .arg(group)
            .query(&mut c)
            .expect("XPENDING");
        match v {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }
}

impl Drop for RedisNs {
    fn drop(&mut self) {
        let Ok(mut c) = redis::Client::open(RedisNs::url()).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut c)
            .unwrap_or_default();
        for k in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut c);
        }
    }
}

/// A RabbitMQ virtual host made for one test and deleted after it (`rabbitmqctl`).
pub struct Vhost {
    pub name: String,
}

impl Default for Vhost {
    fn default() -> Vhost {
        Vhost::new()
    }
}

impl Vhost {
    pub fn new() -> Vhost {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("weir-test-{}-{n}", std::process::id());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost { name }
    }

    /// Closes every client connection of the virtual host, as a broker restart or a network
    /// cut would (`rabbitmqctl close_all_connections`).
    pub fn close_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &self.name,
            "closed by a weir test",
        ]);
    }

    /// `amqp://guest:guest@host:port/<vhost>`.
    pub fn url(&self) -> String {
        let base = std::env::var("WEIR_TEST_AMQP")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
        format!("{}/{}", base.trim_end_matches('/'), self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl (is RabbitMQ installed? .ci/run installs it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A setting of the RabbitMQ server (`application:set_env(rabbit, ...)`) changed for one test
/// and put back when dropped. It changes the broker under every test that runs meanwhile: only
/// tests that run alone (the `measured` profile, .config/nextest.toml) may use it.
pub struct RabbitSetting {
    name: String,
    old: String,
}

impl RabbitSetting {
    pub fn set(name: &str, value: u64) -> RabbitSetting {
        let out = Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!("{{ok, V}} = application:get_env(rabbit, {name}), V."),
            ])
            .output()
            .expect("run rabbitmqctl");
        assert!(out.status.success(), "reading the broker's {name}");
        let old = String::from_utf8_lossy(&out.stdout).trim().to_string();
        rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, {name}, {value})."),
        ]);
        RabbitSetting {
            name: name.into(),
            old,
        }
    }
}

impl Drop for RabbitSetting {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!("application:set_env(rabbit, {}, {}).", self.name, self.old),
            ])
            .status();
    }
}

/// (ready messages, consumers) of `queue` at the AMQP `url`, from the broker itself: a passive
/// declare, as any client can ask. (Each poll used to start `rabbitmqctl`, an Erlang VM and
/// about a core-second, beside the runs under test.) Once no consumer is left, the broker has
/// put back whatever was unacked, so (0, 0) means nothing is left in the queue or held.
pub fn queue_state(url: &str, queue: &str) -> (u64, u64) {
    use lapin::options::QueueDeclareOptions;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let ch = conn.create_channel().await.expect("a channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("no queue {queue}: {e}"));
        let _ = conn.close(200, "read".into()).await;
        (u64::from(q.message_count()), u64::from(q.consumer_count()))
    })
}

/// librdkafka settings every Kafka test passes: a short session timeout, so a member killed
/// with `kill -9` leaves the group in seconds rather than 45.
pub const TEST_KAFKA_PROPERTIES: &[&str] =
    &["session.timeout.ms=6000", "heartbeat.interval.ms=500"];
