#!/usr/bin/env python3
"""Export GPT-2 small (124M: 12 blocks, 768 wide) with its **default initialisation** (random
weights built offline by transformers; zero biases, unit LayerNorms and tied embeddings as
`GPT2LMHeadModel(GPT2Config())` makes them, nothing randomised to suit hyfhe), plus calibration
token sequences and 8- and 32-token prompts. Used by loadtest/gpt2_small.sh and
loadtest/zoo_large.sh; never in CI.

    python export_gpt2_small.py DIR            # gpt2_small.onnx: KV cache, torch.export
    python export_gpt2_small.py DIR --plain    # also the plain `model(input_ids).logits`
                                               # exports, TorchScript and torch.export, with
                                               # torch's logits for prompt_8 (plain_logits.npy)
"""
import os
import sys

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
from make_torch_fixtures import export, with_cache  # noqa: E402


class Logits(torch.nn.Module):
    """`model(input_ids).logits`, as users call it (submodule `m`: names `m.transformer...`)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids).logits


out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
cfg = GPT2Config()  # GPT-2 small
rng = np.random.default_rng(0)
np.save(os.path.join(out, "calibration.npy"), rng.integers(0, cfg.vocab_size, (16, 32), dtype=np.int64))
for n in (8, 32):
    np.save(os.path.join(out, f"prompt_{n}.npy"), rng.integers(0, cfg.vocab_size, (1, n), dtype=np.int64))
if not os.path.exists(os.path.join(out, "gpt2_small.onnx")):
    model = with_cache(GPT2LMHeadModel)(cfg).eval()
    export(model, True, True, os.path.join(out, "gpt2_small.onnx"), cfg.n_layer, cfg.n_head,
           cfg.n_embd // cfg.n_head)
    print("exported GPT-2 small with a KV cache to", out)
if "--plain" in sys.argv:
    torch.manual_seed(0)
    plain = Logits(GPT2LMHeadModel(cfg)).eval()
    ids = torch.from_numpy(np.load(os.path.join(out, "prompt_8.npy")))
    with torch.no_grad():
        np.save(os.path.join(out, "plain_logits.npy"), plain(ids).numpy().astype(np.float32))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}}
    for exporter, dynamo in (("ts", False), ("dynamo", True)):
        path = os.path.join(out, f"gpt2_small_plain_{exporter}.onnx")
        with torch.no_grad():
            torch.onnx.export(plain, (ids,), path, input_names=["input_ids"],
                              output_names=["output"], dynamic_axes=axes, dynamo=dynamo)
        print("exported plain GPT-2 small:", path)
