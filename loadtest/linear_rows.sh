#!/usr/bin/env bash
# `hyfhe bench linear` over row counts, the planner choosing the encoding: one process per point,
# each with its own same-run plaintext baseline. Prints every JSON report, then a markdown table.
#
#   loadtest/linear_rows.sh                      # ROWS="1 4 16 64 128 256 2048" REPS=3
#   ENCODING=blocked16 loadtest/linear_rows.sh   # force one encoding instead
#
# Uses target/release/hyfhe (cargo build --release first). Never in CI (about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
HYFHE=${HYFHE:-target/release/hyfhe}
ROWS=${ROWS:-"1 4 16 64 128 256 2048"}
SHAPES=${SHAPES:-"2048x2048 768x3072"}
REPS=${REPS:-3}
force=()
[ -n "${ENCODING:-}" ] && force=(--encoding "$ENCODING")
reports=()
for shape in $SHAPES; do
    for rows in $ROWS; do
        json=$("$HYFHE" bench linear --rows "$rows" --in "${shape%x*}" --out "${shape#*x}" \
            --threads 2 --repetitions "$REPS" "${force[@]}" --json)
        echo "$json"
        reports+=("$json")
    done
done
printf '%s\n' "${reports[@]}" | python3 -c "$(cat <<'PY'
import json, sys
print("| rows | in | out | encoding | eval ms | plaintext ms | ratio | B / input | B / output | eval key MiB | exact |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for line in sys.stdin:
    r = json.loads(line)
    print(f"| {r['rows']} | {r['in']} | {r['out']} | {r['encoding']} | {r['eval_ms']:.0f} | "
          f"{r['plaintext_ms']:.2f} | {r['ratio']:.1f} | {r['input_bytes_per_value']:.2f} | "
          f"{r['output_bytes_per_value']:.2f} | {r['eval_key_bytes'] / 2**20:.1f} | {r['exact']} |")
PY
)"
