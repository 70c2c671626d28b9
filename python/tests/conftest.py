"""Shared fixtures: small torch models, and `hyfhe serve` started on a free port."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
#: The demo tenant of config/default.toml.
API_KEY = "hyfhe-demo-key"


class FCSmall(nn.Module):
    """The seed's model: Linear → ReLU → Linear."""

    def __init__(self, inp: int = 10, hidden: int = 32, out: int = 4) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class Block(nn.Module):
    """A module with an activation inside (Linear → GELU → Linear) between clear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.block(self.inp(x))))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of `a` from `b`."""
    return float((a - b).norm() / b.norm())


def seeded(cls, *args, seed: int = 0):
    torch.manual_seed(seed)
    return cls(*args).eval()


def fc_small_hybrid() -> tuple:
    """FCSmall (seeded) with `seq.0` remote, compiled at 8 bits: (model, hybrid)."""
    from hyfhe.torch import HybridFHEModel

    model = seeded(FCSmall)
    hybrid = HybridFHEModel(model, ["seq.0"], model_name="fc_small")
    hybrid.compile_model(torch.randn(64, 10))
    return model, hybrid


def hyfhe_bin() -> Path:
    """The CLI the Rust build made (`cargo build --release`, or `cargo test --release`)."""
    path = Path(os.environ.get("HYFHE_BIN", REPO / "target" / "release" / "hyfhe"))
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build --release` first (or set HYFHE_BIN)")
    return path


@contextlib.contextmanager
def serve(model_dir: Path, env: Optional[Dict[str, str]] = None) -> Iterator[Tuple[str, str]]:
    """`hyfhe serve` (embedded coordinator and worker) on a free port, with `env` added to its
    environment (``HYFHE__…`` configuration overrides): (url, metrics url)."""
    proc = subprocess.Popen(
        [str(hyfhe_bin()), "serve", "--model-dir", str(model_dir), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RUST_LOG": "warn", **(env or {})},
    )
    try:
        url = metrics = None
        deadline = time.time() + 120
        while (url is None or metrics is None) and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"hyfhe serve exited: {proc.stderr.read()}")
            if m := re.match(r"listening on (\S+)", line):
                url = m.group(1)
            if m := re.match(r"metrics on (\S+)", line):
                metrics = m.group(1)
        assert url and metrics, "hyfhe serve did not print its ports"
        yield url, metrics
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def tenant_rows(metrics_url: str, tenant: str = "demo") -> float:
    """The server's billed-rows counter for `tenant` (0 before its first job)."""
    text = urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10).read().decode()
    m = re.search(rf'^hyfhe_tenant_rows_total{{tenant="{tenant}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
