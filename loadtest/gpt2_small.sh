#!/usr/bin/env bash
# GPT-2 small (124M, default initialisation, random weights) with all 48 block linear layers remote: export with a KV
# cache (torch.export exporter), compile, then `hyfhe generate` in execute mode (8- and 32-token
# prompts) and in remote mode against `hyfhe serve` on loopback. Prints each run's JSON report
# and a summary: prefill, decode ms/token, MB up/down per token, share of time in local ops.
#
#   loadtest/gpt2_small.sh                  # NEW_TOKENS=4 THREADS=2 KEY=full
#   KEY=lean loadtest/gpt2_small.sh         # sessions with the lean key (automorphism keys only)
#
# Needs torch + transformers (target/pyenv when it has them, else ~/.cache/hyfhe-fixtures/venv,
# installed when missing: ~3 GB, about 3 minutes); uses target/release/hyfhe (cargo build --release first). Never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
NEW_TOKENS=${NEW_TOKENS:-4}
THREADS=${THREADS:-2}
KEY=${KEY:-full}
HYFHE=${HYFHE:-target/release/hyfhe}
PORT=${PORT:-18091}
WORK=${WORK:-$HOME/.cache/hyfhe-bench/gpt2_small}
export RAYON_NUM_THREADS=$THREADS
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null || true' EXIT

venv=target/pyenv  # python/test.sh's venv, when it is there
if ! "$venv/bin/python" -c "import torch, transformers, onnxscript" 2>/dev/null; then
    venv=~/.cache/hyfhe-fixtures/venv
    if ! "$venv/bin/python" -c "import torch, transformers, onnxscript" 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q torch onnxscript transformers onnx numpy
    fi
fi
[ -f "$WORK/gpt2_small.onnx" ] || "$venv/bin/python" loadtest/export_gpt2_small.py "$WORK" >&2

remote=()
for l in $(seq 0 11); do
    for m in attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj; do
        remote+=(--remote "transformer.h.$l.$m")
    done
done
rm -rf "$WORK/models"
"$HYFHE" compile --model "$WORK/gpt2_small.onnx" "${remote[@]}" \
    --calibration "$WORK/calibration.npy" --out "$WORK/models/gpt2_small" >&2

summary() { # label json
    python3 - "$1" "$2" <<'PY'
import json, sys
label, r = sys.argv[1], json.loads(sys.argv[2])
def local_share(s):
    total = sum(s[k] for k in ("local_ms", "quantize_ms", "encrypt_ms", "fhe_ms", "decrypt_ms", "dequantize_ms", "clear_ms"))
    return 100 * s["local_ms"] / total if total else 0
# Local ops once the decode shapes are planned (steps 3 on; the first steps plan them).
steady = [s["local_ms"] for s in r.get("decode_steps", [])[2:]]
steady = f"{sum(steady) / len(steady):.1f}" if steady else "—"
print(f"| {label} | {r['prompt_tokens']} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.0f} | "
      f"{r['bytes_up_per_token'] / 1e6:.3f} | {r['bytes_down_per_token'] / 1e6:.3f} | "
      f"{local_share(r['prefill']):.1f} % / {local_share(r['decode']):.1f} % | {steady} | {r['tokens']} |")
PY
}

rows=()
for n in 8 32; do
    json=$("$HYFHE" generate "$WORK/models/gpt2_small" --prompt "$WORK/prompt_$n.npy" \
        --max-new-tokens "$NEW_TOKENS" --mode execute --key "$KEY" --json)
    echo "$json"
    rows+=("$(summary execute "$json")")
done

"$HYFHE" serve --model-dir "$WORK/models" --listen "127.0.0.1:$PORT" >"$WORK/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 600); do
    grep -q "listening on" "$WORK/serve.log" && break
    sleep 1
done
json=$("$HYFHE" generate "$WORK/models/gpt2_small" --prompt "$WORK/prompt_8.npy" \
    --max-new-tokens "$NEW_TOKENS" --mode remote --server "http://127.0.0.1:$PORT" \
    --api-key hyfhe-demo-key --key "$KEY" --json)
echo "$json"
rows+=("$(summary remote "$json")")

echo
echo "GPT-2 small, 48 remote layers, $THREADS threads, $NEW_TOKENS new tokens, $KEY key"
echo "| mode | prompt tokens | prefill ms | decode ms/token | MB up/token | MB down/token | local ops (prefill / decode) | local ms/token from step 3 | tokens |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
