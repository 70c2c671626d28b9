"""A one-layer model `fc = nn.Linear(IN, OUT)` written as torch.onnx.export (TorchScript) names
it (`/fc/Gemm`, `fc.weight`, `fc.bias`), with random weights, a calibration set and inputs of
several row counts: what loadtest/job_memory.sh serves to measure a worker's memory per job.

    python3 loadtest/make_linear_model.py --in 2048 --out 2048 --rows 256 4096 --dir /tmp/mem
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="n_in", type=int, default=2048)
    p.add_argument("--out", dest="n_out", type=int, default=2048)
    p.add_argument("--rows", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--dir", required=True)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.dir, exist_ok=True)
    # Cast after scaling: under NumPy 2 a float32 array divided by a float64 scalar is float64.
    w = (rng.uniform(-1, 1, size=(a.n_out, a.n_in)) / np.sqrt(a.n_in)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, size=(a.n_out,)).astype(np.float32)
    node = helper.make_node(
        "Gemm", ["input", "fc.weight", "fc.bias"], ["output"], name="/fc/Gemm", transB=1
    )
    graph = helper.make_graph(
        [node],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", a.n_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", a.n_out])],
        [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, os.path.join(a.dir, "linear.onnx"))
    np.save(os.path.join(a.dir, "calibration.npy"), rng.uniform(-1, 1, (64, a.n_in)).astype(np.float32))
    for rows in a.rows:
        x = rng.uniform(-1, 1, (rows, a.n_in)).astype(np.float32)
        np.save(os.path.join(a.dir, f"input_{rows}.npy"), x)


if __name__ == "__main__":
    main()
