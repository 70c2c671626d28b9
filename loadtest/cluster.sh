#!/usr/bin/env bash
# Start a local cluster (redis-server, one coordinator, N workers), run hyfhe-loadtest against it,
# stop everything. Usage:
#   loadtest/cluster.sh WORKERS [hyfhe-loadtest options...]
# e.g.
#   loadtest/cluster.sh 2 --clients 4 --duration-s 30
# Defaults: the bundled digits CNN (compiled into target/loadtest-models), one test image per
# forward. Needs redis-server on PATH (Debian: apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."

workers=${1:-1}
shift || true
cargo build --release --quiet --workspace
bin=target/release/hyfhe
models=target/loadtest-models
if [ ! -d "$models/digits_cnn/client" ]; then
    $bin compile --model tests/fixtures/digits_cnn.onnx \
        --remote features.2 --remote classifier.0 --remote classifier.2 \
        --calibration tests/fixtures/digits_calibration_images.npy \
        --out "$models/digits_cnn" --force >/dev/null
fi

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(port)
coordinator_port=$(port)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

redis-server --port "$redis_port" --save '' --appendonly no >/dev/null &
pids+=($!)
export HYFHE__QUEUE__BACKEND=redis
export HYFHE__QUEUE__REDIS_URL=redis://127.0.0.1:$redis_port
export HYFHE__MODELS__DIR=$models
export HYFHE__COORDINATOR__LISTEN=127.0.0.1:$coordinator_port
export HYFHE__WORKER__LISTEN=127.0.0.1:0
export HYFHE__TELEMETRY__LOG=warn
$bin coordinator >/dev/null &
pids+=($!)
for _ in $(seq "$workers"); do
    $bin worker >/dev/null &
    pids+=($!)
done
until curl -fs "http://127.0.0.1:$coordinator_port/health/ready" >/dev/null; do sleep 0.2; done
sleep 3 # let the shard leases settle over all workers

target/release/hyfhe-loadtest --server "http://127.0.0.1:$coordinator_port" \
    --api-key hyfhe-demo-key --model digits_cnn \
    --input tests/fixtures/digits_test_images.npy "$@"
