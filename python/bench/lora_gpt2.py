"""One LoRA training step on GPT-2 with its frozen dense layers remote: forward and backward
split, bytes per step, resident memory, in float (torch), simulate and execute (real FHE, client
and server in this process), measured in the same run.

    bash python/test.sh -k nothing        # once: builds the wheel and the venv (target/pyenv)
    target/pyenv/bin/python python/bench/lora_gpt2.py [--layers 12] [--steps 2] [--batch 4]
                                                       [--seq 16] [--modes torch,simulate,execute]

GPT-2 small by default (124M parameters, random weights: nothing downloads; ``--size tiny``
for the test's 2-layer model, LoRA r=4), peft LoRA r=8 on ``c_attn``; every block's ``c_attn``/``c_proj``/``c_fc``/``mlp.c_proj`` is remote (48 modules,
each with its backward module), the LM head stays local. Each mode starts from the same
adapters; the first step of a mode is a warm-up (plan caches, execute's key generation), not
counted. Prints a Markdown table (BENCHMARKS.md, "LoRA fine-tuning") and, with ``--json``, the
per-step records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


#: ``--size tiny``: the model of ``python/tests/test_lora.py`` (and of ``lora_concrete_ml.py``).
TINY = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)


def build(layers: int, size: str = "small"):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = TINY if size == "tiny" else dict(n_layer=layers)
    cfg = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    r = 4 if size == "tiny" else 8
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True))
    # A non-zero B, so that the first steps' gradients also reach A through the remote layers.
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, cfg


def token_batches(cfg, batch: int, count: int, seq: int):
    """``count`` seeded batches of ``batch`` × ``seq`` random tokens, labels = inputs."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (batch * count, seq), generator=g)
    return [{"input_ids": ids[i:i + batch], "labels": ids[i:i + batch]}
            for i in range(0, len(ids), batch)]


def main() -> None:
    from hyfhe.lora import LoraTrainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["small", "tiny"], default="small",
                    help="GPT-2 small (124M) or the tiny test model (2 layers, width 32)")
    ap.add_argument("--layers", type=int, default=12, help="blocks of GPT-2 small")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per mode (after one "
                    "warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--modes", default="torch,simulate,execute")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model, cfg = build(args.layers, args.size)
    batches = token_batches(cfg, args.batch, args.steps + 1, args.seq)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = LoraTrainer(model, torch.optim.AdamW(params, lr=1e-4), model_name="gpt2-lora")
    t = time.perf_counter()
    trainer.compile(batches[0]["input_ids"], n_bits=8)
    compile_s = time.perf_counter() - t
    remote = len(trainer.hybrid_model.module_names)
    total = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 {cfg.n_layer} layers, width {cfg.n_embd}, {total:,} "
          f"parameters ({sum(p.numel() for p in params)} trainable), {remote} remote modules "
          f"with their backward modules, batch {args.batch}×{args.seq} tokens; compiled in "
          f"{compile_s:.1f} s")
    results = {}
    for mode in args.modes.split(","):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        trainer.optimizer = torch.optim.AdamW(params, lr=1e-4)
        t = time.perf_counter()
        records = trainer.train(batches, fhe=mode)
        print(f"  {mode}: {len(records)} steps in {time.perf_counter() - t:.1f} s (first is "
              "the warm-up)", flush=True)
        results[mode] = records[1:]

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    print()
    print("| mode | step (s) | forward (s) | backward (s) | remote forward / backward (s) | "
          "requests fwd / bwd | uploaded per step (MiB) | downloaded per step (MiB) | "
          "RSS after (MiB) | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, rs in results.items():
        step = med(rs, "forward_ms") + med(rs, "backward_ms") + med(rs, "optimizer_ms")
        up = med(rs, "forward_upload_bytes") + med(rs, "backward_upload_bytes")
        down = med(rs, "forward_download_bytes") + med(rs, "backward_download_bytes")
        print(f"| {mode} | {step / 1e3:.3f} | {med(rs, 'forward_ms') / 1e3:.3f} | "
              f"{med(rs, 'backward_ms') / 1e3:.3f} | {med(rs, 'remote_forward_ms') / 1e3:.3f} / "
              f"{med(rs, 'remote_backward_ms') / 1e3:.3f} | {med(rs, 'forward_requests'):.0f} / "
              f"{med(rs, 'backward_requests'):.0f} | {up / 2**20:.1f} | {down / 2**20:.1f} | "
              f"{max(r['rss_mib'] for r in rs):.0f} | {rs[-1]['loss']:.4f} |")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
