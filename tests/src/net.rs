//! HTTP for the tests: a plain HTTP/1.1 client for the admin server, a slow downstream service
//! for handlers that call out, and the admin server's address from a run's log.

use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// One HTTP/1.1 request to `addr` (host:port); returns the status code and the body.
pub fn http(method: &str, addr: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with(method, addr, path, &[], body)
}

/// [`http`] with more request headers; a `Host` among them replaces the default (`addr`).
pub fn http_with(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    write!(
        s,
        "{head}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, rest.to_string())
}

/// A downstream service for handlers that call out over HTTP (`guest-examples/rust/fetch`):
/// answers every request with its own body after `latency`, one thread per connection, and
/// counts requests and how many were waiting at once.
pub struct EchoServer {
    addr: String,
    counts: std::sync::Arc<EchoCounts>,
}

#[derive(Default)]
struct EchoCounts {
    requests: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
}

impl EchoServer {
    /// Listens on a free loopback port. The service latency is what the server simulates (a
    /// slow downstream), not a wait of the test.
    pub fn start(latency: Duration) -> EchoServer {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let counts = std::sync::Arc::new(EchoCounts::default());
        let c = counts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let c = c.clone();
                std::thread::spawn(move || {
                    let now = c.in_flight.fetch_add(1, SeqCst) + 1;
                    c.peak.fetch_max(now, SeqCst);
                    let served = echo_one(conn, latency);
                    c.in_flight.fetch_sub(1, SeqCst);
                    if served {
                        c.requests.fetch_add(1, SeqCst);
                    }
                });
            }
        });
        EchoServer { addr, counts }
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The `--handler-config` setting that points the `fetch` guest at this server.
    pub fn url_setting(&self) -> String {
        format!("url=http://{}/enrich", self.addr)
    }

    /// Requests answered.
    pub fn requests(&self) -> u64 {
        self.counts
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests that were being served at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.counts.peak.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads one request (headers and a Content-Length body), waits `latency`, answers 200 with
/// the same body and closes. False if the request was cut short.
fn echo_one(conn: std::net::TcpStream, latency: Duration) -> bool {
    use std::io::{BufRead, BufReader, Read, Write};
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut reader = BufReader::new(&conn);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return false;
    }
    // The service's latency: the behaviour the tests put weir against, not a wait of theirs.
    std::thread::sleep(latency);
    let mut w = &conn;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).is_ok() && w.write_all(&body).is_ok()
}

/// The admin server address a `weir run` logged (with `--log-format json`), once it has.
pub fn admin_address(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("admin server listening"))
        })
        .and_then(|v| {
            v["fields"]["address"]
                .as_str()
                .map(|a| a.trim_start_matches("http://").to_string())
        })
}
