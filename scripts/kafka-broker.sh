#!/usr/bin/env bash
# Starts a real Kafka-protocol broker with transactions for the tests that need one (noida-db
# from PyPI, installed when missing; a data directory of its own) on 127.0.0.1:$PORT (default
# 19092), unless something answers there already, and prints the two variables the tests read.
# Exits 1 when it does not start. Sourced through scripts/services.sh; runs on its own too:
#   export $(PORT=19092 scripts/kafka-broker.sh)
set -euo pipefail
port="${PORT:-19092}"
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
if ! answers; then
  if ! command -v noida-db >/dev/null; then
    # A Debian system Python refuses pip installs (PEP 668) unless told otherwise.
    python3 -m pip install --quiet noida-db==0.2.3 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages noida-db==0.2.3
    if command -v pyenv >/dev/null; then pyenv rehash; fi
  fi
  dir="$(mktemp -d /tmp/weir-noida.XXXXXX)"
  nohup noida-db start --only kafka --kafka-port "$port" --data-dir "$dir" >/tmp/weir-noida.log 2>&1 &
  for _ in $(seq 1 300); do answers && break; sleep 0.1; done
  answers || { echo "noida-db did not start on port $port; see /tmp/weir-noida.log" >&2; exit 1; }
fi
echo "WEIR_TEST_KAFKA_BROKERS=127.0.0.1:$port"
echo "WEIR_TEST_KAFKA_TXN_BROKERS=127.0.0.1:$port"
