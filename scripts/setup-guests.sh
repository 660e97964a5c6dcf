#!/usr/bin/env bash
# Installs the toolchains of the example handlers in other languages (guest-examples/{python,
# js,c}) that the tests build: componentize-py (PyPI), Node.js and npm (jco comes from npm, per
# example, through its package-lock.json), Debian's clang and lld with wasi-libc, and
# wit-bindgen's C generator and wasm-tools (crates.io). Each is skipped when it is there.
# Sourced by test.sh; the demo does not need it.
set -euo pipefail
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
if ! command -v clang >/dev/null || ! command -v wasm-ld >/dev/null || [[ ! -f /usr/lib/wasm32-wasi/libc.a ]] \
  || ! ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq clang lld wasi-libc libclang-rt-dev-wasm32) >/dev/null
fi
if [[ "$(wit-bindgen --version 2>/dev/null)" != *0.63.0* ]]; then
  cargo install --quiet --locked wit-bindgen-cli@0.63.0
fi
if [[ "$(wasm-tools --version 2>/dev/null)" != *1.263.0* ]]; then
  cargo install --quiet --locked wasm-tools@1.263.0
fi
