//! Types and glue generated from `wit/` by wasmtime's `bindgen!`, from the host's view (the
//! `host` world: every import a handler may use, both entry points it may export).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "host",
});
