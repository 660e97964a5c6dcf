//! The admin server as an attack surface (issue 19, findings 1, 9 and 11): what a web page in a
//! browser on the same machine, a client that misbehaves, or a hostile body can do to it. Each
//! test failed on the hand-written server of 0d86429.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use weir_tests::{
    Running, Weir, admin_address, cpu_share, guest, http, http_with, proc_status, wait_until,
};

/// Starts `weir run` (the noop guest on `in`) with its admin server on a free port.
fn run_with_admin(w: &Weir, extra: &[&str]) -> (Running, String) {
    w.create_topic("in", 1);
    let noop = guest("noop");
    let log = w.path("run.log");
    let mut args = vec![
        "run",
        "--module",
        noop.to_str().unwrap(),
        "--topic",
        "in",
        "--group",
        "g",
    ];
    args.extend_from_slice(extra);
    w.spawn_with_admin(&args, &log)
}

fn reload(addr: &str, path: &Path) -> (u16, String) {
    let body = serde_json::json!({ "path": path }).to_string();
    http("POST", addr, "/module", Some(&body))
}

/// Finding 1: `POST /module` read any path the process could open: `/dev/zero` never answered
/// and grew the process by gigabytes, a FIFO blocked a thread. Now a module comes only from the
/// reload directory, is a regular file, and has a size bound; each refusal answers at once.
#[test]
fn a_reload_takes_only_a_bounded_regular_file_from_the_reload_directory() {
    let w = Weir::new();
    let dir = w.path("modules");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(guest("noop"), dir.join("next.wasm")).unwrap();
    let fifo = dir.join("fifo.wasm");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = std::fs::File::create(dir.join("big.wasm")).unwrap();
    big.set_len(300 << 20).unwrap();
    let outside = w.path("outside.wasm");
    std::fs::copy(guest("noop"), &outside).unwrap();
    let (run, addr) = run_with_admin(&w, &["--reload-dir", dir.to_str().unwrap()]);
    let pid = run.id();
    let started = Instant::now();
    for (path, code, says) in [
        (Path::new("/dev/zero"), 403, "reload directory"),
        (outside.as_path(), 403, "reload directory"),
        (&dir.join("../outside.wasm"), 403, "reload directory"),
        (&fifo, 400, "not a regular file"),
        (&dir.join("big.wasm"), 400, "bytes"),
        (&dir.join("missing.wasm"), 400, "missing.wasm"),
    ] {
        let (got, body) = reload(&addr, path);
        assert_eq!(got, code, "{}: {body}", path.display());
        assert!(body.contains(says), "{}: {body}", path.display());
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        proc_status(pid, "VmHWM:") < 400 << 10,
        "peak RSS {} KiB",
        proc_status(pid, "VmHWM:")
    );
    let (got, body) = reload(&addr, &dir.join("next.wasm"));
    assert_eq!(got, 200, "{body}");
}

/// Finding 1: nothing checked `Host` or `Origin`, so a page in a browser on the same machine
/// could post to the server (a cross-origin form or fetch), or read it through DNS rebinding.
#[test]
fn other_origins_and_hosts_are_refused() {
    let w = Weir::new();
    let (_run, addr) = run_with_admin(&w, &[]);
    let ingest = |headers: &[(&str, &str)]| {
        http_with(
            "POST",
            &addr,
            "/topics/in/messages",
            headers,
            Some(r#"{"payload":"x"}"#),
        )
        .0
    };
    assert_eq!(ingest(&[("Origin", "http://evil.example")]), 403);
    assert_eq!(ingest(&[("Origin", "null")]), 403);
    assert_eq!(ingest(&[("Sec-Fetch-Site", "cross-site")]), 403);
    assert_eq!(ingest(&[("Host", "evil.example")]), 403);
    let metrics = http_with(
        "GET",
        &addr,
        "/metrics",
        &[("Host", "evil.example:80")],
        None,
    );
    assert_eq!(metrics.0, 403, "DNS rebinding reads too");
    // The dashboard's own origin, and clients that send none (curl, Prometheus).
    assert_eq!(ingest(&[("Origin", &format!("http://{addr}"))]), 200);
    assert_eq!(ingest(&[]), 200);
    let port = addr.rsplit_once(':').unwrap().1;
    assert_eq!(ingest(&[("Host", &format!("localhost:{port}"))]), 200);
}

/// Finding 1: writes (ingest, reload) take a bearer token when one is set; reads stay open for
/// scrapers and probes.
#[test]
fn writes_need_the_admin_token_when_one_is_set() {
    let w = Weir::new();
    let (_run, addr) = run_with_admin(&w, &["--admin-token", "s3cret"]);
    let ingest = |headers: &[(&str, &str)]| {
        http_with(
            "POST",
            &addr,
            "/topics/in/messages",
            headers,
            Some(r#"{"payload":"x"}"#),
        )
        .0
    };
    assert_eq!(ingest(&[]), 401);
    assert_eq!(ingest(&[("Authorization", "Bearer wrong")]), 401);
    assert_eq!(ingest(&[("Authorization", "Basic czNjcmV0")]), 401);
    assert_eq!(ingest(&[("Authorization", "Bearer s3cret")]), 200);
    assert_eq!(http("GET", &addr, "/metrics", None).0, 200);
    assert_eq!(http("GET", &addr, "/healthz", None).0, 200);
}

/// Finding 11: `POST /topics/messages` sliced the path past its end: a panic, and no answer.
#[test]
fn a_path_that_only_looks_like_ingest_is_not_found() {
    let w = Weir::new();
    let (_run, addr) = run_with_admin(&w, &[]);
    for path in [
        "/topics/messages",
        "/topics//messages",
        "/topics/a/b/messages",
    ] {
        let (code, body) = http("POST", &addr, path, Some(r#"{"payload":"x"}"#));
        assert!(code == 404 || code == 400, "{path}: {code} {body}");
    }
}

/// Finding 9: a 32 MiB JSON body was parsed into a tree about 16 times its size.
#[test]
fn an_ingest_body_is_not_expanded_in_memory() {
    let w = Weir::new();
    let (run, addr) = run_with_admin(&w, &[]);
    let pid = run.id();
    let before = proc_status(pid, "VmHWM:");
    let one = r#"{"payload":1},"#;
    let body = format!("[{}{{\"payload\":1}}]", one.repeat((30 << 20) / one.len()));
    let (code, answer) = http("POST", &addr, "/topics/in/messages", Some(&body));
    assert!(
        code == 413 || code == 400,
        "{code}: {}",
        &answer[..answer.len().min(200)]
    );
    let grown = proc_status(pid, "VmHWM:").saturating_sub(before);
    assert!(grown < 200 << 10, "peak RSS grew by {grown} KiB");
}

/// Finding 9: an `accept` error (out of file descriptors) spun a thread at 100% CPU; there was
/// no bound on connections. Here the process may open 256 files, and 300 idle connections come.
#[test]
fn running_out_of_file_descriptors_does_not_spin() {
    let w = Weir::new();
    w.create_topic("in", 1);
    let noop = guest("noop");
    let log = w.path("run.log");
    let file = std::fs::File::create(&log).unwrap();
    let weir = weir_tests::weir_bin();
    let script = format!(
        "ulimit -n 256 && exec {} --data-dir {} --log-format json run --module {} --topic in --group g --admin 127.0.0.1:0",
        weir.display(),
        w.data_dir().display(),
        noop.display()
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .env("RUST_LOG", "info")
        .stderr(file)
        .spawn()
        .unwrap();
    let _run = Running::from(child);
    let mut addr = None;
    wait_until("the admin server listens", Duration::from_secs(30), || {
        addr = admin_address(&log);
        addr.is_some()
    });
    let addr = addr.unwrap();
    let pid = _run.id();
    // 300 idle connections, made from 50 threads at once with a timeout of a second each:
    // past what the server takes and its backlog holds, a connect waits out SYN retries
    // (seconds each), which one by one took over a minute. (A server without a bound accepts
    // until its descriptors run out.)
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    let idle: Vec<std::net::TcpStream> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..50)
            .map(|_| {
                s.spawn(move || {
                    (0..6)
                        .filter_map(|_| {
                            std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    assert!(
        idle.len() > 100,
        "only {} connections were made",
        idle.len()
    );
    // Give the server half a second to meet the limit, then measure it over two.
    let _ = cpu_share(pid, Duration::from_millis(500));
    let share = cpu_share(pid, Duration::from_secs(2));
    assert!(share < 0.5, "the idle server used {share:.2} of a core");
    drop(idle);
    // Served again once the idle connections are gone.
    wait_until("/healthz answers", Duration::from_secs(60), || {
        std::net::TcpStream::connect(&addr).is_ok() && http("GET", &addr, "/healthz", None).0 == 200
    });
}
