#!/usr/bin/env bash
# Installs the toolchains of the example handlers in other languages (guest-examples/{python,
# js,c}) that the tests build. Each is skipped when it is there.
#   packages: componentize-py (PyPI), Node.js and npm, jco for the JS example (npm ci, from
#             its package-lock.json), Debian's clang and lld with wasi-libc
#   tools:    wit-bindgen's C generator and wasm-tools (crates.io: compiled, so a cargo build)
# Sourced by test.sh (both); CI runs `packages` in the background while weir builds, then
# `tools`. The demo needs none of it.
#   scripts/setup-guests.sh [packages|tools]
set -euo pipefail
guests_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
guests_part="${1:-all}"

if [[ "$guests_part" == all || "$guests_part" == packages ]]; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq python3 python3-pip) >/dev/null
  fi
  if ! command -v componentize-py >/dev/null || [[ "$(componentize-py --version 2>/dev/null)" != *0.25.1* ]]; then
    # A Debian system Python refuses pip installs (PEP 668) unless told otherwise.
    python3 -m pip install --quiet componentize-py==0.25.1 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages componentize-py==0.25.1
    if command -v pyenv >/dev/null; then pyenv rehash; fi
  fi
  command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null
  # jco for the JS example; `npm ci` writes node_modules/.package-lock.json last, so an
  # install cut short is done again.
  if [[ ! -f "$guests_root/guest-examples/js/orders/node_modules/.package-lock.json" ]]; then
    (cd "$guests_root/guest-examples/js/orders" && npm ci --no-audit --no-fund --silent)
  fi
  if ! command -v clang >/dev/null || ! command -v wasm-ld >/dev/null || [[ ! -f /usr/lib/wasm32-wasi/libc.a ]] \
    || ! ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq clang lld wasi-libc libclang-rt-dev-wasm32) >/dev/null
  fi
fi

if [[ "$guests_part" == all || "$guests_part" == tools ]]; then
  # Only the parts the C build uses (wit-bindgen's C generator; wasm-tools' `component new`
  # and `validate`): the default features build every language and subcommand, 2-3 times the
  # compile.
  if [[ "$(wit-bindgen --version 2>/dev/null)" != *0.63.0* ]]; then
    cargo install --quiet --locked wit-bindgen-cli@0.63.0 --no-default-features --features c
  fi
  if [[ "$(wasm-tools --version 2>/dev/null)" != *1.263.0* ]]; then
    cargo install --quiet --locked wasm-tools@1.263.0 --no-default-features --features component,validate
  fi
fi
