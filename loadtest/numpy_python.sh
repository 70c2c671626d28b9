# Sourced by loadtest scripts: sets `py` to a python3 with numpy and onnx (this one when it has
# them, else a venv under ~/.cache/hyfhe-bench, installed when missing).
py=python3
if ! $py -c "import numpy, onnx" 2>/dev/null; then
    venv=~/.cache/hyfhe-bench/venv
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q numpy onnx
    py="$venv/bin/python"
fi
