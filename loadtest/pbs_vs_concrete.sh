#!/usr/bin/env bash
# Non-linear remote modules, hyfhe vs Concrete ML in the same run: FCSmall(10) and FCSmall(64)
# with the whole `seq = Sequential(Linear, ReLU, Linear)` remote, one row, execute mode.
#
#   bash loadtest/pbs_vs_concrete.sh            # hyfhe, and Concrete ML if its venv exists
#
# Concrete ML 1.9.0 runs from $CONCRETE_VENV (default ~/.cache/hyfhe-concrete/venv: `python3 -m
# venv ... && .../pip install concrete-ml==1.9.0 requests`); without it only hyfhe's side is printed.
# Never part of CI: it takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
HYFHE=${HYFHE:-target/release/hyfhe}
CONCRETE_VENV=${CONCRETE_VENV:-$HOME/.cache/hyfhe-concrete/venv}
[ -x "$HYFHE" ] || cargo build --release --bin hyfhe
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_hyfhe() { # model calibration input label
    local dir="$work/$4"
    "$HYFHE" compile --model "$1" --remote seq --calibration "$2" --out "$dir" --n-bits 6 >/dev/null
    local pbs
    pbs=$("$HYFHE" compile --model "$1" --remote seq --calibration "$2" --out "$dir" --n-bits 6 \
        --force | sed -n 's/.* \([0-9]*\) bootstraps\/row.*/\1/p')
    for rows in 1 4; do
        local out
        out=$("$HYFHE" run "$dir" --input "$3" --first "$rows" --mode execute 2>&1)
        local fhe keys
        fhe=$(echo "$out" | sed -n 's/ *FHE eval *\([0-9.]*\) ms/\1/p')
        keys=$(echo "$out" | sed -n 's/.*Fourier weights \([0-9.]*\) ms.*/\1/p')
        python3 -c "
pbs, rows, fhe, keys = $pbs, $rows, $fhe, ${keys:-0}
print(f'hyfhe  $4  rows={rows}  {fhe:.0f} ms per forward ({fhe / rows:.0f} ms/row, '
      f'{fhe / (rows * pbs):.1f} ms per bootstrap, {pbs} per row); keys + setup {keys / 1000:.1f} s')"
    done
}

echo "# $(date -u +%FT%TZ) $(nproc) cores"
run_hyfhe tests/fixtures/fc_small.onnx tests/fixtures/fc_small_calibration.npy \
    tests/fixtures/fc_small_input.npy "FCSmall(10)"
run_hyfhe tests/fixtures/chains/fc_small64.onnx tests/fixtures/chains/fc_small64_calibration.npy \
    tests/fixtures/chains/fc_small64_input.npy "FCSmall(64)"
if [ -x "$CONCRETE_VENV/bin/python" ]; then
    for dim in 10 64; do
        "$CONCRETE_VENV/bin/python" loadtest/pbs_vs_concrete.py "$dim" 2>/dev/null | tail -1 |
            python3 -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"concrete-ml  FCSmall({r['dim']})  rows=1  {r['forward_s'] * 1000:.0f} ms per forward; \"
      f\"first call (keygen) {r['first_call_s']:.1f} s, compile {r['compile_s']:.1f} s\")"
    done
else
    echo "concrete-ml: no venv at $CONCRETE_VENV (see the header of this script)"
fi
