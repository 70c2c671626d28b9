#!/usr/bin/env bash
# The Python package's tests: build the wheel (release: unoptimised FHE is 10-50x slower),
# install it into a virtual environment with torch and the test dependencies, and run pytest.
#
#   bash python/test.sh [pytest args...]
#
# The venv is target/pyenv (HYFHE_PY_VENV overrides); a clean clone creates it, which installs
# torch from PyPI (about 3 GB, 3 minutes). The tests start `hyfhe serve` from target/release/hyfhe,
# built here when missing. Timings of each step are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${HYFHE_PY_VENV:-$root/target/pyenv}
step() { printf '[python] %s\n' "$*" >&2; }
timed() {
    local what=$1; shift
    local t0=$SECONDS
    "$@"
    step "$what: $((SECONDS - t0)) s"
}

if [ ! -x "$venv/bin/python" ]; then
    timed "venv" python3 -m venv "$venv"
fi
timed "dependencies (torch, transformers, brevitas, peft, maturin, pytest)" \
    "$venv/bin/pip" install -q --disable-pip-version-check \
    "maturin>=1.16,<2" "pytest>=7" "numpy>=1.24" torch "transformers>=4.40" onnx onnxscript \
    brevitas peft
timed "wheel (maturin build --release)" \
    "$venv/bin/maturin" build --release --quiet -m python/Cargo.toml -o target/wheels
wheel=$(ls -t target/wheels/hyfhe-*.whl | head -n1)
timed "install $(basename "$wheel")" \
    "$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
if [ ! -x target/release/hyfhe ]; then
    timed "hyfhe CLI" cargo build --release --bin hyfhe
fi
cd python/tests
timed "pytest" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
