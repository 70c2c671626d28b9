#!/usr/bin/env bash
# Fuzz every decoder a client can reach (and the client's own decoders of what a server sends)
# with cargo-fuzz (libFuzzer), outside CI:
#
#   fuzz/run.sh [--seconds S] [--jobs J] [TARGET...]
#
#   session_request   POST /v1/sessions: the msgpack request, evaluation and bootstrap key blobs
#   compute_payload   a compute body: encrypted rows, then the shape check against a plan
#   queue_entry       a job read back from the queue, its payload, a stored outcome
#   client_responses  encrypted outputs (decoded and decrypted), model listings, session answers,
#                     the client bundle's paths and the artefact specs in it
#
# --seconds: per target (default 600); --jobs: targets run at once (default 1). Each target's
# corpus lives in fuzz/corpus/<target>, anything that crashes, leaks or hangs in
# fuzz/artifacts/<target>/ (reproduce: cargo fuzz run <target> <file>); the table at the end
# gives executions and crashes per target (also fuzz/artifacts/table.md). Installs cargo-fuzz
# when missing. The stable toolchain runs it (RUSTC_BOOTSTRAP=1 for the flags cargo-fuzz passes),
# without a sanitizer: the decoders are safe Rust, so what there is to find is a panic, an abort
# (allocation failure), a hang or memory past -rss_limit_mb, which libFuzzer reports alone.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
jobs=1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(session_request compute_payload queue_entry client_responses)

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "[fuzz] installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
echo "[fuzz] building ${targets[*]}" >&2
for t in "${targets[@]}"; do
    cargo fuzz build -s none --release "$t" 2>&1 | grep -E '^(error|warning: unused)' >&2 || true
done

run_one() {
    local t=$1
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    # -rss_limit_mb: decoders bound what they allocate by the bytes given (max_len 1 MiB here);
    # a run needing 2 GiB is a finding. -timeout: one input taking 10 s is a hang.
    cargo fuzz run -s none --release "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=1048576 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        >"fuzz/artifacts/$t.log" 2>&1 || true
}
running=0
for t in "${targets[@]}"; do
    echo "[fuzz] $t for ${seconds} s" >&2
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait

table=fuzz/artifacts/table.md
{
    echo "| target | seconds | executions | exec/s | corpus | crashes |"
    echo "|---|---:|---:|---:|---:|---:|"
    for t in "${targets[@]}"; do
        log="fuzz/artifacts/$t.log"
        runs=$(awk '/stat::number_of_executed_units:/ { print $2 }' "$log" | tail -1)
        rate=$(awk '/stat::average_exec_per_sec:/ { print $2 }' "$log" | tail -1)
        corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
        crashes=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
        echo "| $t | $seconds | ${runs:-?} | ${rate:-?} | $corpus | $crashes |"
    done
} >"$table"
cat "$table"
