//! The admin server of `weir run`: Prometheus metrics checked against what the test produced and
//! what the guest did, the probes, the status API, ingest over HTTP, `weir status`, and the
//! dashboard in a real headless browser.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use weir_tests::{Running, Weir, guest, http, produce_lines, wait_until};

/// Starts `weir run` with its admin server on a free port; returns it and the address.
fn run_with_admin(w: &Weir, module: &Path, extra: &[&str]) -> (Running, String) {
    let log = w.path("run.log");
    let mut args = vec![
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "shipping",
        "--backoff-base",
        "5ms",
        "--jitter",
        "none",
    ];
    args.extend_from_slice(extra);
    w.spawn_with_admin(&args, &log)
}

/// The samples of a Prometheus text page: `name{labels}` -> value.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let (code, body) = http("GET", addr, "/metrics", None);
    assert_eq!(code, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            Some((name.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

#[test]
fn metrics_match_what_was_produced_and_what_the_guest_did() {
    const N: u64 = 3_000;
    let w = Weir::new();
    w.create_topic("orders", 3);
    w.create_topic("confirmations", 2);
    let orders = guest("orders");
    let (run, addr) = run_with_admin(&w, &orders, &["--max-attempts", "3"]);

    assert_eq!(http("GET", &addr, "/healthz", None).0, 200);
    wait_until("ready", Duration::from_secs(30), || {
        http("GET", &addr, "/readyz", None).0 == 200
    });

    // N valid orders, 2 that are not JSON (rejected), 1 transient (one retry), 1 that traps on
    // every attempt (3 traps, then the DLQ).
    w.ok(&["produce", "orders", "--count", &N.to_string()]);
    produce_lines(
        &w,
        "orders",
        None,
        &[
            "not json",
            "nor this",
            r#"{"id":"t-1","customer":"x","amount_cents":3,"transient":true}"#,
            r#"{"id":"p-1","customer":"x","amount_cents":3,"trap":true}"#,
        ],
    );
    // And 5 more over HTTP, keyed, one of them with a header.
    let body = r#"[{"payload":{"id":"h-0","customer":"web","amount_cents":1},"key":"h-0","headers":{"source":"http"}},
                   {"payload":{"id":"h-1","customer":"web","amount_cents":2},"key":"h-1"},
                   {"payload":{"id":"h-2","customer":"web","amount_cents":3},"key":"h-2"},
                   {"payload":{"id":"h-3","customer":"web","amount_cents":4},"key":"h-3"},
                   {"payload":{"id":"h-4","customer":"web","amount_cents":5},"key":"h-4"}]"#;
    let (code, answer) = http("POST", &addr, "/topics/orders/messages", Some(body));
    assert_eq!(code, 200, "{answer}");
    let placed: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(placed["placed"].as_array().unwrap().len(), 5);

    let ok = N + 1 + 5;
    let mut m = HashMap::new();
    wait_until(
        "the metrics count every message and the lag is zero",
        Duration::from_secs(120),
        || {
            m = scrape(&addr);
            let lag: f64 = (0..3)
                .map(|p| {
                    get(
                        &m,
                        &format!(
                            "weir_consumer_lag{{topic=\"orders\",partition=\"{p}\",group=\"shipping\"}}"
                        ),
                    )
                })
                .sum();
            get(&m, r#"weir_messages_total{topic="orders",outcome="ok"}"#) == ok as f64
                && get(&m, r#"weir_messages_total{topic="orders",outcome="dlq"}"#) == 3.0
                && lag == 0.0
        },
    );
    let total = |outcome: &str| {
        get(
            &m,
            &format!(r#"weir_messages_total{{topic="orders",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(total("rejected"), 2.0);
    assert_eq!(total("retry"), 1.0, "the transient order's one retry");
    assert_eq!(total("trap"), 3.0, "three attempts of the trapping order");
    assert_eq!(get(&m, "weir_dlq_writes_total"), 3.0);
    assert_eq!(get(&m, "weir_emitted_total"), ok as f64);
    assert_eq!(
        get(&m, "weir_retries_total"),
        3.0,
        "1 retry + 2 retried traps"
    );
    assert_eq!(get(&m, "weir_instance_faults_total"), 3.0);
    assert_eq!(get(&m, "weir_dedupe_hits_total"), 0.0);
    // What the metrics say is what the topics hold.
    assert_eq!(w.count("confirmations") as u64, ok);
    assert_eq!(w.count("orders.dlq"), 3);
    let produced = N + 4 + 5;
    let ends: f64 = (0..3)
        .map(|p| {
            get(
                &m,
                &format!(r#"weir_partition_end_offset{{topic="orders",partition="{p}"}}"#),
            )
        })
        .sum();
    assert_eq!(ends, produced as f64);
    // Histograms counted every handled message (the handler's once per attempt).
    assert_eq!(
        get(&m, "weir_end_to_end_latency_seconds_count"),
        ok as f64,
        "one latency sample per acked message"
    );
    assert!(get(&m, "weir_handler_duration_seconds_count") >= produced as f64);
    assert!(get(&m, r#"weir_handler_duration_seconds_bucket{le="+Inf"}"#) >= produced as f64);
    assert_eq!(get(&m, "weir_ready"), 1.0);
    assert!(get(&m, "weir_instances") >= 1.0);
    let digest = hex::encode(Sha256::digest(std::fs::read(&orders).unwrap()));
    assert_eq!(
        get(
            &m,
            &format!(r#"weir_module_info{{name="orders",digest="sha256:{digest}"}}"#)
        ),
        1.0
    );

    // The same figures as JSON, and as `weir status` prints them.
    let (code, status) = http("GET", &addr, "/api/status", None);
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["totals"]["processed"], ok);
    assert_eq!(status["messages"]["orders"]["dlq"], 3);
    assert_eq!(status["module"]["digest"], format!("sha256:{digest}"));
    assert!(
        status["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["lag"] == 0)
    );
    let out = w.ok(&["status", "--admin", &addr]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("module     orders"), "{text}");
    assert!(text.contains(&format!("processed {ok}")), "{text}");

    // Bad requests get an answer that says what is wrong, and change nothing.
    let (code, body) = http("POST", &addr, "/topics/orders/messages", Some("{not json"));
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(
        "POST",
        &addr,
        "/topics/nope/messages",
        Some(r#"{"payload":"x"}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("does not exist"), "{body}");
    assert_eq!(http("GET", &addr, "/nope", None).0, 404);
    assert_eq!(w.end("orders"), produced);
    drop(run);
}

/// Debian's Chromium, where CI installs it.
fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The page after its scripts ran for `ms` of (virtual) time.
fn dom(browser: &Path, addr: &str, ms: u32) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--virtual-time-budget={ms}"),
            "--dump-dom",
            &format!("http://{addr}/"),
        ])
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn attr(dom: &str, id: &str, name: &str) -> Option<u64> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let tag = &dom[at..at + dom[at..].find('>')?];
    let from = tag.find(&format!("{name}=\""))? + name.len() + 2;
    tag[from..from + tag[from..].find('"')?].parse().ok()
}

#[test]
fn the_dashboard_shows_the_module_and_its_charts_move_under_load() {
    let Some(browser) = chromium() else {
        // CI installs Chromium, so there this cannot pass without running; elsewhere a
        // machine without it skips this one test.
        assert!(
            std::env::var_os("WEIR_REQUIRE_CHROMIUM").is_none(),
            "no /usr/bin/chromium: apt-get install chromium"
        );
        weir_tests::skip("no /usr/bin/chromium (apt-get install chromium)");
        return;
    };
    let w = Weir::new();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 2);
    let (run, addr) = run_with_admin(&w, &guest("orders"), &[]);
    // Load while the page runs: batches of orders, one after the other.
    let producing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (producing, dir) = (producing.clone(), w.data_dir());
        let weir = weir_tests::weir_bin().to_path_buf();
        std::thread::spawn(move || {
            let mut start = 0u64;
            while producing.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = Command::new(&weir)
                    .arg("--data-dir")
                    .arg(&dir)
                    .args([
                        "produce",
                        "orders",
                        "--count",
                        "2000",
                        "--start",
                        &start.to_string(),
                    ])
                    .output();
                start += 2000;
            }
        })
    };
    let page = dom(&browser, &addr, 8_000);
    producing.store(false, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    drop(run);

    assert!(page.contains(r#"id="module-name">orders<"#), "{page}");
    assert!(page.contains("sha256:"), "the digest is shown");
    for chart in [
        "chart-throughput",
        "chart-lag",
        "chart-latency",
        "chart-instances",
    ] {
        assert!(
            attr(&page, chart, "data-points").unwrap_or(0) >= 3,
            "{chart} has points: {page}"
        );
    }
    // Under load the throughput chart moves: it has more than one value. (Lag may stay at 0
    // when the handler keeps up, so it is not required to move.)
    assert!(
        attr(&page, "chart-throughput", "data-distinct").unwrap_or(0) >= 2,
        "the throughput chart did not change: {page}"
    );
    assert!(page.contains("<polyline"), "lines are drawn");
}
