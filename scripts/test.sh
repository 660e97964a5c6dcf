#!/usr/bin/env bash
# All of weir's tests: unit tests of the pure parts and the end-to-end tests, which build the
# guest components from guest-examples/ and drive the real weir binary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
cargo test --workspace "$@"
