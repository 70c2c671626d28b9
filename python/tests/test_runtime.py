"""The native calls release the GIL, stop on Ctrl-C and work in forked DataLoader workers."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
from torch.utils.data import DataLoader, Dataset

from hyfhe.torch import HybridFHEModel

from conftest import fc_small_hybrid


def test_another_python_thread_keeps_running_during_a_long_forward():
    _, hybrid = fc_small_hybrid()
    ticks, stop = [0], threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        start = time.perf_counter()
        # The first execute call generates the keys: seconds of native work.
        hybrid(torch.randn(4, 10), fhe="execute")
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        t.join()
    assert elapsed > 0.5, "the call was expected to take a while"
    # With the GIL held by the call, the counter would advance only in the interpreter's
    # switch intervals before the call began.
    assert ticks[0] > 100_000, f"{ticks[0]} iterations in {elapsed:.1f} s: the GIL was held"


def test_ctrl_c_interrupts_a_long_forward():
    _, hybrid = fc_small_hybrid()
    # What a terminal's Ctrl-C meets: Python's default handler. A runner started in the
    # background of a non-interactive shell inherits SIGINT ignored, so set it here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    try:
        hybrid(torch.randn(4, 10), fhe="execute")  # key generation: seconds
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    finally:
        elapsed = time.perf_counter() - start
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert interrupted, "Ctrl-C did not interrupt the call"
    assert elapsed < 1.5, f"the interrupt took {elapsed:.2f} s to arrive"


class Rows(Dataset):
    def __init__(self, hybrid: HybridFHEModel) -> None:
        self.hybrid = hybrid

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        torch.manual_seed(i)
        with torch.no_grad():
            return self.hybrid(torch.randn(1, 10), fhe="simulate")[0]


def test_a_dataloader_with_forked_workers_after_the_client_was_used():
    _, hybrid = fc_small_hybrid()
    with torch.no_grad():
        hybrid(torch.randn(2, 10), fhe="execute")  # this process's pool and keys exist now
    expected = torch.stack([Rows(hybrid)[i] for i in range(8)])
    loader = DataLoader(Rows(hybrid), batch_size=4, num_workers=2,
                        multiprocessing_context="fork")
    got = torch.cat(list(loader))
    assert torch.equal(got, expected)
    # And the parent still runs after its children.
    hybrid(torch.randn(2, 10), fhe="execute")
