#!/usr/bin/env bash
# Two builds of `hyfhe` in one session, alternating, on the same `bench linear` shapes: what a
# before/after table in BENCHMARKS.md needs (this machine swings ~2× from day to day, so only a
# same-run comparison means anything). Prints one JSON line per run (the bench's object plus
# `build` and `args`), then a Markdown table of eval ms and ratios.
#
#   OLD=/tmp/hyfhe-old NEW=target/release/hyfhe loadtest/linear_pair.sh
#   ROUNDS=3 REPS=9 EXTRA_NEW="--key lean" SHAPES="1,768,2304 16,2048,2048" loadtest/linear_pair.sh
#
# Build the old binary from a worktree (git worktree add /tmp/old <commit>; cargo build --release
# there) and copy it away. Never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${OLD:?the previous build: OLD=path/to/hyfhe}
NEW=${NEW:-target/release/hyfhe}
ROUNDS=${ROUNDS:-1}
REPS=${REPS:-5}
THREADS=${THREADS:-2}
EXTRA_NEW=${EXTRA_NEW:-}
SHAPES=${SHAPES:-"1,768,2304 1,2048,2048 1,3072,768 16,2048,2048 128,768,3072 2048,768,3072"}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
run() { # label binary args...
    local label=$1 bin=$2
    shift 2
    "$bin" bench linear --threads "$THREADS" --json "$@" 2>/dev/null |
        python3 -c 'import json, sys; d = json.load(sys.stdin); d["build"] = sys.argv[1]; d["args"] = sys.argv[2]; print(json.dumps(d))' \
            "$label" "$*" | tee -a "$out"
}
for _ in $(seq "$ROUNDS"); do
    for shape in $SHAPES; do
        IFS=, read -r rows in out_features <<<"$shape"
        args=(--rows "$rows" --in "$in" --out "$out_features" --repetitions "$REPS")
        run old "$OLD" "${args[@]}"
        # shellcheck disable=SC2086
        run new "$NEW" "${args[@]}" $EXTRA_NEW
    done
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| shape | build | key | encoding | keygen ms | encrypt ms | eval ms | plaintext ms | ratio | exact |")
print("|---|---|---|---|---|---|---|---|---|---|")
for d in rows:
    print(f"| ({d['rows']}, {d['in']}, {d['out']}) | {d['build']} | {d.get('key', 'full')} | {d['encoding']} | "
          f"{d['keygen_ms']:.0f} | {d['encrypt_ms']:.2f} | {d['eval_ms']:.1f} | {d['plaintext_ms']:.2f} | "
          f"{d['ratio']:.1f} | {d['exact']} |")
PY
