"""What the wheel is built from: the client side of the Rust crate, none of the server's."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO

# Crates only `hyfhe serve`, coordinators and workers need.
SERVER_ONLY = re.compile(r"^(actix|actix-web|redis|opentelemetry\S*|clap|tracing-subscriber|toml|"
                         r"indicatif) v", re.M)


def _tree(package: str, *features: str) -> str:
    if shutil.which("cargo") is None:
        pytest.fail("cargo is needed to read the wheel's dependency tree")
    args = ["cargo", "tree", "-p", package, "-e", "normal", "--prefix", "none", *features]
    return subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True).stdout


def test_the_wheels_dependency_tree_has_no_actix_redis_or_opentelemetry():
    wheel = _tree("hyfhe-python")
    assert "hyfhe v" in wheel and "pyo3 v" in wheel and "tfhe v" in wheel, wheel[:500]
    assert SERVER_ONLY.findall(wheel) == []
    # The check can fail: the server build of the same crate does pull them in.
    server = set(SERVER_ONLY.findall(_tree("hyfhe")))
    assert {"actix-web", "redis", "clap"} <= server, server
