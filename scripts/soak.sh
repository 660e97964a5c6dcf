#!/usr/bin/env bash
# Chaos soak: weir consumes a stream of orders while it is killed with `kill -9` at random
# moments (and, on Kafka, while the mock cluster fails requests now and then; with --dedupe on
# Kafka, while Redis pauses). At the end it drains, and every order id is counted in the
# outputs and the dead letters: lost (none) and duplicated (none with --dedupe).
#
#   scripts/soak.sh [embedded|kafka] [--minutes N] [--dedupe]
#
# Exits 1 when an id was lost, or duplicated under --dedupe. Leaves its files in a temp folder
# it names. Starts a redis-server of its own for --dedupe on Kafka.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kind=embedded minutes=20 dedupe=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    embedded|kafka) kind=$1 ;;
    --minutes) minutes=$2; shift ;;
    --dedupe) dedupe=1 ;;
    *) echo "usage: scripts/soak.sh [embedded|kafka] [--minutes N] [--dedupe]" >&2; exit 2 ;;
  esac
  shift
done
cd "$root"
source scripts/setup.sh >/dev/null
cargo build -q -p weir --bin weir
cargo build -q -p weir-tests --bin mock-kafka
(cd guest-examples && cargo build -q --release --target wasm32-wasip2 -p orders)
weir="$root/target/debug/weir"
module="$root/guest-examples/target/wasm32-wasip2/release/orders.wasm"
work="$(mktemp -d /tmp/weir-soak.XXXXXX)"
echo "soak: $kind, $minutes min, dedupe=$dedupe; files in $work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

args=(--data-dir "$work/data")
group="soak-$$-$(date +%s)"
# A short call timeout and few attempts keep the dedupe claims short (a claim outlives the
# longest a message can take with all its attempts: here 39 s), so that what a killed run held
# is free again within the soak rather than for the default 205 s.
run=(run --module "$module" --topic orders --group "$group" --admin off --call-timeout 2s
     --max-attempts 3 --backoff-max 1s)
if [[ $kind == kafka ]]; then
  # The mock cluster keeps 5 MB a partition and deletes older records past it (librdkafka's
  # rdkafka_mock.c): 8 partitions and at most 160,000 orders keep every record the count needs.
  "$root/target/debug/mock-kafka" --faults orders:8 orders.dlq:8 orders.retry:8 confirmations:8 \
    >"$work/mock.log" &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q '^BOOTSTRAP=' "$work/mock.log" 2>/dev/null && break; sleep 0.1; done
  bootstrap="$(sed -n 's/^BOOTSTRAP=//p' "$work/mock.log")"
  args+=(--brokers "$bootstrap" --kafka-property session.timeout.ms=6000
         --kafka-property heartbeat.interval.ms=500)
else
  "$weir" "${args[@]}" topics create orders --partitions 4 >/dev/null
  "$weir" "${args[@]}" topics create confirmations --partitions 4 >/dev/null
fi
if [[ $dedupe == 1 ]]; then
  run+=(--dedupe header --dedupe-window 2h)
  if [[ $kind == kafka ]]; then
    # A Redis of its own: the soak pauses it, and its marks go with it (the machine's Redis
    # serves the tests).
    redis_port=$(( 20000 + RANDOM % 20000 ))
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
      >"$work/redis.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    run+=(--dedupe-store "redis://127.0.0.1:$redis_port")
  fi
fi

# The producer: chunks of 500 orders with ids in sequence; a chunk that fails (the run that
# served it was killed) is sent again, so an id may be in the input twice, never missing. On
# Kafka it spreads at most 160,000 over the soak (see above).
max_ids=0 pause=0
[[ $kind == kafka ]] && max_ids=160000 && pause=$(( minutes * 60 * 500 / 160000 ))
(
  n=0
  while [[ ! -f "$work/stop" ]] && [[ $max_ids == 0 || $n -lt $max_ids ]]; do
    until "$weir" "${args[@]}" produce orders --count 500 --start "$n" >/dev/null 2>>"$work/produce.err"; do
      sleep 0.2
    done
    n=$((n + 500))
    echo "$n" >"$work/produced"
    # The producer's pace on Kafka (a schedule, not a wait for an event).
    if [[ $pause -gt 0 ]]; then sleep "$pause"; fi
  done
) &
producer=$!
pids+=($producer)

kills=0 pauses=0
deadline=$(( $(date +%s) + minutes * 60 ))
while [[ $(date +%s) -lt $deadline ]]; do
  RUST_LOG=warn "$weir" "${args[@]}" "${run[@]}" >>"$work/runs.out" 2>>"$work/runs.log" &
  victim=$!
  # How long this run lives: the chaos schedule, 2-12 s on the embedded log, 8-30 s on Kafka
  # (where a member joins the group and is given partitions only after the killed one's
  # session, 6 s, has timed out).
  if [[ $kind == kafka ]]; then life=$(( 8 + RANDOM % 23 )); else life=$(( 2 + RANDOM % 11 )); fi
  sleep "$life.$(( RANDOM % 10 ))"
  if [[ $kind == kafka && $dedupe == 1 && $(( RANDOM % 3 )) == 0 ]]; then
    redis-cli -h 127.0.0.1 -p "$redis_port" CLIENT PAUSE 1500 WRITE >/dev/null && pauses=$((pauses + 1))
  fi
  kill -9 "$victim" 2>/dev/null && kills=$((kills + 1))
  wait "$victim" 2>/dev/null || true
done
touch "$work/stop"
wait "$producer" || true
produced="$(cat "$work/produced" 2>/dev/null || echo 0)"
echo "soak: $kills kills, $pauses Redis pauses, $produced orders produced; draining"
RUST_LOG=warn timeout 900 "$weir" "${args[@]}" "${run[@]}" --drain --json >"$work/drain.json" 2>>"$work/runs.log"
faults=0
[[ -f "$work/mock.log" ]] && faults="$(grep -c '^fault ' "$work/mock.log" || true)"
"$weir" "${args[@]}" consume confirmations --from-beginning --json >"$work/confirmations.jsonl"
"$weir" "${args[@]}" consume orders.dlq --from-beginning --json >"$work/dlq.jsonl" 2>/dev/null || true
"$weir" "${args[@]}" topics list orders --json >"$work/orders.json"
python3 - "$work" "$produced" "$kills" "$faults" "$pauses" "$dedupe" "$kind" <<'PY'
import json, sys, collections
work, produced, kills, faults, pauses, dedupe, kind = sys.argv[1:]
produced, dedupe = int(produced), dedupe == "1"
seen = collections.Counter()
for line in open(f"{work}/confirmations.jsonl"):
    seen[json.loads(json.loads(line)["payload"])["order_id"]] += 1
dead = 0
for line in open(f"{work}/dlq.jsonl"):
    m = json.loads(line)
    seen[json.loads(m["payload"])["id"]] += 1
    dead += 1
stats = json.load(open(f"{work}/orders.json"))
inputs = sum(p["end_offset"] for t in stats for p in t["partitions"])
ids = [f"m-{i}" for i in range(produced)]
lost = [i for i in ids if seen[i] == 0]
dup_ids = [i for i in ids if seen[i] > 1]
extra = sum(seen[i] - 1 for i in dup_ids)
print(f"soak result: source={kind} dedupe={dedupe} kills={kills} broker_faults={faults} "
      f"redis_pauses={pauses} ids={produced} input_messages={inputs} "
      f"outputs={sum(seen.values()) - dead} dead_letters={dead} lost={len(lost)} "
      f"duplicated_ids={len(dup_ids)} extra_outputs={extra}")
if lost:
    print("lost, first ones:", lost[:10])
if lost or (dedupe and dup_ids):
    sys.exit(1)
PY
