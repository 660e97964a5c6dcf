//! Handlers in every language weir documents: the `orders` example in Rust (through the
//! `weir-guest` SDK), Python (componentize-py), JavaScript (jco) and C (clang + wit-bindgen),
//! each run through the same scenarios on the real pipeline; `weir test` against each; and
//! `weir new` projects that build and pass `weir test` untouched.

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use weir_tests::{
    Lang, Weir, header, js_node_modules, orders_in, preview1_adapter, produce_lines, root,
    run_build,
};

/// One input per scenario: ok + emit, retry then success, two rejections, a trap.
const ORDERS: [&str; 5] = [
    r#"{"id":"o-1","customer":"ada","amount_cents":1250}"#,
    r#"{"id":"o-2","customer":"bo \"b\" \u00e9","amount_cents":5,"transient":true}"#,
    "not json",
    r#"{"id":"o-3","customer":"cy","amount_cents":0}"#,
    r#"{"id":"o-4","customer":"di","amount_cents":9,"trap":true}"#,
];

fn same_scenarios(lang: Lang) {
    let module = orders_in(lang);
    let w = Weir::new();
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    produce_lines(&w, "orders", None, &ORDERS);
    let s = w.drain(
        &module,
        "orders",
        "g",
        &[
            "--max-attempts",
            "3",
            "--backoff-base",
            "5ms",
            "--jitter",
            "none",
        ],
    );
    // The JavaScript example exports the batch entry point: the batch call that reaches the
    // trap is one more fault before the host isolates the culprit.
    let batch_trap = u64::from(lang == Lang::Js);
    let lang = lang.name();
    assert_eq!(s["processed"], 2, "{lang}: {s}");
    assert_eq!(s["emitted"], 2, "{lang}: {s}");
    assert_eq!(s["dead_lettered"], 3, "{lang}: {s}");
    // One retry for the transient order, two for the trap (3 attempts).
    assert_eq!(s["retries"], 3, "{lang}: {s}");
    assert_eq!(s["faults"], 3 + batch_trap, "{lang}: {s}");

    let out = w.messages("confirmations");
    // Keyless messages spread over lanes freely: compare in offset order.
    let mut got: Vec<(Value, Value, Option<&str>)> = out
        .iter()
        .map(|m| {
            let payload: Value = serde_json::from_str(m["payload"].as_str().expect("text"))
                .unwrap_or_else(|e| panic!("{lang}: confirmation is not JSON ({e}): {m}"));
            (m["key"].clone(), payload, header(m, "source-offset"))
        })
        .collect();
    got.sort_by_key(|(_, _, offset)| offset.map(str::to_string));
    assert_eq!(
        got,
        vec![
            (
                json!("o-1"),
                json!({"order_id": "o-1", "customer": "ada", "amount_cents": 1250, "status": "confirmed"}),
                Some("0")
            ),
            (
                json!("o-2"),
                json!({"order_id": "o-2", "customer": "bo \"b\" é", "amount_cents": 5, "status": "confirmed"}),
                Some("1")
            ),
        ],
        "{lang}"
    );

    let mut dlq = w.messages("orders.dlq");
    dlq.sort_by_key(|m| header(m, "weir.dlq.offset").map(str::to_string));
    let kinds: Vec<(Option<&str>, Option<&str>, Option<&str>)> = dlq
        .iter()
        .map(|m| {
            (
                header(m, "weir.dlq.offset"),
                header(m, "weir.dlq.error-kind"),
                header(m, "weir.dlq.attempts"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (Some("2"), Some("rejected"), Some("1")),
            (Some("3"), Some("rejected"), Some("1")),
            (Some("4"), Some("trap"), Some("3")),
        ],
        "{lang}: {dlq:?}"
    );
    let reason = header(&dlq[1], "weir.dlq.error").unwrap_or_default();
    assert_eq!(reason, "order o-3 has no amount", "{lang}");
    let trap = header(&dlq[2], "weir.dlq.error").unwrap_or_default();
    assert!(
        trap.contains("asked to trap at offset 4"),
        "{lang}: the guest's own words are in the envelope: {trap}"
    );
}

/// `weir test --expect` with the results every `orders` must give, and a wrong expectation
/// that must fail with exit code 1.
fn weir_test_checks(lang: Lang) {
    let module = orders_in(lang);
    let w = Weir::new();
    let input = w.path("in.jsonl");
    let lines: Vec<String> = ORDERS
        .iter()
        .map(|p| match serde_json::from_str::<Value>(p) {
            Ok(v) => json!({ "payload": v }).to_string(),
            Err(_) => json!({ "payload": p }).to_string(),
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let expect = w.path("expected.jsonl");
    let expected = [
        json!({"outcome": "ok", "attempts": [{"outcome": "ok"}], "emitted": [{"topic": "confirmations", "key": "o-1", "payload": {"order_id": "o-1", "amount_cents": 1250}, "headers": {"source-offset": "0"}}], "logs": [{"level": "debug", "message": "confirmed order o-1"}]}),
        json!({"outcome": "ok", "attempts": [{"outcome": "retry", "delay_ms": 10}, {"outcome": "ok"}], "emitted": [{"key": "o-2"}]}),
        json!({"outcome": "rejected", "emitted": []}),
        json!({"outcome": "rejected", "reason": "order o-3 has no amount"}),
        json!({"outcome": "trap", "attempts": [{"outcome": "trap"}, {"outcome": "trap"}]}),
    ];
    let text: Vec<String> = expected.iter().map(Value::to_string).collect();
    std::fs::write(&expect, text.join("\n")).unwrap();
    let m = module.to_str().unwrap();
    let (i, e) = (input.to_str().unwrap(), expect.to_str().unwrap());
    let out = w.ok(&[
        "test",
        m,
        "--input",
        i,
        "--expect",
        e,
        "--max-attempts",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("5 of 5 message(s) as expected"),
        "{}: {stdout}",
        lang.name()
    );

    let wrong = w.path("wrong.jsonl");
    let mut bad = text.clone();
    bad[0] = json!({"outcome": "rejected"}).to_string();
    std::fs::write(&wrong, bad.join("\n")).unwrap();
    let out = w.output(&[
        "test",
        m,
        "--input",
        i,
        "--expect",
        wrong.to_str().unwrap(),
        "--max-attempts",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", lang.name());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL  line 1")
            && stdout.contains(".outcome: expected \"rejected\", got \"ok\""),
        "{}: {stdout}",
        lang.name()
    );
}

/// `weir new` for `lang` in a fresh directory: the project builds with its own build script and
/// passes `weir test` against its own sample messages, untouched.
fn new_project_builds_and_passes(lang: Lang) {
    let w = Weir::new();
    let dir = w.path("projects");
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("hello-{}", lang.name());
    w.ok(&[
        "new",
        &name,
        "--lang",
        lang.name(),
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let project = dir.join(&name);
    assert!(project.join("README.md").is_file());
    assert!(project.join("messages.jsonl").is_file() && project.join("expected.jsonl").is_file());
    let mut build = Command::new("./build.sh");
    match lang {
        // Shares compiled dependencies with the guest examples (same wit-bindgen).
        Lang::Rust => {
            build.env(
                "CARGO_TARGET_DIR",
                root().join("guest-examples/target/new-projects"),
            );
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&project)
                .env(
                    "CARGO_TARGET_DIR",
                    root().join("guest-examples/target/new-projects"),
                )
                .args(["test", "--quiet"])
                .status()
                .expect("run cargo test");
            assert!(
                status.success(),
                "the Rust template's own unit tests (the SDK's stub) fail"
            );
        }
        Lang::Js => {
            // Reuses the installed jco of the JS example instead of a second download, once
            // it is whole (under its lock): a link to a node_modules/ that another test's
            // `npm ci` was still filling made build.sh skip its install and find no jco.
            let modules = js_node_modules();
            std::os::unix::fs::symlink(&modules, project.join("node_modules")).unwrap();
        }
        Lang::Python | Lang::C => {}
    }
    run_build(&project, &mut build, "the template's build.sh");
    let module = project.join(format!("{name}.wasm"));
    assert!(module.is_file(), "build.sh wrote no {}", module.display());
    let out = w.ok(&[
        "test",
        module.to_str().unwrap(),
        "--input",
        project.join("messages.jsonl").to_str().unwrap(),
        "--expect",
        project.join("expected.jsonl").to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 of 2 message(s) as expected"),
        "{name}: {stdout}"
    );
    assert_adapter_is_the_crates(lang, &project);
}

fn assert_adapter_is_the_crates(lang: Lang, project: &Path) {
    if lang == Lang::C {
        let written = std::fs::read(project.join("wasi_snapshot_preview1.reactor.wasm")).unwrap();
        assert_eq!(written, std::fs::read(preview1_adapter()).unwrap());
    }
}

/// Request/reply in each language: the `orders` example answers a request (a `reply-to`
/// header) with its confirmation: `reply` in Rust, Python and C, an emit to the reply-to topic
/// with the correlation id in JavaScript (a batch handler, which `reply` does not serve).
fn answers_a_request(lang: Lang) {
    let w = Weir::new();
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    w.create_topic("orders.replies", 1);
    let module = orders_in(lang);
    let _run = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
        "--admin",
        "off",
    ]);
    weir_tests::wait_until(
        "the run serves the log",
        std::time::Duration::from_secs(60),
        || w.data_dir().join("weir.sock").exists(),
    );
    let out = w.ok(&["request", "orders", ORDERS[0], "--timeout", "30s"]);
    let answer: Value = serde_json::from_slice(&out.stdout).expect("a JSON confirmation");
    assert_eq!(answer["order_id"], "o-1", "{answer}");
    assert_eq!(answer["status"], "confirmed", "{answer}");
}

macro_rules! per_language {
    ($($lang:ident => $module:ident),* $(,)?) => {$(
        mod $module {
            use weir_tests::Lang;
            #[test]
            fn orders_passes_the_same_scenarios() {
                super::same_scenarios(Lang::$lang);
            }
            #[test]
            fn weir_test_checks_orders() {
                super::weir_test_checks(Lang::$lang);
            }
            #[test]
            fn orders_answers_a_request() {
                super::answers_a_request(Lang::$lang);
            }
            #[test]
            fn weir_new_builds_and_passes_weir_test() {
                super::new_project_builds_and_passes(Lang::$lang);
            }
        }
    )*};
}

per_language!(Rust => rust, Python => python, Js => js, C => c);

#[test]
fn bad_test_input_names_the_line() {
    let w = Weir::new();
    let input = w.path("in.jsonl");
    std::fs::write(&input, "{\"payload\": \"ok\"}\n{\"key\": \"k\"}\n").unwrap();
    let module = orders_in(Lang::Rust);
    let err = w.fails(
        &[
            "test",
            module.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("line 2: no `payload`"), "{err}");
    let err = w.fails(&["new", "Bad_Name", "--lang", "rust"], 2);
    assert!(err.contains("is not a usable handler name"), "{err}");
}
