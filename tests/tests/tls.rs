//! TLS to the brokers (issue 16): a Redis (`rediss://`) and a NATS of the test's own that speak
//! only TLS, with a private CA, and ask for the client's certificate. A producer that is not
//! weir writes 50 orders over TLS; `weir run --drain` confirms each once, trusting the CA and
//! showing its certificate through `--source-property ca=/cert=/key=`. Without the CA, with
//! the wrong one, without a client certificate, or over plain TCP (Redis), weir exits 1 and
//! says why.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use weir_tests::{Pki, Weir, guest};

const ORDERS: u64 = 50;

fn order(i: u64) -> String {
    format!(
        r#"{{"id":"m-{i}","customer":"c-{}","amount_cents":{}}}"#,
        i % 7,
        i + 1
    )
}

/// `--source URL` and the TLS properties (`ca`, `cert`, `key` from `pki`, those named).
fn source(url: &str, pki: &Pki, files: &[(&str, &str)]) -> Vec<String> {
    let mut a = vec!["--source".to_string(), url.to_string()];
    for (k, f) in files {
        a.push("--source-property".into());
        a.push(format!("{k}={}", pki.file(f)));
    }
    a
}

const ALL: &[(&str, &str)] = &[
    ("ca", "ca.pem"),
    ("cert", "client.pem"),
    ("key", "client.key"),
];

fn args<'a>(src: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    src.iter()
        .map(String::as_str)
        .chain(rest.iter().copied())
        .collect()
}

/// Runs the orders handler over `src` until the topic is drained.
fn run_orders(w: &Weir, src: &[String]) {
    let orders = guest("orders");
    w.ok(&args(
        src,
        &[
            "run",
            "--module",
            orders.to_str().unwrap(),
            "--topic",
            "orders",
            "--group",
            "g",
            "--drain",
        ],
    ));
}

/// Each way of getting TLS wrong fails `weir topics create` with a non-zero exit and a message
/// that names the broker and the failure; returns the messages.
fn refused(w: &Weir, url: &str, plain: Option<&str>, pki: &Pki) -> Vec<String> {
    let mut cases: Vec<Vec<String>> = vec![
        // No CA: the system's roots do not know the private one.
        source(url, pki, &[("cert", "client.pem"), ("key", "client.key")]),
        // The wrong CA.
        source(
            url,
            pki,
            &[
                ("ca", "other-ca.pem"),
                ("cert", "client.pem"),
                ("key", "client.key"),
            ],
        ),
        // No client certificate: the server asks for one.
        source(url, pki, &[("ca", "ca.pem")]),
    ];
    // Plain TCP to the TLS port (a NATS client takes TLS where the server requires it).
    cases.extend(plain.map(|p| source(p, pki, &[])));
    cases
        .iter()
        .map(|src| {
            let out = w.output(&args(src, &["topics", "create", "refused"]));
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert_eq!(out.status.code(), Some(1), "{src:?} was let in:\n{err}");
            assert!(err.contains("error"), "{src:?}: no error said:\n{err}");
            err
        })
        .collect()
}

#[test]
fn redis_over_tls_with_a_client_certificate() {
    let w = Weir::new();
    let pki = Pki::new(&w.path("pki"));
    std::fs::create_dir_all(w.path("redis")).unwrap();
    let server = pki.redis(&w.path("redis"));
    let url = format!("rediss://127.0.0.1:{}", server.port);
    let src = source(&url, &pki, ALL);
    let read = |f: &str| std::fs::read(pki.dir.join(f)).unwrap();
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read("client.pem"),
                client_key: read("client.key"),
            }),
            root_cert: Some(read("ca.pem")),
        },
    )
    .unwrap();
    let mut c = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .expect("a TLS connection of the test's own");
    let mut pipe = redis::pipe();
    for i in 0..ORDERS {
        pipe.cmd("XADD")
            .arg("orders")
            .arg("*")
            .arg("payload")
            .arg(order(i))
            .ignore();
    }
    pipe.query::<()>(&mut c).expect("XADD over TLS");
    w.ok(&args(&src, &["topics", "create", "confirmations"]));
    run_orders(&w, &src);
    let confirmed: u64 = redis::cmd("XLEN")
        .arg("confirmations")
        .query(&mut c)
        .unwrap();
    assert_eq!(confirmed, ORDERS);
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg("orders")
        .arg("g")
        .query(&mut c)
        .unwrap();
    let redis::Value::Array(p) = pending else {
        panic!("XPENDING answered {pending:?}")
    };
    assert_eq!(p.first(), Some(&redis::Value::Int(0)), "{p:?}");
    let plain = format!("redis://127.0.0.1:{}", server.port);
    for err in refused(&w, &url, Some(&plain), &pki) {
        assert!(err.contains("Redis"), "the broker is not named:\n{err}");
    }
}

#[test]
fn nats_over_tls_with_a_client_certificate() {
    let w = Weir::new();
    let pki = Pki::new(&w.path("pki"));
    std::fs::create_dir_all(w.path("nats")).unwrap();
    let server = pki.nats(&w.path("nats"));
    let url = format!("nats://127.0.0.1:{}", server.port);
    let src = source(&url, &pki, ALL);
    w.ok(&args(&src, &["topics", "create", "orders"]));
    w.ok(&args(&src, &["topics", "create", "confirmations"]));
    let options = || {
        async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(pki.dir.join("ca.pem"))
            .add_client_certificate(pki.dir.join("client.pem"), pki.dir.join("client.key"))
    };
    type Job = dyn Fn(async_nats::jetstream::Context) -> Pin<Box<dyn Future<Output = u64>>>;
    let js = |f: &Job| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let c = options()
                    .connect(url.as_str())
                    .await
                    .expect("connect over TLS");
                f(async_nats::jetstream::new(c)).await
            })
    };
    js(&|js| {
        Box::pin(async move {
            for i in 0..ORDERS {
                js.publish("orders", order(i).into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
            0
        })
    });
    run_orders(&w, &src);
    let stored = js(&|js| {
        Box::pin(async move {
            let mut s = js.get_stream("confirmations").await.expect("the stream");
            s.info().await.expect("its info").state.messages
        })
    });
    assert_eq!(stored, ORDERS);
    let unacked = js(&|js| {
        Box::pin(async move {
            let s = js.get_stream("orders").await.expect("the stream");
            let i = s.consumer_info("g").await.expect("the group's consumer");
            i.num_pending + i.num_ack_pending as u64
        })
    });
    assert_eq!(unacked, 0, "messages left unacked or undelivered");
    for err in refused(&w, &url, None, &pki) {
        assert!(err.contains("NATS"), "the broker is not named:\n{err}");
    }
}
