#!/usr/bin/env python3
"""Issue 34's two tables, run the way a user would: orders published by pika, a handler written
outside the repository (`weir new --lang python`, see --module), and

- `kills`: two `weir run` processes on one queue, one killed with `kill -9` KILLS times while
  the other runs (started again after each kill), then a drain;
- `closes`: one `weir run --drain`, with `rabbitmqctl close_all_connections` CLOSES times about
  a second apart.

Each row gets a virtual host of its own, so its queues, group and idempotency keys are its own.
Prints, per mode: orders, outputs missing at the end, outputs twice, the exit codes, the input,
retry and DLQ queues' counts at the end, and the time taken.

  pip install pika
  weir new --lang python shop && (edit shop/app.py) && (cd shop && ./build.sh)
  scripts/experiments/rabbitmq_faults.py kills --module shop/shop.wasm --weir target/debug/weir

The handler must confirm an order `{"id": ..., "busy": bool}` to `confirmations` as
`{"order_id": id}`, ask for one retry when `busy`, and reject what is not JSON.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pika

AMQP = os.environ.get("WEIR_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672").rstrip("/")
DEDUPE = ["--dedupe", "header", "--dedupe-store", "redis://127.0.0.1:6379"]
# Claims of a killed process wait out their TTL: short calls and backoffs keep it short.
FAST_CLAIMS = ["--call-timeout", "2s", "--backoff-max", "1s"]

KILL_MODES = {
    "blocking": [],
    "requeue": ["--retry-mode", "requeue"],
    "blocking exactly-once dedupe": ["--exactly-once", *DEDUPE, *FAST_CLAIMS],
    "requeue exactly-once dedupe": ["--retry-mode", "requeue", "--exactly-once", *DEDUPE, *FAST_CLAIMS],
}
CLOSE_MODES = {
    "at-least-once": ([], 20_000),
    "exactly-once": (["--exactly-once"], 20_000),
    "exactly-once dedupe": (["--exactly-once", *DEDUPE, *FAST_CLAIMS], 60_000),
    "requeue": (["--retry-mode", "requeue"], 60_000),
}


def ctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, stdout=subprocess.DEVNULL)


def order(i):
    if i % 100 == 3:
        return b"not an order"
    return json.dumps({"id": f"m-{i}", "busy": i % 100 in range(10, 17)}).encode()


def publish(url, n):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(n):
        ch.basic_publish(
            "",
            "orders",
            order(i),
            pika.BasicProperties(delivery_mode=2, headers={"idempotency-key": f"m-{i}"}),
        )
    conn.close()


def depth(url, queue):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        q = conn.channel().queue_declare(queue, passive=True)
        return q.method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        if conn.is_open:
            conn.close()


def confirmed(url):
    """Order id -> how many confirmations, taking them off the queue."""
    per_id = {}
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    while True:
        method, _, body = ch.basic_get("confirmations", auto_ack=True)
        if method is None:
            break
        oid = json.loads(body)["order_id"]
        per_id[oid] = per_id.get(oid, 0) + 1
    conn.close()
    return per_id


def weir(args, url, group, extra, log):
    cmd = [args.weir, "--source", url, "run", "--module", args.module, "--topic", "orders",
           "--group", group, "--max-in-flight", "500", "--backoff-base", "10ms", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "RUST_LOG": "warn",
                                 "WEIR_CACHE_DIR": os.environ.get("WEIR_CACHE_DIR", "/tmp/weir-exp-cache")})


def row(args, name, n, run):
    vhost = f"weir-exp-{uuid.uuid4().hex[:8]}"
    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"{AMQP}/{vhost}"
    try:
        for q in ["orders", "confirmations"]:
            subprocess.run([args.weir, "--source", url, "topics", "create", q], check=True,
                           stdout=subprocess.DEVNULL)
        publish(url, n)
        started = time.time()
        codes = run(url, f"g-{vhost}")
        took = time.time() - started
        per_id = confirmed(url)
        expected = {f"m-{i}" for i in range(n) if i % 100 != 3}
        missing = len(expected - per_id.keys())
        twice = sum(c - 1 for c in per_id.values())
        left = {q: depth(url, q) for q in ["orders", "orders.retry", "orders.dlq"]}
        print(f"| {name} | {n} | {missing} | {twice} | {codes} | {left} | {took:.0f} s |", flush=True)
    finally:
        ctl("delete_vhost", vhost)


def kills(args):
    def run_mode(extra):
        def go(url, group):
            log = open(f"/tmp/weir-exp-{group}.log", "w")
            other = weir(args, url, group, extra, log)
            victim = weir(args, url, group, extra, log)
            for _ in range(args.kills):
                time.sleep(random.uniform(0.5, 1.5))
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                victim = weir(args, url, group, extra, log)
            # Then both drain: the killed process's messages are back in the queue by now.
            for p in (other, victim):
                p.send_signal(signal.SIGTERM)
                p.wait()
            drain = weir(args, url, group, [*extra, "--drain"], log)
            return [drain.wait(timeout=900)]
        return go

    for name, extra in KILL_MODES.items():
        if args.only and args.only not in name:
            continue
        row(args, name, args.orders, run_mode(extra))


def closes(args):
    for name, (extra, n) in CLOSE_MODES.items():
        if args.only and args.only not in name:
            continue

        def go(url, group, extra=extra):
            log = open(f"/tmp/weir-exp-{group}.log", "w")
            p = weir(args, url, group, [*extra, "--drain"], log)
            vhost = url.rsplit("/", 1)[1]
            for _ in range(args.closes):
                time.sleep(1)
                ctl("close_all_connections", "-p", vhost, "closed by the experiment")
            return [p.wait(timeout=900)]
        row(args, name, n, go)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=["kills", "closes"])
    ap.add_argument("--module", required=True)
    ap.add_argument("--weir", default="weir")
    ap.add_argument("--orders", type=int, default=20_000)
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--closes", type=int, default=2)
    ap.add_argument("--only", help="run the modes whose name contains this")
    args = ap.parse_args()
    print("| mode | orders | missing | twice | exit codes | left (orders, retry, dlq) | time |")
    print("|---|---|---|---|---|---|---|")
    {"kills": kills, "closes": closes}[args.table](args)


if __name__ == "__main__":
    sys.exit(main())
