"""Concrete ML's ``HybridFHEModel`` flow over a live PyTorch model, with hyfhe's Rust core.

.. code-block:: python

    from hyfhe.torch import HybridFHEModel, HybridFHEMode

    hybrid = HybridFHEModel(model, ["fc1"], model_name="mlp")
    hybrid.compile_model(x_calibration, n_bits=8)
    y = hybrid(x, fhe="execute")                  # real FHE, client and server in this process
    hybrid.save_and_clear_private_info("compiled/mlp")   # `hyfhe serve --models compiled`

    # elsewhere, in a fresh process with the same architecture:
    hybrid = HybridFHEModel(MyModel(), ["fc1"], server_remote_address="http://host:8080",
                            model_name="mlp", api_key="...")
    hybrid.init_client(path_to_clients="compiled/mlp")   # or None: download from the server
    hybrid.set_fhe_mode(HybridFHEMode.REMOTE)
    y = hybrid.model(x)                            # the model's own forward (or HF generate)

The chosen submodules are replaced in the module tree by :class:`RemoteModule`, whose forward
hands its input to Rust: every leading dimension becomes a row (a conv's im2col rows are built
in Rust), and the result comes back as a tensor of the input's dtype and device. The model stays
an ordinary ``nn.Module``: ``model.generate(...)`` with its KV cache calls each remote module
with one row per new token.
"""

from __future__ import annotations

import difflib
import enum
import io
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import _native

__all__ = ["HybridFHEMode", "HybridFHEModel", "RemoteModule"]

#: Calibration rows kept per module with activations inside (its hidden quantizers are
#: calibrated on the integer simulation of these rows).
MAX_CALIBRATION_ROWS = 4096

#: Client-tree file holding the torch state without the remote modules' weights.
CLIENT_STATE = "torch/state_dict.pt"
#: Private-tree file holding the remote modules' float weights (owner only, never served).
PRIVATE_STATE = "torch/remote_modules.pt"
#: A backward module is named after its forward module with this suffix (`@` appears in no
#: `named_modules()` path torch builds from attributes).
BACKWARD_SUFFIX = "@grad"


class HybridFHEMode(str, enum.Enum):
    """How the remote modules compute (Concrete ML's names)."""

    #: The float module, untouched (owner only).
    TORCH = "torch"
    #: Quantized values multiplied in floating point, in the clear.
    DISABLE = "disable"
    #: The integer computation in the clear: bit-exact with ``execute``.
    SIMULATE = "simulate"
    #: Real FHE with client and server in this process.
    EXECUTE = "execute"
    #: Real FHE against a server (``server_remote_address``).
    REMOTE = "remote"

    @classmethod
    def parse(cls, mode: Union[str, "HybridFHEMode"]) -> "HybridFHEMode":
        if isinstance(mode, cls):
            return mode
        try:
            return cls(str(mode).lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"fhe mode {mode!r}: expected one of {names}") from None


class _Binding:
    """What every RemoteModule of one hybrid model shares (not an nn.Module: no parameters)."""

    def __init__(self, native: "_native.Modules") -> None:
        self.native = native
        self.session: Optional["_native.RemoteSession"] = None
        self.calibrating = False
        self.ranges: Dict[str, List[float]] = {}
        self.rows: Dict[str, List[np.ndarray]] = {}
        self.samples: Dict[str, torch.Tensor] = {}
        #: A QAT layer's input quantizer as seen during calibration: (bits, scale, zero point
        #: over unsigned codes), one per module.
        self.learned_inputs: Dict[str, tuple] = {}
        #: When a list, every remote call appends its timings (see ``HybridFHEModel.stats``).
        self.stats: Optional[List[dict]] = None


class RemoteModule(nn.Module):
    """Stands where the chosen module was; computes it in the current mode."""

    def __init__(self, module_name: str, private_module: Optional[nn.Module], binding: _Binding):
        super().__init__()
        self.module_name = module_name
        self.private_module = private_module
        self.fhe_local_mode = HybridFHEMode.TORCH
        self._binding = binding
        self._conv = isinstance(private_module, nn.Conv2d)

    def extra_repr(self) -> str:
        return f"module_name={self.module_name!r}, fhe_local_mode={self.fhe_local_mode.value}"

    @property
    def backward_name(self) -> str:
        """The name of this module's backward module (compiled with ``train=True`` only)."""
        return self.module_name + BACKWARD_SUFFIX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._binding
        mode = self.fhe_local_mode
        if b.calibrating:
            self._record(x)
        if b.calibrating or mode is HybridFHEMode.TORCH:
            if self.private_module is None:
                raise RuntimeError(
                    f"`{self.module_name}` has no float weights in this process (cleared by "
                    "save_and_clear_private_info or never loaded): use simulate/execute on the "
                    "owner's side, or remote"
                )
            return self.private_module(x)
        x = _plain(x)
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(
                f"`{self.module_name}` takes a floating-point tensor, got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if torch.is_grad_enabled() and x.requires_grad:
            # Something before this module trains (a LoRA adapter, an unfrozen layer): the
            # input gradient g·W comes from the backward module, in the mode of this forward.
            return _RemoteFunction.apply(x, self, mode)
        return self._compute(self.module_name, x, mode)

    def _compute(self, name: str, x: torch.Tensor, mode: HybridFHEMode) -> torch.Tensor:
        """Module `name` (this one or its backward) on `x` in `mode`, outside autograd."""
        b = self._binding
        t0 = time.perf_counter()
        # Zero-copy for a contiguous CPU float32 tensor; anything else is converted once.
        xn = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        want = b.stats is not None
        if mode is HybridFHEMode.REMOTE:
            if b.session is None:
                raise RuntimeError(
                    "remote mode needs a session: call init_client() (or set_fhe_mode('remote') "
                    "with server_remote_address set)"
                )
            y = b.session.forward(name, xn, want)
        else:
            y = b.native.forward(name, xn, mode.value, want)
        if want:
            y, stats = y
        out = torch.from_numpy(y).to(device=x.device, dtype=x.dtype)
        if want:
            stats.update(module=name, mode=mode.value,
                         # Images for a conv (NCHW), else every leading dimension.
                         rows=int(xn.shape[0]) if self._conv else
                         (int(np.prod(xn.shape[:-1])) if xn.ndim > 1 else 1),
                         wall_ms=(time.perf_counter() - t0) * 1e3)
            b.stats.append(stats)
        return out

    def _backward(self, g: torch.Tensor, mode: HybridFHEMode) -> torch.Tensor:
        if self.backward_name not in self._binding.native.module_names:
            if self._conv:
                raise RuntimeError(
                    f"`{self.module_name}` is a convolution: no gradient flows through a remote "
                    "convolution (backward modules are built for dense layers); keep it local or "
                    "freeze what comes before it"
                )
            raise RuntimeError(
                f"`{self.module_name}` has no backward module, so no gradient flows through it: "
                "the model's owner opts it into training with compile_model(..., train=True) "
                "(hyfhe.lora.LoraTrainer: its first n_layers_to_skip_for_backprop modules get "
                "none)"
            )
        return self._compute(self.backward_name, g, mode)

    def _record(self, x: Any) -> None:
        b = self._binding
        learned = _learned_input(self.private_module, x)
        if learned is not None:
            seen = b.learned_inputs.setdefault(self.module_name, learned)
            if seen != learned:
                raise RuntimeError(
                    f"`{self.module_name}`'s input quantizer changed between calibration batches "
                    f"({seen} then {learned}): call model.eval() before compile_model"
                )
        xd = _plain(x).detach().to(torch.float32)
        lo, hi = float(xd.min()), float(xd.max())
        r = b.ranges.setdefault(self.module_name, [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)
        if self.module_name not in b.samples:
            b.samples[self.module_name] = xd[:1].clone()
        rows = b.rows.setdefault(self.module_name, [])
        kept = sum(len(a) for a in rows)
        if kept < MAX_CALIBRATION_ROWS and xd.dim() >= 1:
            flat = xd.reshape(-1, xd.shape[-1]).cpu().numpy()
            rows.append(flat[: MAX_CALIBRATION_ROWS - kept].copy())


class _RemoteFunction(torch.autograd.Function):
    """A remote linear module inside autograd: forward as outside it; backward sends the output
    gradient `g` (quantized per row, encrypted in execute and remote) to the backward module,
    which holds `Wᵀ`, and returns `g·W`. No gradient for `W` or the bias: they stay on the
    server, frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, remote: "RemoteModule",
                mode: HybridFHEMode) -> torch.Tensor:
        ctx.remote, ctx.mode = remote, mode
        return remote._compute(remote.module_name, x, mode)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return ctx.remote._backward(g.contiguous(), ctx.mode), None, None


def _plain(x: Any) -> Any:
    """A Brevitas ``QuantTensor`` as the float tensor it stands for; anything else unchanged."""
    if type(x).__name__.endswith("QuantTensor") and hasattr(x, "value"):
        return x.value
    return x


def _brevitas_kind(m: Optional[nn.Module]) -> Optional[str]:
    """``"linear"`` or ``"conv2d"`` for Brevitas's QAT layers (without importing Brevitas)."""
    if m is None:
        return None
    # Through the MRO, so a user's subclass of QuantLinear is still a QAT layer.
    for cls in type(m).__mro__:
        if cls.__module__.startswith("brevitas."):
            kind = {"QuantLinear": "linear", "QuantConv2d": "conv2d"}.get(cls.__name__)
            if kind is not None:
                return kind
    return None


def _learned_input(m: Optional[nn.Module], x: Any) -> Optional[tuple]:
    """The input quantizer a Brevitas layer applies to ``x``: its own ``input_quant`` when
    enabled, else the quantizer of a ``QuantTensor`` it receives (a ``QuantIdentity`` before it
    with ``return_quant_tensor=True``). ``(bits, scale, zero point)`` over unsigned codes."""
    if _brevitas_kind(m) is None:
        return None
    if m.training:
        raise RuntimeError(
            f"{type(m).__name__} is in training mode: its quantizers still move; call "
            "model.eval() before compile_model"
        )
    if m.input_quant.is_quant_enabled:
        if getattr(m.input_quant, "is_narrow_range", False):
            raise ValueError(
                f"{type(m).__name__}: a narrow-range input quantizer (its lowest code unused) "
                "is not supported; use narrow_range=False for activations"
            )
        with torch.no_grad():
            q = m.input_quant(x)
    elif type(x).__name__.endswith("QuantTensor"):
        q = x
    else:
        return None
    if q.scale.numel() != 1 or q.zero_point.numel() != 1:
        raise ValueError(
            f"{type(m).__name__}: per-channel input quantizers are not supported (the client "
            "quantizes a row with one scale)"
        )
    bits = int(q.bit_width)
    zero_point = _integer_zero_point(float(q.zero_point), type(m).__name__)
    if bool(q.signed):
        # Signed codes [-2^(b-1), 2^(b-1)) are unsigned codes shifted by 2^(b-1).
        zero_point += 1 << (bits - 1)
    return (bits, float(q.scale), zero_point)


def _integer_zero_point(z: float, what: str) -> int:
    if z != round(z):
        raise ValueError(f"{what}: zero point {z} is not an integer (quantize_zero_point=False); "
                         "remote modules take integer zero points")
    return int(round(z))


def _resolve_name(known: Dict[str, nn.Module], name: str) -> str:
    """The module `name` stands for. With HF peft, the names users see after
    ``get_peft_model`` work as they are (``…c_attn.base_layer``); a LoRA layer (``…c_attn``)
    stands for its frozen base layer, since its adapters train on the client; and a name from
    before ``get_peft_model`` (without ``base_model.model.``) is found under it."""
    if name not in known or name == "":
        if name and f"base_model.model.{name}" in known:
            name = f"base_model.model.{name}"
        else:
            close = difflib.get_close_matches(name, [k for k in known if k], n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise KeyError(f"no module `{name}` in the model's named_modules(){hint}")
    m = known[name]
    if _is_peft_layer(m):
        name = f"{name}.base_layer"
    if BACKWARD_SUFFIX in name:
        raise ValueError(f"`{name}`: `{BACKWARD_SUFFIX}` names backward modules")
    return name


def _is_peft_layer(m: nn.Module) -> bool:
    """A peft tuner layer (LoRA's ``lora.Linear`` and kin) wrapping a ``base_layer``."""
    return (type(m).__module__.startswith("peft.")
            and isinstance(getattr(m, "base_layer", None), nn.Module))


def _dense_weight(name: str, m: nn.Module) -> torch.Tensor:
    """A dense module's float weight as ``out × in`` (for its backward module)."""
    if _brevitas_kind(m) == "linear":
        with torch.no_grad():
            return m.quant_weight().value.detach() if m.weight_quant.is_quant_enabled \
                else m.weight.detach()
    if isinstance(m, nn.Linear):
        return m.weight.detach()
    if _is_hf_conv1d(m):
        return m.weight.detach().t()
    raise ValueError(
        f"`{name}` ({type(m).__name__}): backward modules are built for dense layers "
        "(nn.Linear, transformers' Conv1D, Brevitas QuantLinear); select only those for training"
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # `_modules` directly: Sequential and ModuleList children are named by index.
    parent._modules[attr] = module


def _is_hf_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D without importing transformers: weight is [in, out].
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    if t is None:
        return None
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def _conv_padding(m: nn.Conv2d) -> tuple:
    kh, kw = m.kernel_size
    dh, dw = m.dilation
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0, 0, 0)
        # "same" (stride 1): torch puts the odd pixel at the end.
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, tw // 2, th - th // 2, tw - tw // 2)
    ph, pw = m.padding
    return (ph, pw, ph, pw)


def _check_conv(name: str, m: nn.Conv2d) -> None:
    if m.groups != 1 or m.padding_mode != "zeros":
        raise ValueError(
            f"`{name}`: Conv2d with groups={m.groups}, padding_mode={m.padding_mode!r}; "
            "remote convolutions take groups=1 and zero padding"
        )
    if isinstance(m.padding, str) and m.padding == "same" and tuple(m.stride) != (1, 1):
        raise ValueError(f"`{name}`: padding='same' needs stride 1")


class _Holder(nn.Module):
    """Names a block `m` in its own ONNX export, so the chain compiler finds it by path."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class HybridFHEModel:
    """A PyTorch model whose ``module_names`` run on encrypted activations.

    Arguments follow Concrete ML's ``HybridFHEModel``. ``verbose`` > 0 prints what compiling
    decided for each module. ``api_key`` defaults to ``$HYFHE_API_KEY``; ``ca_cert`` (a PEM file,
    default ``$HYFHE_CA_CERT``) is trusted besides the system's roots for an ``https://`` server.
    ``key`` picks the session's packing keys: ``"full"`` (every encoding, about 107 MiB uploaded)
    or ``"lean"`` (the automorphism keys alone, about 1 MiB; linear modules only, best for one
    sample or one token per call).
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: Union[str, Sequence[str]],
        server_remote_address: Optional[str] = None,
        model_name: str = "model",
        verbose: int = 0,
        api_key: Optional[str] = None,
        ca_cert: Optional[str] = None,
        key: str = "full",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if key not in ("full", "lean"):
            raise ValueError(f"key must be 'full' or 'lean', got {key!r}")
        names = [module_names] if isinstance(module_names, str) else list(module_names)
        if not names:
            raise ValueError("no module selected: pass names from model.named_modules()")
        known = dict(model.named_modules())
        names = [_resolve_name(known, name) for name in names]
        for name in names:
            if isinstance(known[name], RemoteModule):
                raise ValueError(f"`{name}` is already a remote module")
        for name in names:
            inside = [o for o in names if name.startswith(o + ".")]
            if inside:
                raise ValueError(f"`{name}` is inside `{inside[0]}`: select each module once")
        if len(set(names)) != len(names):
            raise ValueError("a module is selected twice")
        self.model = model
        self.module_names = names
        self.model_name = model_name
        self.server_remote_address = server_remote_address
        self.verbose = verbose
        self.api_key = api_key if api_key is not None else os.environ.get("HYFHE_API_KEY")
        self.ca_cert = ca_cert if ca_cert is not None else os.environ.get("HYFHE_CA_CERT")
        self.key = key
        self._binding = _Binding(_native.Modules(model_name))
        self.remote_modules: Dict[str, RemoteModule] = {}
        for name in names:
            remote = RemoteModule(name, known[name], self._binding)
            _set_submodule(model, name, remote)
            self.remote_modules[name] = remote
        self.fhe_mode = HybridFHEMode.TORCH
        self.reports: Dict[str, dict] = {}

    # -- compile ---------------------------------------------------------------------------------

    def compile_model(
        self,
        x: Any,
        n_bits: Union[int, Dict[str, int]] = 8,
        rounding_threshold_bits: Optional[Union[int, Dict[str, Any]]] = None,
        p_error: Optional[float] = None,
        device: str = "cpu",
        configuration: Any = None,
        use_dynamic_quantization: bool = False,
        precision: str = "exact",
        train: Union[bool, Iterable[str]] = False,
    ) -> None:
        """Calibrate on ``x`` (run through the float model), then quantize and plan every remote
        module. ``n_bits`` is the width of inputs and weights (weights at most 8);
        ``use_dynamic_quantization`` quantizes each row by its own range at run time (linear
        modules). ``p_error``, ``device`` and ``configuration`` are Concrete ML's: they do not
        apply here (warned and ignored); ``precision`` is hyfhe's ("exact", "compact").

        ``train=True`` is the owner opting this model into training (LoRA and the like): each
        remote module also gets a backward module, ``<name>@grad``, holding ``Wᵀ``, which gives
        the input gradient ``g·W`` (``g`` quantized per row to ``n_bits`` at run time). It is
        served like any module; it reveals ``W`` in ``out`` rows (see each report's
        ``exposure``), and its rows count against the forward module's row budget. ``train``
        may instead name the remote modules that get one (the others stay inference-only).
        Compiling again replaces every module, backward modules included."""
        bits = _one_width(n_bits)
        rounding = _rounding_bits(rounding_threshold_bits)
        if p_error is not None:
            warnings.warn(
                "p_error does not apply: linear modules are exact, and a module with activations "
                "inside reports its one-step rate (see the compile report)",
                stacklevel=2,
            )
        if device != "cpu":
            warnings.warn(f"device={device!r}: hyfhe evaluates FHE on the CPU", stacklevel=2)
        if configuration is not None:
            warnings.warn("configuration is Concrete's compiler setting: ignored", stacklevel=2)
        b = self._binding
        b.ranges.clear()
        b.rows.clear()
        b.samples.clear()
        b.learned_inputs.clear()
        b.calibrating = True
        try:
            with torch.no_grad():
                self._call(x)
        finally:
            b.calibrating = False
        trained = self._trained(train)
        for name in trained:
            remote = self.remote_modules[name]
            if remote.private_module is not None:
                _dense_weight(name, remote.private_module)  # refuse before compiling
        # A recompile replaces everything: a backward module left from an earlier
        # compile_model(train=True) must not outlive the owner's opting out.
        self._binding.native.clear()
        self.reports.clear()
        for name, remote in self.remote_modules.items():
            if remote.private_module is None:
                raise RuntimeError(f"`{name}` has no float weights here: compile on the owner's side")
            if name not in b.ranges and not use_dynamic_quantization:
                raise RuntimeError(f"calibration never reached `{name}`: is it used by forward?")
            report = self._compile_one(name, remote.private_module, bits, rounding,
                                       use_dynamic_quantization, precision)
            self.reports[name] = report
            if self.verbose:
                print(f"[hyfhe] {name}: {report}")
            if name in trained:
                grad = remote.backward_name
                weight = _numpy(_dense_weight(name, remote.private_module))
                report = self._binding.native.compile_backward(grad, name, weight, bits,
                                                               precision)
                self.reports[grad] = report
                if self.verbose:
                    print(f"[hyfhe] {grad}: {report}")
        self.set_fhe_mode(HybridFHEMode.DISABLE if self.fhe_mode is HybridFHEMode.TORCH
                          else self.fhe_mode)

    def _trained(self, train: Union[bool, Iterable[str]]) -> List[str]:
        """The remote modules that get a backward module, from ``compile_model``'s ``train``."""
        if isinstance(train, bool):
            return list(self.remote_modules) if train else []
        if isinstance(train, str):
            train = [train]
        known = dict(self.model.named_modules())
        names = []
        for given in train:
            name = _resolve_name(known, given)
            if name not in self.remote_modules:
                raise ValueError(f"train names `{given}`, which is not a remote module of this "
                                 f"model (remote: {sorted(self.remote_modules)[:5]})")
            names.append(name)
        return names

    def _compile_one(self, name: str, m: nn.Module, bits: int, rounding: Optional[int],
                     dynamic: bool, precision: str) -> dict:
        native = self._binding.native
        rng = self._binding.ranges.get(name)
        rng = None if rng is None else (rng[0], rng[1])
        if _brevitas_kind(m) is not None and m.weight_quant.is_quant_enabled:
            return self._compile_brevitas(name, m, bits, rng, dynamic, precision)
        if isinstance(m, nn.Linear):
            return native.compile_linear(name, _numpy(m.weight), _numpy(m.bias), rng, bits,
                                         dynamic, precision)
        if _is_hf_conv1d(m):
            return native.compile_linear(name, _numpy(m.weight.t()), _numpy(m.bias), rng, bits,
                                         dynamic, precision)
        if isinstance(m, nn.Conv2d):
            _check_conv(name, m)
            return native.compile_conv2d(name, _numpy(m.weight), _numpy(m.bias), tuple(m.stride),
                                         _conv_padding(m), tuple(m.dilation), rng, bits, dynamic,
                                         precision)
        if dynamic:
            raise ValueError(
                f"`{name}` ({type(m).__name__}) has activations inside: its input quantizer must "
                "be static, drop use_dynamic_quantization"
            )
        return self._compile_block(name, m, bits, rounding)

    def _compile_brevitas(self, name: str, m: nn.Module, bits: int, rng: Optional[tuple],
                          dynamic: bool, precision: str) -> dict:
        """A Brevitas QuantLinear/QuantConv2d with the integers and scales it learned."""
        if dynamic:
            raise ValueError(f"`{name}` is a QAT layer: it brings its own input quantizer, "
                             "drop use_dynamic_quantization")
        if m.output_quant.is_quant_enabled:
            raise ValueError(
                f"`{name}` quantizes its output (output_quant): the remote module returns the "
                "dequantized accumulator; put a QuantIdentity after it instead"
            )
        with torch.no_grad():
            qw = m.quant_weight()
        wbits = int(qw.bit_width)
        if not bool(qw.signed) or not 2 <= wbits <= 8:
            raise ValueError(
                f"`{name}`: {'signed' if bool(qw.signed) else 'unsigned'} {wbits}-bit weights; "
                "remote modules take signed weights of 2 to 8 bits"
            )
        out = m.weight.shape[0]
        scale = qw.scale.detach().to(torch.float32).flatten()
        zero_point = qw.zero_point.detach().to(torch.float32).flatten()
        if scale.numel() not in (1, out):
            raise ValueError(f"`{name}`: {scale.numel()} weight scales; per tensor or per output "
                             f"channel ({out}) only")
        if zero_point.numel() != scale.numel():
            zero_point = zero_point.expand(scale.numel()) if zero_point.numel() == 1 else zero_point
        codes = np.ascontiguousarray(qw.int().detach().cpu().to(torch.int8).numpy())
        if m.bias is not None and m.bias_quant.is_quant_enabled:
            warnings.warn(f"`{name}`: its bias is added in floating point (bias_quant's rounding "
                          "of it is not reproduced)", stacklevel=3)
        learned = self._binding.learned_inputs.get(name)
        if learned is None:
            warnings.warn(
                f"`{name}` has no input quantizer and got float inputs: its input is quantized "
                f"to n_bits={bits} from calibration (add input_quant or a QuantIdentity before "
                "it to use a learned one)",
                stacklevel=3,
            )
        conv = None
        if _brevitas_kind(m) == "conv2d":
            _check_conv(name, m)
            conv = (tuple(m.stride), _conv_padding(m), tuple(m.dilation))
        return self._binding.native.compile_learned(
            name, codes, wbits, scale.tolist(),
            [_integer_zero_point(z, f"`{name}` weights") for z in zero_point.tolist()],
            _numpy(m.bias), learned, rng, bits, conv, precision)

    def _compile_block(self, name: str, m: nn.Module, bits: int, rounding: Optional[int]) -> dict:
        """A module with activations inside: exported alone, in memory, into the chain compiler."""
        b = self._binding
        sample = b.samples[name]
        rows = np.concatenate(b.rows[name], axis=0)
        buf = io.BytesIO()
        holder = _Holder(m).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(holder, (sample,), buf, input_names=["x"], output_names=["y"],
                              dynamo=False, opset_version=17)
        return b.native.compile_onnx(name, buf.getvalue(), "m", rows, bits, rounding)

    # -- run -------------------------------------------------------------------------------------

    def collect_stats(self, on: bool = True) -> List[dict]:
        """Record every remote module call from now on (``on=False`` stops): the list returned
        fills with one dict per call: ``module``, ``mode``, ``rows`` (images for a conv),
        ``wall_ms`` (the call as
        Python sees it, tensor in to tensor out), ``rust_ms`` (the same call inside Rust, what
        a Rust client pays), the Rust stage times (``quantize_ms``, ``encrypt_ms``, ``fhe_ms``,
        ``decrypt_ms``, ``dequantize_ms``, ``clear_ms``), ``requests`` and wire bytes."""
        self._binding.stats = [] if on else None
        return self._binding.stats if on else []

    def set_fhe_mode(self, hybrid_fhe_mode: Union[str, HybridFHEMode]) -> None:
        """Switch every remote module to ``hybrid_fhe_mode``. Remote opens a session on first use."""
        mode = HybridFHEMode.parse(hybrid_fhe_mode)
        native = self._binding.native
        if mode in (HybridFHEMode.DISABLE, HybridFHEMode.SIMULATE, HybridFHEMode.EXECUTE):
            if not native.module_names:
                raise RuntimeError(f"mode {mode.value} needs compile_model() first")
            if not native.has_server():
                raise RuntimeError(
                    f"mode {mode.value} needs the quantized weights, which this process does not "
                    "hold (cleared by save_and_clear_private_info, or a client): use remote"
                )
        if mode is HybridFHEMode.REMOTE and self._binding.session is None:
            self.init_client()
        if mode is HybridFHEMode.TORCH:
            missing = [n for n, r in self.remote_modules.items() if r.private_module is None]
            if missing:
                raise RuntimeError(f"torch mode needs the float weights of {missing}, cleared here")
        for remote in self.remote_modules.values():
            remote.fhe_local_mode = mode
        self.fhe_mode = mode

    def forward(self, x: Any, fhe: Union[str, HybridFHEMode] = "disable") -> Any:
        """The model's forward with its remote modules in mode ``fhe``."""
        mode = HybridFHEMode.parse(fhe)
        if mode is not self.fhe_mode:
            self.set_fhe_mode(mode)
        return self._call(x)

    __call__ = forward

    def _call(self, x: Any) -> Any:
        if isinstance(x, tuple):
            return self.model(*x)
        if isinstance(x, dict):
            return self.model(**x)
        return self.model(x)

    # -- artefacts and clients -------------------------------------------------------------------

    def save_and_clear_private_info(self, path: Union[str, Path], via_mlir: bool = True,
                                    force: bool = True) -> None:
        """Write ``path/client`` (specs and the torch state without the remote weights),
        ``path/server`` (what ``hyfhe serve`` and workers load) and ``path/private`` (the remote
        modules' float weights, never served), then drop the remote weights from this process.
        ``force`` replaces those three trees if present. ``via_mlir`` is Concrete ML's: ignored."""
        del via_mlir
        native = self._binding.native
        if not native.has_server():
            raise RuntimeError("nothing to save: compile_model() first (or already cleared)")
        prefixes = tuple(f"{n}." for n in self.module_names)
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefixes)}
        private = {n: r.private_module.state_dict() for n, r in self.remote_modules.items()
                   if r.private_module is not None}
        native.save(str(path), {CLIENT_STATE: _torch_bytes(state)},
                    {PRIVATE_STATE: _torch_bytes(private)}, force)
        for remote in self.remote_modules.values():
            remote.private_module = None
        if self.fhe_mode is not HybridFHEMode.REMOTE:
            for remote in self.remote_modules.values():
                remote.fhe_local_mode = HybridFHEMode.REMOTE
            self.fhe_mode = HybridFHEMode.REMOTE

    def init_client(self, path_to_clients: Optional[Union[str, Path]] = None,
                    path_to_keys: Optional[Union[str, Path]] = None) -> None:
        """Open a session on ``server_remote_address``: load the client tree from
        ``path_to_clients`` (or download it from the server) unless this process compiled the
        model, load its torch state into the model, generate keys and upload the evaluation keys.
        ``path_to_keys`` does not apply (keys live for the session; warned and ignored)."""
        if path_to_keys is not None:
            warnings.warn("path_to_keys: hyfhe generates keys per session; ignored", stacklevel=2)
        if not self.server_remote_address:
            raise RuntimeError("remote mode needs server_remote_address (http:// or https://)")
        if not self.api_key:
            raise RuntimeError("remote mode needs an api_key (or $HYFHE_API_KEY)")
        native = self._binding.native
        if not native.module_names or path_to_clients is not None:
            native = self._load_client(path_to_clients)
        forward = [n for n in native.module_names if not n.endswith(BACKWARD_SUFFIX)]
        if sorted(forward) != sorted(self.module_names):
            raise ValueError(
                f"the compiled model has remote modules {forward}, this hybrid model "
                f"selects {self.module_names}"
            )
        self.close()
        self._binding.session = _native.RemoteSession(
            native, self.server_remote_address, self.api_key, self.ca_cert, self.key)

    def _load_client(self, path: Optional[Union[str, Path]]) -> "_native.Modules":
        if path is None:
            path = tempfile.mkdtemp(prefix=f"hyfhe-{self.model_name}-")
            _native.download_client(self.server_remote_address, self.api_key, self.model_name,
                                    str(path), self.ca_cert)
        native = _native.Modules.load(str(path), "client")
        if native.name != self.model_name:
            raise ValueError(f"{path} holds model `{native.name}`, not `{self.model_name}`")
        state = native.client_file(CLIENT_STATE)
        if state is not None:
            loaded = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)
            result = self.model.load_state_dict(loaded, strict=False)
            prefixes = tuple(f"{n}." for n in self.module_names)
            missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"the client state does not fit this model: missing {missing[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}"
                )
        self._binding.native = native
        # A client never holds the remote weights: whatever this instance's modules were
        # initialised with is not the owner's, so torch mode must refuse rather than use it.
        for remote in self.remote_modules.values():
            remote.private_module = None
        return native

    def close(self) -> None:
        """Close the remote session, if any (its keys leave the server at once)."""
        session, self._binding.session = self._binding.session, None
        if session is not None:
            try:
                session.close()
            except _native.HyfheError as e:
                warnings.warn(f"closing the session: {e}", stacklevel=2)

    def __del__(self) -> None:  # best effort: a session's keys otherwise live until their TTL
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _one_width(n_bits: Union[int, Dict[str, int]]) -> int:
    if isinstance(n_bits, dict):
        widths = set(n_bits.values())
        if len(widths) != 1:
            raise ValueError(
                f"n_bits={n_bits}: hyfhe quantizes a module's inputs and weights with one width"
            )
        n_bits = widths.pop()
    if not isinstance(n_bits, int) or not 2 <= n_bits <= 8:
        raise ValueError(f"n_bits={n_bits!r}: an integer in 2..=8")
    return n_bits


def _rounding_bits(r: Optional[Union[int, Dict[str, Any]]]) -> Optional[int]:
    if isinstance(r, dict):
        if "n_bits" not in r:
            raise ValueError(f"rounding_threshold_bits={r}: a dict needs `n_bits`")
        r = r["n_bits"]
    return r
