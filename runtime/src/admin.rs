//! The admin server of `weir run` (`--admin 127.0.0.1:9464`): Prometheus metrics, health and
//! readiness probes, a JSON status, an ingest endpoint on the embedded log, and the live
//! dashboard. A small HTTP/1.1 server on tokio (one request per connection, `Connection:
//! close`), so that weir needs no web framework for five routes.

use crate::engine::metrics::Histogram;
use crate::engine::{Stats, now_ms};
use crate::source::embedded::EmbeddedLog;
use crate::source::embedded::local::MaxDepth;
use crate::source::{Record, Source};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest request body accepted (an ingest batch).
const MAX_BODY: usize = 32 << 20;

const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// How often the status is kept for `/api/history`, and how many are kept (5 minutes).
const HISTORY_EVERY: Duration = Duration::from_secs(1);
const HISTORY_LEN: usize = 300;

struct Served {
    admin: Admin,
    history: std::sync::Mutex<std::collections::VecDeque<Value>>,
}

/// Aborts a task when dropped (the sampler ends with the server).
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the admin server reports on.
pub struct Admin {
    pub stats: Arc<Stats>,
    pub source: Arc<dyn Source>,
    /// Set on the embedded log: `POST /topics/{topic}/messages` appends here.
    pub log: Option<Arc<EmbeddedLog>>,
    pub max_depth: Option<MaxDepth>,
    pub group: String,
    pub topics: Vec<String>,
    pub started_ms: u64,
    /// Loads another module and puts it in place (`POST /module`); `None`: refused.
    pub reload: Option<Reloader>,
}

/// Loads the component at a path and makes it the run's handler; returns its name and digest,
/// or why it was refused (the running handler stays).
pub type Reloader = Arc<dyn Fn(&std::path::Path) -> Result<(String, String), String> + Send + Sync>;

/// (name, digest, loaded at ms) of the handler running now.
fn module_info(admin: &Admin) -> (String, String, u64) {
    match admin.stats.module.get() {
        Some(h) => (
            h.name().to_string(),
            h.digest().to_string(),
            admin.stats.module.loaded_ms(),
        ),
        None => ("-".into(), "-".into(), 0),
    }
}

/// Binds `addr` and serves until the task is dropped. Returns the bound address (port 0 picks
/// one) or why it could not bind.
pub async fn serve(
    admin: Admin,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let admin = Arc::new(Served {
        admin,
        history: Default::default(),
    });
    // The last minutes of status, so that a dashboard opened now shows them at once.
    let sampler = {
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HISTORY_EVERY);
            loop {
                tick.tick().await;
                if let Ok(parts) = partitions(&admin.admin).await {
                    let v = status_json(&admin.admin, &parts);
                    let mut h = admin.history.lock().expect("history lock");
                    if h.len() == HISTORY_LEN {
                        h.pop_front();
                    }
                    h.push_back(v);
                }
            }
        })
    };
    let task = tokio::spawn(async move {
        let _sampler = Abort(sampler);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(&admin, stream).await {
                    tracing::debug!(error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok((bound, task))
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    retry_after: Option<u64>,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            retry_after: None,
        }
    }
    fn json(status: u16, v: &Value) -> Response {
        Response::new(status, "application/json", v.to_string())
    }
    fn error(status: u16, message: impl std::fmt::Display) -> Response {
        Response::json(status, &json!({ "error": message.to_string() }))
    }
}

async fn connection(served: &Served, mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let response =
        match tokio::time::timeout(Duration::from_secs(30), read_request(&mut stream)).await {
            Err(_) => Response::error(408, "request timed out"),
            Ok(Err(e)) => Response::error(400, e),
            Ok(Ok(req)) => route(served, req).await,
        };
    let reason = match response.status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if let Some(s) = response.retry_after {
        let _ = write!(head, "Retry-After: {s}\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&response.body).await?;
    stream.shutdown().await
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Result<Request, String> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the request ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Err("request head over 64 KiB".into());
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or("/").to_string();
    let mut length = 0usize;
    for l in lines {
        if let Some((name, value)) = l.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| "bad Content-Length".to_string())?;
        }
    }
    if length > MAX_BODY {
        return Err(format!("body over {MAX_BODY} bytes"));
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the body ended".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Request { method, path, body })
}

async fn route(served: &Served, req: Request) -> Response {
    let admin = &served.admin;
    let path = req.path.split('?').next().unwrap_or("/").to_string();
    match (req.method.as_str(), path.as_str()) {
        ("POST", "/module") => reload(admin, &req.body).await,
        ("GET", "/api/history") => {
            let h = served.history.lock().expect("history lock");
            Response::json(200, &Value::Array(h.iter().cloned().collect()))
        }
        ("GET", "/") => Response::new(200, "text/html; charset=utf-8", DASHBOARD),
        ("GET", "/healthz") => Response::new(200, "text/plain", "ok\n"),
        ("GET", "/readyz") => {
            if admin.stats.ready.load(Ordering::Relaxed) {
                Response::new(200, "text/plain", "ready\n")
            } else {
                Response::new(
                    503,
                    "text/plain",
                    "not ready: the run is starting or stopping\n",
                )
            }
        }
        ("GET", "/metrics") => match partitions(admin).await {
            Ok(parts) => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics_text(admin, &parts),
            ),
            Err(e) => Response::error(503, e),
        },
        ("GET", "/api/status") => match partitions(admin).await {
            Ok(parts) => Response::json(200, &status_json(admin, &parts)),
            Err(e) => Response::error(503, e),
        },
        (method, p) if p.starts_with("/topics/") && p.ends_with("/messages") => {
            if method != "POST" {
                return Response::error(405, "use POST to append messages");
            }
            let topic = &p["/topics/".len()..p.len() - "/messages".len()];
            ingest(admin, topic, &req.body).await
        }
        _ => Response::error(
            404,
            "no such page; try /, /metrics, /healthz, /readyz, /api/status, /api/history or POST /topics/{topic}/messages",
        ),
    }
}

/// (topic, partition, end offset, committed offset) of every partition the run consumes now.
struct Part {
    topic: String,
    partition: u32,
    end: u64,
    committed: u64,
}

async fn partitions(admin: &Admin) -> Result<Vec<Part>, String> {
    let (source, group, topics) = (
        admin.source.clone(),
        admin.group.clone(),
        admin.topics.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for t in topics {
            let n = source.partitions(&t).map_err(|e| e.to_string())?;
            for p in 0..n {
                out.push(Part {
                    end: source.end_offset(&t, p).map_err(|e| e.to_string())?,
                    committed: source.committed(&group, &t, p).map_err(|e| e.to_string())?,
                    topic: t.clone(),
                    partition: p,
                });
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())?
}

fn esc(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (buckets, total, sum) = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (le, c) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {total}");
}

fn metrics_text(admin: &Admin, parts: &[Part]) -> String {
    let s = &admin.stats;
    let mut o = String::with_capacity(8192);
    let g = esc(&admin.group);
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "weir_messages_total",
        "counter",
        "Messages by topic and outcome: ok, deduped and dlq are final; retry, rejected, trap, timeout, memory and invalid-output count failed attempts.",
    );
    for ((topic, outcome), n) in s.metrics.messages() {
        let _ = writeln!(
            o,
            "weir_messages_total{{topic=\"{}\",outcome=\"{outcome}\"}} {n}",
            esc(&topic)
        );
    }
    let counters: [(&str, &str, u64); 5] = [
        (
            "weir_emitted_total",
            "Messages handlers emitted and weir published.",
            s.emitted.load(Ordering::Relaxed),
        ),
        (
            "weir_retries_total",
            "Failed attempts that were retried.",
            s.retries.load(Ordering::Relaxed),
        ),
        (
            "weir_dlq_writes_total",
            "Messages written to a dead-letter topic.",
            s.dead_lettered.load(Ordering::Relaxed),
        ),
        (
            "weir_dedupe_hits_total",
            "Duplicates acked without running the handler.",
            s.deduped.load(Ordering::Relaxed),
        ),
        (
            "weir_instance_faults_total",
            "Instances lost to a trap, timeout or memory fault.",
            s.faults.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
    histogram(
        &mut o,
        "weir_handler_duration_seconds",
        "Time in the handler per message (a batch call divided among its messages).",
        &s.metrics.handler,
    );
    histogram(
        &mut o,
        "weir_end_to_end_latency_seconds",
        "From a message's append to its ack.",
        &s.metrics.end_to_end,
    );
    family(
        &mut o,
        "weir_consumer_lag",
        "gauge",
        "Messages in a partition the group has not committed (end offset - committed offset).",
    );
    for p in parts {
        let _ = writeln!(
            o,
            "weir_consumer_lag{{topic=\"{}\",partition=\"{}\",group=\"{g}\"}} {}",
            esc(&p.topic),
            p.partition,
            p.end.saturating_sub(p.committed)
        );
    }
    family(
        &mut o,
        "weir_partition_end_offset",
        "gauge",
        "The offset the next message appended to a partition gets (its depth since creation).",
    );
    for p in parts {
        let _ = writeln!(
            o,
            "weir_partition_end_offset{{topic=\"{}\",partition=\"{}\"}} {}",
            esc(&p.topic),
            p.partition,
            p.end
        );
    }
    family(
        &mut o,
        "weir_committed_offset",
        "gauge",
        "The group's committed offset (the next it reads) per partition.",
    );
    for p in parts {
        let _ = writeln!(
            o,
            "weir_committed_offset{{topic=\"{}\",partition=\"{}\",group=\"{g}\"}} {}",
            esc(&p.topic),
            p.partition,
            p.committed
        );
    }
    let gauges: [(&str, &str, u64); 5] = [
        (
            "weir_in_flight_messages",
            "Messages fetched and not finished.",
            s.in_flight.load(Ordering::Relaxed) as u64,
        ),
        (
            "weir_instances",
            "Handler instances running.",
            s.instances.load(Ordering::Relaxed) as u64,
        ),
        (
            "weir_desired_instances",
            "Handler instances the scaler asks for (the fixed count without scaling).",
            s.desired_instances.load(Ordering::Relaxed) as u64,
        ),
        (
            "weir_paused_partitions",
            "Partitions whose fetching is paused at --max-in-flight.",
            s.paused_partitions.load(Ordering::Relaxed) as u64,
        ),
        (
            "weir_busy_lanes",
            "Key-ordered lanes with messages waiting or running.",
            s.busy_lanes.load(Ordering::Relaxed) as u64,
        ),
    ];
    for (name, help, v) in gauges {
        family(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }
    family(
        &mut o,
        "weir_module_info",
        "gauge",
        "The handler module running (always 1), with its name and SHA-256 digest.",
    );
    let (name, digest, loaded_ms) = module_info(admin);
    let _ = writeln!(
        o,
        "weir_module_info{{name=\"{}\",digest=\"sha256:{digest}\"}} 1",
        esc(&name)
    );
    family(
        &mut o,
        "weir_module_loaded_timestamp_seconds",
        "gauge",
        "When the running module was loaded (Unix time).",
    );
    let _ = writeln!(
        o,
        "weir_module_loaded_timestamp_seconds {}",
        loaded_ms as f64 / 1e3
    );
    family(
        &mut o,
        "weir_module_reloads_total",
        "counter",
        "Module reloads, by result: loaded, or refused (the running module stayed).",
    );
    let _ = writeln!(
        o,
        "weir_module_reloads_total{{result=\"loaded\"}} {}",
        s.module.reloads.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "weir_module_reloads_total{{result=\"refused\"}} {}",
        s.module.reload_failures.load(Ordering::Relaxed)
    );
    family(
        &mut o,
        "weir_ready",
        "gauge",
        "1 while the run is consuming.",
    );
    let _ = writeln!(
        o,
        "weir_ready {}",
        u8::from(s.ready.load(Ordering::Relaxed))
    );
    o
}

fn status_json(admin: &Admin, parts: &[Part]) -> Value {
    let s = &admin.stats;
    let mut per_topic: serde_json::Map<String, Value> = serde_json::Map::new();
    for ((topic, outcome), n) in s.metrics.messages() {
        let e = per_topic
            .entry(topic)
            .or_insert_with(|| Value::Object(Default::default()));
        e[outcome] = json!(n);
    }
    let q = |h: &Histogram, q: f64| h.quantile(q).filter(|v| v.is_finite());
    let (name, digest, loaded_ms) = module_info(admin);
    json!({
        "module": {
            "name": name,
            "digest": format!("sha256:{digest}"),
            "loaded_at_ms": loaded_ms,
            "reloads": s.module.reloads.load(Ordering::Relaxed),
            "reloads_refused": s.module.reload_failures.load(Ordering::Relaxed),
        },
        "group": admin.group,
        "ready": s.ready.load(Ordering::Relaxed),
        "now_ms": now_ms(),
        "uptime_seconds": now_ms().saturating_sub(admin.started_ms) as f64 / 1e3,
        "totals": s.summary(),
        "messages": per_topic,
        "instances": s.instances.load(Ordering::Relaxed),
        "desired_instances": s.desired_instances.load(Ordering::Relaxed),
        "in_flight": s.in_flight.load(Ordering::Relaxed),
        "paused_partitions": s.paused_partitions.load(Ordering::Relaxed),
        "busy_lanes": s.busy_lanes.load(Ordering::Relaxed),
        "latency": {
            "end_to_end_p50_seconds": q(&s.metrics.end_to_end, 0.5),
            "end_to_end_p99_seconds": q(&s.metrics.end_to_end, 0.99),
            "handler_p50_seconds": q(&s.metrics.handler, 0.5),
            "handler_p99_seconds": q(&s.metrics.handler, 0.99),
        },
        "partitions": parts.iter().map(|p| json!({
            "topic": p.topic,
            "partition": p.partition,
            "end_offset": p.end,
            "committed": p.committed,
            "lag": p.end.saturating_sub(p.committed),
        })).collect::<Vec<_>>(),
    })
}

/// `POST /topics/{topic}/messages`: one message `{"payload": ..., "key": "k", "headers":
/// {"name": "value"}}` or a list of them. A payload that is a string is sent as its text; any
/// other JSON value as its JSON text.
async fn ingest(admin: &Admin, topic: &str, body: &[u8]) -> Response {
    let Some(log) = admin.log.clone() else {
        return Response::error(
            404,
            "ingest is served on the embedded log only; on Kafka, produce to the brokers",
        );
    };
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Response::error(400, format!("the body is not JSON: {e}")),
    };
    let items = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    let mut records = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match to_record(item) {
            Ok(r) => records.push(r),
            Err(e) => return Response::error(400, format!("message {i}: {e}")),
        }
    }
    if records.is_empty() {
        return Response::error(400, "no messages in the body");
    }
    let (topic, limit) = (topic.to_string(), admin.max_depth.clone());
    let placed = tokio::task::spawn_blocking(move || {
        if let Some(limit) = &limit
            && let Some(depth) = limit.over(&log, &topic)?
        {
            return Ok(Err(depth));
        }
        log.append(&topic, records).map(Ok)
    })
    .await;
    match placed {
        Ok(Ok(Ok(placed))) => Response::json(200, &json!({ "placed": placed })),
        Ok(Ok(Err(depth))) => {
            let mut r = Response::error(
                429,
                format!(
                    "slow down: the topic holds {depth} unconsumed messages, over --max-depth {}",
                    admin.max_depth.as_ref().map_or(0, |l| l.max)
                ),
            );
            r.retry_after = Some(1);
            r
        }
        Ok(Err(e)) if e.is_bad_input() => Response::error(400, e),
        Ok(Err(e)) => Response::error(503, e),
        Err(e) => Response::error(503, e),
    }
}

/// `POST /module` with `{"path": "/path/to/handler.wasm"}` (a file on this machine): load it and
/// make it the handler for new work; in-flight calls finish on the old one.
async fn reload(admin: &Admin, body: &[u8]) -> Response {
    let Some(reload) = admin.reload.clone() else {
        return Response::error(404, "this run does not reload modules");
    };
    let path = match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("path").and_then(Value::as_str) {
            Some(p) => std::path::PathBuf::from(p),
            None => {
                return Response::error(400, "the body is {\"path\": \"/path/to/handler.wasm\"}");
            }
        },
        Err(e) => return Response::error(400, format!("the body is not JSON: {e}")),
    };
    match tokio::task::spawn_blocking(move || reload(&path)).await {
        Ok(Ok((name, digest))) => Response::json(
            200,
            &json!({ "module": name, "digest": format!("sha256:{digest}") }),
        ),
        Ok(Err(why)) => Response::error(400, why),
        Err(e) => Response::error(503, e),
    }
}

fn to_record(v: &Value) -> Result<Record, String> {
    let Value::Object(m) = v else {
        return Err("each message is an object with a `payload`".into());
    };
    let payload = match m.get("payload") {
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
        None => return Err("no `payload`".into()),
    };
    let key = match m.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone().into_bytes()),
        Some(_) => return Err("`key` must be a string".into()),
    };
    let mut headers = Vec::new();
    match m.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (n, hv) in h {
                let Value::String(s) = hv else {
                    return Err("header values must be strings".into());
                };
                headers.push((n.clone(), s.clone().into_bytes()));
            }
        }
        Some(_) => return Err("`headers` must be an object of strings".into()),
    }
    Ok(Record {
        key,
        payload,
        headers,
        timestamp_ms: None,
    })
}
