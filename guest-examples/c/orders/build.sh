#!/usr/bin/env bash
# Builds orders.wasm from orders.c:
#   1. wit-bindgen's C generator writes the bindings for world `consumer` (gen/),
#   2. Debian's clang compiles for wasm32-wasi against wasi-libc (a core module, WASI preview 1),
#   3. wasm-tools turns it into a component, adapting preview 1 to WASI 0.2 with the adapter.
# Needs: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32;
#        cargo install wit-bindgen-cli@0.63.0 wasm-tools;
#        the adapter: ADAPTER=path (default ./wasi_snapshot_preview1.reactor.wasm; `weir new
#        --lang c` writes one, and it ships in the crate wasi-preview1-component-adapter-provider).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
wit="${WEIR_WIT:-../../../wit}"
adapter="${ADAPTER:-wasi_snapshot_preview1.reactor.wasm}"
[[ -f "$adapter" ]] || { echo "error: no WASI preview 1 adapter at $adapter; set ADAPTER=path" >&2; exit 2; }
rm -rf gen
out=$(wit-bindgen c "$wit" --world consumer --out-dir gen 2>&1) || { echo "$out" >&2; exit 1; }
clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror -Wno-unused-parameter \
  -Igen -o orders.core.wasm orders.c gen/consumer.c gen/consumer_component_type.o
wasm-tools component new orders.core.wasm --adapt "wasi_snapshot_preview1=$adapter" -o orders.wasm
wasm-tools validate orders.wasm
