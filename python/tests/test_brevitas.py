"""Brevitas QAT layers bring their learned quantizers: the server holds the trained integers and
the client quantizes on the trained input grid, so the remote module computes what the QAT model
computes (Concrete ML's ``compile_brevitas_qat_model`` users)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hyfhe.torch import HybridFHEModel

qnn = pytest.importorskip("brevitas.nn", reason="brevitas is installed by python/test.sh")


class QatMlp(nn.Module):
    """Concrete ML's QAT shape: every linear layer sees a quantized input."""

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.quant_in = qnn.QuantIdentity(bit_width=bits, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(10, 24, bias=True, weight_bit_width=bits)
        self.relu = qnn.QuantReLU(bit_width=bits, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(24, 3, bias=True, weight_bit_width=bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.quant_in(x))))


class QatCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant_in = qnn.QuantIdentity(bit_width=6, return_quant_tensor=True)
        # An input quantizer of its own, per-channel 5-bit weights.
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

        self.conv = qnn.QuantConv2d(2, 4, 3, stride=1, padding=1, bias=True,
                                    weight_quant=Int8WeightPerChannelFloat, weight_bit_width=5,
                                    input_quant=Int8ActPerTensorFloat, input_bit_width=6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(self.quant_in(x))).flatten(1))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> None:
    """A few QAT steps, so the scales are learned rather than initial."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    model.eval()


def test_brevitas_quant_linear_uses_its_learned_integers_and_input_grid():
    torch.manual_seed(0)
    model = QatMlp()
    x_train = torch.randn(256, 10)
    _train(model, x_train, torch.randn(256, 3))
    x = torch.randn(32, 10)
    with torch.no_grad():
        qat = model(x)
        codes1 = model.fc1.quant_weight().int().clone()
        in_scale = float(model.quant_in(x).scale)
    hybrid = HybridFHEModel(model, ["fc1", "fc2"], model_name="qat_mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both layers have a learned input quantizer
        hybrid.compile_model(x_train, n_bits=8)
    spec1 = hybrid._binding.native.spec("fc1")
    spec2 = hybrid._binding.native.spec("fc2")
    # The learned widths, not n_bits=8: 4-bit weights, 4-bit signed input (zero point 8),
    # 4-bit unsigned input after the QuantReLU (zero point 0).
    assert (spec1["weight_bits"], spec1["input_bits"], spec1["input_zero_point"]) == (4, 4, 8)
    assert (spec2["weight_bits"], spec2["input_bits"], spec2["input_zero_point"]) == (4, 4, 0)
    assert spec1["input_scale"] == pytest.approx(in_scale, rel=1e-6)
    assert codes1.abs().max() <= 7
    with torch.no_grad():
        simulate = hybrid(x, fhe="simulate")
        execute = hybrid(x, fhe="execute")
    assert torch.equal(simulate, execute)
    # Same integers on both sides: only float rounding of the dequantization differs.
    assert (simulate - qat).abs().max() < 1e-4, (simulate - qat).abs().max()


def test_brevitas_quant_conv2d_with_its_own_input_quantizer_and_per_channel_weights():
    torch.manual_seed(1)
    model = QatCnn()
    x_train = torch.randn(64, 2, 6, 6)
    _train(model, x_train, torch.randn(64, 2), steps=30)
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        qat = model(x)
    hybrid = HybridFHEModel(model, ["conv"], model_name="qat_cnn")
    hybrid.compile_model(x_train)
    spec = hybrid._binding.native.spec("conv")
    assert (spec["kind"], spec["weight_bits"], spec["input_bits"]) == ("conv2d", 5, 6)
    with torch.no_grad():
        simulate = hybrid(x, fhe="simulate")
        execute = hybrid(x, fhe="execute")
    assert torch.equal(simulate, execute)
    assert (simulate - qat).abs().max() < 1e-4, (simulate - qat).abs().max()


def test_brevitas_layers_that_cannot_be_served_are_refused_by_name():
    from brevitas.quant import Int8ActPerTensorFloat

    model = nn.Sequential(qnn.QuantIdentity(bit_width=4, return_quant_tensor=True),
                          qnn.QuantLinear(4, 2, bias=False, weight_bit_width=4,
                                          output_quant=Int8ActPerTensorFloat))
    model.eval()
    hybrid = HybridFHEModel(model, ["1"], model_name="refused")
    with pytest.raises(ValueError, match="`1` quantizes its output"):
        hybrid.compile_model(torch.randn(8, 4))
    # No input quantizer and float inputs: compiled at n_bits from calibration, with a warning.
    plain = nn.Sequential(qnn.QuantLinear(4, 2, bias=True, weight_bit_width=4)).eval()
    hybrid = HybridFHEModel(plain, ["0"], model_name="plain")
    with pytest.warns(UserWarning, match="no input quantizer"):
        hybrid.compile_model(torch.randn(8, 4), n_bits=6)
    assert hybrid._binding.native.spec("0")["input_bits"] == 6
    # Quantizers that still move (training mode) and narrow-range input grids are refused.
    moving = nn.Sequential(qnn.QuantLinear(4, 2, bias=True, weight_bit_width=4,
                                           input_quant=Int8ActPerTensorFloat)).train()
    with pytest.raises(RuntimeError, match="training mode"):
        HybridFHEModel(moving, ["0"], model_name="moving").compile_model(torch.randn(8, 4))
    narrow = nn.Sequential(qnn.QuantLinear(4, 2, bias=True, weight_bit_width=4,
                                           input_quant=Int8ActPerTensorFloat,
                                           input_narrow_range=True)).eval()
    with pytest.raises(ValueError, match="narrow-range input quantizer"):
        HybridFHEModel(narrow, ["0"], model_name="narrow").compile_model(torch.randn(8, 4))


def test_a_subclass_of_quant_linear_is_still_compiled_with_its_learned_quantizers():
    class Mine(qnn.QuantLinear):
        pass

    torch.manual_seed(4)
    model = nn.Sequential(qnn.QuantIdentity(bit_width=4, return_quant_tensor=True),
                          Mine(6, 3, bias=True, weight_bit_width=3)).eval()
    hybrid = HybridFHEModel(model, ["1"], model_name="mine")
    hybrid.compile_model(torch.randn(32, 6), n_bits=8)
    assert hybrid._binding.native.spec("1")["weight_bits"] == 3
