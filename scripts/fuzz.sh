#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 300), starting from its seeds in
# fuzz/seeds/<target> and its corpus in fuzz/corpus/<target> (kept between runs, not in git).
# A crash stops the run with libFuzzer's report and the input under fuzz/artifacts/; add that
# input to fuzz/seeds/<target> with the fix, so that every later run replays it.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). It builds on stable Rust: `-s none` leaves
# out the sanitizers, which need nightly; libFuzzer's coverage guidance and weir's own
# assertions remain. FUZZ_PROFILE=release builds optimised (slower to build, faster to run);
# the default, dev, builds faster.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-300}"
shift || true
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(record_codec config_file socket_request ingest_body envelope)
profile=(--dev)
[[ "${FUZZ_PROFILE:-dev}" == release ]] && profile=()
cd "$root/fuzz"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "--- fuzz $t for ${seconds}s"
  log="$(mktemp)"
  if ! cargo fuzz run "${profile[@]}" -s none "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz $t failed (a crash is saved under fuzz/artifacts/$t)" >&2
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$log" || tail -3 "$log"
done
