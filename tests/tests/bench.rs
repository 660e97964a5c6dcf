//! `weir bench` runs the whole pipeline and reports what it measured; its figures are checked
//! against what it was asked to do (not against speed targets: those are for the benchmark).

use serde_json::Value;
use weir_tests::{Weir, guest};

fn bench(w: &Weir, args: &[&str]) -> Value {
    let mut all = vec!["bench", "--json", "--probe-instances", "5"];
    all.extend_from_slice(args);
    let out = w.ok(&all);
    serde_json::from_slice(&out.stdout).expect("bench --json prints JSON")
}

#[test]
fn bench_reports_a_wasm_run_its_native_twin_and_latency() {
    let w = Weir::new();
    let orders = guest("orders");
    let m = orders.to_str().unwrap();
    let r = bench(&w, &["--module", m, "--count", "3000"]);
    assert_eq!(r["processed"], 3000, "{r}");
    assert_eq!(r["emitted"], 3000, "{r}");
    assert_eq!(r["entry"], "handler");
    assert!(r["messages_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["instantiate_us"].as_f64().unwrap() > 0.0);
    assert!(r["peak_rss_mib"].as_f64().unwrap() > 0.0);

    let native = bench(&w, &["--native", "orders", "--count", "3000"]);
    assert_eq!(native["entry"], "native");
    assert_eq!(native["emitted"], 3000, "{native}");

    let rate = bench(&w, &["--module", m, "--count", "2000", "--rate", "4000"]);
    assert_eq!(rate["mode"], "rate");
    assert_eq!(rate["processed"], 2000, "{rate}");
    assert!(rate["latency_p99_ms"].as_f64().is_some(), "{rate}");

    let err = w.fails(&["bench", "--module", m, "--native", "noop"], 2);
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn bench_kafka_row_runs_weir_next_to_a_bare_loop() {
    let w = Weir::new();
    let orders = guest("orders");
    let r = bench(
        &w,
        &[
            "--kafka-mock",
            "--module",
            orders.to_str().unwrap(),
            "--count",
            "500",
            "--partitions",
            "2",
        ],
    );
    assert_eq!(r["mock_cluster"], true);
    assert_eq!(r["messages"], 500);
    assert!(r["bare_messages_per_second"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["weir_messages_per_second"].as_f64().unwrap() > 0.0, "{r}");
}

/// The queue row on Redis and NATS: weir and the bare client loop each drain 300 orders of their
/// own topic (under the test's prefix), and the report says so.
#[test]
fn bench_queue_row_runs_weir_next_to_a_bare_loop_on_redis_and_nats() {
    for w in [Weir::redis(), Weir::nats()] {
        let out = w.ok(&["bench", "--json", "--native", "orders", "--count", "300"]);
        let r: Value = serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
        assert_eq!(r["messages"], 300, "{r}");
        assert!(r["bare_messages_per_second"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["weir_messages_per_second"].as_f64().unwrap() > 0.0, "{r}");
    }
}
