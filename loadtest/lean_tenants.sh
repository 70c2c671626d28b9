#!/usr/bin/env bash
# Many sessions on one worker with lean keys (issue 22): CLIENTS sessions, each with its own keys
# (`--distinct-keys --key lean`, as separate users would), sending single-row forwards to an
# IN×OUT linear module at RATE forwards/s in all (open loop: each session one every CLIENTS/RATE
# seconds), to `hyfhe serve` with a KEY_CACHE_BYTES key cache. Every result is checked bit for
# bit against simulate. Prints hyfhe-loadtest's JSON report, then one table row: latency
# percentiles, the server's peak and final RSS, key-cache bytes, loads, misses and evictions.
#
#   loadtest/lean_tenants.sh                     # CLIENTS=250 RATE=25 DURATION_S=60 IN=OUT=768
#   KEY=full CLIENTS=12 loadtest/lean_tenants.sh # the same with full keys (~650 MiB each)
#
# Needs python3 with numpy and onnx (a venv under ~/.cache/hyfhe-bench when missing); builds
# nothing: uses target/release/hyfhe and target/release/hyfhe-loadtest. Never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-250}
RATE=${RATE:-25}
DURATION_S=${DURATION_S:-60}
IN=${IN:-768}
OUT=${OUT:-768}
KEY=${KEY:-lean}
KEY_CACHE_BYTES=${KEY_CACHE_BYTES:-8589934592}
HYFHE=${HYFHE:-target/release/hyfhe}
LOADTEST=${LOADTEST:-target/release/hyfhe-loadtest}
PORT=${PORT:-18092}
work=$(mktemp -d /tmp/hyfhe-lean-tenants.XXXXXX)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

. loadtest/numpy_python.sh
$py loadtest/make_linear_model.py --in "$IN" --out "$OUT" --rows 1 --dir "$work" >&2
"$HYFHE" compile --model "$work/linear.onnx" --remote fc --calibration "$work/calibration.npy" \
    --out "$work/models/linear" >&2

# One tenant stands for CLIENTS users here: its session and key-byte quotas are raised to fit.
HYFHE__WORKER__KEY_CACHE_BYTES=$KEY_CACHE_BYTES HYFHE__QUOTAS__SESSIONS=$((CLIENTS + 16)) \
    HYFHE__QUOTAS__KEY_BYTES=$((CLIENTS * 128 << 20)) HYFHE__QUOTAS__IN_FLIGHT=256 \
    HYFHE__COORDINATOR__METRICS_LISTEN=127.0.0.1:0 \
    "$HYFHE" serve --model-dir "$work/models" --listen "127.0.0.1:$PORT" >"$work/serve.log" 2>&1 &
server=$!
until curl -fsS "http://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1; do sleep 0.2; done
metrics="http://127.0.0.1:$(sed -n 's/^.*metrics on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$work/serve.log" | head -n1)/metrics"
metric() { curl -fsS "$metrics" | awk -v m="$1" '$1 == m {print $2}'; }

report=$("$LOADTEST" --server "http://127.0.0.1:$PORT" --api-key hyfhe-demo-key --model linear \
    --input "$work/input_1.npy" --clients "$CLIENTS" --distinct-keys --key "$KEY" \
    --rate "$RATE" --duration-s "$DURATION_S" --verify-with "$work/models/linear" --json)
echo "$report"
hwm_mb=$(($(awk '/VmHWM/ {print $2}' "/proc/$server/status") / 1024))
rss_mb=$(($(awk '/VmRSS/ {print $2}' "/proc/$server/status") / 1024))
echo "| key | sessions | rate/s | sent | ok | wrong | errors | p50 ms | p99 ms | max ms | peak RSS MiB | RSS MiB | key cache MiB | key loads | misses | evictions |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
REPORT="$report" $py - "$KEY" "$CLIENTS" "$RATE" "$hwm_mb" "$rss_mb" \
    "$(metric hyfhe_worker_key_cache_bytes)" "$(metric hyfhe_worker_key_loads_total)" \
    "$(metric hyfhe_worker_key_cache_misses_total)" "$(metric hyfhe_worker_key_cache_evictions_total)" <<'PY'
import json, os, sys
key, clients, rate, hwm, rss, cache, loads, misses, evictions = sys.argv[1:]
r = json.loads(os.environ["REPORT"])
num = lambda v: f"{float(v):.0f}" if v else "?"
print(f"| {key} | {clients} | {rate} | {r['sent']} | {r['ok']} | {r['wrong']} | {r['errors']} | "
      f"{r['latency_ms_p50']:.0f} | {r['latency_ms_p99']:.0f} | {r['latency_ms_max']:.0f} | "
      f"{hwm} | {rss} | {float(cache or 0) / 2**20:.0f} | {num(loads)} | {num(misses)} | "
      f"{num(evictions)} |")
PY
