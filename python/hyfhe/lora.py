"""Fine-tuning with LoRA while the frozen base layers stay on the server, encrypted.

The client trains its adapters in the clear; every frozen dense layer is a remote module, and
the gradient that flows back through it (``g·W``) is computed by its backward module, also on
encrypted values. Shaped like Concrete ML's ``LoraTrainer`` for people coming from there:

.. code-block:: python

    from peft import LoraConfig, get_peft_model
    from hyfhe.lora import LoraTrainer

    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], ...))
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), 1e-3)
    trainer = LoraTrainer(model, optimizer, model_name="gpt2-lora")
    trainer.compile(calibration_batch, n_bits=8)
    history = trainer.train(loader, num_epochs=1, fhe="simulate")   # or execute, remote
    trainer.save_and_clear_private_info("compiled/gpt2-lora")      # `hyfhe serve` it

A plain training loop works as well: :class:`~hyfhe.torch.HybridFHEModel` with
``compile_model(..., train=True)``, then ``loss.backward()`` as usual.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .torch import BACKWARD_SUFFIX, HybridFHEMode, HybridFHEModel, _is_hf_conv1d

__all__ = ["LoraTrainer", "frozen_dense_modules"]


def frozen_dense_modules(model: nn.Module, n_last_layers_local: int = 1) -> List[str]:
    """The names of ``model``'s frozen dense layers (``nn.Linear``, transformers' ``Conv1D``)
    outside LoRA adapters, in module order, without the last ``n_last_layers_local`` (an LM
    head, often tied to the embedding the client holds anyway).

    A dense layer whose weight is frozen but whose bias trains (peft ``bias="all"`` or
    ``"lora_only"``) is refused: it could only stay local, which would put its frozen weight in
    the client's hands in the clear."""
    names = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or _is_hf_conv1d(m)) or ".lora_" in name:
            continue
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if weight is not None and weight.requires_grad:
            continue
        if isinstance(bias, torch.Tensor) and bias.requires_grad:
            raise ValueError(
                f"`{name}`'s bias trains while its weight is frozen (peft bias=\"all\" or "
                "\"lora_only\"?): a remote module is frozen as a whole, and keeping it local "
                "would give the client its weight in the clear; use bias=\"none\" or pass "
                "module_names yourself"
            )
        names.append(name)
    if n_last_layers_local > 0:
        names = names[: max(0, len(names) - n_last_layers_local)]
    if not names:
        raise ValueError("no frozen dense layer to make remote: freeze the base model first "
                         "(get_peft_model does) or pass module_names")
    return names


class LoraTrainer:
    """Train what requires grad in ``model`` (LoRA adapters) with its frozen dense layers remote.

    ``loss_fn`` is ``loss_fn(output, target)`` for ``(x, target)`` batches; for dict batches
    (transformers' ``input_ids``/``labels``) it defaults to the model's own ``.loss``.
    ``module_names`` defaults to :func:`frozen_dense_modules` (every frozen dense layer but the
    last ``n_last_layers_local``). As in Concrete ML, the first
    ``n_layers_to_skip_for_backprop`` remote modules get no backward module: nothing trains
    before the first layer of a transformer, so its gradient is never needed, and a backward
    module not compiled is one the server does not expose. The other arguments are
    :class:`~hyfhe.torch.HybridFHEModel`'s.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        lr_scheduler: Any = None,
        module_names: Optional[Sequence[str]] = None,
        n_layers_to_skip_for_backprop: int = 1,
        n_last_layers_local: int = 1,
        server_remote_address: Optional[str] = None,
        model_name: str = "lora",
        api_key: Optional[str] = None,
        ca_cert: Optional[str] = None,
        logging_steps: int = 0,
        verbose: int = 0,
    ) -> None:
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("nothing in the model requires grad: add adapters (get_peft_model) "
                             "or unfreeze what should train")
        names = list(module_names) if module_names is not None else \
            frozen_dense_modules(model, n_last_layers_local)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.lr_scheduler = lr_scheduler
        self.logging_steps = logging_steps
        if n_layers_to_skip_for_backprop < 0:
            raise ValueError("n_layers_to_skip_for_backprop must be 0 or more")
        self.n_layers_to_skip_for_backprop = n_layers_to_skip_for_backprop
        self.hybrid_model = HybridFHEModel(model, names, server_remote_address, model_name,
                                           verbose, api_key, ca_cert)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        remote = tuple(f"{n}." for n in self.hybrid_model.module_names)
        inside = [n for n in trainable if n.startswith(remote)]
        if inside:
            raise ValueError(f"{inside[:3]} train but belong to remote modules (frozen on the "
                             "server): freeze them or leave those modules local")
        #: One dict per step (see :meth:`train`).
        self.history: List[dict] = []

    def compile(self, inputset: Any, n_bits: int = 8, use_dynamic_quantization: bool = True,
                precision: str = "exact") -> None:
        """Quantize and plan every remote module and its backward module (``train=True``).
        Inputs are quantized per row at run time by default: activations move as the adapters
        train, and a range calibrated before training would clip them."""
        self.hybrid_model.compile_model(inputset, n_bits=n_bits,
                                        use_dynamic_quantization=use_dynamic_quantization,
                                        precision=precision,
                                        train=self.hybrid_model.module_names[
                                            self.n_layers_to_skip_for_backprop:])

    def loss(self, batch: Any) -> torch.Tensor:
        """The loss of one batch through the hybrid model in its current mode."""
        if isinstance(batch, dict):
            out = self.model(**batch)
            if self.loss_fn is None:
                if getattr(out, "loss", None) is None:
                    raise ValueError("the model returned no loss for this batch: give `labels` "
                                     "or a loss_fn")
                return out.loss
            return self.loss_fn(out, batch.get("labels"))
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("a batch is a dict of model inputs or a pair (x, target)")
        if self.loss_fn is None:
            raise ValueError("(x, target) batches need a loss_fn")
        x, target = batch
        return self.loss_fn(self.model(x), target)

    def train(self, train_loader: Iterable[Any], num_epochs: int = 1,
              fhe: Union[str, HybridFHEMode] = "simulate", device: str = "cpu") -> List[dict]:
        """Train for ``num_epochs`` over ``train_loader`` with the remote modules in mode ``fhe``.

        Returns (and appends to :attr:`history`) one dict per step: ``loss``, ``forward_ms``,
        ``backward_ms``, ``optimizer_ms``, what the remote modules did forward and backward
        (``remote_forward_ms``/``remote_backward_ms``, ``requests``, ``upload_bytes`` and
        ``download_bytes`` per direction) and the process's resident memory after the step
        (``rss_mib``)."""
        if device != "cpu":
            raise ValueError(f"device={device!r}: hyfhe trains on the CPU")
        self.hybrid_model.set_fhe_mode(fhe)
        self.model.train()
        steps: List[dict] = []
        for epoch in range(num_epochs):
            for batch in train_loader:
                steps.append(self._step(epoch, len(self.history) + len(steps), batch))
                if self.logging_steps and len(steps) % self.logging_steps == 0:
                    s = steps[-1]
                    print(f"[hyfhe] step {s['step']} epoch {epoch}: loss {s['loss']:.4f} "
                          f"({s['forward_ms']:.0f} ms forward, {s['backward_ms']:.0f} ms "
                          f"backward)")
        self.history.extend(steps)
        return steps

    def _step(self, epoch: int, step: int, batch: Any) -> dict:
        calls = self.hybrid_model.collect_stats()
        try:
            t0 = time.perf_counter()
            loss = self.loss(batch)
            t1 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            t3 = time.perf_counter()
        finally:
            self.hybrid_model.collect_stats(False)
        record = {"step": step, "epoch": epoch, "loss": float(loss.detach()),
                  "forward_ms": (t1 - t0) * 1e3, "backward_ms": (t2 - t1) * 1e3,
                  "optimizer_ms": (t3 - t2) * 1e3, "rss_mib": _rss_mib()}
        for direction, backward in (("forward", False), ("backward", True)):
            mine = [c for c in calls if c["module"].endswith(BACKWARD_SUFFIX) == backward]
            record[f"remote_{direction}_ms"] = sum(c["wall_ms"] for c in mine)
            record[f"{direction}_requests"] = sum(c.get("requests", 0) for c in mine)
            record[f"{direction}_rows"] = sum(c["rows"] for c in mine)
            record[f"{direction}_upload_bytes"] = sum(c.get("upload_bytes", 0) for c in mine)
            record[f"{direction}_download_bytes"] = sum(c.get("download_bytes", 0) for c in mine)
        return record

    def save_and_clear_private_info(self, path: Union[str, Path]) -> None:
        """See :meth:`HybridFHEModel.save_and_clear_private_info`; the trained adapters are in
        the client tree's torch state."""
        self.hybrid_model.save_and_clear_private_info(path)


def _rss_mib() -> float:
    """This process's resident memory now (Linux), in MiB; 0 where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0
