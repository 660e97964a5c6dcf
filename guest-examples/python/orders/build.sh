#!/usr/bin/env bash
# Builds orders.wasm from app.py with componentize-py (pip install componentize-py==0.25.1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
wit="${WEIR_WIT:-../../../wit}"
componentize-py -d "$wit" -w consumer componentize app -o orders.wasm
