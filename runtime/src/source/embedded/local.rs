//! Reaching a log that another process owns.
//!
//! A data directory is opened by one process at a time. While `weir run` owns one, it serves
//! the log on a Unix socket, `<data-dir>/weir.sock`, so that `weir produce`, `weir consume` and
//! `weir topics` keep working. The protocol is one JSON object per line each way; it is local,
//! unauthenticated (the socket file's permissions guard it) and not a stable interface.
//!
//! [`open`] is what commands call: it opens the log itself when it can, and otherwise connects
//! to the process that owns it.

use super::EmbeddedLog;
use crate::source::{Delivery, Record, Source, SourceError, TopicStats};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_core::retention::{Retention, RetentionChange};
pub use weir_core::socket::parse_request;
use weir_core::socket::{AdminRequest, Request, WireRecord};

pub const SOCKET_NAME: &str = "weir.sock";

/// Records per produce request; keeps each request line a few MiB at most.
const CHUNK: usize = 5_000;
/// Payload bytes per produce request, past which a chunk is cut short of [`CHUNK`] records.
const CHUNK_BYTES: usize = 8 << 20;
/// The longest request line served. A record's bytes travel as a JSON array (up to 4 bytes a
/// byte), so this takes the largest record weir accepts with room to spare.
const MAX_LINE: usize = 128 << 20;
/// Clients served at once.
const MAX_CLIENTS: usize = 64;
/// How long an answer may take to write before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ok", rename_all = "kebab-case")]
enum Response {
    Placed {
        placed: Vec<(u32, u64)>,
    },
    Done,
    Stats {
        topics: Vec<TopicStats>,
    },
    Records {
        records: Vec<WireDelivery>,
    },
    Offset {
        offset: u64,
    },
    Offsets {
        offsets: Vec<u64>,
    },
    Error {
        bad_input: bool,
        message: String,
    },
    /// The topic holds more unconsumed messages than the run allows: try again later.
    SlowDown {
        depth: u64,
        max: u64,
    },
    /// The answer to an admin request.
    Value {
        value: serde_json::Value,
    },
}

/// What the socket knows of the run that serves it: its group and topics (what admin requests
/// may not pull from under it), and `weir run --max-depth`: appends through the socket to a topic
/// the run consumes are refused with "slow down" while the topic holds more than `max` messages
/// the run's group has not committed.
#[derive(Debug, Clone)]
pub struct Served {
    pub max_depth: Option<u64>,
    pub group: String,
    pub topics: Vec<String>,
    /// The topics the run reads or dead-letters to (its topics, their retry and dead-letter
    /// topics): not deleted under it.
    pub guarded: Vec<String>,
}

impl Served {
    /// The topic's depth when it is over the bound.
    pub fn over(&self, log: &EmbeddedLog, topic: &str) -> Result<Option<u64>, SourceError> {
        let Some(max) = self.max_depth else {
            return Ok(None);
        };
        if !self.topics.iter().any(|t| t == topic) {
            return Ok(None);
        }
        let mut depth = 0u64;
        for p in 0..log.partitions(topic)? {
            let end = log.end_offset(topic, p)?;
            let from = log.committed_offset(&self.group, topic, p)?;
            depth += end.saturating_sub(from.max(log.start_offset(topic, p)?));
        }
        Ok((depth > max).then_some(depth))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WireDelivery {
    partition: u32,
    offset: u64,
    record: WireRecord,
}

impl SourceError {
    /// Whether the user can fix this by changing their input (as opposed to a broken store).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SourceError::UnknownTopic(_)
                | SourceError::TopicExists(_)
                | SourceError::InvalidTopic { .. }
                | SourceError::UnknownPartition { .. }
                | SourceError::Invalid(_)
        )
    }
}

fn error_response(e: SourceError) -> Response {
    Response::Error {
        bad_input: e.is_bad_input(),
        message: e.to_string(),
    }
}

fn serve_one(log: &EmbeddedLog, req: Request, limit: Option<&Served>) -> Response {
    let r = match req {
        Request::Produce { topic, records } => {
            match limit.map(|l| l.over(log, &topic)).transpose() {
                Err(e) => Err(e),
                Ok(Some(Some(depth))) => {
                    return Response::SlowDown {
                        depth,
                        max: limit.and_then(|l| l.max_depth).unwrap_or(0),
                    };
                }
                Ok(_) => log
                    .append(&topic, records.into_iter().map(Record::from).collect())
                    .map(|placed| Response::Placed { placed }),
            }
        }
        Request::CreateTopic {
            topic,
            partitions,
            retention,
        } => log
            .create_topic_retained(
                &topic,
                partitions,
                retention.apply(Retention::default_for_new_topics()),
            )
            .map(|()| Response::Done),
        Request::Admin { admin } => {
            super::admin::serve(log, admin, limit).map(|value| Response::Value { value })
        }
        Request::Stats { topic } => log
            .stats(topic.as_deref())
            .map(|topics| Response::Stats { topics }),
        Request::Read {
            topic,
            partition,
            from,
            max,
        } => log
            .read(&topic, partition, from, max)
            .map(|ds| Response::Records {
                records: ds
                    .into_iter()
                    .map(|d| WireDelivery {
                        partition: d.partition,
                        offset: d.offset,
                        record: d.record.into(),
                    })
                    .collect(),
            }),
        Request::Committed {
            group,
            topic,
            partition,
        } => log
            .committed_offset(&group, &topic, partition)
            .map(|offset| Response::Offset { offset }),
        Request::Publish { outputs, replayed } => {
            let outputs = outputs
                .into_iter()
                .map(|(topic, r)| crate::source::Output {
                    topic,
                    record: r.into(),
                })
                .collect();
            let commit = crate::source::Commit {
                outputs,
                replayed,
                ..Default::default()
            };
            log.commit_batch("", commit).map(|()| Response::Done)
        }
        Request::Replayed { topic, partition } => {
            log.replayed(&topic, partition)
                .map(|set| Response::Offsets {
                    offsets: set.into_iter().collect(),
                })
        }
    };
    r.unwrap_or_else(error_response)
}

/// Serves `log` on `<data-dir>/weir.sock` until the returned guard is dropped. Returns `None`
/// (with a warning) when the socket cannot be made; `weir run` works without it.
pub fn serve(log: Arc<EmbeddedLog>, limit: Served) -> Option<SocketGuard> {
    let limit = Some(Arc::new(limit));
    let path = log.dir().join(SOCKET_NAME);
    // We hold the data directory's lock, so a socket file left here is from a dead process.
    let _ = std::fs::remove_file(&path);
    let bound = tokio::net::UnixListener::bind(&path).and_then(|l| {
        // The socket is the log's only guard: this user's processes alone may connect.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    });
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(socket = %path.display(), error = %e, "cannot serve the log to other weir commands; `weir produce` will wait until this run ends");
            return None;
        }
    };
    // Bounds the clients served at once; a client past it waits in the accept queue.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    // The accept loop; owned by the returned guard, which aborts it.
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin on it.
                    tracing::warn!(error = %e, "accepting a local client failed; trying again in a moment");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let (log, limit) = (log.clone(), limit.clone());
            // One task per client, so a slow client (a big produce) does not hold up the others.
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = connection(log, stream, limit).await {
                    tracing::debug!(error = %e, "local client connection ended");
                }
            });
        }
    });
    Some(SocketGuard { path, task })
}

async fn connection(
    log: Arc<EmbeddedLog>,
    stream: tokio::net::UnixStream,
    limit: Option<Arc<Served>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(0);
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE as u64 + 1);
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let refused = Response::Error {
                bad_input: true,
                message: format!("request over {MAX_LINE} bytes; send fewer records at once"),
            };
            let mut out = serde_json::to_vec(&refused).expect("responses serialise");
            out.push(b'\n');
            write.write_all(&out).await?;
            // The rest of the line cannot be told from the next request: end the connection.
            return Ok(());
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::Error {
                bad_input: true,
                message: format!("bad request: {e}"),
            },
            Ok(req) => {
                let (log, limit) = (log.clone(), limit.clone());
                tokio::task::spawn_blocking(move || serve_one(&log, req, limit.as_deref()))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        bad_input: false,
                        message: e.to_string(),
                    })
            }
        };
        let mut out = serde_json::to_vec(&response).expect("responses serialise");
        out.push(b'\n');
        tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading")
            })??;
    }
}

/// Removes the socket and stops serving when dropped.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A connection to the process that owns a data directory.
#[derive(Debug)]
pub struct Client {
    dir: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(dir: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(dir.join(SOCKET_NAME))?;
        Ok(Client {
            dir: dir.display().to_string(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn call(&mut self, req: &Request) -> Result<Response, SourceError> {
        let lost = |e: std::io::Error| SourceError::Storage {
            dir: self.dir.clone(),
            detail: format!("lost the connection to the weir process that owns it: {e}"),
        };
        let mut line = serde_json::to_vec(req).expect("requests serialise");
        line.push(b'\n');
        self.writer.write_all(&line).map_err(lost)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer).map_err(lost)? == 0 {
            return Err(lost(std::io::ErrorKind::UnexpectedEof.into()));
        }
        match serde_json::from_str(&answer) {
            Ok(Response::Error {
                bad_input: true,
                message,
            }) => Err(SourceError::Invalid(message)),
            Ok(Response::Error {
                bad_input: false,
                message,
            }) => Err(SourceError::Storage {
                dir: self.dir.clone(),
                detail: message,
            }),
            Ok(r) => Ok(r),
            Err(e) => Err(SourceError::Storage {
                dir: self.dir.clone(),
                detail: format!("unreadable answer: {e}"),
            }),
        }
    }

    /// Sends an admin request; its JSON answer.
    pub(super) fn admin(&mut self, admin: AdminRequest) -> Result<serde_json::Value, SourceError> {
        match self.call(&Request::Admin { admin })? {
            Response::Value { value } => Ok(value),
            r => Err(self.unexpected(r)),
        }
    }

    fn unexpected(&self, r: Response) -> SourceError {
        SourceError::Storage {
            dir: self.dir.clone(),
            detail: format!("unexpected answer {r:?}"),
        }
    }
}

/// A log opened here, or reached through the process that owns it.
#[derive(Debug)]
pub enum LogHandle {
    Local(Arc<EmbeddedLog>),
    Remote(Client),
}

/// How long a command waits for a data directory that another short-lived command holds.
const OPEN_WAIT: Duration = Duration::from_secs(10);

/// Opens the log in `dir`, or connects to the `weir run` that owns it.
pub fn open(dir: &Path) -> Result<LogHandle, SourceError> {
    // A run that serves the directory answers at once; trying its lock first costs fjall's
    // retries (200 ms a command, measured with strace).
    if dir.join(SOCKET_NAME).exists()
        && let Ok(c) = Client::connect(dir)
    {
        return Ok(LogHandle::Remote(c));
    }
    let deadline = Instant::now() + OPEN_WAIT;
    loop {
        match EmbeddedLog::open(dir) {
            Ok(log) => return Ok(LogHandle::Local(Arc::new(log))),
            Err(SourceError::Locked { dir: shown }) => {
                if let Ok(c) = Client::connect(dir) {
                    return Ok(LogHandle::Remote(c));
                }
                // Another command (produce, topics) holds it for a moment: wait for it.
                if Instant::now() >= deadline {
                    return Err(SourceError::Locked { dir: shown });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens the log in `dir` for this process alone (what `weir run` needs), waiting a little for
/// a short-lived command that holds it.
pub fn open_owned(dir: &Path) -> Result<Arc<EmbeddedLog>, SourceError> {
    let deadline = Instant::now() + OPEN_WAIT;
    loop {
        match EmbeddedLog::open(dir) {
            Err(SourceError::Locked { .. })
                if Instant::now() < deadline && Client::connect(dir).is_err() =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map(Arc::new),
        }
    }
}

impl LogHandle {
    pub fn append(
        &mut self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<(u32, u64)>, SourceError> {
        match self {
            LogHandle::Local(log) => log.append(topic, records),
            LogHandle::Remote(c) => {
                let mut placed = Vec::with_capacity(records.len());
                let mut records = records.into_iter().peekable();
                let mut told = false;
                while records.peek().is_some() {
                    let mut chunk: Vec<WireRecord> = Vec::new();
                    let mut bytes = 0usize;
                    while chunk.len() < CHUNK && (chunk.is_empty() || bytes < CHUNK_BYTES) {
                        let Some(r) = records.next() else { break };
                        bytes += crate::source::wire_size(&r);
                        chunk.push(WireRecord::from(r));
                    }
                    let request = Request::Produce {
                        topic: topic.to_string(),
                        records: chunk,
                    };
                    // Backpressure: while the run says the topic is too deep, wait and retry.
                    let mut wait = Duration::from_millis(20);
                    loop {
                        match c.call(&request)? {
                            Response::Placed { placed: p } => {
                                placed.extend(p);
                                break;
                            }
                            Response::SlowDown { depth, max } => {
                                if !told {
                                    eprintln!(
                                        "slowing down: topic {topic} holds {depth} unconsumed messages, over the run's --max-depth {max}; waiting for the handler to catch up"
                                    );
                                    told = true;
                                }
                                std::thread::sleep(wait);
                                wait = (wait * 2).min(Duration::from_millis(500));
                            }
                            r => return Err(c.unexpected(r)),
                        }
                    }
                }
                Ok(placed)
            }
        }
    }

    pub fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        retention: RetentionChange,
    ) -> Result<(), SourceError> {
        match self {
            LogHandle::Local(log) => log.create_topic_retained(
                topic,
                partitions,
                retention.apply(Retention::default_for_new_topics()),
            ),
            LogHandle::Remote(c) => match c.call(&Request::CreateTopic {
                topic: topic.into(),
                partitions,
                retention,
            })? {
                Response::Done => Ok(()),
                r => Err(c.unexpected(r)),
            },
        }
    }

    pub fn stats(&mut self, topic: Option<&str>) -> Result<Vec<TopicStats>, SourceError> {
        match self {
            LogHandle::Local(log) => log.stats(topic),
            LogHandle::Remote(c) => match c.call(&Request::Stats {
                topic: topic.map(String::from),
            })? {
                Response::Stats { topics } => Ok(topics),
                r => Err(c.unexpected(r)),
            },
        }
    }

    pub fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        match self {
            LogHandle::Local(log) => log.read(topic, partition, from, max),
            LogHandle::Remote(c) => match c.call(&Request::Read {
                topic: topic.into(),
                partition,
                from,
                max,
            })? {
                Response::Records { records } => {
                    let name: Arc<str> = Arc::from(topic);
                    Ok(records
                        .into_iter()
                        .map(|w| Delivery {
                            topic: name.clone(),
                            partition: w.partition,
                            offset: w.offset,
                            record: w.record.into(),
                            redeliveries: 0,
                        })
                        .collect())
                }
                r => Err(c.unexpected(r)),
            },
        }
    }

    pub fn committed(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<u64, SourceError> {
        match self {
            LogHandle::Local(log) => log.committed_offset(group, topic, partition),
            LogHandle::Remote(c) => match c.call(&Request::Committed {
                group: group.into(),
                topic: topic.into(),
                partition,
            })? {
                Response::Offset { offset } => Ok(offset),
                r => Err(c.unexpected(r)),
            },
        }
    }

    /// Publishes outputs and replay marks atomically (used by `weir dlq replay`).
    pub fn publish(
        &mut self,
        outputs: Vec<crate::source::Output>,
        replayed: Vec<(String, u32, u64)>,
    ) -> Result<(), SourceError> {
        match self {
            LogHandle::Local(log) => log.commit_batch(
                "",
                crate::source::Commit {
                    outputs,
                    replayed,
                    ..Default::default()
                },
            ),
            LogHandle::Remote(c) => {
                let outputs = outputs
                    .into_iter()
                    .map(|o| (o.topic, WireRecord::from(o.record)))
                    .collect();
                match c.call(&Request::Publish { outputs, replayed })? {
                    Response::Done => Ok(()),
                    r => Err(c.unexpected(r)),
                }
            }
        }
    }

    /// Offsets of the partition's dead letters that were replayed.
    pub fn replayed(
        &mut self,
        topic: &str,
        partition: u32,
    ) -> Result<std::collections::BTreeSet<u64>, SourceError> {
        match self {
            LogHandle::Local(log) => log.replayed(topic, partition),
            LogHandle::Remote(c) => match c.call(&Request::Replayed {
                topic: topic.into(),
                partition,
            })? {
                Response::Offsets { offsets } => Ok(offsets.into_iter().collect()),
                r => Err(c.unexpected(r)),
            },
        }
    }

    /// Commits a consumer offset (used by `weir consume --group`).
    pub fn commit_offset(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
        next: u64,
    ) -> Result<(), SourceError> {
        match self {
            LogHandle::Local(log) => log.commit_batch(
                group,
                crate::source::Commit {
                    offsets: vec![(Arc::from(topic), partition, next)],
                    ..Default::default()
                },
            ),
            LogHandle::Remote(_) => Err(SourceError::Invalid(
                "`weir consume --group` cannot commit while `weir run` owns the data directory; \
                 read without --group, or stop the run"
                    .into(),
            )),
        }
    }
}
