//! The end-to-end test harness: builds the real `weir` binary and the guest components from
//! `guest-examples/` (for wasm32-wasip2), gives each test its own data directory, and waits on
//! conditions with deadlines instead of sleeping.

mod brokers;
mod guests;
mod logs;
mod measure;
mod net;
mod proxy;
pub mod sqs;
mod tls;

pub use brokers::*;
pub use guests::*;
pub use logs::*;
pub use measure::*;
pub use net::*;
pub use proxy::*;
pub use sqs::SqsNs;
pub use tls::*;

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A directory under `target/` that every test process of a run (and later runs) shares.
pub fn shared_dir(name: &str) -> PathBuf {
    let dir = target_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Runs `f` holding an exclusive lock on `target/weir-test-locks/<name>`: test processes
/// (cargo-nextest runs each test in one of its own) build a shared thing once, not at once.
pub fn with_lock<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let path = shared_dir("weir-test-locks").join(name);
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("create the lock {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
    let out = f();
    drop(file);
    out
}

/// The `weir` binary under test. It is `runtime/src/main.rs` built as this package's
/// `weir-under-test` binary, so cargo builds it before any test runs, once, with the features of
/// the test build (building `-p weir` from here compiled tokio and everything above it a second
/// time, without tokio's test-util).
pub fn weir_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let name = format!("weir-under-test{}", std::env::consts::EXE_SUFFIX);
        // cargo-nextest names it; under `cargo test` it is beside the test binary's deps/.
        let bin = std::env::var_os("NEXTEST_BIN_EXE_weir-under-test")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let exe = std::env::current_exe().expect("the test binary's path");
                let profile_dir = exe
                    .parent()
                    .and_then(Path::parent)
                    .expect("the test binary is in target/<profile>/deps");
                profile_dir.join(&name)
            });
        assert!(
            bin.is_file(),
            "no weir binary at {}: run the tests through cargo (`cargo nextest run` or \
             `cargo test -p weir-tests`), which builds it",
            bin.display()
        );
        bin
    })
}

/// Whether this is CI (`CI` set to anything but `false` or empty), where no test may skip:
/// a missing service or tool fails the test that needs it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// For a test that cannot run here (`why` says what is missing and how to get it): fails it in
/// CI, says so on standard error elsewhere. The caller returns after it.
pub fn skip(why: &str) {
    assert!(!in_ci(), "CI=true and {why}");
    eprintln!("SKIPPED: {why}");
}

/// `WEIR_TEST_SCALE` (default 1): how many times the CI-sized volumes the tests run. A kill
/// test needs enough messages that the kill lands mid-stream, not a benchmark's worth; run
/// `WEIR_TEST_SCALE=10 scripts/test.sh` to put ten times as many through the same checks.
pub fn scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("WEIR_TEST_SCALE") {
        Err(_) => 1.0,
        Ok(v) => match v.parse::<f64>() {
            Ok(x) if x > 0.0 && x.is_finite() => x,
            _ => panic!("WEIR_TEST_SCALE={v}: expected a positive number (1 is CI's size)"),
        },
    })
}

/// `base` messages times [`scale`], and never fewer than `floor` (what the property needs).
pub fn scaled(base: u64, floor: u64) -> u64 {
    ((base as f64 * scale()).round() as u64).max(floor)
}

/// Polls `cond` until it holds or `within` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        // The poll interval of this deadline-bound wait (5 ms, doubling to 100 ms).
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A data directory for one test, and `weir` commands run against it (and against its broker).
pub struct Weir {
    dir: tempfile::TempDir,
    broker: Broker,
}

impl Default for Weir {
    fn default() -> Self {
        Self::new()
    }
}

impl Weir {
    /// A test on the embedded log.
    pub fn new() -> Weir {
        Weir::on(Broker::Embedded)
    }

    /// A test on a fresh mock Kafka cluster of its own.
    pub fn kafka_mock() -> Weir {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("start a mock Kafka cluster");
        Weir::on(Broker::Mock(cluster))
    }

    /// A test on the machine's RabbitMQ, in a virtual host of its own.
    pub fn rabbitmq() -> Weir {
        Weir::on(Broker::Rabbit(Vhost::new()))
    }

    /// A test on the machine's NATS JetStream, under a subject prefix of its own.
    pub fn nats() -> Weir {
        Weir::on(Broker::Nats(NatsNs::new()))
    }

    /// A test on SQS (moto's server), under a queue-name prefix of its own.
    pub fn sqs() -> Weir {
        Weir::on(Broker::Sqs(SqsNs::new(false)))
    }

    /// A test on SQS FIFO queues (`fifo=true`: a topic `t` is the queue `t.fifo`).
    pub fn sqs_fifo() -> Weir {
        Weir::on(Broker::Sqs(SqsNs::new(true)))
    }

    /// A test on the machine's Redis, under a key prefix of its own.
    pub fn redis() -> Weir {
        Weir::on(Broker::Redis(RedisNs::new()))
    }

    pub fn on(broker: Broker) -> Weir {
        Weir {
            dir: tempfile::Builder::new()
                .prefix("weir-test")
                .tempdir()
                .expect("make a temp dir"),
            broker,
        }
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The brokers' address, when the test is on Kafka.
    pub fn brokers(&self) -> Option<String> {
        match &self.broker {
            Broker::Embedded
            | Broker::Rabbit(_)
            | Broker::Redis(_)
            | Broker::Nats(_)
            | Broker::Sqs(_) => None,
            Broker::Mock(c) => Some(c.bootstrap_servers()),
            Broker::External(b) => Some(b.clone()),
        }
    }

    /// (ready messages, consumers) of a queue of the test's RabbitMQ virtual host; on SQS
    /// (visible, in flight): either way, once the second is 0 what a killed consumer held is
    /// back in the first.
    pub fn queue_state(&self, queue: &str) -> (u64, u64) {
        match &self.broker {
            Broker::Rabbit(v) => queue_state(&v.url(), queue),
            Broker::Sqs(ns) => ns.counts(queue),
            _ => panic!("queue_state on a test that is not on a queue"),
        }
    }

    /// Drops every connection weir has to the broker: RabbitMQ closes them
    /// (`close_all_connections`); the mock Kafka cluster takes its broker down for `outage`
    /// and up again. (The embedded log and an external broker have none to drop here.)
    pub fn lose_links(&self, outage: Duration) {
        match &self.broker {
            Broker::Rabbit(v) => v.close_connections(),
            Broker::Redis(ns) => ns.close_connections(),
            Broker::Nats(ns) => {
                let closed = ns.relay.cut(outage);
                assert!(closed > 0, "the relay had no link of weir's to cut");
            }
            Broker::Sqs(ns) => {
                let closed = ns.relay.cut(outage);
                assert!(closed > 0, "the relay had no link of weir's to cut");
            }
            Broker::Mock(c) => {
                c.broker_down(1).expect("take the mock broker down");
                // The outage itself, not a wait for something: weir meets a broker that is gone.
                std::thread::sleep(outage);
                c.broker_up(1).expect("bring the mock broker up");
            }
            Broker::Embedded | Broker::External(_) => {
                panic!("no broker link to lose on this source")
            }
        }
    }

    /// The default dead-letter topic of `topic` (`in.dlq`; SQS names take no dots: `in-dlq`).
    pub fn dlq_of(&self, topic: &str) -> String {
        match self.broker {
            Broker::Sqs(_) => format!("{topic}-dlq"),
            _ => format!("{topic}.dlq"),
        }
    }

    /// How many messages a test sends to show a property that `n` shows elsewhere: on SQS an
    /// eighth (at least 100). moto's server, the tests' SQS, answers a call in 50 ms with a
    /// queue nearly empty and in hundreds with thousands of messages in it (it walks every
    /// message of a queue on each receive), so volume buys time, not proof.
    /// On FIFO queues a fortieth: moto checks each message sent against every message of the
    /// queue (deduplication), so sending slows with the square of the queue's length.
    pub fn volume(&self, n: u64) -> u64 {
        match &self.broker {
            Broker::Sqs(ns) if ns.fifo => (n / 40).max(100),
            Broker::Sqs(_) => (n / 8).max(100),
            _ => n,
        }
    }

    /// Whether the test's topics are queues (one partition, no offsets).
    pub fn on_queue(&self) -> bool {
        matches!(self.broker, Broker::Rabbit(_) | Broker::Sqs(_))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A scratch path beside the data directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `weir <args>` against this data directory, with logs quiet unless a test asks
    /// (`WEIR_TEST_LOG=debug` sets every command's `RUST_LOG`).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(weir_bin());
        c.arg("--data-dir").arg(self.data_dir());
        if let Some(b) = self.brokers() {
            c.arg("--brokers").arg(b);
            for p in TEST_KAFKA_PROPERTIES {
                c.arg("--source-property").arg(p);
            }
        }
        if let Broker::Rabbit(v) = &self.broker {
            c.arg("--source").arg(v.url());
        }
        if let Broker::Redis(ns) = &self.broker {
            // A killed process's entries are taken over after claim-idle: 2 s rather than 30.
            c.args(["--source", &RedisNs::url()])
                .args(["--source-property", &format!("prefix={}", ns.prefix)])
                .args(["--source-property", "claim-idle=2s"]);
        }
        if let Broker::Nats(ns) = &self.broker {
            // A killed process's messages come back after ack-wait: 2 s rather than 30.
            c.args(["--source", &ns.weir_url()])
                .args(["--source-property", &format!("prefix={}", ns.prefix)])
                .args(["--source-property", "ack-wait=2s"]);
        }
        if let Broker::Sqs(ns) = &self.broker {
            // Queues weir creates hide a received message for 20 s rather than 30, so a killed
            // process's messages come back sooner (moto answers in tens of milliseconds, at
            // times hundreds: much less has held messages expire between renewals). One
            // receiver per process: moto's receive is not atomic, so two at once can both take
            // one message (or, on FIFO, messages of one group), which SQS never does.
            c.args(["--source", &format!("sqs://{}", sqs::REGION)])
                .args(["--source-property", &format!("prefix={}", ns.prefix)])
                .args(["--source-property", "visibility=20s"]);
            if ns.fifo {
                // Short polling: moto's long poll spins while every group of a FIFO queue is
                // held, and starves the rest.
                c.args(["--source-property", "fifo=true"])
                    .args(["--source-property", "wait=0s"]);
            }
            c.args(["--source-property", "receivers=1"]);
            c.envs(ns.env());
        }
        c.args(args)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_TEST_LOG").unwrap_or("warn".into()),
            )
            // One cache of compiled modules for every test: each compiled its guest again in
            // a data directory of its own (seconds each for Python and JavaScript).
            .env("WEIR_CACHE_DIR", shared_dir("weir-test-compiled"))
            .stdin(Stdio::null());
        c
    }

    /// Runs `weir <args>` and returns its output, whatever its exit code.
    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run weir")
    }

    /// Runs `weir <args>` and panics, showing its standard error, unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "weir {args:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `weir <args>`, expects exit code `code`, and returns its standard error.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.output(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "weir {args:?}: wrong exit code; stderr:\n{stderr}"
        );
        stderr
    }

    /// Creates `topic`. On the mock cluster, also its dead-letter and retry topics and the
    /// topic of `weir dlq replay`'s marks, which weir creates by itself on brokers that take
    /// CreateTopics (the mock cluster does not).
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        if let Broker::Mock(c) = &self.broker {
            for (t, n) in [
                (topic.to_string(), partitions),
                (format!("{topic}.dlq"), partitions),
                (format!("{topic}.retry"), partitions),
                (format!("{topic}.dlq.replayed"), 1),
            ] {
                c.create_topic(&t, n as i32, 1)
                    .expect("create a topic on the mock cluster");
            }
            return;
        }
        // A queue or a Redis stream has no partitions: the same test runs on one.
        let one = matches!(
            self.broker,
            Broker::Rabbit(_) | Broker::Redis(_) | Broker::Nats(_) | Broker::Sqs(_)
        );
        let partitions = if one { 1 } else { partitions };
        self.ok(&[
            "topics",
            "create",
            topic,
            "--partitions",
            &partitions.to_string(),
        ]);
    }

    /// Every message of `topic`, as `weir consume --json` prints them.
    /// On SQS FIFO queues, which cannot be read without taking, they are taken (deleted).
    pub fn messages(&self, topic: &str) -> Vec<Value> {
        if let Broker::Sqs(ns) = &self.broker {
            // A queue is read by receiving it: wait until nothing is in flight (a run that
            // ended, a read before this one put back), or the read misses what is held.
            wait_until(
                "nothing in flight in the queue read",
                Duration::from_secs(150),
                || ns.counts(topic).1 == 0,
            );
        }
        let out = if matches!(&self.broker, Broker::Sqs(ns) if ns.fifo) {
            self.ok(&["consume", topic, "--group", "harness", "--json"])
        } else {
            self.ok(&["consume", topic, "--from-beginning", "--json"])
        };
        String::from_utf8(out.stdout)
            .expect("consume prints UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("consume --json prints JSON lines"))
            .collect()
    }

    /// How many confirmations each order id has in `confirmations` (what `orders` emits).
    pub fn confirmations_per_id(&self) -> HashMap<String, u64> {
        let mut per_id = HashMap::new();
        for m in self.messages("confirmations") {
            let c: Value = serde_json::from_str(m["payload"].as_str().expect("a text payload"))
                .expect("a JSON confirmation");
            *per_id
                .entry(c["order_id"].as_str().expect("an order_id").to_string())
                .or_default() += 1;
        }
        per_id
    }

    /// The committed offsets of `group` on `topic`, summed over partitions.
    pub fn committed(&self, topic: &str, group: &str) -> u64 {
        self.offsets(topic, group).iter().map(|(_, c)| c).sum()
    }

    /// `weir topics list --json`.
    pub fn stats(&self) -> Value {
        let out = self.ok(&["topics", "list", "--json"]);
        serde_json::from_slice(&out.stdout).expect("topics list --json prints JSON")
    }

    /// (end offset, committed offset of `group`) per partition of `topic`.
    pub fn offsets(&self, topic: &str, group: &str) -> Vec<(u64, u64)> {
        // Named, since not every broker lists its groups (the mock cluster does not).
        let out = self.ok(&["topics", "list", topic, "--group", group, "--json"]);
        let stats = serde_json::from_slice(&out.stdout).expect("topics list --json prints JSON");
        offsets_in(&stats, topic, group)
    }

    /// Runs `weir run ... --drain --json` and returns its summary.
    pub fn drain(&self, module: &Path, topic: &str, group: &str, extra: &[&str]) -> Value {
        let mut args = vec![
            "run",
            "--module",
            module.to_str().expect("UTF-8 path"),
            "--topic",
            topic,
            "--group",
            group,
            "--drain",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = self.ok(&args);
        serde_json::from_slice(&out.stdout).expect("run --json prints a JSON summary")
    }
}

/// A `weir` process a test started. Killed when dropped, so a failing test never leaves one
/// running (it would hold the test's output pipe open).
pub struct Running {
    child: Option<std::process::Child>,
}

impl From<std::process::Child> for Running {
    fn from(child: std::process::Child) -> Running {
        Running { child: Some(child) }
    }
}

impl Running {
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("poll the child").is_none())
    }

    /// Waits for it to exit by itself; returns what it printed on standard output.
    pub fn wait(mut self) -> Output {
        let child = self.child.take().expect("running");
        child.wait_with_output().expect("wait for weir")
    }

    /// `kill -9`, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for it to exit; returns what it printed on standard output.
    pub fn terminate(mut self) -> Output {
        let child = self.child.take().expect("running");
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(term.success(), "kill -TERM failed");
        child.wait_with_output().expect("wait for weir")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Weir {
    /// Starts `weir <args>` in the background; its standard output is captured, its log dropped.
    pub fn spawn(&self, args: &[&str]) -> Running {
        let child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weir");
        Running { child: Some(child) }
    }

    /// `weir --log-format json <args> --admin 127.0.0.1:0` (a run), with its log in `log`; waits
    /// until its admin server listens and returns the run and the server's address.
    pub fn spawn_with_admin(&self, args: &[&str], log: &Path) -> (Running, String) {
        let mut all = vec!["--log-format", "json"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--admin", "127.0.0.1:0"]);
        let run = self.spawn_logged(&all, log);
        let mut addr = None;
        wait_until("the admin server listens", Duration::from_secs(30), || {
            addr = admin_address(log);
            addr.is_some()
        });
        (run, addr.expect("an address"))
    }

    /// Like [`Weir::spawn`], with its log (standard error) written to `log`.
    pub fn spawn_logged(&self, args: &[&str], log: &Path) -> Running {
        let file = std::fs::File::create(log).expect("create the log file");
        let child = self
            .cmd(args)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("start weir");
        Running { child: Some(child) }
    }

    /// The end offsets of `topic`'s partitions, summed: how many messages it holds.
    pub fn end(&self, topic: &str) -> u64 {
        let out = self.ok(&["topics", "list", topic, "--json"]);
        let stats: Value = serde_json::from_slice(&out.stdout).expect("topics list --json");
        offsets_in(&stats, topic, "")
            .iter()
            .map(|(end, _)| end)
            .sum()
    }

    /// Messages in `topic` now, or 0 if it does not exist yet (for polling).
    pub fn count(&self, topic: &str) -> usize {
        let out = self.output(&["consume", topic, "--from-beginning", "--json"]);
        if out.status.success() {
            out.stdout.iter().filter(|&&b| b == b'\n').count()
        } else {
            0
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// Writes `lines` to a file beside the data directory and produces them, one message each,
/// with key `key` (or none).
pub fn produce_lines(w: &Weir, topic: &str, key: Option<&str>, lines: &[&str]) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = w.path(&format!("input-{n}.txt"));
    std::fs::write(&file, lines.join("\n") + "\n").expect("write the input file");
    let mut args = vec![
        "produce",
        topic,
        "--file",
        file.to_str().expect("UTF-8 path"),
    ];
    if let Some(k) = key {
        args.extend(["--key", k]);
    }
    w.ok(&args);
}

/// Produces `lines` of `KEY<sep>VALUE` to `topic`, each keyed, with `weir produce --file`.
pub fn produce_keyed(w: &Weir, topic: &str, sep: &str, lines: &[String]) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = w.path(&format!("keyed-{n}.txt"));
    std::fs::write(&file, lines.join("\n") + "\n").expect("write the input file");
    w.ok(&[
        "produce",
        topic,
        "--file",
        file.to_str().expect("UTF-8 path"),
        "--key-separator",
        sep,
    ]);
}

/// (end offset, committed offset of `group`) per partition of `topic`, from `topics list --json`.
pub fn offsets_in(stats: &Value, topic: &str, group: &str) -> Vec<(u64, u64)> {
    let t = stats
        .as_array()
        .expect("a list of topics")
        .iter()
        .find(|t| t["topic"] == topic)
        .unwrap_or_else(|| panic!("no topic {topic} in {stats}"));
    t["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            let end = p["end_offset"].as_u64().expect("end_offset");
            let committed = p["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .find(|g| g["group"] == group)
                .map_or(0, |g| g["committed"].as_u64().expect("committed"));
            (end, committed)
        })
        .collect()
}

/// The value of header `name` of a message printed by `consume --json`.
pub fn header<'a>(msg: &'a Value, name: &str) -> Option<&'a str> {
    msg["headers"][name].as_str()
}
