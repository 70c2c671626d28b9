#!/usr/bin/env bash
# Every test: the Rust suite (release) and the Python package's (wheel, venv with torch, pytest).
# This is the README's test command, and .ci/run runs it after fmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."

# The serving tests start their own redis-server (and sentinels) on free ports, and nginx as
# the load balancer over several coordinators; install Debian's packages when missing.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v nginx >/dev/null 2>&1; then
    echo "redis-server or nginx not found: installing Debian's packages"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server nginx-light >/dev/null
fi

cargo test --release
# The load generator's own tests (its error codes, its schedules): a workspace member that a
# plain `cargo test` in the root does not run.
cargo test --release -p hyfhe-loadtest
bash python/test.sh
