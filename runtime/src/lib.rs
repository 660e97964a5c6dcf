//! weir: a stream-processing runtime that runs message handlers as WebAssembly components.
//!
//! weir consumes topics, calls a sandboxed handler component for each message through the WIT
//! contract in `wit/`, and owns delivery: acks and offset commits, publishing what the handler
//! emitted, and never losing a message.
//!
//! # Layout
//! - [`source`]: where messages come from. [`source::Source`] is what the engine needs;
//!   [`source::embedded`] is the default, a durable log in the data directory (fjall), with
//!   [`source::embedded::local`] letting other `weir` commands reach a log that `weir run` owns.
//! - [`host`]: wasmtime. Compiles (and caches) a component, instantiates it under limits, and
//!   turns a call's result into an [`host::Outcome`]. The only module that names wasmtime.
//! - [`engine`]: the consume loop. Fetch per partition, run through an instance pool, commit
//!   outputs and offsets together; [`engine::offsets`] is the pure commit-point tracker,
//!   [`engine::retry`] the pure backoff policy.
//!   [`source::kafka`] is Kafka (consumer groups), the only module that names rdkafka.
//! - [`dedupe_store`]: the dedupe store several processes share (Redis).
//! - [`config`]: `weir.toml`, flags and `WEIR_*` variables, checked in `weir_core::config`
//!   and resolved here into one struct of settings.
//!
//! The pure parts (records, the log's codec, the dead-letter envelope, the retry policy,
//! configuration, the decoders of outside bytes) are the crate `weir_core` (`core/`), which the
//! fuzz targets build alone.
//! - [`cli`]: the `weir` command line; one module per subcommand.
//! - [`admin`]: `weir run`'s HTTP server (axum): metrics, probes, status, ingest, reload, the
//!   dashboard, behind a guard on `Host`, `Origin` and a bearer token.

pub mod admin;
pub mod cli;
pub mod config;
pub mod dedupe_store;
pub mod engine;
pub mod host;
pub mod source;
