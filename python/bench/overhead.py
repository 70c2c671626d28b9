"""What the Python front costs: per remote call, Python vs the Rust client on the same module and
rows, and the whole forward, torch vs tract for the local part (FCSmall, GPT-2 tiny decode).

    bash python/test.sh -k nothing        # once: builds the wheel and the venv (target/pyenv)
    target/pyenv/bin/python python/bench/overhead.py [--repeats 30]

Per call, ``wall_ms`` is what Python sees (tensor in, tensor out: torch→numpy, the GIL released,
the hand-off to the Rust pool, numpy→torch) and ``rust_ms`` is the same call timed inside Rust
(``CompiledModules::forward_module``, what a Rust client pays). The whole-forward rows run the
same model and inputs through the torch front (``hyfhe.torch``) and the ONNX front (``hyfhe run``
/ ``hyfhe generate``, tract for the local part) in execute mode; keys are set up once per process
and not counted. Prints a Markdown table per part (BENCHMARKS.md, "The Python front").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from hyfhe.torch import HybridFHEModel

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
HYFHE = Path(os.environ.get("HYFHE_BIN", REPO / "target" / "release" / "hyfhe"))
sys.path.insert(0, str(FIXTURES))
sys.path.insert(0, str(REPO / "python" / "tests"))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fc_small() -> nn.Module:
    """The seed's FCSmall with the weights of tests/fixtures/fc_small.onnx."""
    from conftest import FCSmall

    model = FCSmall(10, 10, 10)
    graph = onnx.load(FIXTURES / "fc_small.onnx").graph
    params = dict(model.named_parameters())
    with torch.no_grad():
        for init in graph.initializer:
            params[init.name].copy_(torch.from_numpy(numpy_helper.to_array(init).copy()))
    return model.eval()


def gpt2_tiny() -> nn.Module:
    """The GPT-2 of tests/fixtures/llm (same config, seeds and randomisation)."""
    import make_torch_fixtures as fx

    fam, base, cfg, *_ = fx.families()[0]
    assert fam == "gpt2"
    torch.manual_seed(1)
    model = base(cfg).eval()
    fx.randomise(model, 2)
    return model


def gpt2_remote() -> list[str]:
    return [f"transformer.h.{i}.{m}" for i in range(2)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def per_call(hybrid: HybridFHEModel, x, mode: str, repeats: int) -> list[dict]:
    stats = hybrid.collect_stats()
    with torch.no_grad():
        hybrid(x, fhe=mode)  # warm: key setup, Fourier weights
        stats.clear()
        for _ in range(repeats):
            hybrid(x, fhe=mode)
    hybrid.collect_stats(False)
    return stats


def overhead_rows(label: str, stats: list[dict]) -> list[str]:
    rows = []
    for module in dict.fromkeys(s["module"] for s in stats):
        mine = [s for s in stats if s["module"] == module]
        wall, rust = median([s["wall_ms"] for s in mine]), median([s["rust_ms"] for s in mine])
        rows.append(f"| {label} | `{module}` | {mine[0]['rows']} | {mine[0]['mode']} | "
                    f"{wall:.3f} | {rust:.3f} | {wall - rust:.3f} | {100 * (wall - rust) / rust:.1f} % |")
    return rows


def run_cli(*args: str) -> dict:
    out = subprocess.run([str(HYFHE), *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = ["| case | module | rows | mode | Python wall ms | Rust ms | binding ms | overhead |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    whole = ["| model | front (local part) | mode | per forward / token ms | local part ms | remote modules ms |",
             "|---|---|---|---:|---:|---:|"]
    tmp = Path(tempfile.mkdtemp(prefix="hyfhe-bench-"))

    # FCSmall: seq.0 remote, the fixture's 8 inputs (and 1 row).
    cal = torch.from_numpy(np.load(FIXTURES / "fc_small_calibration.npy"))
    x8 = torch.from_numpy(np.load(FIXTURES / "fc_small_input.npy"))
    model = fc_small()
    hybrid = HybridFHEModel(model, ["seq.0"], model_name="fc_small")
    hybrid.compile_model(cal, n_bits=8)
    for x in (x8[:1], x8):
        table += overhead_rows("FCSmall", per_call(hybrid, x, "execute", args.repeats))
    # Whole forward, torch front: wall of model(x) minus its remote calls.
    stats = hybrid.collect_stats()
    walls = []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            hybrid(x8, fhe="execute")
            walls.append((time.perf_counter() - t0) * 1e3)
    hybrid.collect_stats(False)
    remote = median([s["wall_ms"] for s in stats])
    whole.append(f"| FCSmall, 8 rows | torch (hyfhe.torch) | execute | {median(walls):.2f} | "
                 f"{median(walls) - remote:.3f} | {remote:.2f} |")
    # ONNX front on the same weights and inputs: hyfhe compile + hyfhe run --json.
    out = tmp / "fc_small"
    subprocess.run([str(HYFHE), "compile", "--model", str(FIXTURES / "fc_small.onnx"), "--remote",
                    "seq.0", "--calibration", str(FIXTURES / "fc_small_calibration.npy"), "--out",
                    str(out)], check=True, capture_output=True)
    runs = [run_cli("run", str(out), "--input", str(FIXTURES / "fc_small_input.npy"), "--mode",
                    "execute", "--json") for _ in range(max(3, args.repeats // 10))]
    local = median([r["stats"]["local_ms"] for r in runs])
    total = median([r["total_ms"] for r in runs])
    whole.append(f"| FCSmall, 8 rows | ONNX (tract) | execute | {total:.2f} | {local:.3f} | "
                 f"{total - local:.2f} |")

    # GPT-2 tiny: every block linear remote; one-row calls while decoding.
    import make_torch_fixtures as fx

    gpt = gpt2_tiny()
    calib = torch.from_numpy(np.load(FIXTURES / "llm" / "gpt2_calibration.npy"))
    prompt = torch.from_numpy(np.load(FIXTURES / "llm" / "gpt2_prompt.npy"))
    hybrid = HybridFHEModel(gpt, gpt2_remote(), model_name="gpt2")
    hybrid.compile_model({"input_ids": calib, "attention_mask": torch.ones_like(calib)}, n_bits=8)
    new = fx.NEW_TOKENS
    gen = dict(max_new_tokens=new, do_sample=False, pad_token_id=0,
               attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        hybrid.set_fhe_mode("execute")
        gpt.generate(prompt, **gen)  # warm
        steps = []
        for _ in range(max(2, args.repeats // 10)):
            stats = hybrid.collect_stats()
            marks = []

            class Clock:
                def put(self, _ids):
                    marks.append(time.perf_counter())

                def end(self):
                    marks.append(time.perf_counter())

            tokens = gpt.generate(prompt, streamer=Clock(), **gen)
            hybrid.collect_stats(False)
            # marks[0]: the prompt; marks[1]: prefill's token; marks[2..]: decode steps.
            decode = [(b - a) * 1e3 for a, b in zip(marks[1:-2], marks[2:-1])]
            one_row = [s for s in stats if s["rows"] == 1]
            steps.append((median(decode), sum(s["wall_ms"] for s in one_row) / len(decode),
                          one_row))
    per_token = median([s[0] for s in steps])
    remote_per_token = median([s[1] for s in steps])
    table += overhead_rows("GPT-2 tiny decode", steps[-1][2])
    whole.append(f"| GPT-2 tiny, decode | torch (HF generate) | execute | {per_token:.2f} | "
                 f"{per_token - remote_per_token:.2f} | {remote_per_token:.2f} |")
    out = tmp / "gpt2"
    cmd = [str(HYFHE), "compile", "--model", str(FIXTURES / "llm" / "gpt2_kv_dynamo.onnx"),
           "--calibration", str(FIXTURES / "llm" / "gpt2_calibration.npy"), "--out", str(out)]
    for name in gpt2_remote():
        cmd += ["--remote", name]
    subprocess.run(cmd, check=True, capture_output=True)
    runs = [run_cli("generate", str(out), "--prompt", str(FIXTURES / "llm" / "gpt2_prompt.npy"),
                    "--max-new-tokens", str(new), "--mode", "execute", "--json")
            for _ in range(max(2, args.repeats // 10))]
    rust_tokens = runs[0]["tokens"]
    per_token_r = median([r["decode_ms_per_token"] for r in runs])
    local_r = median([r["decode"]["local_ms"] / (new - 1) for r in runs])
    whole.append(f"| GPT-2 tiny, decode | ONNX (tract, KV export) | execute | {per_token_r:.2f} | "
                 f"{local_r:.2f} | {per_token_r - local_r:.2f} |")
    same = tokens[0, prompt.shape[1]:].tolist() == rust_tokens
    print("\n".join(table))
    print()
    print("\n".join(whole))
    print(f"\nGPT-2 tiny tokens, torch front {tokens[0, prompt.shape[1]:].tolist()}, ONNX front "
          f"{rust_tokens}: {'equal' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
