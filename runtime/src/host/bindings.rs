//! Types and glue generated from `wit/` by wasmtime's `bindgen!`, from the host's view (the
//! `host` world: every import a handler may use, both entry points it may export).
//!
//! The entry points are called asynchronously (the instance's call can wait on I/O, such as a
//! timer or an HTTP request, without holding a thread); weir's own imports are plain functions.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "host",
    exports: { default: async },
});
