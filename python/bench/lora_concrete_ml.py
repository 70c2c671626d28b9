"""The tiny LoRA model of ``lora_gpt2.py --size tiny`` trained by Concrete ML 1.9's own
``LoraTrainer``, for a side-by-side step time (BENCHMARKS.md, "LoRA fine-tuning"). Not part of
the tests: Concrete ML pins torch 2.3.1, so it lives in its own venv.

    python3 -m venv /tmp/cml
    /tmp/cml/bin/pip install concrete-ml==1.9.0 requests peft "transformers<4.50"
    /tmp/cml/bin/python python/bench/lora_concrete_ml.py [--steps 2] [--batch 4] [--seq 16]
                                                         [--modes disable,simulate,execute]

The same GPT-2 shape (2 layers, width 32, vocabulary 64), the same peft LoRA (r = 4 on
``c_attn``, seeded non-zero B), the same random token batches as ``lora_gpt2.py --size tiny``.
Concrete ML compiles every dense layer but the first remote, with a backward module, 8-bit with
dynamic quantization (its ``LoraTrainer.compile`` defaults). Its ``LoraTrainer`` runs the
backward inside the forward call, so a step is one hybrid call plus the optimizer step. The
first step of a mode is a warm-up (its execute mode generates keys then), not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def main() -> None:
    from concrete.ml.torch.lora import LoraTrainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--modes", default="disable,simulate,execute")
    args = ap.parse_args()
    torch.set_num_threads(1)

    # The model and batches of `lora_gpt2.py --size tiny`, from the same code (it imports
    # nothing of hyfhe at module level, so this venv can load it).
    from lora_gpt2 import build, token_batches

    model, cfg = build(0, "tiny")
    batches = token_batches(cfg, args.batch, args.steps + 1, args.seq)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    # peft's forward takes **kwargs, which Concrete ML's check for a `labels` parameter refuses;
    # the causal LM loss given explicitly is the one GPT-2 computes itself.
    trainer = LoraTrainer(model, torch.optim.AdamW(params, lr=1e-4), loss_fn=causal_lm_loss,
                          train_log_path="/tmp/cml_lora_training.log")
    t = time.perf_counter()
    trainer.compile(dict(batches[0]), n_bits=8)
    print(f"Concrete ML: {len(trainer.remote_names)} remote modules (forward and backward "
          f"counted apart), compiled in {time.perf_counter() - t:.1f} s", flush=True)

    print("| mode | step (s) | loss |")
    print("|---|---|---|")
    for mode in args.modes.split(","):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        opt = torch.optim.AdamW(params, lr=1e-4)
        trainer.lora_training_module.inference_model.train()
        times, losses = [], []
        for batch in batches:
            t = time.perf_counter()
            loss, _ = trainer.hybrid_model(dict(batch), fhe=mode)
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
        print(f"| {mode} | {statistics.median(times[1:]):.3f} | {losses[-1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
