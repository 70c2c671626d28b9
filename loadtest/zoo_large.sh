#!/usr/bin/env bash
# The zoo's large-model check (outside CI): GPT-2 small (124M, default initialisation) exported
# the plain way, `model(input_ids).logits`, by both of torch's exporters; all 48 block linear
# layers remote; compile, then an 8-token prompt in simulate and execute (bit for bit equal) and
# against torch's own logits (relative L2), then `hyfhe generate` of NEW_TOKENS tokens in
# simulate and execute (same tokens). Prints a Markdown table (BENCHMARKS.md, "The model zoo").
#
#   loadtest/zoo_large.sh            # NEW_TOKENS=2 THREADS=2
#
# Needs torch + transformers (target/pyenv when it has them, else ~/.cache/hyfhe-fixtures/venv,
# installed when missing); uses target/release/hyfhe (cargo build --release first).
set -euo pipefail
cd "$(dirname "$0")/.."
NEW_TOKENS=${NEW_TOKENS:-2}
export RAYON_NUM_THREADS=${THREADS:-2}
HYFHE=${HYFHE:-target/release/hyfhe}
WORK=${WORK:-$HOME/.cache/hyfhe-bench/gpt2_small}
venv=target/pyenv
if ! "$venv/bin/python" -c "import torch, transformers, onnxscript" 2>/dev/null; then
    venv=~/.cache/hyfhe-fixtures/venv
    if ! "$venv/bin/python" -c "import torch, transformers, onnxscript" 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q torch onnxscript transformers onnx numpy
    fi
fi
mkdir -p "$WORK"
for e in ts dynamo; do
    [ -f "$WORK/gpt2_small_plain_$e.onnx" ] || { "$venv/bin/python" loadtest/export_gpt2_small.py "$WORK" --plain >&2; break; }
done

remote=()
for l in $(seq 0 11); do
    for m in attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj; do
        remote+=(--remote "m.transformer.h.$l.$m")
    done
done
rows=()
for e in ts dynamo; do
    dir="$WORK/models_plain/gpt2_small_plain_$e"
    rm -rf "$dir"
    t0=$(date +%s)
    if ! "$HYFHE" compile --model "$WORK/gpt2_small_plain_$e.onnx" "${remote[@]}" \
        --calibration "$WORK/calibration.npy" --out "$dir" >"$WORK/compile_$e.log" 2>&1; then
        rows+=("| $e | FAILED: $(tail -1 "$WORK/compile_$e.log") | | | |")
        continue
    fi
    compile_s=$(( $(date +%s) - t0 ))
    for mode in simulate execute; do
        "$HYFHE" run "$dir" --input "$WORK/prompt_8.npy" --mode "$mode" \
            --output "$WORK/plain_${e}_$mode.npy" >&2
    done
    gen() { "$HYFHE" generate "$dir" --prompt "$WORK/prompt_8.npy" --max-new-tokens "$NEW_TOKENS" \
        --mode "$1" --json | "$venv/bin/python" -c "import json,sys; print(json.load(sys.stdin)['tokens'])"; }
    sim_tokens=$(gen simulate)
    exe_tokens=$(gen execute)
    rows+=("$("$venv/bin/python" - "$WORK" "$e" "$compile_s" "$sim_tokens" "$exe_tokens" <<'PY'
import sys
import numpy as np
work, e, compile_s, sim, exe = sys.argv[1:]
s = np.load(f"{work}/plain_{e}_simulate.npy")
x = np.load(f"{work}/plain_{e}_execute.npy")
t = np.load(f"{work}/plain_logits.npy")
rel = np.linalg.norm(s - t) / np.linalg.norm(t)
exact = "yes" if s.tobytes() == x.tobytes() else "NO"
same = "same" if sim == exe else f"DIFFER: simulate {sim}, execute {exe}"
print(f"| {e} | 48 | {compile_s} s | {exact} | {100 * rel:.2f} % | {same} ({sim}) |")
PY
)")
done
echo
echo "GPT-2 small (default init) exported plainly, 48 block linear layers remote, 8-token prompt"
echo "| exporter | remote modules | compile | execute == simulate | rel. L2 vs torch | generate $NEW_TOKENS tokens |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
