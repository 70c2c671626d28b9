"""Bad inputs give exceptions that name the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyfhe
from hyfhe import _native
from hyfhe.torch import HybridFHEModel

from conftest import API_KEY, FCSmall, fc_small_hybrid, free_port, seeded


def test_unknown_and_nested_module_names_are_refused_with_the_closest_names():
    with pytest.raises(KeyError, match=r"no module `seq\.5`.*closest: seq\.[0-2]"):
        HybridFHEModel(seeded(FCSmall), ["seq.5"])
    with pytest.raises(ValueError, match="inside `seq`"):
        HybridFHEModel(seeded(FCSmall), ["seq", "seq.0"])
    with pytest.raises(ValueError, match="model name"):
        HybridFHEModel(seeded(FCSmall), ["seq.0"], model_name="bad name/..")


def test_wrong_shapes_dtypes_and_modes_are_clear_errors():
    model, hybrid = fc_small_hybrid()
    hybrid.set_fhe_mode("simulate")
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 10\]"):
        model.seq[0](torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        model.seq[0](torch.ones(3, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="fhe mode 'fast'"):
        hybrid(torch.randn(2, 10), fhe="fast")
    with pytest.raises(KeyError, match="seq.9"):
        hybrid._binding.native.forward("seq.9", np.zeros((1, 10), np.float32), "simulate")
    with pytest.raises(TypeError):
        hybrid._binding.native.forward("seq.0", np.zeros((1, 10), np.float64), "simulate")
    with pytest.raises(ValueError, match="n_bits"):
        HybridFHEModel(seeded(FCSmall), ["seq.0"]).compile_model(torch.randn(8, 10), n_bits=12)
    with pytest.raises(RuntimeError, match="compile_model"):
        HybridFHEModel(seeded(FCSmall), ["seq.0"]).set_fhe_mode("simulate")
    with pytest.warns(UserWarning, match="p_error"):
        HybridFHEModel(seeded(FCSmall), ["seq.0"]).compile_model(torch.randn(8, 10), p_error=0.1)


def test_a_server_that_is_down_or_refuses_the_key_is_a_clear_exception(tmp_path):
    _, hybrid = fc_small_hybrid()
    hybrid.server_remote_address = f"http://127.0.0.1:{free_port()}"
    hybrid.api_key = API_KEY
    with pytest.raises(hyfhe.ServerUnreachable, match="cannot reach"):
        hybrid.set_fhe_mode("remote")
    with pytest.raises(RuntimeError, match="server_remote_address"):
        HybridFHEModel(seeded(FCSmall), ["seq.0"]).init_client()
    with pytest.raises(hyfhe.HyfheError, match="client"):
        _native.Modules.load(str(tmp_path / "nothing"), "client")


def test_after_saving_only_remote_runs_and_torch_mode_says_why(tmp_path):
    model, hybrid = fc_small_hybrid()
    hybrid.save_and_clear_private_info(tmp_path / "m")
    with pytest.raises(RuntimeError, match="quantized weights"):
        hybrid.set_fhe_mode("simulate")
    with pytest.raises(RuntimeError, match="float weights"):
        hybrid.set_fhe_mode("torch")
