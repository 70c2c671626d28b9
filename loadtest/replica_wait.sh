#!/usr/bin/env bash
# What `queue.replica_acks = 1` costs a job: a Redis primary and one replica on free loopback
# ports (Debian's redis-server, as the tests use), then `hyfhe bench complete`, which stores
# outcomes announced at once and after `WAIT 1`, alternating in one run. Outside CI.
#
#   loadtest/replica_wait.sh [--jobs N] [--outcome-bytes B] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet --bin hyfhe
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
primary=$(free_port)
replica=$(free_port)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
redis-server --port "$primary" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids+=($!)
redis-server --port "$replica" --bind 127.0.0.1 --save "" --appendonly no \
    --replicaof 127.0.0.1 "$primary" >/dev/null &
pids+=($!)
linked=0
for _ in $(seq 100); do
    if redis-cli -p "$replica" INFO replication 2>/dev/null | grep -q master_link_status:up; then
        linked=1
        break
    fi
    sleep 0.1
done
[ "$linked" = 1 ] || {
    echo "the replica never linked to its primary: nothing to measure" >&2
    exit 1
}
echo "redis-server $(redis-server --version | grep -o 'v=[0-9.]*'): primary :$primary, replica :$replica" >&2
"${CARGO_TARGET_DIR:-target}/release/hyfhe" bench complete --redis-url "redis://127.0.0.1:$primary" "$@"
