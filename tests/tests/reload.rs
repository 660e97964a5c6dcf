//! Hot module reload: `POST /module` and `weir run --watch` swap the handler mid-run; every
//! message is handled once, by one version; a module that does not load is refused and the
//! running one stays.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use weir_tests::{Weir, admin_address, guest, header, http, scaled, wait_until};

/// Produced in chunks while the run consumes (50,000 before issue 33).
fn orders() -> u64 {
    scaled(6_000, 3_000)
}
const CHUNK: u64 = 200;

fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = http("GET", addr, "/metrics", None);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn ok_count(addr: &str) -> f64 {
    metric(addr, r#"weir_messages_total{topic="orders",outcome="ok"}"#)
}

fn digest(p: &Path) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
    )
}

fn post_module(addr: &str, path: &Path) -> (u16, String) {
    let body = serde_json::json!({ "path": path }).to_string();
    http("POST", addr, "/module", Some(&body))
}

#[test]
fn a_reload_mid_run_hands_each_message_to_one_version_and_a_broken_module_is_refused() {
    let (v1, v2, broken) = (guest("orders"), guest("orders-v2"), guest("wrong-world"));
    let n = orders();
    let w = Weir::new();
    w.create_topic("orders", 4);
    w.create_topic("confirmations", 2);
    // The run loads (and --watch watches) a file of its own.
    let watched = w.path("handler.wasm");
    std::fs::copy(&v1, &watched).unwrap();
    let log = w.path("run.log");
    let run = w.spawn_logged(
        &[
            "--log-format",
            "json",
            "run",
            "--module",
            watched.to_str().unwrap(),
            "--topic",
            "orders",
            "--group",
            "g",
            "--admin",
            "127.0.0.1:0",
            "--watch",
            // `POST /module` below loads the other versions from where they were built.
            "--reload-dir",
            v2.parent().unwrap().to_str().unwrap(),
        ],
        &log,
    );
    let mut addr = None;
    wait_until("the admin server listens", Duration::from_secs(30), || {
        addr = admin_address(&log);
        addr.is_some()
    });
    let addr = addr.unwrap();

    // Orders arrive in chunks while the run consumes; v2 goes in a third of the way.
    let producer = {
        let (dir, weir) = (w.data_dir(), weir_tests::weir_bin().to_path_buf());
        std::thread::spawn(move || {
            for start in (0..n).step_by(CHUNK as usize) {
                let out = Command::new(&weir)
                    .arg("--data-dir")
                    .arg(&dir)
                    .args(["produce", "orders", "--count", &CHUNK.to_string()])
                    .args(["--start", &start.to_string()])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        })
    };
    wait_until("a third handled by v1", Duration::from_secs(120), || {
        ok_count(&addr) >= (n / 3) as f64
    });
    let (code, answer) = post_module(&addr, &v2);
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains(&digest(&v2)), "{answer}");
    producer.join().unwrap();
    wait_until("all orders handled", Duration::from_secs(180), || {
        ok_count(&addr) >= n as f64
    });

    // Each order confirmed exactly once, by one of the two versions; both ran.
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for m in w.messages("confirmations") {
        let id = m["key"].as_str().unwrap().to_string();
        let version = header(&m, "handler-version").unwrap_or("?").to_string();
        by.entry(id).or_default().push(version);
    }
    assert_eq!(by.len() as u64, n, "every order confirmed");
    let mut per_version: HashMap<String, u64> = HashMap::new();
    for (id, versions) in &by {
        assert_eq!(versions.len(), 1, "{id} confirmed {versions:?}");
        *per_version.entry(versions[0].clone()).or_default() += 1;
    }
    eprintln!("confirmations per version: {per_version:?}");
    assert!(
        per_version.get("orders").copied().unwrap_or(0) >= n / 3,
        "{per_version:?}"
    );
    assert!(
        per_version.get("orders-v2").copied().unwrap_or(0) > 0,
        "{per_version:?}"
    );
    assert_eq!(per_version.len(), 2, "{per_version:?}");
    assert_eq!(ok_count(&addr), n as f64, "nothing handled twice");

    // A module that does not implement the world is refused; v2 keeps running.
    let (code, answer) = post_module(&addr, &broken);
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains("does not implement weir's handler world"),
        "{answer}"
    );
    assert_eq!(
        metric(&addr, r#"weir_module_reloads_total{result="refused"}"#),
        1.0
    );
    assert_eq!(
        metric(&addr, r#"weir_module_reloads_total{result="loaded"}"#),
        1.0
    );
    let (_, status) = http("GET", &addr, "/api/status", None);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["module"]["digest"], digest(&v2));
    w.ok(&[
        "produce",
        "orders",
        "--count",
        "100",
        "--start",
        &n.to_string(),
    ]);
    wait_until(
        "v2 handles what comes after",
        Duration::from_secs(60),
        || ok_count(&addr) >= (n + 100) as f64,
    );
    let last = w.messages("confirmations");
    let after: Vec<&Value> = last
        .iter()
        .filter(|m| {
            m["key"]
                .as_str()
                .and_then(|k| k.strip_prefix("m-"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|i| i >= n)
        })
        .collect();
    assert_eq!(after.len(), 100);
    assert!(
        after
            .iter()
            .all(|m| header(m, "handler-version") == Some("orders-v2"))
    );

    // --watch: a broken file written over the watched one is refused; a good one is loaded.
    std::fs::copy(&broken, &watched).unwrap();
    wait_until(
        "--watch refuses the broken file",
        Duration::from_secs(30),
        || metric(&addr, r#"weir_module_reloads_total{result="refused"}"#) == 2.0,
    );
    std::fs::copy(&v1, &watched).unwrap();
    wait_until("--watch loads v1 again", Duration::from_secs(30), || {
        metric(&addr, r#"weir_module_reloads_total{result="loaded"}"#) == 2.0
    });
    let (_, status) = http("GET", &addr, "/api/status", None);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["module"]["digest"], digest(&v1));
    drop(run);
}
