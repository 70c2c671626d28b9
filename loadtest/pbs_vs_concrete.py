"""Concrete ML's side of `loadtest/pbs_vs_concrete.sh`: FCSmall(dim) with its whole `seq`
remote, n_bits=6, rounding_threshold_bits=6, execute mode, one row. Prints one JSON line.
Needs a venv with concrete-ml==1.9.0 (never in CI)."""
import json
import sys
import time

import numpy as np
import torch
from torch import nn
from concrete.ml.torch.hybrid_model import HybridFHEModel


class FCSmall(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.seq(x)


def main():
    dim = int(sys.argv[1])
    torch.manual_seed(0)
    model = FCSmall(dim)
    x = torch.randn(64, dim)
    hybrid = HybridFHEModel(model, ["seq"])
    t = time.time()
    hybrid.compile_model(x, n_bits=6, rounding_threshold_bits=6)
    compile_s = time.time() - t
    row = x[:1]
    t = time.time()
    hybrid(row, fhe="execute")  # first call: key generation
    first_s = time.time() - t
    times = []
    for _ in range(2):
        t = time.time()
        y = hybrid(row, fhe="execute")
        times.append(time.time() - t)
    ref = model(row) if False else None
    print(json.dumps({"dim": dim, "compile_s": compile_s, "first_call_s": first_s,
                      "forward_s": min(times)}))


if __name__ == "__main__":
    main()
