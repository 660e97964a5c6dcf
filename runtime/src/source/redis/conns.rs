//! Connections to Redis: a stack of idle ones for requests, named so an operator (and a test)
//! can tell weir's clients apart in `CLIENT LIST`.

use super::error;
use crate::source::SourceError;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long connecting may take.
const CONNECT: Duration = Duration::from_secs(5);
/// How long a request may take, beyond a blocking read's own wait.
pub(super) const REQUEST: Duration = Duration::from_secs(10);
/// Idle connections kept.
const MAX_IDLE: usize = 8;
/// How long a request whose link broke is tried again before the error is the run's.
const RETRY_FOR: Duration = Duration::from_secs(60);

pub(super) struct Conns {
    client: redis::Client,
    /// `CLIENT SETNAME` of every connection.
    name: String,
    /// A stack of idle connections: a call takes one (or connects) and puts it back unless it
    /// failed. (A pool crate such as r2d2 adds a reaper thread and settings this does not need.)
    idle: Mutex<Vec<redis::Connection>>,
    /// Whether a connection was ever made: until one is, a failure is the caller's at once (a
    /// wrong address, certificate or password), not a link to wait for.
    connected: std::sync::atomic::AtomicBool,
}

/// Whether `e` says the link broke (the request may or may not have run) rather than the
/// server refusing it.
pub(super) fn is_link(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

impl Conns {
    pub(super) fn new(cfg: &super::RedisConfig, name: String) -> Result<Conns, SourceError> {
        let client = cfg.client()?;
        Ok(Conns {
            client,
            name,
            idle: Mutex::new(Vec::new()),
            connected: Default::default(),
        })
    }

    /// A new connection whose reads wait at most `read` (a blocking read's wait and then some).
    pub(super) fn connect(&self, read: Duration) -> redis::RedisResult<redis::Connection> {
        let mut c = self.client.get_connection_with_timeout(CONNECT)?;
        c.set_read_timeout(Some(read))?;
        c.set_write_timeout(Some(REQUEST))?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.name)
            .query::<()>(&mut c)?;
        self.connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(c)
    }

    /// Runs `f` once on an idle connection or a new one; a connection that failed is dropped.
    pub(super) fn once<T>(
        &self,
        f: &mut impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let idle = self.idle.lock().expect("redis connections").pop();
        let mut c = match idle {
            Some(c) => c,
            None => self.connect(REQUEST)?,
        };
        let r = f(&mut c);
        if r.is_ok() {
            let mut idle = self.idle.lock().expect("redis connections");
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
        r
    }

    /// Runs `f`, again on a new connection while the link is what fails (a restart, a network
    /// cut), for up to a minute, once a first connection was made; `what` names the request in the error. Only for requests that
    /// may run twice: reads, and writes that check before they change anything.
    pub(super) fn with<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, SourceError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.once(&mut f) {
                Ok(v) => return Ok(v),
                Err(e)
                    if is_link(&e)
                        && self.connected.load(std::sync::atomic::Ordering::Relaxed)
                        && start.elapsed() < RETRY_FOR =>
                {
                    tracing::warn!(error = %e, "Redis: {what} failed; trying again on a new connection");
                    self.idle.lock().expect("redis connections").clear();
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(error(what, e)),
            }
        }
    }
}
