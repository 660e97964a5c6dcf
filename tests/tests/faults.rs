//! A guest that traps never takes the host down: its instance is replaced, the message is not
//! acked until it is retried or dead-lettered, and every other message is processed.

use weir_tests::{Weir, guest, header};

#[test]
fn a_trapping_guest_is_replaced_and_good_messages_keep_flowing() {
    let w = Weir::new();
    w.create_topic("in", 2);
    w.create_topic("out", 2);
    let lines: String = (0..200)
        .map(|i| {
            if i == 50 || i == 150 {
                "please panic\n".to_string()
            } else {
                format!("fine {i}\n")
            }
        })
        .collect();
    let file = w.path("in.txt");
    std::fs::write(&file, lines).unwrap();
    w.ok(&["produce", "in", "--file", file.to_str().unwrap()]);

    let run = w.drain_logged(
        &guest("panics"),
        "in",
        "g",
        &[
            "--max-attempts",
            "2",
            "--backoff-base",
            "100ms",
            "--jitter",
            "none",
        ],
    );
    let s = run.summary;
    // Each poison message failed twice, 100 ms apart at least (the backoff), from weir's log.
    let mut per_offset: std::collections::BTreeMap<(u64, u64), Vec<(u64, u64)>> =
        Default::default();
    for f in &run.failures {
        let at = (
            f["fields"]["partition"].as_u64().unwrap(),
            f["fields"]["offset"].as_u64().unwrap(),
        );
        per_offset.entry(at).or_default().push((
            f["fields"]["attempt"].as_u64().unwrap(),
            f["at_ms"].as_u64().unwrap(),
        ));
    }
    assert_eq!(per_offset.len(), 2, "{:?}", run.failures);
    for attempts in per_offset.values() {
        assert_eq!(attempts.iter().map(|a| a.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(attempts[1].1 - attempts[0].1 >= 100, "{attempts:?}");
    }
    assert_eq!(s["processed"], 198, "{s}");
    assert_eq!(s["dead_lettered"], 2, "{s}");
    assert_eq!(
        s["faults"], 4,
        "each poison message trapped on both attempts: {s}"
    );
    assert_eq!(w.messages("out").len(), 198);
    let dlq = w.messages("in.dlq");
    assert_eq!(dlq.len(), 2);
    for m in &dlq {
        assert_eq!(m["payload"], "please panic");
        assert_eq!(header(m, "weir.dlq.error-kind"), Some("trap"));
        assert_eq!(header(m, "weir.dlq.attempts"), Some("2"));
        assert!(
            header(m, "weir.dlq.error").unwrap().contains("unreachable")
                && header(m, "weir.dlq.error")
                    .unwrap()
                    .contains("panicked at rust/panics/src/lib.rs")
                && header(m, "weir.dlq.error")
                    .unwrap()
                    .contains("asked to panic at offset"),
            "{m}"
        );
    }
}

#[test]
fn a_batch_call_that_traps_is_isolated_to_the_faulty_message() {
    let w = Weir::new();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    let lines: String = (0..100)
        .map(|i| {
            if i == 37 {
                "please panic\n".to_string()
            } else {
                format!("fine {i}\n")
            }
        })
        .collect();
    let file = w.path("in.txt");
    std::fs::write(&file, lines).unwrap();
    w.ok(&["produce", "in", "--file", file.to_str().unwrap()]);
    let s = w.drain(
        &guest("panics-batch"),
        "in",
        "g",
        // One lane, so keyless messages keep their order and it can be checked exactly.
        &["--batch-size", "50", "--max-attempts", "1", "--lanes", "1"],
    );
    // Everything but the poison message succeeded, its outputs published exactly once.
    assert_eq!(
        (s["processed"].as_u64(), s["dead_lettered"].as_u64()),
        (Some(99), Some(1)),
        "{s}"
    );
    let out: Vec<String> = w
        .messages("out")
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..100)
        .filter(|&i| i != 37)
        .map(|i| format!("fine {i}"))
        .collect();
    assert_eq!(out, expected, "outputs in order, none lost, none twice");
    let dlq = w.messages("in.dlq");
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], "weir.dlq.offset"), Some("37"));
    assert_eq!(header(&dlq[0], "weir.dlq.error-kind"), Some("trap"));
    // The batch call faulted once, then the message alone faulted once.
    assert_eq!(s["faults"], 2, "{s}");
}

#[test]
fn the_batch_entry_point_acks_every_message() {
    let w = Weir::new();
    w.create_topic("in", 3);
    w.ok(&["produce", "in", "--count", "3000", "--size", "100"]);
    let s = w.drain(&guest("noop"), "in", "g", &["--batch-size", "100"]);
    assert_eq!(
        (
            s["processed"].as_u64(),
            s["faults"].as_u64(),
            s["retries"].as_u64()
        ),
        (Some(3000), Some(0), Some(0)),
        "{s}"
    );
    assert!(w.offsets("in", "g").iter().all(|(end, c)| end == c));
}
