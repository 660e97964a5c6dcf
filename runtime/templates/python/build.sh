#!/usr/bin/env bash
# Builds {{name}}.wasm from app.py. Needs: pip install componentize-py==0.25.1
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
componentize-py -d wit -w consumer componentize app -o "{{name}}.wasm"
echo "built {{name}}.wasm"
