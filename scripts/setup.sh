#!/usr/bin/env bash
# Installs what building weir needs beyond rustup and cargo: the pinned toolchain (from
# rust-toolchain.toml) and its wasm32-wasip2 target. rustup does not add a toolchain file's
# targets by itself on machines that set RUSTUP_AUTO_INSTALL=0, so this does it explicitly.
# Quick when everything is already there. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^${toolchain}"; then
  rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy
fi
rustup target add --toolchain "$toolchain" wasm32-wasip2 >/dev/null 2>&1 || rustup target add --toolchain "$toolchain" wasm32-wasip2
for c in rustfmt clippy; do
  rustup component list --toolchain "$toolchain" --installed | grep -q "^$c" || rustup component add --toolchain "$toolchain" "$c"
done
# librdkafka (built from source by rdkafka-sys) links the system OpenSSL for ssl:// and SASL_SSL.
if ! pkg-config --exists openssl 2>/dev/null; then
  (apt-get update -qq && apt-get install -y -qq libssl-dev pkg-config) >/dev/null
fi

