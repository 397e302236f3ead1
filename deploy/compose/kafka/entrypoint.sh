#!/usr/bin/env bash
# Starts the broker, creates the audit topic once it answers (Tansu creates no topic by
# itself), then waits for the broker; SIGTERM is passed on. /tmp/ready exists once the topic
# does (the healthcheck).
#   KAFKA_ADVERTISED   host:port clients are told to use (default kafka:9092)
#   KAFKA_TOPIC        the audit topic (default vigil-audit), KAFKA_PARTITIONS (default 3)
set -euo pipefail
advertised="${KAFKA_ADVERTISED:-kafka:9092}"
topic="${KAFKA_TOPIC:-vigil-audit}"
partitions="${KAFKA_PARTITIONS:-3}"
broker=tcp://127.0.0.1:9092

rm -f /tmp/ready
tansu broker --listener-url tcp://0.0.0.0:9092 --advertised-listener-url "tcp://$advertised" \
  --storage-engine memory://tansu/ &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT

until tansu topic list --broker "$broker" >/dev/null 2>&1; do
  kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit 1; }
  sleep 0.2
done
if ! tansu topic list --broker "$broker" | grep -qxF "$topic"; then
  tansu topic create "$topic" --partitions "$partitions" --broker "$broker"
fi
touch /tmp/ready
echo "vigil-kafka: broker ready, topic $topic ($partitions partitions), advertised as $advertised"
wait "$pid"
