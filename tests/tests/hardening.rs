//! Hostile input and faults (issue 19): each finding of the review as a test that failed on the
//! code it was found in. One message, one header or one fault costs only its own outcome; it
//! never stops the run, and a clean stop loses nothing and leaves nothing claimed.
//!
//! The handler is `hostile`, which emits what its payload asks for (see its module doc).

use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use weir_tests::{Weir, guest, header, now_ms, produce_lines, wait_until};

fn payloads(w: &Weir, topic: &str) -> Vec<String> {
    let mut v: Vec<String> = w
        .messages(topic)
        .iter()
        .map(|m| m["payload"].as_str().unwrap_or("<binary>").to_string())
        .collect();
    v.sort();
    v
}

fn hostile() -> String {
    guest("hostile").to_str().expect("UTF-8 path").to_string()
}

/// `(error kind, first words of the payload)` of each dead letter of `topic`, sorted.
fn dead_letters(w: &Weir, topic: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = w
        .messages(&format!("{topic}.dlq"))
        .iter()
        .map(|m| {
            let p = m["payload"].as_str().unwrap_or("");
            let words: Vec<&str> = p.split_whitespace().take(2).collect();
            (
                header(m, "weir.dlq.error-kind").unwrap_or("").to_string(),
                words.join(" "),
            )
        })
        .collect();
    v.sort();
    v
}

/// Finding 5: header names past the codec's 65,535 bytes (one cut inside a multi-byte
/// character), a huge key, thousands of headers. Each failed the commit and stopped the run
/// (the multi-byte one with a panic), again on every restart.
#[test]
fn outputs_the_log_cannot_store_cost_only_their_own_message() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    let bad = [
        "header-name 70000",
        "header-name-multibyte 70000",
        "key 100000",
        "headers 5000",
    ];
    produce_lines(&w, "in", None, &bad);
    produce_lines(&w, "in", None, &["fine"]);
    let s = w.drain(&guest("hostile"), "in", "g", &["--max-attempts", "1"]);
    assert_eq!(
        (s["processed"].as_u64(), s["dead_lettered"].as_u64()),
        (Some(1), Some(4)),
        "{s}"
    );
    assert_eq!(payloads(&w, "out"), vec!["fine"]);
    let mut want: Vec<(String, String)> = bad
        .iter()
        .map(|b| ("invalid-output".to_string(), b.to_string()))
        .collect();
    want.sort();
    assert_eq!(dead_letters(&w, "in"), want);
    assert!(w.offsets("in", "g").iter().all(|(end, c)| end == c));
}

/// Finding 5 on Kafka: an output over the producer's `message.max.bytes` failed the publish,
/// so the commit, so the run.
#[test]
fn kafka_an_output_over_the_message_size_costs_only_its_message() {
    let w = Weir::kafka_mock();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    produce_lines(&w, "in", None, &["payload 2000000", "fine"]);
    let s = w.drain(&guest("hostile"), "in", "g", &["--max-attempts", "1"]);
    assert_eq!(
        (s["processed"].as_u64(), s["dead_lettered"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(payloads(&w, "out"), vec!["fine"]);
    let letters = w.messages("in.dlq");
    let error = header(&letters[0], "weir.dlq.error").unwrap_or("");
    assert!(error.contains("message.max.bytes"), "{error}");
}

/// Finding 6: a dead letter that cannot be written (an input near the broker's message size
/// plus the envelope; a reject reason of 2 MB) stopped the run on the same message every time.
/// Now the reason is bounded and the dead letter cut to fit, saying what was cut.
#[test]
fn kafka_a_dead_letter_too_large_for_the_broker_is_cut_to_fit() {
    let w = Weir::kafka_mock();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    // One line of 999,800 bytes: it fits the producer's 1,000,000; with an envelope it does not.
    let big = format!("reject 10 {}", "x".repeat(999_790));
    let file = w.path("big.txt");
    std::fs::write(&file, format!("{big}\nreject 2000000\nfine\n")).unwrap();
    w.ok(&["produce", "in", "--file", file.to_str().unwrap()]);
    let s = w.drain(&guest("hostile"), "in", "g", &[]);
    assert_eq!(
        (s["processed"].as_u64(), s["dead_lettered"].as_u64()),
        (Some(1), Some(2)),
        "{s}"
    );
    let letters = w.messages("in.dlq");
    let cut: Vec<&Value> = letters
        .iter()
        .filter(|m| header(m, "weir.dlq.truncated").is_some())
        .collect();
    assert_eq!(cut.len(), 1, "one dead letter was cut: {letters:?}");
    assert_eq!(
        header(cut[0], "weir.dlq.truncated"),
        Some(format!("payload={}", big.len()).as_str())
    );
    let kept = cut[0]["payload"].as_str().unwrap();
    assert!(
        kept.len() > 990_000 && big.starts_with(kept),
        "{}",
        kept.len()
    );
    for m in &letters {
        let error = header(m, "weir.dlq.error").unwrap_or("");
        assert!(error.len() <= 4096, "an error of {} bytes", error.len());
    }
}

/// Finding 2: in requeue mode the `weir.retry.*` headers were trusted. One message naming a
/// missing origin topic failed every commit (its dead letter went to `missing.dlq`); a
/// not-before in the far future pinned the commit point, so `--drain` never ended.
#[test]
fn a_retry_topic_message_cannot_name_a_missing_origin_or_pin_the_commit_point() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    w.create_topic("in.retry", 1);
    let retry_headers = |not_before: &str| {
        [
            "weir.retry.topic=missing",
            "weir.retry.partition=0",
            "weir.retry.offset=0",
            "weir.retry.attempt=2",
            &format!("weir.retry.not-before-ms={not_before}"),
            "weir.retry.first-failure-ms=0",
        ]
        .iter()
        .flat_map(|h| ["--header".to_string(), h.to_string()])
        .collect::<Vec<String>>()
    };
    let produce = |value: &str, headers: Vec<String>| {
        let mut args = vec!["produce", "in.retry", value];
        args.extend(headers.iter().map(String::as_str));
        w.ok(&args);
    };
    produce("reject 5", retry_headers("0"));
    produce("far future", retry_headers("18446744073709551615"));
    let module = hostile();
    let run = w.spawn(&[
        "run",
        "--module",
        &module,
        "--topic",
        "in",
        "--group",
        "g",
        "--retry-mode",
        "requeue",
        "--backoff-max",
        "1s",
        "--drain",
        "--json",
    ]);
    let mut run = run;
    wait_until("the run drains and ends", Duration::from_secs(60), || {
        !run.is_running()
    });
    let out = run.wait();
    assert!(out.status.success(), "the run failed: {}", out.status);
    assert_eq!(payloads(&w, "out"), vec!["far future"]);
    assert_eq!(
        dead_letters(&w, "in"),
        vec![("rejected".to_string(), "reject 5".to_string())]
    );
    assert!(w.offsets("in.retry", "g").iter().all(|(end, c)| end == c));
}

/// Finding 4: a fatal error while handler calls were in flight panicked at
/// `Arc::into_inner(..).expect(..)`, and the real error was never printed. Here the broker
/// refuses every write (topic authorization), while another lane's call sleeps.
#[test]
fn kafka_a_fatal_error_with_calls_in_flight_is_reported_not_a_panic() {
    let w = Weir::kafka_mock();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    // Keyless: they go to different lanes, so "fine" commits while "sleep" runs.
    produce_lines(&w, "in", None, &["sleep 5000", "fine"]);
    let weir_tests::Broker::Mock(cluster) = w.broker() else {
        unreachable!("a mock cluster test")
    };
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64],
    );
    let module = hostile();
    let out = w
        .cmd(&[
            "run", "--module", &module, "--topic", "in", "--group", "g", "--drain", "--lanes", "4",
        ])
        .output()
        .expect("run weir");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.to_lowercase().contains("authoriz"), "{stderr}");
}

/// Finding 7: at-most-once acks what it fetches; a normal stop (SIGTERM) dropped the fetched
/// messages that had not started. The README promises loss only on a crash.
#[test]
fn at_most_once_handles_everything_it_acked_before_a_clean_stop() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    let lines: Vec<String> = (0..30).map(|i| format!("sleep 100 #{i}")).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    produce_lines(&w, "in", None, &lines);
    let module = hostile();
    let run = w.spawn(&[
        "run",
        "--module",
        &module,
        "--topic",
        "in",
        "--group",
        "g",
        "--delivery",
        "at-most-once",
        "--batch-size",
        "1",
        "--lanes",
        "1",
    ]);
    wait_until(
        "the first message is handled",
        Duration::from_secs(60),
        || w.count("out") >= 1,
    );
    let out = run.terminate();
    assert!(out.status.success(), "{}", out.status);
    let acked = w.committed("in", "g");
    assert!(acked > 1, "the run acked only {acked} before it stopped");
    assert_eq!(
        w.count("out") as u64,
        acked,
        "every acked message was handled"
    );
}

/// Which of `keys` of `group` are claimed in the shared store (a value other than `done`).
/// Asked with one MGET of the keys themselves: a SCAN would walk every key of the machine's
/// Redis.
fn redis_claims(group: &str, keys: &[String]) -> Vec<String> {
    let names: Vec<String> = keys
        .iter()
        .map(|k| format!("weir:dedupe:{group}:{k}"))
        .collect();
    let values = Command::new("redis-cli")
        .arg("MGET")
        .args(&names)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&values.stdout)
        .lines()
        .zip(keys)
        .filter(|(v, _)| !v.trim().is_empty() && v.trim() != "done")
        .map(|(_, k)| k.clone())
        .collect()
}

/// Finding 3: a partition that stopped with claimed messages queued (shutdown, revoke, abort)
/// left their keys claimed in the process and in the shared store until the claims expired
/// (about 205 s with the defaults), stalling those keys for every other process.
#[test]
fn a_stopped_partition_lets_go_of_its_dedupe_claims() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    // One lane, one message at a time, half a second each: while one runs, the others wait
    // in the lane holding their claims (taken when the lane was last idle).
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        produce_lines(&w, "in", Some(k), &[&format!("sleep 500 #{i}")]);
    }
    let group = format!("claims-{}-{}", std::process::id(), now_ms());
    let module = hostile();
    let run = w.spawn(&[
        "run",
        "--module",
        &module,
        "--topic",
        "in",
        "--group",
        &group,
        "--dedupe",
        "key",
        "--dedupe-store",
        "redis://127.0.0.1:6379",
        "--dedupe-window",
        "1m",
        "--lanes",
        "1",
        "--batch-size",
        "1",
        "--max-in-flight",
        "40",
    ]);
    // Under load the store may count as down for a moment (its calls time out), and then no
    // message claims: wait until the queued ones have.
    wait_until(
        "queued messages hold claims",
        Duration::from_secs(60),
        || redis_claims(&group, &keys).len() >= 5,
    );
    let out = run.terminate();
    assert!(out.status.success(), "{}", out.status);
    wait_until("no claim is left", Duration::from_secs(10), || {
        redis_claims(&group, &keys).is_empty()
    });
}

/// Waits until `weir run` serves its data directory's socket, and returns the socket's path.
fn served_socket(w: &Weir) -> std::path::PathBuf {
    let path = w.data_dir().join("weir.sock");
    wait_until("the run serves its socket", Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&path).is_ok()
    });
    path
}

fn idle_run(w: &Weir) -> weir_tests::Running {
    w.create_topic("in", 1);
    let noop = guest("noop");
    w.spawn(&[
        "run",
        "--module",
        noop.to_str().unwrap(),
        "--topic",
        "in",
        "--group",
        "g",
        "--admin",
        "off",
    ])
}

/// Finding 9: the socket's mode followed the umask, so another user of the machine could
/// append to and read every topic.
#[test]
fn the_local_socket_is_for_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let w = Weir::new();
    let _run = idle_run(&w);
    let path = served_socket(&w);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket's mode is {mode:o}");
}

/// Finding 9: a request line had no length limit: a client that never sends a newline made
/// the run buffer without bound.
#[test]
fn the_local_socket_refuses_a_line_without_end() {
    use std::io::{BufRead, Write};
    let w = Weir::new();
    let _run = idle_run(&w);
    let path = served_socket(&w);
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    // 129 MiB without a newline; the server may close before it has all of it.
    for _ in 0..129 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut answer)
        .expect("an answer before the read timeout");
    assert!(answer.contains("request over"), "{answer}");
}

/// Finding 11: `consume` and `dlq show` printed payloads raw, so escape sequences in a message
/// reached the operator's terminal (retitle it, clear it, hide lines).
#[test]
fn consume_and_dlq_show_escape_control_characters() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    produce_lines(&w, "in", None, &["reject 3 \u{1b}]0;owned\u{7}\u{1b}[2J"]);
    w.drain(&guest("hostile"), "in", "g", &[]);
    for args in [
        &["consume", "in", "--from-beginning"][..],
        &["dlq", "show", "in", "0"][..],
    ] {
        let out = w.ok(args);
        assert!(!out.stdout.contains(&0x1b), "{args:?} printed an escape");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("\\x1b]0;owned\\x07\\x1b[2J"),
            "{args:?}: {text}"
        );
    }
}

/// Finding 11: `weir consume --group` committed what it had read before it wrote it out: with
/// its output gone (a closed pipe), the messages were committed and never printed.
#[test]
fn consume_with_a_group_commits_only_what_it_printed() {
    let w = Weir::new();
    w.create_topic("in", 1);
    // Less than the writer's buffer: nothing reaches the pipe before the end.
    let lines: Vec<String> = (0..100).map(|i| format!("message {i}")).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    produce_lines(&w, "in", None, &lines);
    let mut child = w
        .cmd(&["consume", "in", "--group", "reader"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(!status.success(), "printing to a closed pipe must fail");
    assert_eq!(w.committed("in", "reader"), 0);
}

/// Finding 8: what a partition holds in flight was bounded by count alone (by default
/// 2 × batch × lanes messages): 100 messages of 4 MB, fetched while the handler is slow, were
/// all in flight (in memory) at once (94 seen). Now a byte bound (`--max-in-flight-bytes`,
/// 64 MiB by default) holds fetching back too: at most 16 such messages, and one more fetch.
/// Forty are enough to tell the two apart.
#[test]
fn large_messages_in_flight_are_bounded_by_bytes() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    w.ok(&[
        "produce", "in", "--count", "40", "--size", "4000000", "--no-key",
    ]);
    let sleepy = guest("sleepy");
    let log = w.path("run.log");
    let (_run, addr) = w.spawn_with_admin(
        &[
            "run",
            "--module",
            sleepy.to_str().unwrap(),
            "--topic",
            "in",
            "--group",
            "g",
            "--handler-config",
            "wait-ms=100",
            "--lanes",
            "2",
            "--instances",
            "2",
            "--batch-size",
            "1",
            "--max-in-flight",
            "1000",
        ],
        &log,
    );
    let mut most = 0;
    wait_until(
        "twenty messages are handled",
        Duration::from_secs(120),
        || {
            let (_, body) = weir_tests::http("GET", &addr, "/api/status", None);
            let status: Value = serde_json::from_str(&body).unwrap_or_default();
            most = most.max(status["in_flight"].as_u64().unwrap_or(0));
            w.committed("in", "g") >= 20
        },
    );
    assert!(
        (1..=20).contains(&most),
        "{most} messages of 4 MB were in flight at once"
    );
}

/// A Redis that answers every request correctly (claims are granted, marks and releases
/// succeed) but `delay` late: enough of the protocol (RESP arrays of bulk strings) for weir's
/// dedupe store.
struct SlowRedis {
    addr: String,
}

impl SlowRedis {
    fn start(delay: Duration) -> SlowRedis {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                std::thread::spawn(move || serve_slowly(stream, delay));
            }
        });
        SlowRedis { addr }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

/// Answers each request (a RESP array) after `delay`: 1 to EVAL/EVALSHA, OK to the rest.
fn serve_slowly(stream: std::net::TcpStream, delay: Duration) {
    use std::io::{BufRead, Read, Write};
    let mut out = stream.try_clone().unwrap();
    let mut r = std::io::BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let Some(n) = line
            .trim_end()
            .strip_prefix('*')
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let mut command = String::new();
        for i in 0..n {
            line.clear();
            r.read_line(&mut line).unwrap_or(0);
            let len: usize = line.trim_end().trim_start_matches('$').parse().unwrap_or(0);
            let mut bulk = vec![0u8; len + 2];
            if r.read_exact(&mut bulk).is_err() {
                return;
            }
            if i == 0 {
                command = String::from_utf8_lossy(&bulk[..len]).to_ascii_uppercase();
            }
        }
        // The slowness under test: every answer comes late, in order.
        std::thread::sleep(delay);
        let answer: &[u8] = if command.starts_with("EVAL") {
            b":1\r\n"
        } else {
            b"+OK\r\n"
        };
        if out.write_all(answer).is_err() {
            return;
        }
    }
}

/// Finding 10: the shared dedupe store was asked on the async threads that also fetch, commit
/// and serve the admin server, through one connection behind a mutex: a slow Redis (here 50 ms
/// an answer) stalled all of them, `/healthz` included. Now the store is asked on the blocking
/// pool, over a connection per caller.
#[test]
fn a_slow_dedupe_store_does_not_stall_the_admin_server() {
    let redis = SlowRedis::start(Duration::from_millis(50));
    let w = Weir::new();
    w.create_topic("in", 8);
    w.create_topic("out", 8);
    // Far more than the run gets through while the test asks /healthz.
    w.ok(&["produce", "in", "--count", "4000", "--size", "60"]);
    let sleepy = guest("sleepy");
    let log = w.path("run.log");
    let url = redis.url();
    let (_run, addr) = w.spawn_with_admin(
        &[
            "run",
            "--module",
            sleepy.to_str().unwrap(),
            "--topic",
            "in",
            "--group",
            "g",
            "--dedupe",
            "key",
            "--dedupe-store",
            &url,
            "--batch-size",
            "4",
            "--lanes",
            "4",
            "--instances",
            "4",
        ],
        &log,
    );
    wait_until(
        "messages are being handled",
        Duration::from_secs(60),
        || w.count("out") > 0,
    );
    let mut took: Vec<Duration> = (0..20)
        .map(|_| {
            let t = std::time::Instant::now();
            assert_eq!(weir_tests::http("GET", &addr, "/healthz", None).0, 200);
            t.elapsed()
        })
        .collect();
    took.sort();
    eprintln!("/healthz while the dedupe store is slow: {took:?}");
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(100),
        "/healthz took {median:?} (median of 20) while the dedupe store was slow: {took:?}"
    );
}
