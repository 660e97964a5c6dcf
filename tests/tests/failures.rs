//! Failure handling: retries with backoff (blocking and requeue), dead letters with their full
//! envelope, timeouts and memory limits, invalid outputs, at-most-once, and `weir dlq`.
//! Attempt times come from weir's own JSON log, never from sleeps in the test.

use serde_json::Value;
use weir_tests::{Weir, guest, header, now_ms, produce_keyed, produce_lines};

/// Payloads of `topic` in the order they were appended (single-partition topics).
fn payloads(w: &Weir, topic: &str) -> Vec<String> {
    w.messages(topic)
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect()
}

fn position(list: &[String], item: &str) -> usize {
    list.iter()
        .position(|p| p == item)
        .unwrap_or_else(|| panic!("{item} not in {list:?}"))
}

/// One slow key ("slow") whose first message is flaky, 40 other keys, then one more message of
/// the slow key.
fn flaky_input(w: &Weir) {
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    let mut lines = vec!["slow|flaky first".to_string()];
    lines.extend((0..40).map(|i| format!("k{i}|fine {i}")));
    lines.push("slow|slow second".into());
    produce_keyed(w, "in", "|", &lines);
}

fn attempt_times(failures: &[Value], offset: u64) -> Vec<(u64, u64)> {
    failures
        .iter()
        .filter(|f| f["fields"]["offset"] == offset)
        .map(|f| {
            (
                f["fields"]["attempt"].as_u64().unwrap(),
                f["at_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn blocking_retry_backs_off_exponentially_while_other_keys_flow() {
    let w = Weir::new();
    flaky_input(&w);
    let run = w.drain_logged(
        &guest("flaky"),
        "in",
        "g",
        &[
            "--handler-config",
            "fail-attempts=3",
            "--backoff-base",
            "200ms",
            "--backoff-factor",
            "2",
            "--jitter",
            "none",
            "--lanes",
            "4",
        ],
    );
    assert_eq!(run.summary["processed"], 42, "{}", run.summary);
    assert_eq!(run.summary["retries"], 3, "{}", run.summary);
    assert_eq!(run.summary["dead_lettered"], 0, "{}", run.summary);

    // Three failed attempts of offset 0, 200 ms then 400 ms apart (at least: the backoff is a
    // floor; the ceiling allows for a loaded machine), and the fourth succeeded.
    let times = attempt_times(&run.failures, 0);
    assert_eq!(
        times.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{:?}",
        run.failures
    );
    for (i, floor) in [(1, 200), (2, 400)] {
        let gap = times[i].1 - times[i - 1].1;
        assert!(
            gap >= floor && gap < floor + 2_000,
            "gap before attempt {} was {gap} ms, expected about {floor}",
            i + 1
        );
    }

    // The slow key's second message waited for its first. (Other keys run while it backs off,
    // but their outputs wait for the offset to pass them, so they are written with or after
    // it and their order in `out` no longer shows who ran first: the engine's paused-time test
    // `a_retry_waits_its_backoff_and_holds_back_only_its_key` measures that instead.)
    let out = payloads(&w, "out");
    assert_eq!(out.len(), 42);
    let flaky_at = position(&out, "flaky first");
    for i in 0..40 {
        assert!(out.contains(&format!("fine {i}")), "fine {i} missing");
    }
    assert!(
        position(&out, "slow second") > flaky_at,
        "per-key order was broken"
    );
}

#[test]
fn requeue_mode_keeps_throughput_and_gives_up_order() {
    let w = Weir::new();
    flaky_input(&w);
    let run = w.drain_logged(
        &guest("flaky"),
        "in",
        "g",
        &[
            "--handler-config",
            "fail-attempts=2",
            "--retry-mode",
            "requeue",
            "--backoff-base",
            "300ms",
            "--jitter",
            "none",
            "--lanes",
            "1",
        ],
    );
    assert_eq!(
        (
            run.summary["processed"].as_u64(),
            run.summary["retries"].as_u64()
        ),
        (Some(42), Some(2)),
        "{}",
        run.summary
    );
    let out = payloads(&w, "out");
    assert_eq!(out.len(), 42);
    // Even with one lane nothing waited for the failing message: its own key's next message
    // went first, and the retried message came last.
    assert!(position(&out, "slow second") < position(&out, "flaky first"));
    assert_eq!(out.last().map(String::as_str), Some("flaky first"));
    // The retry topic holds one copy per retry, with its origin and attempt number.
    let retries = w.messages("in.retry");
    assert_eq!(retries.len(), 2);
    for (m, attempt) in retries.iter().zip(["2", "3"]) {
        assert_eq!(header(m, "weir.retry.topic"), Some("in"));
        assert_eq!(header(m, "weir.retry.offset"), Some("0"));
        assert_eq!(header(m, "weir.retry.attempt"), Some(attempt));
    }
    // The handler saw the origin's offset on every attempt, spaced by the backoff.
    let times = attempt_times(&run.failures, 0);
    assert_eq!(times.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    assert!(times[1].1 - times[0].1 >= 300, "{times:?}");
    assert!(
        w.offsets("in", "g")
            .iter()
            .chain(w.offsets("in.retry", "g").iter())
            .all(|(end, c)| end == c)
    );
}

#[test]
fn a_rejected_message_is_dead_lettered_with_its_whole_envelope() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    produce_lines(&w, "in", Some("a"), &["fine 1"]);
    w.ok(&[
        "produce",
        "in",
        "poison pill",
        "--key",
        "b",
        "--header",
        "trace=xyz",
    ]);
    produce_lines(&w, "in", Some("c"), &["fine 2"]);
    let module = guest("poison");
    let digest: Value =
        serde_json::from_slice(&w.ok(&["check", module.to_str().unwrap(), "--json"]).stdout)
            .unwrap();
    let before = now_ms();
    let s = w.drain(&module, "in", "g", &[]);
    let after = now_ms();
    assert_eq!(
        (
            s["processed"].as_u64(),
            s["dead_lettered"].as_u64(),
            s["retries"].as_u64()
        ),
        (Some(2), Some(1), Some(0)),
        "{s}"
    );
    assert_eq!(payloads(&w, "out"), vec!["fine 1", "fine 2"]);

    let dlq = w.messages("in.dlq");
    assert_eq!(dlq.len(), 1);
    let m = &dlq[0];
    assert_eq!(
        (m["key"].as_str(), m["payload"].as_str()),
        (Some("b"), Some("poison pill"))
    );
    assert_eq!(
        header(m, "trace"),
        Some("xyz"),
        "the original headers are kept"
    );
    assert_eq!(header(m, "weir.dlq.topic"), Some("in"));
    assert_eq!(header(m, "weir.dlq.partition"), Some("0"));
    assert_eq!(header(m, "weir.dlq.offset"), Some("1"));
    assert_eq!(header(m, "weir.dlq.attempts"), Some("1"));
    assert_eq!(header(m, "weir.dlq.error-kind"), Some("rejected"));
    assert_eq!(
        header(m, "weir.dlq.error"),
        Some("poison message at offset 1")
    );
    assert_eq!(header(m, "weir.dlq.module"), Some("poison"));
    assert_eq!(
        header(m, "weir.dlq.module-digest"),
        digest["digest"].as_str()
    );
    let first: u64 = header(m, "weir.dlq.first-failure-ms")
        .unwrap()
        .parse()
        .unwrap();
    let last: u64 = header(m, "weir.dlq.last-failure-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        before <= first && first <= last && last <= after,
        "{before} {first} {last} {after}"
    );

    // `weir dlq list` and `show` present it.
    let list = String::from_utf8(w.ok(&["dlq", "list", "in"]).stdout).unwrap();
    assert!(
        list.contains("0:0")
            && list.contains("rejected")
            && list.contains("poison message at offset 1"),
        "{list}"
    );
    let show = String::from_utf8(w.ok(&["dlq", "show", "in", "0:0"]).stdout).unwrap();
    assert!(
        show.contains("header    trace: xyz") && show.contains("payload   poison pill"),
        "{show}"
    );
    let e = w.fails(&["dlq", "show", "in", "0:9"], 2);
    assert!(e.contains("no dead letter `0:9`"), "{e}");
}

#[test]
fn retries_that_run_out_are_dead_lettered_as_exhausted() {
    let w = Weir::new();
    flaky_input(&w);
    let s = w.drain(
        &guest("flaky"),
        "in",
        "g",
        &[
            "--handler-config",
            "fail-attempts=99",
            "--max-attempts",
            "3",
            "--backoff-base",
            "5ms",
            // Without jitter the two backoffs are 5 and 10 ms; full jitter may draw nearly 0.
            "--jitter",
            "none",
        ],
    );
    assert_eq!(
        (
            s["processed"].as_u64(),
            s["dead_lettered"].as_u64(),
            s["retries"].as_u64()
        ),
        (Some(41), Some(1), Some(2)),
        "{s}"
    );
    let dlq = w.messages("in.dlq");
    assert_eq!(
        header(&dlq[0], "weir.dlq.error-kind"),
        Some("retries-exhausted")
    );
    assert_eq!(header(&dlq[0], "weir.dlq.attempts"), Some("3"));
    assert_eq!(
        header(&dlq[0], "weir.dlq.error"),
        Some("attempt 3 of a flaky message")
    );
    let first: u64 = header(&dlq[0], "weir.dlq.first-failure-ms")
        .unwrap()
        .parse()
        .unwrap();
    let last: u64 = header(&dlq[0], "weir.dlq.last-failure-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        last >= first + 15,
        "two backoffs (5 ms, 10 ms) passed between the first and last failure: {first} -> {last}"
    );
    // Dead-lettering unblocks the key: its next message was handled.
    assert!(payloads(&w, "out").contains(&"slow second".to_string()));
}

#[test]
fn a_handler_that_spins_is_stopped_at_its_deadline() {
    let w = Weir::new();
    w.create_topic("in", 2);
    w.create_topic("out", 2);
    produce_lines(
        &w,
        "in",
        None,
        &["fine 1", "spin forever", "fine 2", "fine 3"],
    );
    let run = w.drain_logged(
        &guest("spins"),
        "in",
        "g",
        &[
            "--call-timeout",
            "200ms",
            "--max-attempts",
            "3",
            "--backoff-base",
            "50ms",
            "--jitter",
            "none",
        ],
    );
    let s = &run.summary;
    assert_eq!(
        (
            s["processed"].as_u64(),
            s["dead_lettered"].as_u64(),
            s["faults"].as_u64()
        ),
        (Some(3), Some(1), Some(3)),
        "{s}"
    );
    let dlq = w.messages("in.dlq");
    assert_eq!(header(&dlq[0], "weir.dlq.error-kind"), Some("timeout"));
    assert_eq!(header(&dlq[0], "weir.dlq.attempts"), Some("3"));
    assert_eq!(payloads(&w, "out").len(), 3);
    // Each attempt ran into its 200 ms deadline, after a 50 ms then 100 ms backoff.
    let number = |name: &str| header(&dlq[0], name).unwrap().parse::<u64>().unwrap();
    let (partition, offset) = (number("weir.dlq.partition"), number("weir.dlq.offset"));
    let times: Vec<(u64, u64)> = run
        .failures
        .iter()
        .filter(|f| f["fields"]["offset"] == offset && f["fields"]["partition"] == partition)
        .map(|f| {
            (
                f["fields"]["attempt"].as_u64().unwrap(),
                f["at_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        times.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{:?}",
        run.failures
    );
    for (i, floor) in [(1, 200 + 50), (2, 200 + 100)] {
        let gap = times[i].1 - times[i - 1].1;
        assert!(
            gap >= floor && gap < floor + 2_000,
            "gap before attempt {} was {gap} ms, expected about {floor}",
            i + 1
        );
    }
}

#[test]
fn a_handler_that_hogs_memory_is_stopped_at_its_limit() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    produce_lines(&w, "in", None, &["fine 1", "hog it all", "fine 2"]);
    let s = w.drain(
        &guest("hog"),
        "in",
        "g",
        &["--memory-limit", "16MiB", "--max-attempts", "1"],
    );
    assert_eq!(
        (
            s["processed"].as_u64(),
            s["dead_lettered"].as_u64(),
            s["faults"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{s}"
    );
    let dlq = w.messages("in.dlq");
    assert_eq!(header(&dlq[0], "weir.dlq.error-kind"), Some("memory"));
    assert!(
        header(&dlq[0], "weir.dlq.error")
            .unwrap()
            .contains("16777216"),
        "{}",
        dlq[0]
    );
    assert_eq!(payloads(&w, "out"), vec!["fine 1", "fine 2"]);
}

#[test]
fn an_output_that_cannot_be_published_fails_the_message() {
    let w = Weir::new();
    w.create_topic("in", 1);
    produce_lines(&w, "in", None, &["fine 1"]);
    // The handler ignores emit's error and returns ok; the host must not lose the output.
    let s = w.drain(
        &guest("poison"),
        "in",
        "g",
        &[
            "--handler-config",
            "output-topic=nowhere",
            "--handler-config",
            "ignore-emit-errors=true",
            "--max-attempts",
            "1",
        ],
    );
    assert_eq!(
        (s["processed"].as_u64(), s["dead_lettered"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
    let dlq = w.messages("in.dlq");
    assert_eq!(
        header(&dlq[0], "weir.dlq.error-kind"),
        Some("invalid-output")
    );
    assert!(
        header(&dlq[0], "weir.dlq.error")
            .unwrap()
            .contains("`nowhere`")
    );
}

#[test]
fn at_most_once_acks_before_invoking_and_never_retries() {
    let w = Weir::new();
    flaky_input(&w);
    let s = w.drain(
        &guest("flaky"),
        "in",
        "g",
        &[
            "--delivery",
            "at-most-once",
            "--handler-config",
            "fail-attempts=1",
        ],
    );
    assert_eq!(
        (
            s["processed"].as_u64(),
            s["retries"].as_u64(),
            s["dead_lettered"].as_u64()
        ),
        (Some(41), Some(0), Some(1)),
        "{s}"
    );
    assert_eq!(
        header(&w.messages("in.dlq")[0], "weir.dlq.attempts"),
        Some("1")
    );
    assert!(w.offsets("in", "g").iter().all(|(end, c)| end == c));
}

#[test]
fn dead_letters_replay_through_a_fixed_module_once() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    produce_lines(&w, "in", None, &["fine 1", "poison a", "poison b"]);
    w.drain(&guest("poison"), "in", "g", &[]);
    assert_eq!(w.messages("in.dlq").len(), 2);

    // A dry run changes nothing.
    let e = String::from_utf8(w.ok(&["dlq", "replay", "in", "--dry-run"]).stderr).unwrap();
    assert!(e.contains("2 dead letter(s) would be replayed"), "{e}");
    // `flaky` stands in for the fixed handler: it copies these to `out`.
    let fixed = guest("flaky");
    let e = String::from_utf8(
        w.ok(&["dlq", "replay", "in", "--module", fixed.to_str().unwrap()])
            .stderr,
    )
    .unwrap();
    assert!(e.contains("replayed 2 dead letter(s)"), "{e}");
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(payloads(&w, "out")),
        vec!["fine 1", "poison a", "poison b"]
    );
    let listed: Vec<Value> = String::from_utf8(w.ok(&["dlq", "list", "in", "--json"]).stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(listed.iter().all(|l| l["replayed"] == true), "{listed:?}");

    // Again without --force: nothing.
    let e = String::from_utf8(
        w.ok(&["dlq", "replay", "in", "--module", fixed.to_str().unwrap()])
            .stderr,
    )
    .unwrap();
    assert!(e.contains("replayed 0 dead letter(s)"), "{e}");
    assert_eq!(payloads(&w, "out").len(), 3);
    // With --force, back to the original topic, without the envelope headers.
    let e = String::from_utf8(
        w.ok(&["dlq", "replay", "in", "--force", "--kind", "rejected"])
            .stderr,
    )
    .unwrap();
    assert!(e.contains("replayed 2 dead letter(s)"), "{e}");
    let input = w.messages("in");
    assert_eq!(input.len(), 5);
    let replayed: Vec<String> = input[3..]
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sorted(replayed), vec!["poison a", "poison b"]);
    assert!(
        input[3]["headers"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("weir.")),
        "{}",
        input[3]
    );
}

#[test]
fn kill_9_while_backing_off_and_dead_lettering_loses_nothing() {
    // 20,000 before issue 33: the kill lands within the first hundred or so messages either way.
    let n = weir_tests::scaled(4_000, 2_000) as usize;
    let w = Weir::new();
    w.create_topic("in", 4);
    w.create_topic("out", 4);
    // Every 10th message is poison (dead-lettered), every 7th flaky (one retry).
    let lines: Vec<String> = (0..n)
        .map(|i| match i {
            i if i % 10 == 3 => format!("poison {i}"),
            i if i % 7 == 2 => format!("flaky {i}"),
            i => format!("fine {i}"),
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    produce_lines(&w, "in", None, &refs);
    let module = guest("poison");
    let mut run = w.spawn(&[
        "run",
        "--module",
        module.to_str().unwrap(),
        "--topic",
        "in",
        "--group",
        "g",
        "--batch-size",
        "16",
        "--instances",
        "1",
        "--backoff-base",
        "300ms",
        "--jitter",
        "none",
        "--max-in-flight",
        "20",
    ]);
    // Each retry holds its partition's offset (and the outputs behind it) for 300 ms, and at
    // most 20 messages are in flight, so the run takes seconds and commits come in steps:
    // kill at the first dead letters, well before the end.
    weir_tests::wait_until(
        "some dead letters and retries happened",
        std::time::Duration::from_secs(120),
        || w.count("in.dlq") >= 10,
    );
    run.kill();
    let dead_at_kill = w.messages("in.dlq").len();
    assert!(
        dead_at_kill < n / 10,
        "the run finished before it was killed ({dead_at_kill} dead letters); the test proves nothing"
    );
    // What the kill left is exactly the committed inputs' outputs and dead letters: every
    // message below its partition's committed offset has one, none above it has (retried
    // messages run after later ones, so a handler call's messages can span a wide range).
    let committed: Vec<u64> = w.offsets("in", "g").iter().map(|(_, c)| *c).collect();
    let written: std::collections::HashSet<String> = ["out", "in.dlq"]
        .iter()
        .flat_map(|t| w.messages(t))
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect();
    for m in w.messages("in") {
        let p = m["partition"].as_u64().unwrap() as usize;
        let below = m["offset"].as_u64().unwrap() < committed[p];
        let payload = m["payload"].as_str().unwrap();
        assert_eq!(
            written.contains(payload),
            below,
            "{payload} (partition {p}, offset {}, committed {})",
            m["offset"],
            committed[p]
        );
    }

    w.drain(&module, "in", "g", &["--backoff-base", "1ms"]);
    // Each payload counted, not collected into a set: on the log an output or a dead letter is
    // written with the offset that passes its input, so across the kill each is written once.
    let count = |topic: &str| {
        let mut per: std::collections::HashMap<String, usize> = Default::default();
        for m in w.messages(topic) {
            *per.entry(m["payload"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        per
    };
    let (out, dead) = (count("out"), count("in.dlq"));
    for line in &lines {
        let (o, d) = (
            out.get(line).copied().unwrap_or(0),
            dead.get(line).copied().unwrap_or(0),
        );
        if line.starts_with("poison") {
            assert_eq!((o, d), (0, 1), "{line}: (published, dead-lettered)");
        } else {
            assert_eq!((o, d), (1, 0), "{line}: (published, dead-lettered)");
        }
    }
    assert!(w.offsets("in", "g").iter().all(|(end, c)| end == c));
}
