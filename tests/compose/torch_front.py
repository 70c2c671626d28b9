"""A torch-front model through the compose cluster (run by tests/compose/run.sh with the venv
python/test.sh makes).

    torch_front.py compile MODELS_DIR     owner: compile FCSmall from the live torch model, keep
                                          its simulate output, save_and_clear into MODELS_DIR
    torch_front.py remote MODELS_DIR URL  a fresh process with a freshly initialised model:
                                          download the client tree from the cluster, run remote,
                                          and compare with simulate bit for bit

The API key comes from $HYFHE_API_KEY, a CA from $HYFHE_CA_CERT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hyfhe.torch import HybridFHEModel

NAME = "torch_fc"
REMOTE = ["seq.0", "seq.2"]


class FCSmall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


def inputs() -> torch.Tensor:
    # Distinct rows, so a mix-up of rows between requests shows.
    return torch.linspace(-2, 2, 16 * 10).reshape(16, 10) + torch.arange(16.0)[:, None] * 0.01


def compile_(models: Path) -> None:
    torch.manual_seed(7)
    model = FCSmall().eval()
    hybrid = HybridFHEModel(model, REMOTE, model_name=NAME)
    hybrid.compile_model(torch.randn(256, 10), n_bits=8)
    with torch.no_grad():
        expected = hybrid(inputs(), fhe="simulate")
    hybrid.save_and_clear_private_info(models / NAME)
    np.save(models.parent / f"{NAME}_simulate.npy", expected.numpy())
    print(f"[compose] torch front: {NAME} compiled from a live torch model ({', '.join(REMOTE)})",
          file=sys.stderr)


def remote(models: Path, url: str) -> None:
    torch.manual_seed(99)  # not the owner's weights: the client state must replace them
    hybrid = HybridFHEModel(FCSmall().eval(), REMOTE, server_remote_address=url, model_name=NAME)
    hybrid.init_client()  # the client tree comes from the cluster
    hybrid.set_fhe_mode("remote")
    stats = hybrid.collect_stats()
    with torch.no_grad():
        got = hybrid.model(inputs()).numpy()
    expected = np.load(models.parent / f"{NAME}_simulate.npy")
    hybrid.close()
    if got.tobytes() != expected.tobytes():
        sys.exit(f"torch front through the cluster differs from simulate: max |diff| "
                 f"{np.abs(got - expected).max()}")
    print(f"[compose] torch front through the cluster: 16 rows, bit-identical to simulate, "
          f"{sum(s['requests'] for s in stats)} requests", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "compile":
        compile_(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "remote":
        remote(Path(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(__doc__)
