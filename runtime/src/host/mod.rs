//! The WebAssembly host: loads a handler component and runs messages through it.
//!
//! A [`Module`] is compiled once (the compiled code is cached on disk, keyed by the SHA-256 of
//! the component and the engine's compatibility hash) and pre-instantiated. Each [`Instance`]
//! has its own `Store` with a memory limit. Calls are asynchronous: a handler that waits (a WASI
//! timer, an HTTP request) suspends its call and frees the thread for other instances, and a
//! handler that computes yields at every epoch tick, so hundreds of instances share a few
//! threads. Every call runs under a deadline (`--call-timeout` per message).
//!
//! WASI preview 2 is linked with nothing granted: no files, no sockets, no environment, no
//! args. `wasi:http` outgoing requests are linked too, and refused unless the request's host is
//! on the allow list (`--allow-http HOST[:PORT]`, see [`http`]).
//!
//! The engine talks to this module in terms of [`Delivery`], [`Output`] and [`RunResult`];
//! nothing of wasmtime leaks out.

mod bindings;
pub mod http;
pub mod native;
pub mod reply;
mod stderr;

use crate::source::{Delivery, Output, OutputCheck, Record};
use bindings::exports::weir::r#stream::{batch_handler, handler};
use bindings::weir::r#stream::{config, emit, log, reply as reply_wit, types};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::timeout;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// The most messages one call may emit (a batch call: per message in it). Past it, `emit.send`
/// refuses, which fails the message as `invalid-output` unless the handler handles the error.
pub const MAX_OUTPUTS_PER_MESSAGE: usize = 10_000;

/// How often the epoch advances; a running call yields to other instances at every tick.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The exported interfaces weir calls, as they appear in a component.
pub const HANDLER_EXPORT: &str = "weir:stream/handler@0.1.0";
pub const BATCH_HANDLER_EXPORT: &str = "weir:stream/batch-handler@0.1.0";

/// Limits and settings of the host, fixed when a module is loaded.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Linear memory an instance may use, in bytes.
    pub memory_limit: usize,
    /// How long one message may run; a batch call gets this per message.
    pub call_timeout: Duration,
    /// The most instances alive at once (sizes the pooling allocator).
    pub max_instances: u32,
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// What the handler reads through the `config` import.
    pub handler_config: BTreeMap<String, String>,
    /// Keep the guest's log lines for [`Instance::take_logs`] instead of writing them to the
    /// log (`weir test`).
    pub capture_logs: bool,
    /// Hosts a handler may send HTTP requests to; empty refuses every request.
    pub allow_http: http::AllowList,
}

/// One line a guest logged, kept when [`HostConfig::capture_logs`] is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLog {
    pub level: &'static str,
    pub message: String,
}

/// Why a module could not be loaded. Each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read handler module {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a WebAssembly file (it does not start with \\0asm); \
         pass the .wasm your handler's build produced"
    )]
    NotWasm { path: String },
    #[error(
        "{path} is a core WebAssembly module, not a component; build it for the \
         wasm32-wasip2 target (`cargo build --target wasm32-wasip2`), or wrap it with \
         `wasm-tools component new`"
    )]
    CoreModule { path: String },
    #[error("{path} is not a valid WebAssembly component: {detail}")]
    Invalid { path: String, detail: String },
    #[error(
        "{path} does not implement weir's handler world: it exports neither `{HANDLER_EXPORT}` \
         nor `{BATCH_HANDLER_EXPORT}` (it exports: {exports}); build it against world \
         `consumer` or `batch-consumer` of weir's wit/"
    )]
    NoHandler { path: String, exports: String },
    #[error(
        "{path} cannot be linked: {detail}; weir provides only its own `weir:stream` interfaces, WASI 0.2 (with nothing granted) and wasi:http 0.2 outgoing requests"
    )]
    Imports { path: String, detail: String },
    #[error("{path}: the handler's exports do not match weir's contract: {detail}")]
    Signature { path: String, detail: String },
    #[error("wasmtime engine: {0}")]
    Engine(String),
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled; ack it and publish its outputs.
    Ok,
    /// The handler asked to be called again later.
    Retry {
        reason: String,
        delay: Option<Duration>,
    },
    /// The handler says the message can never succeed.
    Reject { reason: String },
    /// The handler returned `ok` after `emit.send` refused one of its outputs (unknown topic,
    /// invalid name, too large). Nothing it emitted is published; retried like `Retry`.
    InvalidOutput { detail: String },
    /// The host stopped the call: the instance is gone and must be replaced.
    Fault { kind: FaultKind, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The guest trapped (a panic, `unreachable`, an out-of-bounds access...).
    Trap,
    /// The call ran past its deadline.
    Timeout,
    /// The instance tried to grow its memory past the limit.
    Memory,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trap => "trap",
            FaultKind::Timeout => "timeout",
            FaultKind::Memory => "memory",
        }
    }
}

/// The result of running a run of messages: the first `done` succeeded (their outputs are in
/// `outputs`), and `stop`, if any, is what happened to message number `done`; the messages
/// after it were not run (the engine keeps per-partition order by stopping there).
#[derive(Debug, Default)]
pub struct RunResult {
    pub done: usize,
    pub outputs: Vec<Output>,
    pub stop: Option<Outcome>,
    /// Where each done message's outputs end in `outputs` (message i's are
    /// `ends[i-1]..ends[i]`), where the call tells them apart (one message per guest call);
    /// `None` where it does not (a batch call).
    pub ends: Option<Vec<usize>>,
}

/// Which entry point the component exports (the batch one is preferred).
#[derive(Clone)]
enum Entry {
    Single(handler::GuestIndices),
    Batch(batch_handler::GuestIndices),
}

/// What every instance of a module shares.
struct Shared {
    name: Arc<str>,
    config: BTreeMap<String, String>,
    /// Asks the source whether an output topic exists, so `emit.send` can refuse at once.
    /// Whether an output may be published (its topic exists, it fits the broker's limits).
    check_output: OutputCheck,
    capture_logs: bool,
    http: Arc<http::Policy>,
}

/// A loaded, compiled, pre-instantiated handler component.
#[derive(Clone)]
pub struct Module {
    engine: Engine,
    pre: InstancePre<State>,
    entry: Entry,
    shared: Arc<Shared>,
    digest: Arc<str>,
    memory_limit: usize,
    call_timeout: Duration,
    /// Keeps the epoch ticker running.
    ticker: Arc<()>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.shared.name)
            .field("digest", &self.digest)
            .finish()
    }
}

/// A description of a component, for `weir check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Description {
    pub name: String,
    pub digest: String,
    pub size: usize,
    pub entry: &'static str,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

fn make_engine(cfg: &HostConfig) -> Result<Engine, LoadError> {
    let mut pool = PoolingAllocationConfig::default();
    // Each instance is one component instance; guests built by wit-bindgen or componentize
    // tools hold a handful of core instances, memories and tables. Room for replacements too.
    let slots = cfg.max_instances.saturating_mul(2).max(8);
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(8))
        .total_memories(slots.saturating_mul(2))
        .total_tables(slots.saturating_mul(4))
        .total_stacks(slots)
        .max_memory_size(cfg.memory_limit)
        .max_core_instances_per_component(50)
        .max_memories_per_component(10)
        .max_tables_per_component(20)
        .max_core_instance_size(4 << 20)
        .max_component_instance_size(4 << 20)
        .table_elements(200_000);
    let mut config = wasmtime::Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        // A call's stack; its pages are returned when the call ends.
        .async_stack_size(2 << 20)
        // Async-component machinery weir does not use costs ~1 µs per call (TOOLCHAIN.md).
        .concurrency_support(false)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| LoadError::Engine(format!("{e:#}")))
}

/// Advances the engine's epoch every tick while any module or instance of the engine lives
/// (each holds the returned token). This thread is the only clock call deadlines see.
fn start_epoch_ticker(engine: &Engine) -> Arc<()> {
    let token = Arc::new(());
    let alive: Weak<()> = Arc::downgrade(&token);
    let engine = engine.clone();
    std::thread::Builder::new()
        .name("weir-epoch".into())
        .spawn(move || {
            while alive.strong_count() > 0 {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .expect("spawn the epoch ticker thread");
    token
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads and classifies a file before handing it to wasmtime, so each kind of wrong file gets
/// its own message.
/// The largest component weir loads (a Python or JavaScript one, interpreter included, is
/// 12-18 MiB).
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// Reads a component file: a regular file of at most [`MAX_COMPONENT_BYTES`] (so that a device
/// or a FIFO given as a module fails at once instead of blocking or filling memory).
fn read_component(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let read_err = |source| LoadError::Read {
        path: shown.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other(
            "not a regular file (give the path of a .wasm component)",
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len().min(MAX_COMPONENT_BYTES) as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_COMPONENT_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(read_err(std::io::Error::other(format!(
            "larger than {MAX_COMPONENT_BYTES} bytes, the most weir loads"
        ))));
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm { path: shown });
    }
    // The layer field after the magic: 1 is a core module, 0x0d (with layer 1) a component.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule { path: shown });
    }
    Ok(bytes)
}

fn compile(
    engine: &Engine,
    bytes: &[u8],
    digest: &str,
    cache_dir: Option<&Path>,
    shown: &str,
) -> Result<Component, LoadError> {
    let invalid = |e: wasmtime::Error| LoadError::Invalid {
        path: shown.to_string(),
        detail: format!("{e:#}"),
    };
    let Some(dir) = cache_dir else {
        return Component::new(engine, bytes).map_err(invalid);
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let cached = dir.join(format!("{digest}-{:016x}.cwasm", h.finish()));
    if cached.is_file() {
        // SAFETY: the file was written by `Component::serialize` below, by this build of weir
        // (the name carries the engine's compatibility hash), into weir's own data directory
        // or the cache directory its user named (`--cache-dir`), which are trusted like the
        // log and the module itself. Wasmtime checks the header and version too.
        #[allow(unsafe_code)]
        match unsafe { Component::deserialize_file(engine, &cached) } {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(file = %cached.display(), error = %e, "ignoring unusable compiled-module cache entry")
            }
        }
    }
    let component = Component::new(engine, bytes).map_err(invalid)?;
    // A cache we cannot write only costs time on the next start.
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        // A name of its own per writer (process and call): two loads of one module in a
        // process must not write the same file while a third maps it.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = cached.with_extension(format!("tmp{}-{n}", std::process::id()));
        std::fs::write(&tmp, component.serialize().map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &cached)
    };
    if let Err(e) = write() {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot cache the compiled module");
    }
    Ok(component)
}

impl Module {
    /// Loads the component at `path`. `check_output` lets `emit.send` refuse an output that could
    /// not be published (an unknown topic, past a size limit) as the call makes it.
    pub fn load(
        path: &Path,
        cfg: &HostConfig,
        check_output: OutputCheck,
    ) -> Result<Module, LoadError> {
        let shown = path.display().to_string();
        let bytes = read_component(path)?;
        let digest = sha256_hex(&bytes);
        let engine = make_engine(cfg)?;
        let ticker = start_epoch_ticker(&engine);
        let component = compile(&engine, &bytes, &digest, cfg.cache_dir.as_deref(), &shown)?;

        let mut linker: Linker<State> = Linker::new(&engine);
        let link_err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link_err)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(link_err)?;
        types::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(link_err)?;
        emit::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(link_err)?;
        reply_wit::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(link_err)?;
        log::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(link_err)?;
        config::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(link_err)?;

        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Imports {
                path: shown.clone(),
                detail: format!("{e:#}"),
            })?;
        let entry = match batch_handler::GuestIndices::new(&pre) {
            Ok(b) => Entry::Batch(b),
            Err(_) => match handler::GuestIndices::new(&pre) {
                Ok(s) => Entry::Single(s),
                Err(_) => {
                    let exports = component
                        .component_type()
                        .exports(&engine)
                        .map(|(n, _)| n.to_string())
                        .collect::<Vec<_>>();
                    let exports = if exports.is_empty() {
                        "nothing".to_string()
                    } else {
                        exports.join(", ")
                    };
                    return Err(LoadError::NoHandler {
                        path: shown,
                        exports,
                    });
                }
            },
        };
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("handler");
        let module = Module {
            engine,
            pre,
            entry,
            shared: Arc::new(Shared {
                name: Arc::from(name),
                config: cfg.handler_config.clone(),
                check_output,
                capture_logs: cfg.capture_logs,
                http: Arc::new(http::Policy::new(name, cfg.allow_http.clone())),
            }),
            digest: Arc::from(digest),
            memory_limit: cfg.memory_limit,
            call_timeout: cfg.call_timeout,
            ticker,
        };
        // Instantiate once now: type mismatches in the exports, and guests that trap in their
        // start function, are load errors, not per-message faults.
        block_on(module.instantiate()).map_err(|e| LoadError::Signature {
            path: shown.clone(),
            detail: format!("{e:?}"),
        })?;
        Ok(module)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// SHA-256 of the component's bytes, hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Whether the component exports the batch entry point.
    pub fn is_batch(&self) -> bool {
        matches!(self.entry, Entry::Batch(_))
    }

    pub fn describe(&self, size: usize) -> Description {
        let ty = self.pre.component().component_type();
        Description {
            name: self.shared.name.to_string(),
            digest: self.digest.to_string(),
            size,
            entry: if self.is_batch() {
                BATCH_HANDLER_EXPORT
            } else {
                HANDLER_EXPORT
            },
            imports: ty
                .imports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
            exports: ty
                .exports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
        }
    }

    /// A fresh instance. Errors are faults (the component trapped while starting). Must run
    /// inside a tokio runtime with timers (the start function may wait, as any call).
    pub async fn instantiate(&self) -> Result<Instance, Outcome> {
        let stderr = stderr::Tail::default();
        // Nothing granted: no preopened directories, environment, arguments or network.
        let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: self.memory_limit,
                hit: false,
            },
            outputs: Vec::new(),
            output_budget: MAX_OUTPUTS_PER_MESSAGE,
            emit_error: None,
            shared: self.shared.clone(),
            context: Context::default(),
            reply: reply::Target::default(),
            stderr,
            logs: Vec::new(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            hooks: http::Hooks(self.shared.http.clone()),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Running wasm gives the thread back at every epoch tick; the deadline is the caller's
        // timer, which also covers time spent waiting on I/O.
        store.epoch_deadline_async_yield_and_update(1);
        store.set_epoch_deadline(1);
        let started = timeout(
            self.call_timeout.saturating_mul(10),
            self.pre.instantiate_async(&mut store),
        )
        .await;
        let instance = match started {
            Ok(r) => r.map_err(|e| classify(&store, &e))?,
            Err(_) => return Err(timed_out(&store, "instantiating")),
        };
        let entry = match &self.entry {
            Entry::Single(ix) => LoadedEntry::Single(
                ix.load(&mut store, &instance)
                    .map_err(|e| classify(&store, &e))?,
            ),
            Entry::Batch(ix) => LoadedEntry::Batch(
                ix.load(&mut store, &instance)
                    .map_err(|e| classify(&store, &e))?,
            ),
        };
        Ok(Instance {
            store,
            entry,
            call_timeout: self.call_timeout,
            _ticker: self.ticker.clone(),
        })
    }
}

/// Runs `fut` to completion on a private current-thread runtime, on a thread of its own, so it
/// works from anywhere: plain code, or a task of another runtime (which must not block on one).
/// For one-off calls (the check at load time); the engine runs instances on its own runtime.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("start a current-thread tokio runtime")
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// What the engine runs: a component, or a native twin of an example (for `weir bench`).
#[derive(Clone, Debug)]
pub enum Handler {
    Wasm(Module),
    Native {
        twin: native::Native,
        /// Where the `orders` twin emits (the `output-topic` setting).
        output_topic: Arc<str>,
    },
}

impl Handler {
    pub fn name(&self) -> &str {
        match self {
            Handler::Wasm(m) => m.name(),
            Handler::Native { twin, .. } => twin.name(),
        }
    }

    pub fn digest(&self) -> &str {
        match self {
            Handler::Wasm(m) => m.digest(),
            Handler::Native { .. } => "native",
        }
    }

    pub fn is_batch(&self) -> bool {
        match self {
            Handler::Wasm(m) => m.is_batch(),
            Handler::Native { .. } => false,
        }
    }

    /// A fresh instance (a native twin has no state: instantiating it is free).
    pub async fn instantiate(&self) -> Result<HandlerInstance, Outcome> {
        match self {
            Handler::Wasm(m) => m.instantiate().await.map(HandlerInstance::Wasm),
            Handler::Native { twin, output_topic } => Ok(HandlerInstance::Native {
                twin: *twin,
                output_topic: output_topic.clone(),
            }),
        }
    }
}

impl From<Module> for Handler {
    fn from(m: Module) -> Self {
        Handler::Wasm(m)
    }
}

/// One instance of a [`Handler`].
pub enum HandlerInstance {
    Wasm(Instance),
    Native {
        twin: native::Native,
        output_topic: Arc<str>,
    },
}

impl HandlerInstance {
    /// As [`Instance::run`].
    pub async fn run(&mut self, msgs: &mut [Delivery], attempts: &[u32]) -> RunResult {
        match self {
            HandlerInstance::Wasm(i) => i.run(msgs, attempts).await,
            HandlerInstance::Native { twin, output_topic } => {
                twin.run(msgs, attempts, output_topic)
            }
        }
    }
}

enum LoadedEntry {
    Single(handler::Guest),
    Batch(batch_handler::Guest),
}

/// One live instance of a module. Serves one caller at a time; after a [`Outcome::Fault`] it
/// must be dropped and replaced (its memory may be half-written).
pub struct Instance {
    store: Store<State>,
    entry: LoadedEntry,
    call_timeout: Duration,
    _ticker: Arc<()>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("module", &self.store.data().shared.name)
            .finish()
    }
}

/// Which message(s) the current call is about, for the guest's log lines: `topic/partition@offset`
/// (with `..` for a batch starting there). Kept as parts and formatted only when a line is
/// logged.
#[derive(Debug, Clone, Default)]
struct Context {
    topic: Option<Arc<str>>,
    partition: u32,
    offset: u64,
    batch: bool,
}

impl Context {
    fn of(d: &Delivery, batch: bool) -> Context {
        Context {
            topic: Some(d.topic.clone()),
            partition: d.partition,
            offset: d.offset,
            batch,
        }
    }
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.topic {
            None => Ok(()),
            Some(t) => write!(
                f,
                "{t}/{}@{}{}",
                self.partition,
                self.offset,
                if self.batch { ".." } else { "" }
            ),
        }
    }
}

/// Lends a delivery's key, payload and headers to a WIT message for one call, without copying
/// them; [`give_back`] returns them. (Cloning them cost five allocations a message.)
fn lend(d: &mut Delivery, attempt: u32) -> types::Message {
    types::Message {
        topic: d.topic.to_string(),
        partition: d.partition,
        offset: d.offset,
        key: d.record.key.take(),
        payload: std::mem::take(&mut d.record.payload),
        headers: std::mem::take(&mut d.record.headers),
        timestamp_ms: d.record.timestamp_ms,
        attempt,
    }
}

fn give_back(d: &mut Delivery, m: types::Message) {
    d.record.key = m.key;
    d.record.payload = m.payload;
    d.record.headers = m.headers;
}

fn from_failure(f: types::Failure) -> Outcome {
    match f {
        types::Failure::Retry(r) => Outcome::Retry {
            reason: r.reason,
            delay: r.delay_ms.map(Duration::from_millis),
        },
        types::Failure::Reject(reason) => Outcome::Reject { reason },
    }
}

/// The fault of a call (or an instantiation) that its deadline cut short. The instance is
/// left mid-call and must be dropped.
fn timed_out(store: &Store<State>, what: &str) -> Outcome {
    let mut detail = format!("{what} ran past its deadline (--call-timeout)");
    if let Some(said) = store.data().stderr.take() {
        detail = format!("{detail}; guest stderr: {said}");
    }
    Outcome::Fault {
        kind: FaultKind::Timeout,
        detail,
    }
}

/// Turns a wasmtime error from a call into a fault with its kind.
fn classify(store: &Store<State>, e: &wasmtime::Error) -> Outcome {
    let kind = if store.data().limiter.hit {
        FaultKind::Memory
    } else {
        FaultKind::Trap
    };
    let mut detail = match kind {
        FaultKind::Memory => format!(
            "memory limit of {} bytes reached: {e}",
            store.data().limiter.limit
        ),
        _ => match e.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => trap.to_string(),
            None => format!("{e:#}").replace('\n', " "),
        },
    };
    tracing::debug!(
        module = &*store.data().shared.name,
        error = format!("{e:?}"),
        "guest fault"
    );
    // What the guest printed just before (a Rust panic's message) says more than the trap.
    if let Some(said) = store.data().stderr.take() {
        detail = format!("{detail}; guest stderr: {said}");
    }
    Outcome::Fault { kind, detail }
}

impl Instance {
    /// The log lines kept since the last call (with [`HostConfig::capture_logs`]).
    pub fn take_logs(&mut self) -> Vec<GuestLog> {
        std::mem::take(&mut self.store.data_mut().logs)
    }

    /// What the guest printed on stderr in its last call (a panic message), if anything.
    pub fn take_stderr(&mut self) -> Option<String> {
        self.store.data().stderr.take()
    }

    /// Runs `msgs` in order, stopping at the first that does not succeed. `attempts[i]` is the
    /// delivery attempt of `msgs[i]` (1 for a first delivery). Must run inside a tokio runtime
    /// with timers.
    pub async fn run(&mut self, msgs: &mut [Delivery], attempts: &[u32]) -> RunResult {
        match self.entry {
            LoadedEntry::Single(_) => self.run_singly(msgs, attempts).await,
            LoadedEntry::Batch(_) => self.run_batch(msgs, attempts).await,
        }
    }

    /// Readies the store for a call of `messages` messages; returns the call's deadline.
    fn arm(&mut self, messages: usize, context: Context, reply: reply::Target) -> Duration {
        let s = self.store.data_mut();
        s.reply = reply;
        s.outputs.clear();
        s.output_budget = MAX_OUTPUTS_PER_MESSAGE.saturating_mul(messages.max(1));
        s.emit_error = None;
        s.stderr.take();
        s.context = context;
        self.call_timeout
            .saturating_mul(u32::try_from(messages.max(1)).unwrap_or(u32::MAX))
    }

    async fn run_singly(&mut self, msgs: &mut [Delivery], attempts: &[u32]) -> RunResult {
        let LoadedEntry::Single(guest) = &self.entry else {
            unreachable!("run_singly on a batch entry")
        };
        let guest = guest.clone();
        let mut result = RunResult {
            ends: Some(Vec::with_capacity(msgs.len())),
            ..RunResult::default()
        };
        for (d, &attempt) in msgs.iter_mut().zip(attempts) {
            let deadline = self.arm(
                1,
                Context::of(d, false),
                reply::Target::of(&d.record.headers, false),
            );
            let m = lend(d, attempt);
            let call = timeout(deadline, guest.call_handle(&mut self.store, &m)).await;
            give_back(d, m);
            let outcome = match call {
                Err(_) => timed_out(&self.store, "the call"),
                Ok(Err(e)) => classify(&self.store, &e),
                Ok(Ok(r)) => match r {
                    Err(f) => from_failure(f),
                    Ok(()) => match self.store.data_mut().emit_error.take() {
                        None => Outcome::Ok,
                        Some(detail) => Outcome::InvalidOutput { detail },
                    },
                },
            };
            if outcome != Outcome::Ok {
                result.stop = Some(outcome);
                return result;
            }
            result.outputs.append(&mut self.store.data_mut().outputs);
            result.done += 1;
            if let Some(ends) = &mut result.ends {
                ends.push(result.outputs.len());
            }
        }
        result
    }

    /// Boxed: it calls itself (on the prefix before a failure, or one message at a time).
    fn run_batch<'a>(
        &'a mut self,
        msgs: &'a mut [Delivery],
        attempts: &'a [u32],
    ) -> std::pin::Pin<Box<dyn Future<Output = RunResult> + Send + 'a>> {
        Box::pin(self.run_batch_once(msgs, attempts))
    }

    async fn run_batch_once(&mut self, msgs: &mut [Delivery], attempts: &[u32]) -> RunResult {
        let LoadedEntry::Batch(guest) = &self.entry else {
            unreachable!("run_batch on a single entry")
        };
        let guest = guest.clone();
        let mut result = RunResult::default();
        if msgs.is_empty() {
            return result;
        }
        let deadline = self.arm(
            msgs.len(),
            Context::of(&msgs[0], true),
            reply::Target {
                batch: true,
                ..Default::default()
            },
        );
        let batch: Vec<types::Message> = msgs
            .iter_mut()
            .zip(attempts)
            .map(|(d, &a)| lend(d, a))
            .collect();
        let call = timeout(deadline, guest.call_handle_batch(&mut self.store, &batch)).await;
        for (d, m) in msgs.iter_mut().zip(batch) {
            give_back(d, m);
        }
        let results = match call {
            // With more than one message the culprit is unknown: the caller replaces the
            // instance and runs the messages one at a time to find it.
            Err(_) => {
                result.stop = Some(timed_out(&self.store, "the call"));
                return result;
            }
            Ok(Err(e)) => {
                result.stop = Some(classify(&self.store, &e));
                return result;
            }
            Ok(Ok(r)) => r,
        };
        if results.len() != msgs.len() {
            let detail = format!(
                "handle-batch returned {} results for {} messages",
                results.len(),
                msgs.len()
            );
            result.stop = Some(Outcome::Fault {
                kind: FaultKind::Trap,
                detail,
            });
            return result;
        }
        let emit_error = self.store.data_mut().emit_error.take();
        match results
            .into_iter()
            .enumerate()
            .find_map(|(i, r)| r.err().map(|f| (i, f)))
        {
            None if emit_error.is_none() => {
                result.outputs.append(&mut self.store.data_mut().outputs);
                result.done = msgs.len();
            }
            None if msgs.len() == 1 => {
                result.stop = Some(Outcome::InvalidOutput {
                    detail: emit_error.unwrap_or_default(),
                });
            }
            None => {
                // Some message emitted what cannot be published and we cannot tell which:
                // run them one at a time, keeping what succeeds.
                for i in 0..msgs.len() {
                    let one = self.run_batch(&mut msgs[i..=i], &attempts[i..=i]).await;
                    result.done += one.done;
                    result.outputs.extend(one.outputs);
                    if one.stop.is_some() {
                        result.stop = one.stop;
                        break;
                    }
                }
            }
            Some((k, failure)) => {
                // Message k's outcome is known. Drop this call's outputs and run the prefix
                // before it again on its own, so every output belongs to a message that succeeded.
                let prefix = self.run_batch(&mut msgs[..k], &attempts[..k]).await;
                result.done = prefix.done;
                result.outputs = prefix.outputs;
                result.stop = Some(prefix.stop.unwrap_or_else(|| from_failure(failure)));
            }
        }
        result
    }

    /// Whether this instance was built for the batch entry point.
    pub fn is_batch(&self) -> bool {
        matches!(self.entry, LoadedEntry::Batch(_))
    }
}

/// Per-instance host state.
struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    /// Messages the guest emitted during the current call; published only on success.
    outputs: Vec<Output>,
    /// How many outputs the current call may emit.
    output_budget: usize,
    emit_error: Option<String>,
    shared: Arc<Shared>,
    /// Which message(s) the current call is about, for log lines.
    context: Context,
    /// Where the current message wants its answer (`reply`).
    reply: reply::Target,
    /// The tail of what the guest printed on stderr during the current call.
    stderr: stderr::Tail,
    /// Log lines kept with [`HostConfig::capture_logs`].
    logs: Vec<GuestLog>,
    http: wasmtime_wasi_http::WasiHttpCtx,
    /// Decides which outgoing requests go out.
    hooks: http::Hooks,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for State {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Enforces the memory limit and remembers that it was hit, so the trap that usually follows
/// (an allocator that cannot grow aborts) is reported as `memory`, not as a generic trap.
struct MemoryLimiter {
    limit: usize,
    hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl types::Host for State {}

impl emit::Host for State {
    fn send(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: types::Headers,
    ) -> Result<(), String> {
        let record = Record {
            key,
            payload,
            headers,
            timestamp_ms: None,
        };
        self.push_output(Output { topic, record })
    }
}

impl State {
    /// Queues an output of the current call (an emit or a reply), within the budget and
    /// checked by the source.
    fn push_output(&mut self, out: Output) -> Result<(), String> {
        let Output { topic, record } = out;
        let refused = if self.outputs.len() >= self.output_budget {
            Some(format!(
                "emitted more than {MAX_OUTPUTS_PER_MESSAGE} messages for one message"
            ))
        } else {
            (self.shared.check_output)(&topic, &record).err().map(|e| {
                format!(
                    "output to `{}` refused: {e}",
                    crate::source::clip(&topic, 200)
                )
            })
        };
        if let Some(e) = refused {
            // Remembered as well as returned: if the handler goes on to return `ok`, the host
            // fails the message rather than lose the output silently.
            self.emit_error.get_or_insert_with(|| e.clone());
            return Err(e);
        }
        self.outputs.push(Output { topic, record });
        Ok(())
    }
}

impl log::Host for State {
    fn log(&mut self, level: log::Level, message: String) {
        if self.shared.capture_logs {
            let level = match level {
                log::Level::Trace => "trace",
                log::Level::Debug => "debug",
                log::Level::Info => "info",
                log::Level::Warn => "warn",
                log::Level::Error => "error",
            };
            self.logs.push(GuestLog { level, message });
            return;
        }
        let module = &*self.shared.name;
        // `at` is formatted only when the line is logged.
        let at = &self.context;
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "weir::guest", module, at = %at, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "weir::guest", module, at = %at, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "weir::guest", module, at = %at, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "weir::guest", module, at = %at, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "weir::guest", module, at = %at, "{message}")
            }
        }
    }
}

impl config::Host for State {
    fn get(&mut self, key: String) -> Option<String> {
        self.shared.config.get(&key).cloned()
    }
}
