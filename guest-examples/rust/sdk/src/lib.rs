//! `weir-guest`: write a weir message handler in Rust.
//!
//! ```ignore
//! use weir_guest::{Failure, Message, Outcome};
//!
//! fn handle(msg: Message) -> Outcome {
//!     let text = msg.payload_str().map_err(|e| Failure::reject(format!("not UTF-8: {e}")))?;
//!     weir_guest::emit("shouted", msg.key.as_deref(), text.to_uppercase().as_bytes(), &[])
//!         .map_err(Failure::retry)?;
//!     weir_guest::info!("shouted offset {}", msg.offset);
//!     Ok(())
//! }
//!
//! weir_guest::export_handler!(handle);
//! ```
//!
//! Built for `wasm32-wasip2` this is a component exporting weir's `handler` interface. Built for
//! the machine you develop on (`cargo test`), `emit`, the log macros and `config` talk to a stub
//! in [`testing`] instead of a host, so a handler's unit tests need no weir and no wasm:
//!
//! ```ignore
//! let run = weir_guest::testing::run(handle, Message::new(b"hi".to_vec()));
//! assert!(run.outcome.is_ok());
//! assert_eq!(run.emitted[0].payload, b"HI");
//! ```

use std::time::Duration;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "consumer",
        pub_export_macro: true,
        export_macro_name: "__export_consumer",
        default_bindings_module: "weir_guest::bindings",
    });
}

/// One message as the host delivers it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The topic it was read from.
    pub topic: String,
    /// The partition of `topic` it was read from.
    pub partition: u32,
    /// Its offset within the partition.
    pub offset: u64,
    /// The key, if the producer gave one.
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Headers in order; names may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<u64>,
    /// 1 on the first delivery, 2, 3, ... on retries.
    pub attempt: u32,
}

impl Message {
    /// A first delivery of `payload` on topic `test`, partition 0, offset 0: for tests.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: "test".into(),
            payload: payload.into(),
            attempt: 1,
            ..Self::default()
        }
    }

    /// The same message with this key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The same message with one more header.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The same message as delivery number `attempt`.
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// The payload as UTF-8.
    pub fn payload_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.payload)
    }

    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Why a message was not handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Transient: the host backs off and delivers the message again (after `delay` if given,
    /// capped at its maximum backoff; otherwise its own exponential backoff).
    Retry {
        reason: String,
        delay: Option<Duration>,
    },
    /// The message can never succeed: the host dead-letters it now with this reason.
    Reject(String),
}

impl Failure {
    /// Try again later, with the host's backoff.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        Failure::Retry {
            reason: reason.to_string(),
            delay: None,
        }
    }

    /// Try again after `delay` (the host caps it at its maximum backoff).
    pub fn retry_after(reason: impl std::fmt::Display, delay: Duration) -> Self {
        Failure::Retry {
            reason: reason.to_string(),
            delay: Some(delay),
        }
    }

    /// Never retry: dead-letter the message with this reason.
    pub fn reject(reason: impl std::fmt::Display) -> Self {
        Failure::Reject(reason.to_string())
    }
}

/// What a handler returns: `Ok(())` acks the message (after its emitted messages are published).
pub type Outcome = Result<(), Failure>;

/// Log levels, as the host's log shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Queues a message for `topic`; the host publishes it only if the current message succeeds.
/// An error (unknown topic, too large) comes back as text: turn it into a [`Failure`] or ignore
/// it.
pub fn emit(
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: &[(&str, &[u8])],
) -> Result<(), String> {
    imp::emit(topic, key, payload, headers)
}

/// Answers the message being handled (request/reply): the host sends `payload` where the
/// request said (its `reply-to`), with its `correlation-id`, once the message succeeds. An error
/// says the message asked for no answer, or was answered already.
pub fn reply(payload: &[u8], headers: &[(&str, &[u8])]) -> Result<(), String> {
    imp::reply(payload, headers)
}

/// A setting the operator gave the handler (`--handler-config KEY=VALUE`).
pub fn config(key: &str) -> Option<String> {
    imp::config(key)
}

/// Writes one line into the host's log, tagged with the module and the message. The macros
/// ([`info!`] and friends) format and call this.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// Logs at `trace` level: `weir_guest::trace!("...", args)`.
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::log($crate::Level::Trace, &format!($($t)*)) }; }
/// Logs at `debug` level.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log($crate::Level::Debug, &format!($($t)*)) }; }
/// Logs at `info` level.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log($crate::Level::Info, &format!($($t)*)) }; }
/// Logs at `warn` level.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log($crate::Level::Warn, &format!($($t)*)) }; }
/// Logs at `error` level.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log($crate::Level::Error, &format!($($t)*)) }; }

/// Exports `fn(Message) -> Outcome` as the component's handler. Use it once, at the crate root.
/// Off wasm32 it exports nothing (the function is then called by tests through [`testing`]).
#[macro_export]
macro_rules! export_handler {
    ($handle:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct WeirHandler;
            impl $crate::bindings::exports::weir::stream::handler::Guest for WeirHandler {
                fn handle(
                    msg: $crate::bindings::weir::stream::types::Message,
                ) -> ::core::result::Result<(), $crate::bindings::weir::stream::types::Failure>
                {
                    $crate::__call($handle, msg)
                }
            }
            $crate::bindings::__export_consumer!(WeirHandler);
        };
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub fn __call(
    handle: fn(Message) -> Outcome,
    msg: bindings::weir::stream::types::Message,
) -> Result<(), bindings::weir::stream::types::Failure> {
    use bindings::weir::stream::types as wit;
    let msg = Message {
        topic: msg.topic,
        partition: msg.partition,
        offset: msg.offset,
        key: msg.key,
        payload: msg.payload,
        headers: msg.headers,
        timestamp_ms: msg.timestamp_ms,
        attempt: msg.attempt,
    };
    handle(msg).map_err(|f| match f {
        Failure::Retry { reason, delay } => wit::Failure::Retry(wit::RetryRequest {
            reason,
            delay_ms: delay.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
        }),
        Failure::Reject(reason) => wit::Failure::Reject(reason),
    })
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Level;
    use crate::bindings::weir::stream::{
        config as wconfig, emit as wemit, log as wlog, reply as wreply,
    };

    pub fn reply(payload: &[u8], headers: &[(&str, &[u8])]) -> Result<(), String> {
        let headers: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| ((*n).to_string(), v.to_vec()))
            .collect();
        wreply::send(payload, &headers)
    }

    pub fn emit(
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(), String> {
        let headers: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| ((*n).to_string(), v.to_vec()))
            .collect();
        wemit::send(topic, key, payload, &headers)
    }

    pub fn config(key: &str) -> Option<String> {
        wconfig::get(key)
    }

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => wlog::Level::Trace,
            Level::Debug => wlog::Level::Debug,
            Level::Info => wlog::Level::Info,
            Level::Warn => wlog::Level::Warn,
            Level::Error => wlog::Level::Error,
        };
        wlog::log(level, message)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::testing::STUB;
    use super::{Level, testing::Emitted};

    pub fn emit(
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(), String> {
        STUB.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(known) = &s.topics {
                if !known.iter().any(|t| t == topic) {
                    return Err(format!("unknown topic `{topic}`"));
                }
            }
            s.emitted.push(Emitted {
                topic: topic.into(),
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                headers: headers
                    .iter()
                    .map(|(n, v)| ((*n).to_string(), v.to_vec()))
                    .collect(),
            });
            Ok(())
        })
    }

    pub fn config(key: &str) -> Option<String> {
        STUB.with(|s| s.borrow().config.get(key).cloned())
    }

    /// As the host: to the message's `reply-to`, with its `correlation-id`, once.
    pub fn reply(payload: &[u8], headers: &[(&str, &[u8])]) -> Result<(), String> {
        STUB.with(|s| {
            let mut s = s.borrow_mut();
            let header = |name: &str| {
                s.request
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            };
            let Some(to) = header("reply-to").filter(|t| !t.is_empty()) else {
                return Err("this message asked for no reply (it has no reply-to)".into());
            };
            if s.answered {
                return Err("this message was answered already".into());
            }
            let id = header("correlation-id");
            let mut headers: Vec<(String, Vec<u8>)> = headers
                .iter()
                .filter(|(n, _)| *n != "correlation-id")
                .map(|(n, v)| ((*n).to_string(), v.to_vec()))
                .collect();
            if let Some(id) = &id {
                headers.push(("correlation-id".into(), id.clone()));
            }
            s.answered = true;
            s.emitted.push(Emitted {
                topic: String::from_utf8_lossy(&to).into_owned(),
                key: id,
                payload: payload.to_vec(),
                headers,
            });
            Ok(())
        })
    }

    pub fn log(level: Level, message: &str) {
        STUB.with(|s| s.borrow_mut().logs.push((level, message.to_string())))
    }
}

/// A stand-in for the host, for handler unit tests with plain `cargo test` (not on wasm32).
/// State is per thread, as `cargo test` runs each test on its own thread.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    use super::{Level, Message, Outcome};
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A message the handler emitted.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Emitted {
        pub topic: String,
        pub key: Option<Vec<u8>>,
        pub payload: Vec<u8>,
        pub headers: Vec<(String, Vec<u8>)>,
    }

    /// What one call did.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Run {
        pub outcome: Outcome,
        /// What it emitted (the host would publish these only if `outcome` is `Ok`).
        pub emitted: Vec<Emitted>,
        pub logs: Vec<(Level, String)>,
    }

    #[derive(Default)]
    pub(crate) struct Stub {
        pub(crate) emitted: Vec<Emitted>,
        pub(crate) logs: Vec<(Level, String)>,
        pub(crate) config: HashMap<String, String>,
        pub(crate) topics: Option<Vec<String>>,
        /// The headers of the message being handled (for `reply`).
        pub(crate) request: Vec<(String, Vec<u8>)>,
        pub(crate) answered: bool,
    }

    thread_local! {
        pub(crate) static STUB: RefCell<Stub> = RefCell::default();
    }

    /// Sets a handler setting, as `--handler-config KEY=VALUE` does.
    pub fn set_config(key: &str, value: &str) {
        STUB.with(|s| s.borrow_mut().config.insert(key.into(), value.into()));
    }

    /// Makes `emit` refuse topics other than these, as the host does for unknown topics.
    pub fn known_topics(topics: &[&str]) {
        STUB.with(|s| {
            s.borrow_mut().topics = Some(topics.iter().map(|t| (*t).to_string()).collect())
        });
    }

    /// Calls `handle` with `msg` and returns what it did.
    pub fn run(handle: fn(Message) -> Outcome, msg: Message) -> Run {
        STUB.with(|s| {
            let mut s = s.borrow_mut();
            s.emitted.clear();
            s.logs.clear();
            s.request = msg.headers.clone();
            s.answered = false;
        });
        let outcome = handle(msg);
        STUB.with(|s| {
            let mut s = s.borrow_mut();
            Run {
                outcome,
                emitted: std::mem::take(&mut s.emitted),
                logs: std::mem::take(&mut s.logs),
            }
        })
    }
}
