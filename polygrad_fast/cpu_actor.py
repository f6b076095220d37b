"""The actor's mean action tanh(MLP(s)) on CPU as one fused native pass, for the guided sampler.

Every reverse step evaluates the policy on all B·H guide states. As torch ops that is three addmm, two LayerNorm +
ELU and a tanh over [B·H, hidden] activations that each go to memory and back. The kernels of
``polygrad_fast._cpu_ops`` (csrc/cpu_ops/actor_mean.cpp) run blocks of rows through the whole network in cache:

- bf16 (the sampler's bf16 policy copy: AMX and AVX512-BF16 CPUs): every Linear as bf16 products with fp32
  accumulation, AMX tiles or AVX-512 BF16 register tiles (csrc/cpu_ops/bf16_gemm.hpp), 32 rows at a time: 0.39 vs
  0.77 ms (compiled torch) for 2,560 rows at hidden 256 on a 2-core Sapphire Rapids;
- fp32 (the fp32 policy copy every other x86 CPU runs): FMA register tiles, AVX-512 or AVX2, 24 rows at a time.

LayerNorm + ELU run on the row kernels of ``cpu_layer_norm``, tanh in fp32.

Numerics (``actor_mean_reference`` is the plain-torch twin, computed from the ``Actor`` itself): for a bf16 actor
the weights are the actor's (bf16), the states are rounded to bf16, and every post-ELU activation is rounded to
bf16 (the operands of the bf16 GEMMs); the pre-norm activations, the output layer's sums and tanh stay fp32 (the
bf16 copy rounds those too, so this is at least as precise). For an fp32 actor nothing is rounded: the kernel is
the actor's fp32 forward up to summation order.

``FusedActor(actor)`` is the drop-in for the sampler's policy call: states fp32 [..., O] -> (mean, std) fp32 [..., A],
with its packed weights rebuilt from the actor by ``refresh()`` after every weight change. ``fusable(actor)`` says
whether an actor qualifies (a polygrad_fast ``Actor`` in bf16 or fp32 whose hidden width suits the kernel) and a
kernel for its dtype runs here (``kernel_isa``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ._native import CPU_OPS, extension
from . import bf16_layout
from .bf16_layout import bf16_values, check_tensors, fused_is_faster, require_isa, round_up, vnni_into, vnni_shape
from .backend import cpu_isa
from .cpu_layer_norm import fuse_layer_norm_acts, pair_activation
from .policy import Actor

__all__ = ["FusedActor", "actor_mean", "actor_mean_reference", "fusable", "fused_actor_pays_off", "kernel_isa"]

_module = extension(CPU_OPS)
# hidden must be a multiple of this: the bf16 kernels' 32-wide operand tiles; the fp32 kernels' 16-column panels
HIDDEN_MULTIPLE = {torch.bfloat16: 32, torch.float32: 16}


def _mlp_layers(actor: Actor) -> tuple[list[nn.Linear], list[nn.LayerNorm]] | None:
    """(linears, norms) of ``actor.mlp`` when it is ``policy.mlp``'s pattern [Linear, LayerNorm, ELU] * L + [Linear]
    (with ``cpu_layer_norm``'s fused LayerNorm + ELU followed by Identity accepted too), else None."""
    mods = list(actor.mlp)
    if len(mods) < 4 or (len(mods) - 1) % 3:
        return None
    linears, norms = [], []
    for i in range(0, len(mods) - 1, 3):
        lin, ln, act = mods[i: i + 3]
        if type(lin) is not nn.Linear or pair_activation(ln, act) != "elu":
            return None
        linears.append(lin)
        norms.append(ln)
    if type(mods[-1]) is not nn.Linear or len({ln.eps for ln in norms}) != 1:
        return None
    return linears + [mods[-1]], norms


@functools.cache
def _fp32_isa() -> str | None:
    """'avx512' or 'avx2': the lower of the best fp32 kernel the CPU runs and what ``backend.cpu_isa()`` names (so an
    ``ONEDNN_MAX_CPU_ISA`` cap rehearses a smaller CPU here too); None without the extension or below AVX2."""
    best = _module.actor_mean_f32_isa() if _module is not None else ""
    cap = cpu_isa()
    if best == "avx512" and cap in ("AMX", "AVX512-BF16", "AVX512"):
        return "avx512"
    return "avx2" if best in ("avx512", "avx2") and cap != "default" else None


def kernel_isa(dtype: torch.dtype) -> str | None:
    """The kernel an actor in ``dtype`` runs here: 'amx' or 'avx512bf16' (bf16: ``bf16_layout.isa()``), 'avx512' or
    'avx2' (fp32), None where there is none."""
    if dtype == torch.bfloat16:
        return bf16_layout.isa()
    return _fp32_isa() if dtype == torch.float32 else None


def fusable(actor) -> bool:
    """Whether ``FusedActor(actor)`` runs a native kernel: a polygrad_fast ``Actor`` on CPU, in bf16 or fp32 with a
    kernel for that dtype here (``kernel_isa``), whose hidden width is a multiple of ``HIDDEN_MULTIPLE[dtype]``."""
    if type(actor) is not Actor:
        return False
    dtype = actor.mlp[0].weight.dtype
    if kernel_isa(dtype) is None:
        return False
    layers = _mlp_layers(actor)
    return (layers is not None and layers[0][0].out_features % HIDDEN_MULTIPLE[dtype] == 0
            and all(p.device.type == "cpu" and p.dtype == dtype for p in actor.parameters()))


def actor_mean_reference(actor: Actor, states: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of the kernel: states [..., O] fp32 -> tanh(MLP(states)) [..., A] fp32 with the kernel's
    rounding points (module docstring: bf16 ones for a bf16 actor, none for an fp32 one), from the actor's own
    modules."""
    linears, norms = _mlp_layers(actor)
    r = bf16_values if linears[0].weight.dtype == torch.bfloat16 else (lambda t: t.detach().float())
    z = r(states)
    for lin, ln in zip(linears, norms):
        h = F.linear(z, r(lin.weight), r(lin.bias))
        z = r(F.elu(F.layer_norm(h, (h.shape[-1],), r(ln.weight), r(ln.bias), ln.eps)))
    out = linears[-1]
    return torch.tanh(F.linear(z, r(out.weight), r(out.bias)))


def _check_states(states: torch.Tensor, obs_dim: int) -> None:
    if not isinstance(states, torch.Tensor) or states.dtype != torch.float32 or states.device.type != "cpu":
        got = f"{states.dtype} on {states.device}" if isinstance(states, torch.Tensor) else type(states).__name__
        raise TypeError(f"actor_mean: states must be a float32 CPU tensor, got {got}")
    if states.dim() < 1 or states.shape[-1] != obs_dim:
        raise ValueError(f"actor_mean: states must be [..., {obs_dim}], got {list(states.shape)}")


def _check_weights(act_dim, obs_dim, w_in, b_in, ln_w, ln_b, w_hidden, b_hidden, w_out, b_out) -> tuple[int, int]:
    """(layers, hidden) after checking every weight tensor against the layout ``FusedActor`` builds for w_in's
    dtype (the kernel reads them through raw pointers, so a wrong size would read out of bounds): ValueError saying
    which."""
    if ln_w.dim() != 2:
        raise ValueError(f"actor_mean: ln_w must be [layers, hidden], got {list(ln_w.shape)}")
    if w_in.dtype not in HIDDEN_MULTIPLE:
        raise ValueError(f"actor_mean: w_in must be bfloat16 (VNNI layout) or float32 (panel layout), got {w_in.dtype}")
    layers, hidden = ln_w.shape
    multiple = HIDDEN_MULTIPLE[w_in.dtype]
    if layers < 1 or hidden < multiple or hidden % multiple or obs_dim < 1 or act_dim < 1:
        raise ValueError(f"actor_mean: need layers, obs_dim, act_dim >= 1 and hidden a multiple of {multiple}, got "
                         f"layers {layers}, hidden {hidden}, obs_dim {obs_dim}, act_dim {act_dim}")
    check_tensors("actor_mean", _layout(obs_dim, act_dim, hidden, layers, w_in.dtype), dict(
        w_in=w_in, b_in=b_in, ln_w=ln_w, ln_b=ln_b, w_hidden=w_hidden, b_hidden=b_hidden, w_out=w_out, b_out=b_out))
    return layers, hidden


def panel_shape(n: int, k: int) -> tuple[int, int, int]:
    """Shape of W [N, K] in the fp32 kernels' 16-column panels: [N' / 16, K, 16], N' = N rounded up to 16."""
    return round_up(n, 16) // 16, k, 16


def panels_into(dst: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Write W [N, K] into ``dst`` (fp32, ``panel_shape(N, K)``, contiguous): entry (p, k, j) = W[16 p + j, k], the
    columns beyond N zero."""
    n, k = weight.shape
    w = F.pad(weight.detach().float(), (0, 0, 0, round_up(n, 16) - n))
    dst.copy_(w.view(-1, 16, k).transpose(1, 2))
    return dst


def _layout(obs_dim: int, act_dim: int, hidden: int, layers: int, dtype: torch.dtype) -> dict:
    """name -> (shape, dtype) of the kernel's weight tensors: AMX's VNNI order for bf16, 16-column panels for fp32."""
    f32 = torch.float32
    shape, wdtype = (vnni_shape, torch.bfloat16) if dtype == torch.bfloat16 else (panel_shape, f32)
    return {"w_in": (shape(hidden, obs_dim), wdtype), "b_in": ((hidden,), f32),
            "ln_w": ((layers, hidden), f32), "ln_b": ((layers, hidden), f32),
            "w_hidden": ((layers - 1, *shape(hidden, hidden)), wdtype), "b_hidden": ((layers - 1, hidden), f32),
            "w_out": (shape(act_dim, hidden), wdtype), "b_out": ((round_up(act_dim, 16),), f32)}


def _actor_mean_impl(states, act_dim, obs_dim, w_in, b_in, ln_w, ln_b, w_hidden, b_hidden, w_out, b_out, eps):
    _check_states(states, obs_dim)
    layers, hidden = _check_weights(act_dim, obs_dim, w_in, b_in, ln_w, ln_b, w_hidden, b_hidden, w_out, b_out)
    isa = kernel_isa(w_in.dtype)
    if isa is None:
        if w_in.dtype == torch.bfloat16:
            require_isa("actor_mean")
        raise RuntimeError("actor_mean: no fp32 kernel runs here (needs the native extension and AVX2 + FMA, "
                           "and backend.cpu_isa() at least 'AVX2')")
    states = states.contiguous()
    mean = states.new_empty(*states.shape[:-1], act_dim)
    rows = states.numel() // obs_dim
    if rows:
        _module.actor_mean(states.data_ptr(), rows, obs_dim, hidden, layers, act_dim, w_in.data_ptr(),
                           b_in.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), float(eps), w_hidden.data_ptr(),
                           b_hidden.data_ptr(), w_out.data_ptr(), b_out.data_ptr(), mean.data_ptr(),
                           torch.get_num_threads(), isa)
    return mean


# Plain torch.library registration (as cpu_layer_norm's op): ~6 µs of dispatch per call; opaque to torch.compile.
_LIB = torch.library.Library("polygrad_fast", "FRAGMENT")
_LIB.define("actor_mean(Tensor states, int act_dim, int obs_dim, Tensor w_in, Tensor b_in, Tensor ln_w, "
            "Tensor ln_b, Tensor w_hidden, Tensor b_hidden, Tensor w_out, Tensor b_out, float eps) -> Tensor")
_LIB.impl("actor_mean", _actor_mean_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("polygrad_fast::actor_mean")
def _(states, act_dim, obs_dim, w_in, b_in, ln_w, ln_b, w_hidden, b_hidden, w_out, b_out, eps):
    return states.new_empty(*states.shape[:-1], act_dim)


# actor_mean(states [..., O] fp32, A, O, the FusedActor's packed weights..., eps) -> mean [..., A] fp32. Native only
# (RuntimeError where ``kernel_isa`` of the weights' dtype is None); no autograd.
actor_mean = torch.ops.polygrad_fast.actor_mean


class FusedActor(nn.Module):
    """The sampler's policy call for a ``fusable`` actor: states fp32 [..., O] -> (mean, std) fp32 [..., A], mean
    from the native kernel for the actor's dtype, std the actor's own (state-independent, in the actor's dtype,
    cast to fp32). Holds the kernel's copy of the weights (buffers, not in any state dict the user sees); call
    ``refresh()`` after the actor's weights change."""

    def __init__(self, actor: Actor):
        super().__init__()
        if not fusable(actor):
            raise ValueError("FusedActor needs a polygrad_fast Actor on CPU, bf16 with hidden width a multiple of 32 "
                             "on an AMX or AVX-512 BF16 CPU, or fp32 with hidden width a multiple of 16 on an AVX2 "
                             "or AVX-512 CPU (cpu_actor.kernel_isa)")
        self.actor = actor
        linears, norms = _mlp_layers(actor)
        hidden, layers = linears[0].out_features, len(norms)
        self.eps = float(norms[0].eps)
        obs_dim, act_dim = linears[0].in_features, linears[-1].out_features
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.dtype = linears[0].weight.dtype
        for name, (shape, dtype) in _layout(obs_dim, act_dim, hidden, layers, self.dtype).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the kernel's weights from the actor (in place: a compiled graph keeps reading the same buffers)."""
        linears, norms = _mlp_layers(self.actor)
        pack = vnni_into if self.dtype == torch.bfloat16 else panels_into
        pack(self.w_in, linears[0].weight)
        self.b_in.copy_(linears[0].bias)
        for i, ln in enumerate(norms):
            self.ln_w[i].copy_(ln.weight)
            self.ln_b[i].copy_(ln.bias)
        for i, lin in enumerate(linears[1:-1]):
            pack(self.w_hidden[i], lin.weight)
            self.b_hidden[i].copy_(lin.bias)
        pack(self.w_out, linears[-1].weight)
        self.b_out.zero_()[: self.act_dim].copy_(linears[-1].bias)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and (states.requires_grad or any(p.requires_grad for p in self.actor.parameters())):
            raise RuntimeError("FusedActor has no autograd: call it under torch.no_grad() / torch.inference_mode(), "
                               "or differentiate the Actor itself")
        mean = actor_mean(states, self.act_dim, self.obs_dim, self.w_in, self.b_in, self.ln_w, self.ln_b,
                          self.w_hidden, self.b_hidden, self.w_out, self.b_out, self.eps)
        return mean, self.actor.std().float().expand_as(mean)


@functools.lru_cache(maxsize=None)
def _pays_off(obs_dim: int, act_dim: int, hidden: int, layers: int, rows: int, dtype: torch.dtype) -> bool:
    with torch.random.fork_rng():  # the caller's global RNG stream is left as it was
        torch.manual_seed(0)
        actor = Actor(obs_dim, act_dim, hidden, layers).to(dtype).eval()
        states = torch.randn(rows, obs_dim)
    if dtype == torch.float32:  # what the sampler's fp32 copy runs otherwise: the native LayerNorm + ELU
        fuse_layer_norm_acts(actor)
    fused = FusedActor(actor)
    return fused_is_faster(lambda: actor(states.to(dtype)), lambda: fused(states))


def fused_actor_pays_off(actor: Actor, rows: int = 2560) -> bool:
    """True when ``FusedActor`` measured faster than the actor's plain forward in its dtype (fp32: with the native
    LayerNorm + ELU, as the sampler's fp32 copy runs) on ``rows`` states on this CPU (``backend.choose_fastest``,
    the plain forward preferred; measured once per actor shape, dtype and process, a few ms); False unless
    ``fusable(actor)``. rows: the sampler's B·H (2,560 at the paper's B = 256, H = 10)."""
    if not fusable(actor):
        return False
    linears, norms = _mlp_layers(actor)
    return _pays_off(linears[0].in_features, linears[-1].out_features, linears[0].out_features, len(norms), rows,
                     linears[0].weight.dtype)
