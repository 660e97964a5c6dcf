#!/usr/bin/env bash
# weir's tests, run by cargo-nextest: each test in a process of its own, several at once, and
# every test's time in target/nextest/<profile>/junit.xml (scripts/test-times.py lists the
# slowest; docs/testing.md says what runs where and what it costs).
#
#   scripts/test.sh              every test: the unit tests and the end-to-end tests, which
#                                drive the real weir binary with real guest components against
#                                the embedded log, librdkafka's mock cluster and real servers
#                                (Redis, RabbitMQ, noida-db for Kafka with transactions).
#                                What the README names and CI runs.
#   scripts/test.sh --quick      the inner loop, for after every change: the unit tests (the
#                                engine's paused-time tests among them) and the conformance
#                                suite on the embedded log.
#   scripts/test.sh [--quick] NAME...   only the tests whose names contain a NAME.
#
# Installs and starts what the tests need first (each step is quick when it is there already):
# the pinned toolchain and its wasm target, the guests' toolchains (Python, JavaScript, C; not
# for --quick), cargo-nextest, and the servers. WEIR_TEST_SCALE=N puts N times the CI-sized
# volumes through the tests that count messages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
quick=0
if [[ "${1:-}" == "--quick" ]]; then
  quick=1
  shift
fi
source "$root/scripts/setup.sh"
if (( ! quick )); then
  source "$root/scripts/setup-guests.sh" all
fi
if (( quick )); then
  source "$root/scripts/services.sh" redis
else
  source "$root/scripts/services.sh" all
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "--- installing cargo-nextest"
  cargo install --quiet --locked cargo-nextest
fi
cd "$root"
names=("$@")
if (( quick )); then
  cargo nextest run --workspace --no-tests=pass \
    -E 'package(weir) | package(weir-core) | test(/^conformance::.*::embedded$/)' -- "${names[@]}"
  exit
fi
# Two passes (.config/nextest.toml): everything that does not measure time or CPU, three at
# a time; then the tests that do, one at a time. Both run, whatever the first's outcome.
status=0
cargo nextest run --workspace --no-tests=pass -- "${names[@]}" || status=$?
echo "--- tests that measure time, CPU or memory, one at a time"
cargo nextest run --workspace --no-tests=pass --profile measured -- "${names[@]}" || status=$?
python3 "$root/scripts/test-times.py" 20 || true
exit "$status"
