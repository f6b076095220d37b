"""The MLP denoiser's residual trunk on CPU as one fused native pass (bf16: AMX or AVX-512 BF16), for the guided
sampler.

Run as torch ops, each reverse step of the paper's Hopper denoiser (width 1024, 6 residual blocks) makes 8 oneDNN
GEMM calls from Python and 7 LayerNorm + ReLU passes of inductor's code; at B = 256 those LayerNorms and the
Python glue cost about 0.66 ms next to the GEMMs' 1.6 ms on a 2-core Sapphire Rapids. The kernel of
``polygrad_fast._cpu_ops`` (csrc/cpu_ops/residual_mlp.cpp) runs each thread's rows through all layers with its own
bf16 GEMMs (``bf16_layout.isa()``: AMX tiles, or AVX-512 BF16 register tiles on CPUs without AMX; panel-outer,
each as fast as oneDNN's bf16 GEMM at 256 x 1024 x 1024 on its CPU), the residual add in the accumulators, and the
AVX-512 LayerNorm + ReLU row kernel in between, with no Python between layers.

Numerics (``residual_mlp_reference`` is the plain-torch twin, computed from the ``ResidualMLP`` itself): weights
and the input rounded to bf16, the residual stream h kept in fp32 (the bf16 copy rounds it to bf16 after every
block), every post-ReLU activation rounded to bf16 (the GEMM operands), the output rounded to bf16.

``FusedResidualMLP.from_trunk(trunk)`` is a ``ResidualMLP`` sharing the trunk's modules (same state dict) whose
forward runs the kernel on bf16 CPU inputs without autograd (plain torch otherwise); ``refresh()`` rebuilds the
kernel's weights after the trunk's change. ``fusable(trunk)`` says whether a trunk qualifies.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ._native import CPU_OPS, extension
from .bf16_layout import (available, bf16_values, check_tensors, fused_is_faster, require_isa, round_up, vnni_into,
                          vnni_shape)
from .cpu_layer_norm import pair_activation
from .denoisers.mlp import ResidualBlock, ResidualMLP

__all__ = ["FusedResidualMLP", "fusable", "fused_trunk_pays_off", "residual_mlp", "residual_mlp_reference"]

_module = extension(CPU_OPS)
WIDTH_MULTIPLE = 32  # the kernel's 32-wide bf16 operand tiles


def _layers(trunk: ResidualMLP) -> tuple[list[nn.Linear], list[nn.LayerNorm]] | None:
    """([input, block linears..., output], [block norms..., final norm]) when the trunk is the kernel's network, else
    None."""
    if not isinstance(trunk, ResidualMLP) or not isinstance(trunk.blocks, nn.Sequential):
        return None
    blocks = list(trunk.blocks)
    if not all(type(b) is ResidualBlock and pair_activation(b.norm, b.act) == "relu"
               and isinstance(b.dropout, nn.Identity) and isinstance(b.linear, nn.Linear) for b in blocks):
        return None
    if pair_activation(trunk.norm, trunk.act) != "relu" or not isinstance(trunk.input, nn.Linear) or not isinstance(
            trunk.output, nn.Linear):
        return None
    norms = [b.norm for b in blocks] + [trunk.norm]
    if len({n.eps for n in norms}) != 1:
        return None
    return [trunk.input] + [b.linear for b in blocks] + [trunk.output], norms


def fusable(trunk) -> bool:
    """Whether ``FusedResidualMLP.from_trunk(trunk)`` runs the native kernel: a ``ResidualMLP`` of ReLU residual
    blocks without dropout, its width a multiple of ``WIDTH_MULTIPLE``, on CPU, where ``available()``."""
    layers = _layers(trunk) if available() else None
    return (layers is not None and layers[0][0].out_features % WIDTH_MULTIPLE == 0
            and all(p.device.type == "cpu" for p in trunk.parameters()))


def residual_mlp_reference(trunk: ResidualMLP, x: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of the kernel: x [..., in] -> [..., out] bf16 with the kernel's rounding points (module
    docstring), from the trunk's own modules."""
    linears, norms = _layers(trunk)
    w = [(bf16_values(m.weight), bf16_values(m.bias)) for m in linears]
    g = [(bf16_values(n.weight), bf16_values(n.bias), n.eps) for n in norms]

    def z(h, k):
        return bf16_values(F.relu(F.layer_norm(h, (h.shape[-1],), g[k][0], g[k][1], g[k][2])))

    h = F.linear(bf16_values(x), *w[0])
    for k in range(len(linears) - 2):
        h = h + F.linear(z(h, k), *w[k + 1])
    return F.linear(z(h, len(norms) - 1), *w[-1]).to(torch.bfloat16)


def _layout(in_dim: int, width: int, depth: int, out_dim: int) -> dict:
    """name -> (shape, dtype) of the kernel's weight tensors."""
    f32, bf16 = torch.float32, torch.bfloat16
    return {"w_in": (vnni_shape(width, in_dim), bf16), "b_in": ((width,), f32),
            "ln_w": ((depth + 1, width), f32), "ln_b": ((depth + 1, width), f32),
            "w_blocks": ((depth, *vnni_shape(width, width)), bf16), "b_blocks": ((depth, width), f32),
            "w_out": (vnni_shape(out_dim, width), bf16), "b_out": ((round_up(out_dim, 16),), f32)}


def _residual_mlp_impl(x, out_dim, w_in, b_in, ln_w, ln_b, w_blocks, b_blocks, w_out, b_out, eps):
    isa = require_isa("residual_mlp")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() < 1:
        got = f"{x.dtype} {list(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"residual_mlp: x must be a bfloat16 CPU tensor [..., in], got {got}")
    if ln_w.dim() != 2 or ln_w.shape[1] % WIDTH_MULTIPLE or out_dim < 1:
        raise ValueError(f"residual_mlp: need ln_w [depth + 1, width] with width a multiple of {WIDTH_MULTIPLE} "
                         f"and out_dim >= 1, got ln_w {list(ln_w.shape)}, out_dim {out_dim}")
    in_dim, (depth, width) = x.shape[-1], (ln_w.shape[0] - 1, ln_w.shape[1])
    check_tensors("residual_mlp", _layout(in_dim, width, depth, out_dim), dict(
        w_in=w_in, b_in=b_in, ln_w=ln_w, ln_b=ln_b, w_blocks=w_blocks, b_blocks=b_blocks, w_out=w_out, b_out=b_out))
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], out_dim)
    rows = x.numel() // in_dim
    if rows:
        _module.residual_mlp(x.data_ptr(), rows, in_dim, width, depth, out_dim, w_in.data_ptr(), b_in.data_ptr(),
                             ln_w.data_ptr(), ln_b.data_ptr(), float(eps), w_blocks.data_ptr(), b_blocks.data_ptr(),
                             w_out.data_ptr(), b_out.data_ptr(), out.data_ptr(), torch.get_num_threads(), isa)
    return out


# Plain torch.library registration (as cpu_layer_norm's op): ~6 µs of dispatch per call; opaque to torch.compile.
_LIB = torch.library.Library("polygrad_fast", "FRAGMENT")
_LIB.define("residual_mlp(Tensor x, int out_dim, Tensor w_in, Tensor b_in, Tensor ln_w, Tensor ln_b, "
            "Tensor w_blocks, Tensor b_blocks, Tensor w_out, Tensor b_out, float eps) -> Tensor")
_LIB.impl("residual_mlp", _residual_mlp_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("polygrad_fast::residual_mlp")
def _(x, out_dim, w_in, b_in, ln_w, ln_b, w_blocks, b_blocks, w_out, b_out, eps):
    return x.new_empty(*x.shape[:-1], out_dim)


# residual_mlp(x [..., in] bf16, out_dim, the FusedResidualMLP's packed weights..., eps) -> [..., out_dim] bf16.
# Native only (RuntimeError where ``available()`` is False); no autograd.
residual_mlp = torch.ops.polygrad_fast.residual_mlp


class FusedResidualMLP(ResidualMLP):
    """A ``ResidualMLP`` that shares a fusable trunk's modules (build it with ``from_trunk``: names and state dict
    unchanged) and runs bf16 CPU inputs without autograd through the native kernel; call ``refresh()`` after the
    weights change. The kernel's weights are non-persistent buffers."""

    @classmethod
    def from_trunk(cls, trunk: ResidualMLP) -> "FusedResidualMLP":
        if not fusable(trunk):
            raise ValueError("FusedResidualMLP needs a ResidualMLP of ReLU blocks without dropout, width a multiple "
                             f"of {WIDTH_MULTIPLE}, on a CPU where bf16_layout.available() (AMX or AVX-512 BF16)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in trunk.named_children():
            new.add_module(name, child)
        linears, norms = _layers(new)
        new.in_dim, new.width, new.out_dim = linears[0].in_features, linears[0].out_features, linears[-1].out_features
        new.eps = float(norms[0].eps)
        for name, (shape, dtype) in _layout(new.in_dim, new.width, len(norms) - 1, new.out_dim).items():
            new.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=False)
        new.refresh()
        return new

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the kernel's weights from the shared modules (in place: a compiled graph keeps reading them)."""
        linears, norms = _layers(self)
        vnni_into(self.w_in, linears[0].weight)
        self.b_in.copy_(bf16_values(linears[0].bias))
        for i, n in enumerate(norms):
            self.ln_w[i].copy_(bf16_values(n.weight))
            self.ln_b[i].copy_(bf16_values(n.bias))
        for i, lin in enumerate(linears[1:-1]):
            vnni_into(self.w_blocks[i], lin.weight)
            self.b_blocks[i].copy_(bf16_values(lin.bias))
        vnni_into(self.w_out, linears[-1].weight)
        self.b_out.zero_()[: self.out_dim].copy_(bf16_values(linears[-1].bias))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., in] -> [..., out]: the kernel for bf16 CPU inputs when no gradient is needed (neither h nor any
        weight requires one under grad mode), else ``ResidualMLP.forward`` (differentiable, any dtype)."""
        needs_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in self.parameters()))
        if h.dtype != torch.bfloat16 or h.device.type != "cpu" or needs_grad:
            return super().forward(h)
        return residual_mlp(h, self.out_dim, self.w_in, self.b_in, self.ln_w, self.ln_b, self.w_blocks, self.b_blocks,
                            self.w_out, self.b_out, self.eps)


@functools.lru_cache(maxsize=None)
def _pays_off(in_dim: int, width: int, depth: int, out_dim: int, rows: int) -> bool:
    with torch.random.fork_rng():  # the caller's global RNG stream is left as it was
        torch.manual_seed(0)
        trunk = ResidualMLP(in_dim, width, depth, out_dim, 0.0).to(torch.bfloat16).eval()
        x = torch.randn(rows, in_dim).to(torch.bfloat16)
    fused = FusedResidualMLP.from_trunk(trunk)
    return fused_is_faster(lambda: ResidualMLP.forward(fused, x), lambda: fused(x))


def fused_trunk_pays_off(trunk: ResidualMLP, rows: int = 256) -> bool:
    """True when ``FusedResidualMLP`` measured faster than the trunk's plain bf16 forward on ``rows`` inputs on this
    CPU (``backend.choose_fastest``, plain preferred; once per shape and process); False unless ``fusable``."""
    if not fusable(trunk):
        return False
    linears, norms = _layers(trunk)
    return _pays_off(linears[0].in_features, linears[0].out_features, len(norms) - 1, linears[-1].out_features, rows)
