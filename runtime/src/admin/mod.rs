//! The admin server of `weir run` (`--admin 127.0.0.1:9464`): Prometheus metrics, health and
//! readiness probes, a JSON status, an ingest endpoint on the embedded log, hot reload, and the
//! live dashboard.
//!
//! HTTP is axum's (hyper's): parsing, body limits and keep-alive are theirs. weir adds what is
//! its own: [`guard`] (who may call: `Host`, `Origin`, a bearer token for writes),
//! [`listener`] (a bound on connections, timeouts on every read and write), [`write`] (ingest
//! and reload, each bounding its input), and [`metrics`] (what is reported).

mod guard;
mod listener;
mod metrics;
mod request;
mod write;

pub use guard::Policy;
pub use request::Brokers;

use crate::engine::Stats;
use crate::source::Source;
use crate::source::embedded::EmbeddedLog;
use crate::source::embedded::local::Served as RunServed;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The largest request body accepted (an ingest batch).
const MAX_BODY: usize = 32 << 20;

const DASHBOARD: &str = include_str!("dashboard.html");

/// How often the status is kept for `/api/history`, and how many are kept (5 minutes).
const HISTORY_EVERY: Duration = Duration::from_secs(1);
const HISTORY_LEN: usize = 300;

/// What the admin server reports on, and what it lets callers do.
pub struct Admin {
    pub stats: Arc<Stats>,
    pub source: Arc<dyn Source>,
    /// Set on the embedded log: `POST /topics/{topic}/messages` appends here.
    pub log: Option<Arc<EmbeddedLog>>,
    /// Set on a broker: `POST /topics/{topic}/request` connects here.
    pub brokers: Option<Arc<Brokers>>,
    pub max_depth: Option<RunServed>,
    pub group: String,
    pub topics: Vec<String>,
    pub started_ms: u64,
    /// Loads another module and puts it in place (`POST /module`); `None`: refused.
    pub reload: Option<Reloader>,
    /// `POST /module` takes modules from this directory only.
    pub reload_dir: std::path::PathBuf,
    /// Who may call.
    pub policy: Policy,
}

/// Loads the component at a path and makes it the run's handler; returns its name and digest,
/// or why it was refused (the running handler stays).
pub type Reloader = Arc<dyn Fn(&std::path::Path) -> Result<(String, String), String> + Send + Sync>;

struct Served {
    admin: Admin,
    /// The last minutes of status, so that a dashboard opened now shows them at once; written
    /// by the sampler task, read by `/api/history`.
    history: std::sync::Mutex<std::collections::VecDeque<Value>>,
}

/// An answer: a status, a JSON body, and a `Retry-After` when the caller should slow down.
pub(crate) struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            body,
            retry_after: None,
        }
    }
    fn error(status: u16, message: impl std::fmt::Display) -> Answer {
        Answer::json(status, json!({ "error": message.to_string() }))
    }
    fn retry_after(mut self, seconds: u64) -> Answer {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Binds `addr` and serves until the returned task is aborted. Returns the bound address (port
/// 0 picks one) or why it could not bind.
pub async fn serve(
    admin: Admin,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let served = Arc::new(Served {
        admin,
        history: Default::default(),
    });
    let sampler = {
        let served = served.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HISTORY_EVERY);
            loop {
                tick.tick().await;
                if let Ok(parts) = metrics::partitions(&served.admin).await {
                    let usage = metrics::usage(&served.admin).await;
                    let v = metrics::status_json(&served.admin, &parts, &usage);
                    let mut h = served.history.lock().expect("history lock");
                    if h.len() == HISTORY_LEN {
                        h.pop_front();
                    }
                    h.push_back(v);
                }
            }
        })
    };
    let app = router(served);
    let task = tokio::spawn(async move {
        // The sampler ends with the server.
        let _sampler = AbortOnDrop(sampler);
        if let Err(e) = axum::serve(listener::Bounded::new(listener), app).await {
            tracing::warn!(error = %e, "the admin server stopped");
        }
    });
    Ok((bound, task))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn router(served: Arc<Served>) -> Router {
    Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DASHBOARD) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .route("/api/status", get(status))
        .route("/api/history", get(history))
        .route("/module", post(reload))
        .route("/topics/{topic}/messages", post(ingest))
        .route("/topics/{topic}/request", post(request_reply))
        .fallback(|| async {
            Answer::error(
                404,
                "no such page; try /, /metrics, /healthz, /readyz, /api/status, /api/history, POST /topics/{topic}/messages or POST /topics/{topic}/request",
            )
        })
        .layer(middleware::from_fn_with_state(served.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::map_response(no_store))
        .with_state(served)
}

/// Every request passes [`guard::check`] before its route.
async fn guard(
    State(served): State<Arc<Served>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let headers = request.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let seen = guard::Seen {
        method_is_write: !matches!(*request.method(), Method::GET | Method::HEAD),
        host: text(header::HOST),
        origin: text(header::ORIGIN),
        fetch_site: headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()),
        authorization: text(header::AUTHORIZATION),
    };
    match guard::check(&seen, &served.admin.policy) {
        Ok(()) => next.run(request).await,
        Err(r) => {
            tracing::debug!(status = r.status, reason = %r.message, "admin request refused");
            let mut response = Answer::error(r.status, r.message).into_response();
            if r.status == 401 {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// Nothing the server answers is to be cached: it is all live.
async fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn readyz(State(served): State<Arc<Served>>) -> (StatusCode, &'static str) {
    if served.admin.stats.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the run is starting or stopping\n",
        )
    }
}

async fn metrics_page(State(served): State<Arc<Served>>) -> Response {
    match metrics::partitions(&served.admin).await {
        Ok(parts) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics::metrics_text(&served.admin, parts, metrics::usage(&served.admin).await),
        )
            .into_response(),
        Err(e) => Answer::error(503, e).into_response(),
    }
}

async fn status(State(served): State<Arc<Served>>) -> Answer {
    match metrics::partitions(&served.admin).await {
        Ok(parts) => {
            let usage = metrics::usage(&served.admin).await;
            Answer::json(200, metrics::status_json(&served.admin, &parts, &usage))
        }
        Err(e) => Answer::error(503, e),
    }
}

async fn history(State(served): State<Arc<Served>>) -> Answer {
    let h = served.history.lock().expect("history lock");
    Answer::json(200, Value::Array(h.iter().cloned().collect()))
}

async fn reload(State(served): State<Arc<Served>>, body: Bytes) -> Answer {
    write::reload(&served.admin, &body).await
}

async fn ingest(
    State(served): State<Arc<Served>>,
    Path(topic): Path<String>,
    body: Bytes,
) -> Answer {
    write::ingest(&served.admin, topic, &body).await
}

#[derive(serde::Deserialize)]
struct RequestQuery {
    timeout: Option<String>,
}

async fn request_reply(
    State(served): State<Arc<Served>>,
    Path(topic): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RequestQuery>,
    body: Bytes,
) -> Answer {
    request::request(&served.admin, topic, q.timeout, &body).await
}
