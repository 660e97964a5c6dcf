//! The conformance suite's lost-link behaviour (tests/tests/conformance.rs runs it on each
//! source with a link): weir's connections to the broker are dropped twice mid-run.

use std::time::Duration;
use weir_tests::{Broker, Weir, guest, scaled, wait_until};

/// A lost link to the broker costs a reconnect, never the run: twice while a run drains the
/// orders, the broker drops weir's connections (RabbitMQ and Redis close them; NATS's are cut
/// at a relay that refuses new ones for 8 s; the mock Kafka cluster's
/// broker goes down for 8 s, past the tests' 6 s session timeout: the group takes the
/// partition away and gives it back, and `--drain` must not take "none of mine left" for
/// "done", as it did, exiting 0 with most of the orders uncommitted). The run exits 0 with
/// every order confirmed: at least once (how many twice per source: tests/tests/
/// rabbitmq_commits.rs), and on NATS exactly once, as each output's `Nats-Msg-Id` makes a
/// republished one a duplicate the stream drops.
pub fn a_lost_link_costs_a_reconnect(w: Weir) {
    const OUTAGE: Duration = Duration::from_secs(8);
    // Enough that both losses land mid-run; on a queue, reading the confirmations back (each
    // taken and put back) costs 5 ms apiece, so fewer.
    let n = if w.on_queue() {
        w.volume(scaled(5_000, 5_000))
    } else {
        scaled(20_000, 20_000)
    };
    w.create_topic("orders", 1);
    w.create_topic("confirmations", 1);
    w.ok(&["produce", "orders", "--count", &n.to_string()]);
    let log = w.path("run.log");
    let mut run = w.spawn_logged(
        &[
            "run",
            "--module",
            guest("orders").to_str().unwrap(),
            "--topic",
            "orders",
            "--group",
            "g",
            "--max-in-flight",
            "200",
            "--drain",
            "--json",
        ],
        &log,
    );
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("a tenth is confirmed", Duration::from_secs(120), || {
        assert!(run.is_running(), "the run ended early:\n{}", text());
        w.end("confirmations") >= n / 10
    });
    let at_loss = w.end("confirmations");
    assert!(
        at_loss < n,
        "the run finished before the link was lost; the test proves nothing"
    );
    w.lose_links(OUTAGE);
    // Going on after it (the link is back), and then lost again.
    wait_until(
        "orders are confirmed after the loss",
        Duration::from_secs(120),
        || {
            assert!(
                run.is_running() || w.end("confirmations") >= n,
                "the run ended early:\n{}",
                text()
            );
            w.end("confirmations") >= (at_loss + n / 20).min(n)
        },
    );
    if run.is_running() {
        w.lose_links(OUTAGE);
    }
    wait_until("the run drains", Duration::from_secs(180), || {
        !run.is_running()
    });
    let out = run.wait();
    assert!(out.status.success(), "the run failed:\n{}", text());
    let per_id = w.confirmations_per_id();
    let missing: Vec<u64> = (0..n)
        .filter(|i| !per_id.contains_key(&format!("m-{i}")))
        .collect();
    if matches!(w.broker(), Broker::Nats(_)) {
        let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "confirmed more than once: {twice:?}");
    }
    assert!(
        missing.is_empty(),
        "{} orders never confirmed, e.g. {:?}; (end, committed) of orders: {:?}; the run's log:\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        (!w.on_queue()).then(|| w.offsets("orders", "g")),
        text()
    );
}
