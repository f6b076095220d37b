"""Fused LayerNorm(+affine) + activation on CPU: one native pass per row instead of inductor's LayerNorm kernel
plus a separate Sleef-exp ELU.

``layer_norm_act(x, weight, bias, eps, activation)`` is the opaque custom op ``polygrad_fast::layer_norm_act``
(activation 'none', 'relu' or 'elu' with alpha 1) running the C++ kernel of ``polygrad_fast._cpu_ops``
(csrc/cpu_ops/layer_norm_act.cpp) on contiguous CPU bf16/fp32 tensors, on torch's OpenMP threads
(``torch.get_num_threads()``); anything else (other dtypes or devices, extension missing) runs the plain torch
reference ``layer_norm_act_reference``. Inside ``torch.compile`` the op stays opaque (its fake returns an empty
tensor of x's shape).

``FusedLayerNormAct`` is an ``nn.LayerNorm`` that applies the activation too and shares the original module's
Parameters (state dict unchanged); ``fuse_layer_norm_acts(module)`` swaps every ``LayerNorm`` directly followed by
``ELU()`` (alpha 1) or ``ReLU()`` in an ``nn.Sequential`` for it (the activation's slot becomes ``nn.Identity()``,
so indices and state-dict keys stay). Its forward uses plain torch whenever the native kernel cannot be used or
autograd is needed, so it is always correct.

Numerics: mean and biased variance in fp32 with two passes over the row (like torch), rstd = 1/sqrt(var + eps);
ELU uses a range-reduced polynomial expm1 (about 1 fp32 ulp); bf16 outputs round to nearest even like torch. The
result is within fp32 rounding of torch (reduction order differs), so bf16 outputs can differ from torch's by one
bf16 ulp on rare elements near a rounding boundary. Set POLYGRAD_FAST_NO_NATIVE=1 to pretend the extension is absent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._native import CPU_OPS, extension, extension_error

__all__ = ["ACTIVATIONS", "FusedLayerNormAct", "available", "fuse_layer_norm_acts", "layer_norm_act",
           "layer_norm_act_reference", "native_error"]

ACTIVATIONS = ("none", "relu", "elu")
_NATIVE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}

_module = extension(CPU_OPS)  # loaded now, not while dynamo traces a forward (an import there breaks the graph)
_AVAILABLE = _module is not None


def available() -> bool:
    """True when the native fused kernel (polygrad_fast._cpu_ops) is importable."""
    return _AVAILABLE


def native_error() -> str | None:
    """Why the native kernel is unavailable (None when it loaded)."""
    return extension_error(CPU_OPS)


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"layer_norm_act: unknown activation {activation!r} (expected one of {ACTIVATIONS})")
    if x.dim() < 1:
        raise ValueError("layer_norm_act: x must have at least one dimension")
    width = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != width:
            raise ValueError(f"layer_norm_act: {name} has shape {tuple(p.shape)}, expected ({width},) "
                             f"(the width of x's last dimension)")
        if p.dtype != x.dtype:
            raise ValueError(f"layer_norm_act: {name} dtype {p.dtype} differs from x dtype {x.dtype}")
        if p.device != x.device:
            raise ValueError(f"layer_norm_act: {name} is on {p.device}, x on {x.device}")


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "elu":
        return F.elu(y)
    return y


def layer_norm_act_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                             activation: str) -> torch.Tensor:
    """Plain torch: F.layer_norm over the last dimension, then the activation."""
    _check(x, weight, bias, activation)
    return _activate(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), activation)


def _native_ok(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and _AVAILABLE
            and all(p is None or p.is_contiguous() for p in (weight, bias)))


def _layer_norm_act_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                         activation: str) -> torch.Tensor:
    _check(x, weight, bias, activation)
    if not _native_ok(x, weight, bias):
        return layer_norm_act_reference(x, weight, bias, eps, activation).contiguous()
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    if rows and width:
        _module.layer_norm_act(x.data_ptr(), out.data_ptr(), 0 if weight is None else weight.data_ptr(),
                               0 if bias is None else bias.data_ptr(), rows, width, width, width,
                               _NATIVE_DTYPES[x.dtype], float(eps), activation, torch.get_num_threads())
    return out


# Registered with torch.library.Library (plain registration: ~6 vs ~15 µs of dispatch per call with the custom_op
# decorator), on this module's own fragment of the polygrad_fast namespace.
_LIB = torch.library.Library("polygrad_fast", "FRAGMENT")
_LIB.define("layer_norm_act(Tensor x, Tensor? weight, Tensor? bias, float eps, str activation) -> Tensor")
_LIB.impl("layer_norm_act", _layer_norm_act_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("polygrad_fast::layer_norm_act")
def _(x, weight, bias, eps, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# layer_norm_act(x, weight, bias, eps, activation): act(layer_norm(x) * weight + bias) over x's last dimension
# (weight/bias may be None), same dtype as x. Native on CPU bf16/fp32 (x made contiguous first), plain torch otherwise.
# No autograd formula: use ``FusedLayerNormAct``, which falls back to torch when gradients are needed.
layer_norm_act = torch.ops.polygrad_fast.layer_norm_act


class FusedLayerNormAct(nn.LayerNorm):
    """LayerNorm over the last dimension followed by an activation ('none', 'relu' or 'elu' with alpha 1), through
    the fused native op when it applies; build it with ``from_layer_norm`` (Parameters shared, names unchanged)."""

    activation: str

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, activation: str) -> "FusedLayerNormAct":
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedLayerNormAct: unknown activation {activation!r} (expected one of {ACTIVATIONS})")
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"FusedLayerNormAct: only a LayerNorm over the last dimension can be fused, got "
                             f"normalized_shape={tuple(ln.normalized_shape)}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = ln.normalized_shape, ln.eps, ln.elementwise_affine
        new.weight, new.bias = ln.weight, ln.bias  # shared Parameters (or None): names and state dict unchanged
        new.activation = activation
        new.train(ln.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (w is not None and w.requires_grad) or (b is not None and b.requires_grad))
        if (not needs_grad and x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and x.is_contiguous()
                and (w is None or w.dtype == x.dtype) and (b is None or b.dtype == x.dtype) and _AVAILABLE):
            # Eager calls skip the custom-op dispatch (~10 us per call measured, a third of the 256x1024 kernel);
            # under torch.compile the op keeps the kernel opaque to dynamo/inductor.
            op = layer_norm_act if torch.compiler.is_compiling() else _layer_norm_act_impl
            return op(x, w, b, self.eps, self.activation)
        return _activate(F.layer_norm(x, self.normalized_shape, w, b, self.eps), self.activation)


def _fusable_activation(act: nn.Module) -> str | None:
    if type(act) is nn.ELU and float(act.alpha) == 1.0:
        return "elu"
    if type(act) is nn.ReLU:
        return "relu"
    return None


def pair_activation(norm: nn.Module, act: nn.Module) -> str | None:
    """The activation ('elu' or 'relu') that the pair act(norm(x)) applies after an affine LayerNorm over the last
    dimension: a plain ``nn.LayerNorm`` followed by ``ELU()`` with alpha 1 / ``ReLU()``, or a ``FusedLayerNormAct``
    (as ``fuse_layer_norm_acts`` leaves it) followed by ``nn.Identity()``; None for anything else."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1 or not norm.elementwise_affine \
            or norm.bias is None:
        return None
    if isinstance(norm, FusedLayerNormAct):
        return norm.activation if norm.activation != "none" and isinstance(act, nn.Identity) else None
    return _fusable_activation(act) if type(norm) is nn.LayerNorm else None


def fuse_layer_norm_acts(module: nn.Module) -> int:
    """In place: replace each plain ``nn.LayerNorm`` (over the last dimension) that is followed by ``nn.ELU()``
    with alpha 1 or ``nn.ReLU()`` by a ``FusedLayerNormAct`` and the activation by ``nn.Identity()`` (names, indices
    and state-dict keys unchanged). Pairs are (a) adjacent entries of an ``nn.Sequential`` and (b) the children
    ``norm`` and ``act`` of one module, which by convention applies ``act(norm(x))`` (the MLP denoiser's blocks).
    Returns how many pairs it fused."""
    fused = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            pairs = list(zip(names[:-1], names[1:]))
        else:
            pairs = [("norm", "act")] if {"norm", "act"} <= set(parent._modules) else []
        for norm_name, act_name in pairs:
            ln, act = parent._modules[norm_name], parent._modules[act_name]
            name = _fusable_activation(act)
            if type(ln) is not nn.LayerNorm or len(ln.normalized_shape) != 1 or name is None:
                continue
            parent._modules[norm_name] = FusedLayerNormAct.from_layer_norm(ln, name)
            parent._modules[act_name] = nn.Identity()
            fused += 1
    return fused
