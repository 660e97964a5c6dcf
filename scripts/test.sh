#!/usr/bin/env bash
# All of weir's tests: unit tests of the pure parts and the end-to-end tests, which build the
# guest components from guest-examples/ and drive the real weir binary. Kafka behaviour is
# tested on librdkafka's in-process mock cluster, which needs nothing installed.
#
# With WEIR_TEST_KAFKA_BROKERS=host:port set, the tests that need a real Kafka-protocol broker
# in its own process run too (scripts/kafka-broker.sh starts one when tansu is installed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
source "$root/scripts/setup-guests.sh"
source "$root/scripts/services.sh"
cd "$root"
cargo test --workspace "$@"
if [[ -n "${WEIR_TEST_KAFKA_BROKERS:-}" ]]; then
  echo "--- tests against the broker at $WEIR_TEST_KAFKA_BROKERS"
  cargo test -p weir-tests --test e2e "$@" -- --ignored real_broker
fi
