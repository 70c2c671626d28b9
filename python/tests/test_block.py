"""A module with an activation inside (Linear → GELU → Linear), exported in memory."""

from __future__ import annotations

import torch

from hyfhe.torch import HybridFHEModel

from conftest import Block, rel_l2, seeded


def test_linear_gelu_linear_block_runs_remote_close_to_simulate_and_to_torch():
    model = seeded(Block)
    torch.manual_seed(5)
    x_cal, x = torch.randn(512, 8), torch.randn(16, 8)
    with torch.no_grad():
        expected = model(x)
    hybrid = HybridFHEModel(model, ["block"], model_name="block")
    hybrid.compile_model(x_cal, n_bits=6, rounding_threshold_bits=6)
    report = hybrid.reports["block"]
    assert report["non_linear"] and report["activations"], report
    with torch.no_grad():
        simulate = hybrid(x, fhe="simulate")
        execute = hybrid(x, fhe="execute")
    # A bootstrap rounds within one step of the simulation at the reported rate; the result
    # stays within a few percent of simulate, and simulate of the float block.
    assert rel_l2(execute, simulate) < 0.05, rel_l2(execute, simulate)
    assert rel_l2(simulate, expected) < 0.1, rel_l2(simulate, expected)
