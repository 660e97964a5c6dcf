//! The end-to-end test harness: builds the real `weir` binary and the guest components from
//! `guest-examples/` (for wasm32-wasip2), gives each test its own data directory, and waits on
//! conditions with deadlines instead of sleeping.

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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

/// The profile the tests build the Rust guests with (guest-examples/Cargo.toml): release
/// without LTO, so a change to a guest or the SDK rebuilds in seconds.
const GUEST_PROFILE: &str = "guest-test";

/// The component built from `guest-examples/rust/<name>`, built (once per test process; cargo
/// finds the build fresh after the first) in the guests' test profile.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let manifest = root().join("guest-examples").join("Cargo.toml");
        let status = cargo()
            .current_dir(root().join("guest-examples"))
            .env_remove("CARGO_TARGET_DIR")
            .args([
                "build",
                "--quiet",
                "--profile",
                GUEST_PROFILE,
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("run cargo build for the guest examples");
        assert!(
            status.success(),
            "building the guest examples failed (is the wasm32-wasip2 target installed?)"
        );
        root()
            .join("guest-examples/target/wasm32-wasip2")
            .join(GUEST_PROFILE)
    });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.is_file(), "no guest component at {}", path.display());
    path
}

/// The languages weir's example handlers are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

impl Lang {
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Js, Lang::C];

    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::C => "c",
        }
    }
}

/// Runs a guest's build script; panics with its output (and what to install) if it fails.
pub fn run_build(dir: &Path, cmd: &mut Command, needs: &str) {
    let out = cmd
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot start the build in {}: {e}; {needs}", dir.display()));
    assert!(
        out.status.success(),
        "building {} failed ({needs}):\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the WASI preview 1 adapter (from its crate) where C builds can find it.
pub fn preview1_adapter() -> PathBuf {
    let path = std::env::temp_dir().join(format!("weir-tests-adapter-{}.wasm", std::process::id()));
    if !path.is_file() {
        std::fs::write(
            &path,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )
        .expect("write the adapter");
    }
    path
}

/// The `orders` example in `lang`, built with its language's toolchain
/// (scripts/setup-guests.sh installs them) once for every test process of a run and for later
/// runs: the component is kept under `target/weir-test-guests/`, named by a digest of the
/// example's sources and the WIT contract, and built again only when they change.
pub fn orders_in(lang: Lang) -> PathBuf {
    if lang == Lang::Rust {
        return guest("orders");
    }
    static BUILT: OnceLock<Mutex<HashMap<Lang, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&lang) {
        return p.clone();
    }
    let dir = root()
        .join("guest-examples")
        .join(lang.name())
        .join("orders");
    let cached = shared_dir("weir-test-guests").join(format!(
        "orders-{}-{}.wasm",
        lang.name(),
        sources_digest(&[&dir, &root().join("wit")])
    ));
    with_lock(&format!("guest-{}", lang.name()), || {
        if cached.is_file() {
            return;
        }
        match lang {
            Lang::Rust => unreachable!("built by cargo above"),
            Lang::Python => run_build(
                &dir,
                &mut Command::new("./build.sh"),
                "needs componentize-py: scripts/setup-guests.sh",
            ),
            Lang::Js => {
                npm_install(&dir);
                run_build(
                    &dir,
                    Command::new("npm").args(["run", "--silent", "build"]),
                    "needs jco from npm: scripts/setup-guests.sh",
                );
            }
            Lang::C => run_build(
                &dir,
                Command::new("./build.sh").env("ADAPTER", preview1_adapter()),
                "needs clang, wasi-libc, wit-bindgen and wasm-tools: scripts/setup-guests.sh",
            ),
        }
        let out = dir.join("orders.wasm");
        assert!(out.is_file(), "no component at {}", out.display());
        let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
        std::fs::copy(&out, &tmp).expect("copy the component to the test cache");
        std::fs::rename(&tmp, &cached).expect("move the component into the test cache");
    });
    built.insert(lang, cached.clone());
    cached
}

/// The JavaScript example's `node_modules/` (jco), installed with `npm ci` once, under the
/// JS example's lock: another test may link to it, and must not see it half filled.
pub fn js_node_modules() -> PathBuf {
    let dir = root().join("guest-examples/js/orders");
    with_lock("guest-js", || npm_install(&dir));
    dir.join("node_modules")
}

fn npm_install(dir: &Path) {
    // `npm ci` writes this file last: a node_modules/ without it is an install cut short.
    if !dir.join("node_modules/.package-lock.json").is_file() {
        run_build(
            dir,
            Command::new("npm").args(["ci", "--no-audit", "--no-fund"]),
            "needs Node.js and npm",
        );
    }
}

/// A digest of every file under `dirs` (names and contents, in a fixed order), leaving out what
/// builds write there: `orders.wasm`, `*.core.wasm`, `gen/`, `node_modules/`.
pub fn sources_digest(dirs: &[&Path]) -> String {
    use sha2::{Digest, Sha256};
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if matches!(name, "gen" | "node_modules" | "orders.wasm")
                || name.ends_with(".core.wasm")
            {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut h = Sha256::new();
    for dir in dirs {
        let mut files = Vec::new();
        walk(dir, &mut files);
        for f in files {
            h.update(
                f.strip_prefix(root())
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .as_bytes(),
            );
            h.update([0]);
            h.update(std::fs::read(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display())));
        }
    }
    hex::encode(&h.finalize()[..8])
}

/// One HTTP/1.1 request to `addr` (host:port); returns the status code and the body.
pub fn http(method: &str, addr: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with(method, addr, path, &[], body)
}

/// [`http`] with more request headers; a `Host` among them replaces the default (`addr`).
pub fn http_with(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    write!(
        s,
        "{head}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, rest.to_string())
}

/// A downstream service for handlers that call out over HTTP (`guest-examples/rust/fetch`):
/// answers every request with its own body after `latency`, one thread per connection, and
/// counts requests and how many were waiting at once.
pub struct EchoServer {
    addr: String,
    counts: std::sync::Arc<EchoCounts>,
}

#[derive(Default)]
struct EchoCounts {
    requests: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
}

impl EchoServer {
    /// Listens on a free loopback port. The service latency is what the server simulates (a
    /// slow downstream), not a wait of the test.
    pub fn start(latency: Duration) -> EchoServer {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let counts = std::sync::Arc::new(EchoCounts::default());
        let c = counts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let c = c.clone();
                std::thread::spawn(move || {
                    let now = c.in_flight.fetch_add(1, SeqCst) + 1;
                    c.peak.fetch_max(now, SeqCst);
                    let served = echo_one(conn, latency);
                    c.in_flight.fetch_sub(1, SeqCst);
                    if served {
                        c.requests.fetch_add(1, SeqCst);
                    }
                });
            }
        });
        EchoServer { addr, counts }
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The `--handler-config` setting that points the `fetch` guest at this server.
    pub fn url_setting(&self) -> String {
        format!("url=http://{}/enrich", self.addr)
    }

    /// Requests answered.
    pub fn requests(&self) -> u64 {
        self.counts
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests that were being served at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.counts.peak.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads one request (headers and a Content-Length body), waits `latency`, answers 200 with
/// the same body and closes. False if the request was cut short.
fn echo_one(conn: std::net::TcpStream, latency: Duration) -> bool {
    use std::io::{BufRead, BufReader, Read, Write};
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut reader = BufReader::new(&conn);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return false;
    }
    // The service's latency: the behaviour the tests put weir against, not a wait of theirs.
    std::thread::sleep(latency);
    let mut w = &conn;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).is_ok() && w.write_all(&body).is_ok()
}

/// The admin server address a `weir run` logged (with `--log-format json`), once it has.
pub fn admin_address(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("admin server listening"))
        })
        .and_then(|v| {
            v["fields"]["address"]
                .as_str()
                .map(|a| a.trim_start_matches("http://").to_string())
        })
}

/// A number from /proc/PID/status (`Threads:`, `VmRSS:` and `VmHWM:` in KiB); 0 once the
/// process is gone.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) the process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command; in
    // clock ticks of 1/100 s on Linux.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// The share of one core the process used over `window` (CPU time / wall time). The window is
/// the measurement itself, not a wait for an event.
pub fn cpu_share(pid: u32, window: Duration) -> f64 {
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(window);
    (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64()
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
            Broker::Embedded | Broker::Rabbit(_) => None,
            Broker::Mock(c) => Some(c.bootstrap_servers()),
            Broker::External(b) => Some(b.clone()),
        }
    }

    /// (ready messages, consumers) of a queue of the test's RabbitMQ virtual host.
    pub fn queue_state(&self, queue: &str) -> (u64, u64) {
        let Broker::Rabbit(v) = &self.broker else {
            panic!("queue_state on a test that is not on RabbitMQ")
        };
        queue_state(&v.url(), queue)
    }

    /// Whether the test's topics are queues (one partition, no offsets).
    pub fn on_queue(&self) -> bool {
        matches!(self.broker, Broker::Rabbit(_))
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
        // A queue has no partitions: the same test runs on one.
        let partitions = if self.on_queue() { 1 } else { partitions };
        self.ok(&[
            "topics",
            "create",
            topic,
            "--partitions",
            &partitions.to_string(),
        ]);
    }

    /// Every message of `topic`, as `weir consume --json` prints them.
    pub fn messages(&self, topic: &str) -> Vec<Value> {
        let out = self.ok(&["consume", topic, "--from-beginning", "--json"]);
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
            .env("RUST_LOG", "info")
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

/// What `weir run --json --log-format json` reported: its summary, and the `message failed`
/// events of its log (each with `at_ms`, the event's timestamp in ms since the epoch, added).
pub struct Logged {
    pub summary: Value,
    pub failures: Vec<Value>,
}

impl Weir {
    /// Runs `weir run ... --drain` with a JSON log, and returns the summary and failure events.
    pub fn drain_logged(&self, module: &Path, topic: &str, group: &str, extra: &[&str]) -> Logged {
        let mut args = vec![
            "--log-format",
            "json",
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
        let summary =
            serde_json::from_slice(&out.stdout).expect("run --json prints a JSON summary");
        let failures = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["fields"]["message"] == "message failed")
            .map(|mut e| {
                let at = rfc3339_ms(
                    e["timestamp"]
                        .as_str()
                        .expect("log events have a timestamp"),
                );
                e["at_ms"] = Value::from(at);
                e
            })
            .collect();
        Logged { summary, failures }
    }
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp as tracing prints it
/// (`2026-11-28T01:02:03.123456Z`).
pub fn rfc3339_ms(ts: &str) -> u64 {
    let num = |r: std::ops::Range<usize>| -> i64 {
        ts[r]
            .parse()
            .unwrap_or_else(|_| panic!("bad timestamp {ts}"))
    };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    let (hh, mm) = (num(11..13), num(14..16));
    let secs: f64 = ts[17..ts.len() - 1]
        .parse()
        .unwrap_or_else(|_| panic!("bad timestamp {ts}"));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + hh * 3600 + mm * 60) * 1000) as u64 + (secs * 1000.0).round() as u64
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
