#!/usr/bin/env bash
# Builds {{name}}.wasm from handler.js with jco (installed from npm into node_modules/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[[ -d node_modules ]] || npm install --no-audit --no-fund
npm run --silent build
echo "built {{name}}.wasm"
