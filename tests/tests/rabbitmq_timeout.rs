//! RabbitMQ's `consumer_timeout` (issue 34): the broker closes a channel whose oldest unacked
//! message was delivered longer ago than the timeout (30 minutes by default; a server setting on
//! RabbitMQ 3.10, per queue with `x-consumer-timeout` from 3.12). A message held that long costs
//! a reconnect, and comes back counted as its next attempt, so one that is always held too
//! long reaches its DLQ. Runs alone (the `measured` profile): it shortens the broker's timeout
//! for every channel opened meanwhile.

use super::rabbitmq::{publish, take_all};
use std::time::Duration;
use weir_tests::{Broker, RabbitSetting, Weir, guest, wait_until};

#[test]
fn a_message_held_past_consumer_timeout_comes_back_counted_to_its_dlq() {
    // Read when a channel opens: weir's channels get 2 s, checked every 250 ms.
    let _timeout = RabbitSetting::set("consumer_timeout", 2_000);
    let _tick = RabbitSetting::set("channel_tick_interval", 250);
    let w = Weir::rabbitmq();
    let Broker::Rabbit(vhost) = w.broker() else {
        unreachable!()
    };
    let url = vhost.url();
    w.create_topic("in", 1);
    w.create_topic("out", 1);
    w.create_topic("in.dlq", 1);
    publish(&url, "in", 1, |_| "flaky forever".to_string());
    publish(&url, "in", 20, |i| format!("fine {i}"));
    let module = guest("flaky");
    let log_path = w.path("run.log");
    // Every attempt of the flaky message fails and waits 10 s for the next: past the timeout.
    let mut run = w.spawn_logged(
        &[
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "in",
            "--group",
            "g",
            "--handler-config",
            "fail-attempts=100",
            "--max-attempts",
            "3",
            "--backoff-base",
            "10s",
            "--backoff-factor",
            "1",
            "--jitter",
            "none",
        ],
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(
        "the message is dead-lettered",
        Duration::from_secs(60),
        || {
            assert!(run.is_running(), "the run ended:\n{}", log());
            w.queue_state("in.dlq").0 == 1
        },
    );
    let out = run.terminate();
    assert!(out.status.success(), "{}", log());
    let text = log();
    assert!(
        text.contains("consumer_timeout closed the channel"),
        "the log does not name consumer_timeout:\n{text}"
    );
    assert_eq!(
        text.matches("message failed").count(),
        3,
        "three attempts, no more:\n{text}"
    );
    let mut fine: Vec<String> = take_all(&url, "out")
        .into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect();
    fine.sort();
    fine.dedup();
    assert_eq!(fine.len(), 20, "every other message handled: {fine:?}");
}
