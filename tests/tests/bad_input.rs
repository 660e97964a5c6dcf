//! Bad input: each gets one clear line naming the input and what to do, a non-zero exit code
//! (2: the input is wrong; 3: the data directory cannot be used), no panic, and no change to
//! the stored messages and offsets.

use std::time::Duration;
use weir_tests::{Weir, guest, wait_until};

/// A data directory with one consumed topic; returns what must not change.
fn populated() -> (Weir, serde_json::Value, usize) {
    let w = Weir::new();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 1);
    w.ok(&["produce", "orders", "--count", "10"]);
    w.drain(&guest("orders"), "orders", "g", &[]);
    w.ok(&["produce", "orders", "--count", "5", "--start", "10"]);
    let stats = w.stats();
    let n = w.messages("confirmations").len();
    (w, stats, n)
}

fn unchanged(w: &Weir, before: &(serde_json::Value, usize)) {
    assert_eq!(&w.stats(), &before.0, "stored topics and offsets changed");
    assert_eq!(
        w.messages("confirmations").len(),
        before.1,
        "outputs changed"
    );
}

fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(!stderr.contains("panicked"), "weir panicked:\n{stderr}");
    lines[0]
}

fn run_args<'a>(module: &'a str, topic: &'a str) -> Vec<&'a str> {
    vec![
        "run", "--module", module, "--topic", topic, "--group", "g", "--drain",
    ]
}

#[test]
fn a_missing_module_file() {
    let (w, stats, n) = populated();
    let e = w.fails(&run_args("/nonexistent/handler.wasm", "orders"), 2);
    let line = one_line(&e);
    assert!(
        line.contains("/nonexistent/handler.wasm") && line.contains("no such file"),
        "{line}"
    );
    let e = w.fails(&["check", "/nonexistent/handler.wasm"], 2);
    assert!(
        one_line(&e).contains("cannot read handler module /nonexistent/handler.wasm"),
        "{e}"
    );
    unchanged(&w, &(stats, n));
}

#[test]
fn a_file_that_is_not_wasm() {
    let (w, stats, n) = populated();
    let f = w.path("notes.wasm");
    std::fs::write(&f, "this is text").unwrap();
    let e = w.fails(&run_args(f.to_str().unwrap(), "orders"), 2);
    let line = one_line(&e);
    assert!(
        line.contains("notes.wasm") && line.contains("not a WebAssembly file"),
        "{line}"
    );
    unchanged(&w, &(stats, n));
}

#[test]
fn a_core_module_instead_of_a_component() {
    let (w, stats, n) = populated();
    let f = w.path("core.wasm");
    // The smallest valid core module: magic and version 1, no sections.
    std::fs::write(&f, b"\0asm\x01\0\0\0").unwrap();
    let e = w.fails(&run_args(f.to_str().unwrap(), "orders"), 2);
    let line = one_line(&e);
    assert!(
        line.contains("core.wasm")
            && line.contains("core WebAssembly module, not a component")
            && line.contains("wasm32-wasip2"),
        "{line}"
    );
    let e = w.fails(&["check", f.to_str().unwrap()], 2);
    assert!(one_line(&e).contains("not a component"));
    unchanged(&w, &(stats, n));
}

#[test]
fn a_component_of_another_world() {
    let (w, stats, n) = populated();
    let m = guest("wrong-world");
    let e = w.fails(&run_args(m.to_str().unwrap(), "orders"), 2);
    let line = one_line(&e);
    assert!(
        line.contains("wrong_world.wasm")
            && line.contains("does not implement weir's handler world")
            && line.contains("greet"),
        "{line}"
    );
    let e = w.fails(&["check", m.to_str().unwrap()], 2);
    assert!(one_line(&e).contains("does not implement"));
    // And a good one passes the check.
    let out = w.ok(&["check", guest("orders").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("weir:stream/handler@0.1.0"));
    unchanged(&w, &(stats, n));
}

#[test]
fn an_unknown_topic() {
    let (w, stats, n) = populated();
    let module = guest("orders");
    let e = w.fails(&run_args(module.to_str().unwrap(), "nope"), 2);
    let line = one_line(&e);
    assert!(
        line.contains("topic `nope` does not exist") && line.contains("weir topics create nope"),
        "{line}"
    );
    let e = w.fails(&["produce", "nope", "x"], 2);
    assert!(one_line(&e).contains("topic `nope` does not exist"));
    let e = w.fails(&["consume", "nope"], 2);
    assert!(one_line(&e).contains("topic `nope` does not exist"));
    let e = w.fails(&["topics", "create", "bad/name"], 2);
    assert!(one_line(&e).contains("invalid topic name `bad/name`"));
    unchanged(&w, &(stats, n));
}

#[test]
fn a_malformed_config_key() {
    let (w, stats, n) = populated();
    let cfg = w.path("weir.toml");
    std::fs::write(&cfg, "[run]\ngroup = \"g\"\nbatch-sise = 10\n").unwrap();
    let module = guest("orders");
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend(run_args(module.to_str().unwrap(), "orders"));
    let e = w.fails(&args, 2);
    let line = one_line(&e);
    assert!(
        line.contains("weir.toml") && line.contains("batch-sise") && line.contains("line 3"),
        "{line}"
    );
    // A bad value is named too.
    std::fs::write(&cfg, "[run]\ncall-timeout = \"5 parsecs\"\n").unwrap();
    let e = w.fails(&args, 2);
    assert!(one_line(&e).contains("--call-timeout"), "{e}");
    unchanged(&w, &(stats, n));
}

#[test]
fn a_corrupt_data_directory() {
    let (w, stats, n) = populated();
    let version = w.data_dir().join("log/version");
    std::fs::write(&version, b"garbage!").unwrap();
    let snapshot = |dir: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        for e in walk(dir) {
            files.push((e.display().to_string(), std::fs::read(&e).unwrap()));
        }
        files.sort();
        files
    };
    let before = snapshot(&w.data_dir().join("log"));
    let e = w.fails(&["topics", "list"], 3);
    let line = one_line(&e);
    assert!(
        line.contains(&w.data_dir().display().to_string()) && line.contains("corrupt"),
        "{line}"
    );
    let module = guest("orders");
    let e = w.fails(&run_args(module.to_str().unwrap(), "orders"), 3);
    assert!(one_line(&e).contains("corrupt"));
    assert!(
        snapshot(&w.data_dir().join("log")) == before,
        "a corrupt directory was modified"
    );
    // Repaired, everything is as it was.
    std::fs::write(&version, b"FJL\x03").unwrap();
    unchanged(&w, &(stats, n));

    // A directory that holds something else is not taken over.
    let other = w.path("someone-elses");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("thesis.tex"), "precious").unwrap();
    let out = std::process::Command::new(weir_tests::weir_bin())
        .args([
            "--data-dir",
            other.to_str().unwrap(),
            "topics",
            "create",
            "t",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a weir data directory"));
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().is_some_and(|n| n != "lock") {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_data_directory_locked_by_another_run() {
    let (w, stats, n) = populated();
    let module = guest("orders");
    let first = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "orders",
        "--group",
        "g",
    ]);
    wait_until(
        "the first run owns the directory",
        Duration::from_secs(60),
        || w.data_dir().join("weir.sock").exists(),
    );
    let e = w.fails(&run_args(module.to_str().unwrap(), "orders"), 3);
    let line = one_line(&e);
    assert!(
        line.contains("in use by another weir process")
            && line.contains(&w.data_dir().display().to_string()),
        "{line}"
    );
    assert!(first.terminate().status.success());
    // The first run consumed the 5 waiting orders; nothing else changed.
    let after = w.offsets("orders", "g");
    assert!(after.iter().all(|(end, c)| end == c));
    assert_eq!(w.messages("confirmations").len(), n + 5);
    let _ = stats;
}

#[test]
fn bad_flags_and_values() {
    let w = Weir::new();
    w.create_topic("t", 1);
    let e = w.fails(&["produce", "t", "x", "--header", "novalue"], 2);
    assert!(one_line(&e).contains("`novalue` is not KEY=VALUE"));
    let e = w.fails(&["topics", "create", "u", "--partitions", "0"], 2);
    assert!(one_line(&e).contains("--partitions must be between 1"));
    let e = w.fails(&["produce", "t", "--file", "/nonexistent/msgs.txt"], 2);
    assert!(one_line(&e).contains("/nonexistent/msgs.txt"));
    let module = guest("orders");
    let e = w.fails(
        &[
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "t",
            "--group",
            "g",
            "--memory-limit",
            "lots",
        ],
        2,
    );
    assert!(one_line(&e).contains("--memory-limit"));
    let e = w.fails(&["produce", "t", "--count", "1", "--size", "1000000000"], 2);
    assert!(one_line(&e).contains("--size 1000000000 is more than"));
    assert_eq!(w.offsets("t", "g"), vec![(0, 0)], "nothing was produced");
    // clap's own usage errors exit 2 as well.
    let out = w.output(&["run", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A reader that goes away (`weir consume t --from-beginning | head -1`) ends the command
/// quietly with SIGPIPE's status (141), as other tools end, rather than with a panic or an
/// error message.
#[test]
fn a_closed_output_pipe_is_no_panic() {
    use std::io::{BufRead, BufReader};
    let w = Weir::new();
    w.create_topic("t", 1);
    w.ok(&["produce", "t", "--count", "20000"]);
    let mut child = w
        .cmd(&["consume", "t", "--from-beginning"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start weir");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone (dropped above); weir's next writes meet a closed pipe.
    let out = child.wait_with_output().expect("weir ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("t/0@0"), "{first}");
    assert!(stderr.trim().is_empty(), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
