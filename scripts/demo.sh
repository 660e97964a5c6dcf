#!/usr/bin/env bash
# weir's main job, from nothing: build weir and the example `orders` handler, produce sample
# orders into a fresh embedded log, run the handler over them, and print a summary.
#   WEIR_DEMO_COUNT   synthetic orders to produce (default 10000)
#   WEIR_DATA_DIR     where the log goes (default: a new temporary directory)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"

echo "==> building weir and the orders handler (the first build takes a while)"
cargo build --quiet -p weir --bin weir
(cd guest-examples && cargo build --quiet --release --target wasm32-wasip2 -p orders)
weir="$root/target/debug/weir"
module="$root/guest-examples/target/wasm32-wasip2/release/orders.wasm"
export WEIR_DATA_DIR="${WEIR_DATA_DIR:-$(mktemp -d)/weir-data}"
count="${WEIR_DEMO_COUNT:-10000}"

echo "==> data directory: $WEIR_DATA_DIR"
"$weir" check "$module"
"$weir" topics create orders --partitions 4
"$weir" topics create confirmations --partitions 2
"$weir" produce orders --count "$count"
# A few hand-written orders: one valid, one that is not JSON (rejected, dead-lettered), one
# that fails transiently on its first attempt (retried, then confirmed).
"$weir" produce orders --file guest-examples/rust/orders/sample-orders.jsonl

echo "==> running the handler until the topic is drained"
"$weir" run --module "$module" --topic orders --group shipping --drain

echo "==> consumer lag per partition"
"$weir" topics list orders
echo "==> three of the confirmations"
"$weir" consume confirmations --from-beginning --max 3
echo "==> the dead-letter topic"
"$weir" consume orders.dlq --from-beginning
