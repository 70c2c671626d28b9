#!/usr/bin/env python3
"""Export GPT-2 small (124M: 12 blocks, 768 wide, random weights built offline by transformers)
with a KV cache through the torch.export exporter, plus calibration token sequences and 8- and
32-token prompts. Used by loadtest/gpt2_small.sh; never in CI.

    python export_gpt2_small.py DIR
"""
import os
import sys

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_torch_fixtures import export, randomise, with_cache  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
cfg = GPT2Config()  # GPT-2 small
model = with_cache(GPT2LMHeadModel)(cfg).eval()
randomise(model, 1)
export(model, True, True, os.path.join(out, "gpt2_small.onnx"), cfg.n_layer, cfg.n_head,
       cfg.n_embd // cfg.n_head)
rng = np.random.default_rng(0)
np.save(os.path.join(out, "calibration.npy"), rng.integers(0, cfg.vocab_size, (16, 32), dtype=np.int64))
for n in (8, 32):
    np.save(os.path.join(out, f"prompt_{n}.npy"), rng.integers(0, cfg.vocab_size, (1, n), dtype=np.int64))
print("exported GPT-2 small to", out)
