#!/usr/bin/env bash
# Starts the servers the tests talk to when they do not answer: Redis (127.0.0.1:6379, shared
# dedupe and the redis:// source), NATS with JetStream (127.0.0.1:4222, the nats:// source), RabbitMQ (127.0.0.1:5672, guest/guest, the amqp:// source; the tests make a vhost
# of their own per test with rabbitmqctl), each from Debian's package (installed when missing),
# moto's SQS server (PyPI, 127.0.0.1:4566, the sqs:// source), and noida-db (PyPI), a Kafka-protocol broker with transactions, on 127.0.0.1:19092.
# Sourced by test.sh (and so by CI); quick when all answer.
#   scripts/services.sh [all|redis]   (`redis` alone for `scripts/test.sh --quick`)
set -euo pipefail
services_wanted="${1:-all}"
echo "--- services: Redis for the shared-dedupe tests (127.0.0.1:6379; started if it is not answering)"
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 100); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli ping
fi

if [[ "$services_wanted" == all ]]; then
  echo "--- services: NATS with JetStream for the nats:// source (127.0.0.1:4222; started if it is not answering)"
  if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    command -v nats-server >/dev/null || (apt-get update -qq && apt-get install -y -qq nats-server >/dev/null)
    mkdir -p /var/lib/nats-server-ci
    (nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server-ci -l /var/log/nats-server-ci.log &)
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
    (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null \
      || { echo "nats-server did not start: see /var/log/nats-server-ci.log" >&2; exit 1; }
  fi
  export WEIR_TEST_NATS="${WEIR_TEST_NATS:-nats://127.0.0.1:4222}"

  echo "--- services: RabbitMQ for the amqp:// source (127.0.0.1:5672, guest/guest; started if it is not answering)"
  # The tests make a vhost of their own per test with rabbitmqctl, so the CLI must be there too.
  if ! command -v rabbitmqctl >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq rabbitmq-server) >/dev/null
  fi
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    (rabbitmq-server >/var/log/rabbitmq-ci.log 2>&1 &)
    for _ in $(seq 1 240); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  rabbitmqctl -q status >/dev/null
  export WEIR_TEST_AMQP="${WEIR_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672}"
  # The management API (queue depth with every consumer's unacked messages, 127.0.0.1:15672).
  rabbitmq-plugins -q enable rabbitmq_management >/dev/null
  for _ in $(seq 1 120); do (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null && break; sleep 0.5; done
  (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null \
    || { echo "RabbitMQ's management API does not answer on 127.0.0.1:15672" >&2; exit 1; }
  export WEIR_TEST_RABBIT_MANAGEMENT="${WEIR_TEST_RABBIT_MANAGEMENT:-http://127.0.0.1:15672}"
  # rabbitmq_timeout's test shortens consumer_timeout to 2 s and puts it back when it ends; one
  # killed before that leaves it: put back the defaults.
  if [[ "$(rabbitmqctl -q eval '{ok, V} = application:get_env(rabbit, consumer_timeout), V.' 2>/dev/null)" == 2000 ]]; then
    rabbitmqctl -q eval 'application:set_env(rabbit, consumer_timeout, 1800000), application:set_env(rabbit, channel_tick_interval, 60000).' >/dev/null
  fi

  echo "--- services: moto's SQS server for the sqs:// source (127.0.0.1:4566; started if it is not answering)"
  if ! (exec 3<>/dev/tcp/127.0.0.1/4566) 2>/dev/null; then
    if ! command -v moto_server >/dev/null; then
      # A Debian system Python refuses pip installs (PEP 668) unless told otherwise.
      python3 -m pip install --quiet 'moto[server]==5.2.1' 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages 'moto[server]==5.2.1'
      if command -v pyenv >/dev/null; then pyenv rehash; fi
    fi
    nohup moto_server -H 127.0.0.1 -p 4566 >/tmp/weir-moto.log 2>&1 &
    for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/4566) 2>/dev/null && break; sleep 0.1; done
    (exec 3<>/dev/tcp/127.0.0.1/4566) 2>/dev/null \
      || { echo "moto_server did not start: see /tmp/weir-moto.log" >&2; exit 1; }
  fi
  export WEIR_TEST_SQS="${WEIR_TEST_SQS:-http://127.0.0.1:4566}"

  echo "--- services: a Kafka-protocol broker with transactions (noida-db, 127.0.0.1:19092; started if it is not answering)"
  # The real-broker Kafka tests (two members, exactly-once across kills) run against it; the
  # rest of the Kafka tests use librdkafka's in-process mock cluster.
  broker_settings="$(PORT="${WEIR_TEST_KAFKA_PORT:-19092}" "$(dirname "${BASH_SOURCE[0]}")/kafka-broker.sh")" \
    || { echo "noida-db did not start: see /tmp/weir-noida.log" >&2; exit 1; }
  while read -r setting; do export "$setting"; done <<<"$broker_settings"
fi
