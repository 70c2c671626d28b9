#!/usr/bin/env bash
# Every test: the Rust suite (release) and the Python package's (wheel, venv with torch, pytest).
# This is the README's test command, and .ci/run runs it after fmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release
bash python/test.sh
