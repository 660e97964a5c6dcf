#!/usr/bin/env bash
# Starts a real Kafka-protocol broker (tansu, in memory) on 127.0.0.1:$PORT for the tests that
# need one, and prints `WEIR_TEST_KAFKA_BROKERS=127.0.0.1:$PORT` once it answers. Builds tansu
# only when WEIR_INSTALL_TANSU=1: `cargo install tansu --features dynostore` takes about 16
# minutes on 2 cores. Prints nothing and exits 0 when tansu is not installed.
set -euo pipefail
port="${PORT:-19092}"
bin="$(command -v tansu || true)"
[[ -z "$bin" && -x /root/.local/tansu/bin/tansu ]] && bin=/root/.local/tansu/bin/tansu
if [[ -z "$bin" && "${WEIR_INSTALL_TANSU:-0}" == 1 ]]; then
  cargo install tansu --features dynostore --root "$HOME/.local/tansu" >&2
  bin="$HOME/.local/tansu/bin/tansu"
fi
[[ -z "$bin" ]] && exit 0
url="tcp://127.0.0.1:$port"
nohup "$bin" broker --listener-url "$url" --advertised-listener-url "$url" \
  --storage-engine memory://tansu/ >/tmp/weir-tansu.log 2>&1 &
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "WEIR_TEST_KAFKA_BROKERS=127.0.0.1:$port"
    exit 0
  fi
  sleep 0.1
done
echo "tansu did not start; see /tmp/weir-tansu.log" >&2
exit 1
