//! Outgoing HTTP for handlers (wasi:http): refused unless the operator allows the host, sent
//! when allowed, bounded by the call timeout, and checked as input.

use serde_json::Value;
use std::time::Duration;
use weir_tests::{EchoServer, Weir, guest, header, produce_lines};

fn topics(w: &Weir) {
    w.create_topic("in", 1);
    w.create_topic("out", 1);
}

/// `weir run --drain` of the `fetch` guest pointed at `service`, with `extra` flags.
fn drain_fetch(w: &Weir, service: &EchoServer, extra: &[&str]) -> Value {
    let url = service.url_setting();
    let mut args = vec!["--handler-config", url.as_str()];
    args.extend_from_slice(extra);
    w.drain(&guest("fetch"), "in", "g", &args)
}

/// Without `--allow-http`, or with another port, the request never leaves: the handler gets
/// `HTTP-request-denied`, retries run out, the message is dead-lettered with that reason, and
/// the log says which flag would allow it.
#[test]
fn requests_to_hosts_not_allowed_are_refused_and_dead_lettered() {
    let service = EchoServer::start(Duration::ZERO);
    let url = service.url_setting();
    let fetch = guest("fetch");
    let port = service
        .addr()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse::<u16>()
        .unwrap();
    let other_port = format!("127.0.0.1:{}", port.wrapping_add(1).max(1));
    for (case, allow) in [
        ("no --allow-http", None),
        ("another port", Some(other_port.as_str())),
    ] {
        let w = Weir::new();
        topics(&w);
        produce_lines(&w, "in", Some("k"), &["a", "b"]);
        let mut extra = vec![
            "--handler-config",
            &url,
            "--max-attempts",
            "2",
            "--backoff-base",
            "10ms",
        ];
        if let Some(a) = allow {
            extra.extend(["--allow-http", a]);
        }
        let out = w.ok(&{
            let mut a = vec![
                "--log-format",
                "json",
                "run",
                "--module",
                fetch.to_str().unwrap(),
            ];
            a.extend(["--topic", "in", "--group", "g", "--drain", "--json"]);
            a.extend(extra.iter().copied());
            a
        });
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["dead_lettered"], 2, "{case}: {summary}");
        assert_eq!(summary["processed"], 0, "{case}: {summary}");
        let dlq = w.messages("in.dlq");
        assert_eq!(dlq.len(), 2, "{case}");
        let error = header(&dlq[0], "weir.dlq.error").unwrap();
        assert!(error.contains("HttpRequestDenied"), "{case}: {error}");
        let log = String::from_utf8_lossy(&out.stderr);
        let target = format!("--allow-http {}", service.addr());
        assert_eq!(
            log.lines().filter(|l| l.contains(&target)).count(),
            1,
            "{case}: one warning naming the flag, got:\n{log}"
        );
        assert_eq!(w.count("out"), 0, "{case}");
    }
    assert_eq!(
        service.requests(),
        0,
        "a refused request reached the service"
    );
}

/// Allowed by host alone (any port), the request goes out and the answer is emitted.
#[test]
fn an_allowed_host_is_called_and_its_answer_emitted() {
    let service = EchoServer::start(Duration::ZERO);
    let w = Weir::new();
    topics(&w);
    produce_lines(&w, "in", Some("k"), &["one", "two", "three"]);
    let s = drain_fetch(&w, &service, &["--allow-http", "127.0.0.1"]);
    assert_eq!(s["processed"], 3, "{s}");
    let out: Vec<String> = w
        .messages("out")
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(out, ["one", "two", "three"]);
    assert_eq!(service.requests(), 3);
}

/// A downstream slower than `--call-timeout` times the call out while it waits on the network:
/// the instance is replaced, the message is retried and dead-lettered as `timeout`, and the
/// run goes on to the next message.
#[test]
fn the_call_timeout_cuts_a_slow_request_short() {
    let service = EchoServer::start(Duration::from_secs(3));
    let w = Weir::new();
    topics(&w);
    produce_lines(&w, "in", Some("k"), &["slow"]);
    let started = std::time::Instant::now();
    let s = drain_fetch(
        &w,
        &service,
        &[
            "--allow-http",
            service.addr(),
            "--call-timeout",
            "200ms",
            "--max-attempts",
            "2",
            "--backoff-base",
            "10ms",
        ],
    );
    assert_eq!(s["dead_lettered"], 1, "{s}");
    assert_eq!(s["faults"], 2, "{s}");
    let dlq = w.messages("in.dlq");
    assert_eq!(header(&dlq[0], "weir.dlq.error-kind"), Some("timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the run waited for the service ({:?}) instead of timing the call out",
        started.elapsed()
    );
}

/// `weir test --allow-http` calls the service too.
#[test]
fn weir_test_allows_http_per_host() {
    let service = EchoServer::start(Duration::ZERO);
    let w = Weir::new();
    let input = w.path("in.jsonl");
    std::fs::write(&input, "{\"payload\": \"hi\", \"key\": \"k\"}\n").unwrap();
    let url = format!("url=http://{}/x", service.addr());
    let fetch = guest("fetch");
    let args = |allow: bool| {
        let mut a = vec![
            "test",
            fetch.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--json",
            "--max-attempts",
            "1",
            "--handler-config",
            &url,
        ];
        if allow {
            a.extend(["--allow-http", service.addr()]);
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |allow: bool| -> Value {
        let a = args(allow);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        serde_json::from_slice(&w.ok(&a).stdout).unwrap()
    };
    let allowed = run(true);
    assert_eq!(allowed["outcome"], "ok", "{allowed}");
    assert_eq!(allowed["emitted"][0]["payload"], "hi", "{allowed}");
    let refused = run(false);
    assert_ne!(refused["outcome"], "ok", "{refused}");
    assert!(
        refused.to_string().contains("HttpRequestDenied"),
        "{refused}"
    );
}

/// A bad `--allow-http` is an input error that names the entry and the form expected.
#[test]
fn a_bad_allow_http_entry_is_named() {
    let w = Weir::new();
    topics(&w);
    for bad in ["http://example.com", "example.com:99999", "::1"] {
        let e = w.fails(
            &[
                "run",
                "--module",
                guest("fetch").to_str().unwrap(),
                "--topic",
                "in",
                "--group",
                "g",
                "--drain",
                "--allow-http",
                bad,
            ],
            2,
        );
        assert!(
            e.contains(&format!("--allow-http `{bad}`")) && e.contains("give a host"),
            "{bad}: {e}"
        );
    }
}
