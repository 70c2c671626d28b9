"""Remote mode against `hyfhe serve`: the seed's flow across processes, and HF generate."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from hyfhe.torch import HybridFHEModel

from conftest import API_KEY, FCSmall, seeded, serve, tenant_rows


def test_seed_flow_compile_save_then_a_fresh_process_runs_remote_against_hyfhe_serve(tmp_path):
    models = tmp_path / "models"
    model = seeded(FCSmall)
    torch.manual_seed(1)
    x_cal, x = torch.randn(256, 10), torch.randn(8, 10)
    hybrid = HybridFHEModel(model, ["seq.0"], model_name="fc_small")
    hybrid.compile_model(x_cal, n_bits=8)
    with torch.no_grad():
        simulate = hybrid(x, fhe="simulate")
    hybrid.save_and_clear_private_info(models / "fc_small")
    # The owner's process no longer holds the remote weights.
    assert hybrid.remote_modules["seq.0"].private_module is None
    np.save(tmp_path / "x.npy", x.numpy())
    state = torch.load(models / "fc_small" / "client" / "torch" / "state_dict.pt")
    assert not any(k.startswith("seq.0.") for k in state), "the client tree holds remote weights"

    client = textwrap.dedent(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import FCSmall
        from hyfhe.torch import HybridFHEModel, HybridFHEMode
        torch.manual_seed(123)  # the client's own init: its clear layers come from client/
        model = FCSmall().eval()
        x = torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))
        for source in ({str(models / "fc_small")!r}, None):  # a local client tree, then download
            hybrid = HybridFHEModel(model if source else FCSmall().eval(), ["seq.0"],
                                    server_remote_address=sys.argv[1], model_name="fc_small",
                                    api_key={API_KEY!r})
            hybrid.init_client(path_to_clients=source)
            hybrid.set_fhe_mode(HybridFHEMode.REMOTE)
            with torch.no_grad():
                y = hybrid.model(x)
            np.save({str(tmp_path)!r} + ("/y_local.npy" if source else "/y_download.npy"),
                    y.numpy())
            hybrid.close()
    """)
    with serve(models) as (url, _):
        subprocess.run([sys.executable, "-c", client, url], check=True, timeout=600)
    for name in ("y_local.npy", "y_download.npy"):
        y = torch.from_numpy(np.load(tmp_path / name))
        assert torch.equal(y, simulate), f"{name}: remote must equal simulate bit for bit"


def test_tiny_gpt2_generate_gives_the_same_tokens_in_simulate_execute_and_remote(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    names = [f"transformer.h.{i}.{m}" for i in range(cfg.n_layer)
             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    hybrid = HybridFHEModel(model, names, model_name="gpt2_tiny")
    hybrid.compile_model(torch.randint(0, cfg.vocab_size, (8, 16)), n_bits=8)
    prompt = torch.randint(0, cfg.vocab_size, (1, 5))
    new = 4

    def generate(mode: str) -> torch.Tensor:
        hybrid.set_fhe_mode(mode)
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, use_cache=True)

    simulate = generate("simulate")
    execute = generate("execute")
    assert simulate.shape == (1, 5 + new)
    assert torch.equal(simulate, execute)

    hybrid.save_and_clear_private_info(tmp_path / "gpt2_tiny")
    with serve(tmp_path) as (url, metrics):
        hybrid.server_remote_address, hybrid.api_key = url, API_KEY
        before = tenant_rows(metrics)
        remote = generate("remote")
        # The prefill sends the prompt's rows; every later token one row per remote module.
        expected = len(names) * (prompt.shape[1] + new - 1)
        deadline = time.time() + 10
        while tenant_rows(metrics) - before < expected and time.time() < deadline:
            time.sleep(0.1)
        rows = tenant_rows(metrics) - before
        hybrid.close()
    assert torch.equal(remote, simulate)
    assert rows == expected, f"{rows} rows billed, expected {expected}"


def test_a_lean_key_session_uploads_about_a_mebibyte_and_equals_simulate(tmp_path):
    """`key="lean"`: the session's evaluation key is the automorphism keys alone (~1 MiB against
    ~107 MiB), requests go as auto/slot, and the result is still simulate's, bit for bit."""
    models = tmp_path / "models"
    torch.manual_seed(2)
    x_cal, x = torch.randn(256, 10), torch.randn(3, 10)
    owner = HybridFHEModel(seeded(FCSmall), ["seq.0"], model_name="fc_small")
    owner.compile_model(x_cal, n_bits=8)
    with torch.no_grad():
        simulate = owner(x, fhe="simulate")
    owner.save_and_clear_private_info(models / "fc_small")
    try:
        HybridFHEModel(seeded(FCSmall), ["seq.0"], key="small")
        raise AssertionError("an unknown key profile must be refused")
    except ValueError as e:
        assert "lean" in str(e)
    with serve(models) as (url, _):
        hybrid = HybridFHEModel(seeded(FCSmall), ["seq.0"], server_remote_address=url,
                                model_name="fc_small", api_key=API_KEY, key="lean")
        hybrid.init_client(path_to_clients=models / "fc_small")
        uploaded = hybrid._binding.session.uploaded_key_bytes
        with torch.no_grad():
            y = hybrid(x, fhe="remote")
        hybrid.close()
    assert uploaded < 2 << 20, f"lean session uploaded {uploaded} bytes"
    assert torch.equal(y, simulate), "lean remote must equal simulate bit for bit"
