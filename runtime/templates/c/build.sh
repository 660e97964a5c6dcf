#!/usr/bin/env bash
# Builds {{name}}.wasm from handler.c:
#   1. wit-bindgen's C generator writes the bindings for world `consumer` (gen/),
#   2. clang compiles for wasm32-wasi against wasi-libc (a core module, WASI preview 1),
#   3. wasm-tools makes it a component, adapting preview 1 to WASI 0.2 with the adapter here.
# Needs: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 (Debian);
#        cargo install wit-bindgen-cli@0.63.0 wasm-tools
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
rm -rf gen
out=$(wit-bindgen c wit --world consumer --out-dir gen 2>&1) || { echo "$out" >&2; exit 1; }
clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Wno-unused-parameter \
  -Igen -o "{{name}}.core.wasm" handler.c gen/consumer.c gen/consumer_component_type.o
wasm-tools component new "{{name}}.core.wasm" \
  --adapt wasi_snapshot_preview1=wasi_snapshot_preview1.reactor.wasm -o "{{name}}.wasm"
echo "built {{name}}.wasm"
