"""Brevitas QAT models through the torch front: execute against the QAT model's own output.

    target/pyenv/bin/python python/bench/qat.py

An MLP and a CNN on the digits fixtures (tests/fixtures/digits_test_*: the first 240 labelled
images train, the other 120 evaluate), trained with Brevitas at 4 and 8 bits for a few hundred
steps, every QuantLinear/QuantConv2d remote. Prints a Markdown table (BENCHMARKS.md, "Brevitas
QAT models"): the QAT model's accuracy, hyfhe's in execute mode, how often their top-1 agree, the
largest logit difference, and whether execute equals simulate bit for bit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hyfhe.torch import HybridFHEModel

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
# The same Brevitas models the ONNX front's QAT fixtures are trained from.
sys.path.insert(0, str(FIXTURES))
from make_qat import BrevitasCnn as Cnn, BrevitasMlp as Mlp  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    images = torch.from_numpy(np.load(FIXTURES / "digits_test_images.npy"))
    labels = torch.from_numpy(np.load(FIXTURES / "digits_test_y.npy"))
    x_train, y_train, x_eval, y_eval = images[:240], labels[:240], images[240:], labels[240:]
    rows = ["| model | bits (weights, activations) | QAT model accuracy | hyfhe execute accuracy | "
            "top-1 agreement | max \\|execute − QAT\\| | execute == simulate | execute s |",
            "|---|---|---:|---:|---:|---:|---|---:|"]
    for name, cls, remote in (("MLP 64-64-10", Mlp, ["fc1", "fc2"]),
                              ("CNN conv3x3(8)-fc", Cnn, ["conv", "fc"])):
        for bits in (4, 8):
            torch.manual_seed(bits)
            model = cls(bits)
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            model.train()
            for _ in range(300):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x_train), y_train).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                qat = model(x_eval)
            hybrid = HybridFHEModel(model, remote, model_name=f"qat_{bits}")
            hybrid.compile_model(x_train)
            with torch.no_grad():
                t0 = time.perf_counter()
                execute = hybrid(x_eval, fhe="execute")
                seconds = time.perf_counter() - t0
                simulate = hybrid(x_eval, fhe="simulate")
            acc = lambda y: 100.0 * float((y.argmax(1) == y_eval).float().mean())  # noqa: E731
            agree = 100.0 * float((execute.argmax(1) == qat.argmax(1)).float().mean())
            rows.append(f"| {name} | {bits}, {bits} | {acc(qat):.1f} % | {acc(execute):.1f} % | "
                        f"{agree:.1f} % | {float((execute - qat).abs().max()):.2e} | "
                        f"{'yes' if torch.equal(execute, simulate) else 'NO'} | {seconds:.1f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
