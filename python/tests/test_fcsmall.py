"""FCSmall through the torch front: modes agree, and both fronts compile the same server module."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import numpy as np
import torch

from hyfhe.torch import HybridFHEMode, HybridFHEModel

from conftest import FCSmall, hyfhe_bin, rel_l2, seeded


def test_fcsmall_seq0_execute_equals_simulate_bit_for_bit_and_is_close_to_torch():
    model = seeded(FCSmall)
    torch.manual_seed(1)
    x_cal, x = torch.randn(256, 10), torch.randn(16, 10)
    with torch.no_grad():
        expected = model(x)
    hybrid = HybridFHEModel(model, ["seq.0"], model_name="fc_small")
    hybrid.compile_model(x_cal, n_bits=8)
    with torch.no_grad():
        simulate = hybrid(x, fhe="simulate")
        execute = hybrid(x, fhe="execute")
        disable = hybrid(x, fhe="disable")
        float_again = hybrid(x, fhe="torch")
    assert torch.equal(simulate, execute), "execute must equal simulate bit for bit"
    assert torch.equal(float_again, expected)
    # 8-bit inputs and weights on a 10-wide layer: well within 2 % of float.
    assert rel_l2(execute, expected) < 0.02, rel_l2(execute, expected)
    assert rel_l2(disable, expected) < 0.02
    # The model is still an ordinary module whose chosen child was replaced.
    assert type(model.seq[0]).__name__ == "RemoteModule"
    assert hybrid.fhe_mode is HybridFHEMode.TORCH  # the last call's mode stays set


def test_conv2d_and_hf_style_leading_dimensions_run_as_rows():
    torch.manual_seed(3)
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1, stride=2), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)).eval()
    x_cal, x = torch.randn(32, 2, 8, 8), torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        expected = conv(x)
    hybrid = HybridFHEModel(conv, ["0", "3"], model_name="conv")
    hybrid.compile_model(x_cal)
    with torch.no_grad():
        simulate = hybrid(x, fhe="simulate")
        execute = hybrid(x, fhe="execute")
    assert torch.equal(simulate, execute)
    assert rel_l2(execute, expected) < 0.03
    # Three leading dimensions become rows of a linear module.
    lin = torch.nn.Linear(6, 7)
    hybrid = HybridFHEModel(torch.nn.Sequential(lin), ["0"], model_name="lin")
    hybrid.compile_model(torch.randn(64, 6))
    y = hybrid(torch.randn(2, 3, 4, 6), fhe="simulate")
    assert y.shape == (2, 3, 4, 7)


def test_torch_and_onnx_fronts_write_byte_identical_server_trees(tmp_path: Path):
    model = seeded(FCSmall)
    torch.manual_seed(2)
    x_cal = torch.randn(128, 10)
    # The ONNX front: torch's exporter, then `hyfhe compile` on the same calibration set.
    onnx_path = tmp_path / "fc_small.onnx"
    torch.onnx.export(model, (x_cal[:1],), str(onnx_path), input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}},
                      dynamo=False)
    np.save(tmp_path / "cal.npy", x_cal.numpy())
    subprocess.run([str(hyfhe_bin()), "compile", "--model", str(onnx_path), "--remote", "seq.0",
                    "--calibration", str(tmp_path / "cal.npy"), "--out", str(tmp_path / "onnx")],
                   check=True, capture_output=True)
    # The torch front on the live model.
    hybrid = HybridFHEModel(model, ["seq.0"], model_name="fc_small")
    hybrid.compile_model(x_cal, n_bits=8)
    hybrid.save_and_clear_private_info(tmp_path / "torch")
    a, b = tmp_path / "onnx" / "server", tmp_path / "torch" / "server"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["manifest.json", "seq.0/module.bin"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between the fronts"
    # The client trees differ by what the client runs: a graph, or the torch state.
    assert (tmp_path / "onnx" / "client" / "model.onnx").exists()
    assert (tmp_path / "torch" / "client" / "torch" / "state_dict.pt").exists()
    assert not filecmp.cmp(tmp_path / "onnx" / "client" / "manifest.json",
                           tmp_path / "torch" / "client" / "manifest.json", shallow=False)
