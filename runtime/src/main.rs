/// mimalloc instead of glibc's malloc: a profile of `weir bench` (noop WASM, 1,000,000
/// messages) spent about a quarter of its CPU in glibc's allocator (`malloc_consolidate`,
/// `_int_free`, `_int_malloc`, `unlink_chunk`): records, batches and outputs are many small
/// allocations freed on other threads. Measured side by side in docs/performance.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    weir::cli::main()
}
