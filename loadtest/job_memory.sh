#!/usr/bin/env bash
# Peak memory of the embedded server (`hyfhe serve`) for one remote forward of ROWS rows through
# an IN×OUT linear layer, fresh server per row count: what bounds a worker's memory per job.
#
#   loadtest/job_memory.sh                      # ROWS="256 4096" IN=2048 OUT=2048
#   ROWS="64 512" MAX_JOB_BYTES=134217728 loadtest/job_memory.sh
#
# Prints, per row count: requests the client split the input into, wall time, and the server's
# peak RSS (VmHWM) next to key cache + job budget. Needs python3 with numpy and onnx (installed
# into a venv under ~/.cache/hyfhe-bench when missing); builds nothing, uses target/release/hyfhe.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-"256 4096"}
IN=${IN:-2048}
OUT=${OUT:-2048}
MAX_JOB_BYTES=${MAX_JOB_BYTES:-268435456}
HYFHE=${HYFHE:-target/release/hyfhe}
PORT=${PORT:-18090}
work=$(mktemp -d /tmp/hyfhe-job-memory.XXXXXX)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

. loadtest/numpy_python.sh
# shellcheck disable=SC2086
$py loadtest/make_linear_model.py --in "$IN" --out "$OUT" --rows $ROWS --dir "$work" >&2
"$HYFHE" compile --model "$work/linear.onnx" --remote fc --calibration "$work/calibration.npy" \
    --out "$work/models/linear" >&2

echo "| rows | in × out | requests | forward s | server peak RSS MiB | key cache + job budget MiB |"
echo "|---|---|---|---|---|---|"
for rows in $ROWS; do
    HYFHE__WORKER__MAX_JOB_BYTES=$MAX_JOB_BYTES HYFHE__COORDINATOR__METRICS_LISTEN=127.0.0.1:0 \
        "$HYFHE" serve --model-dir "$work/models" --listen "127.0.0.1:$PORT" >"$work/serve.log" 2>&1 &
    server=$!
    until curl -fsS "http://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1; do sleep 0.2; done
    start=$(date +%s.%N)
    out=$("$HYFHE" run "$work/models/linear" --input "$work/input_$rows.npy" --mode remote \
        --server "http://127.0.0.1:$PORT" --api-key hyfhe-demo-key --json)
    end=$(date +%s.%N)
    requests=$(echo "$out" | $py -c "import json,sys; print(json.load(sys.stdin)['stats']['requests'])")
    hwm_kb=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
    key_kb=$(curl -fsS "http://127.0.0.1:$(sed -n 's/^metrics on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$work/serve.log")/metrics" \
        | awk '/^hyfhe_worker_key_cache_bytes / {print int($2/1024)}')
    kill "$server"; wait "$server" 2>/dev/null || true; server=""
    printf '| %s | %s × %s | %s | %.1f | %d | %d |\n' "$rows" "$IN" "$OUT" "$requests" \
        "$(echo "$end - $start" | bc)" "$((hwm_kb / 1024))" "$(((key_kb + MAX_JOB_BYTES / 1024) / 1024))"
done
