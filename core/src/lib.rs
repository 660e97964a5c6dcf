//! weir's pure parts, in a crate of their own: what they need builds in seconds, without
//! wasmtime, librdkafka or the broker clients, so the fuzz targets (`fuzz/`) build only this,
//! and the runtime (`weir`) builds on it.
//!
//! - [`record`]: messages ([`record::Record`], [`record::Delivery`], [`record::Output`]).
//! - [`codec`]: the embedded log's byte layout of keys and records.
//! - [`dlq`]: the dead-letter envelope and the retry-topic headers.
//! - [`retry`]: the backoff policy.
//! - [`config`]: `weir.toml`, flags and `WEIR_*` variables, parsed and checked.
//! - [`allow`]: `--allow-http` entries.
//! - [`topic`]: topic names.
//! - [`socket`] and [`ingest`]: the decoders of what the local socket and the admin server
//!   read from outside.

pub mod allow;
pub mod codec;
pub mod config;
pub mod dlq;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod record;
pub mod retention;
pub mod retry;
pub mod socket;
pub mod topic;
