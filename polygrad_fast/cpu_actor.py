"""The actor's mean action tanh(MLP(s)) on CPU as one fused native pass (AMX-BF16), for the guided sampler.

Every reverse step evaluates the policy on all B·H guide states. As torch ops on the bf16 policy copy that is
three addmm, two LayerNorm + ELU and a tanh over [B·H, hidden] activations that each go to memory and back: 0.77 ms
for 2,560 rows at hidden 256 on a 2-core Sapphire Rapids, where the GEMMs' arithmetic needs about 0.18 ms. The
kernel of ``polygrad_fast._cpu_ops`` (csrc/cpu_ops/actor_mean.cpp) runs blocks of 32 rows through the whole network
in cache: every Linear as AMX bf16 tile products with fp32 accumulation (csrc/cpu_ops/amx_gemm.hpp), LayerNorm + ELU
with the row kernel of ``cpu_layer_norm``, tanh in fp32.

Numerics (``actor_mean_reference`` is the plain-torch twin, computed from the ``Actor`` itself): the weights are
the actor's rounded to bf16 (what its bf16 copy holds), the states are rounded to bf16, and every post-ELU
activation is rounded to bf16 (the operands of the bf16 GEMMs); the pre-norm activations, the output layer's sums
and tanh stay fp32 (the bf16 copy rounds those too, so this is at least as precise).

``FusedActor(actor)`` is the drop-in for the sampler's policy call: states fp32 [..., O] -> (mean, std) fp32 [..., A],
with its packed weights rebuilt from the actor by ``refresh()`` after every weight change. ``fusable(actor)`` says
whether an actor qualifies (a polygrad_fast ``Actor``, hidden a multiple of 32) and the kernel runs here.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ._native import CPU_OPS, extension
from .amx_layout import (available, bf16_values, check_tensors, fused_is_faster, require_available, round_up,
                         vnni_into, vnni_shape)
from .cpu_layer_norm import pair_activation
from .policy import Actor

__all__ = ["FusedActor", "actor_mean", "actor_mean_reference", "available", "fusable", "fused_actor_pays_off"]

_module = extension(CPU_OPS)
HIDDEN_MULTIPLE = 32  # the kernel's AMX tiles: 16 x 32 bf16 operands, 16-column weight tiles in pairs


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


def fusable(actor) -> bool:
    """Whether ``FusedActor(actor)`` runs the native kernel: a polygrad_fast ``Actor`` on CPU whose hidden width is a
    multiple of ``HIDDEN_MULTIPLE``, on a machine where ``available()``."""
    if type(actor) is not Actor or not available():
        return False
    layers = _mlp_layers(actor)
    return (layers is not None and layers[0][0].out_features % HIDDEN_MULTIPLE == 0
            and all(p.device.type == "cpu" for p in actor.parameters()))


def actor_mean_reference(actor: Actor, states: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of the kernel: states [..., O] fp32 -> tanh(MLP(states)) [..., A] fp32 with the kernel's
    rounding points (module docstring), from the actor's own modules."""
    linears, norms = _mlp_layers(actor)
    z = bf16_values(states)
    for lin, ln in zip(linears, norms):
        h = F.linear(z, bf16_values(lin.weight), bf16_values(lin.bias))
        z = bf16_values(F.elu(F.layer_norm(h, (h.shape[-1],), bf16_values(ln.weight), bf16_values(ln.bias), ln.eps)))
    out = linears[-1]
    return torch.tanh(F.linear(z, bf16_values(out.weight), bf16_values(out.bias)))


def _check_states(states: torch.Tensor, obs_dim: int) -> None:
    if not isinstance(states, torch.Tensor) or states.dtype != torch.float32 or states.device.type != "cpu":
        got = f"{states.dtype} on {states.device}" if isinstance(states, torch.Tensor) else type(states).__name__
        raise TypeError(f"actor_mean: states must be a float32 CPU tensor, got {got}")
    if states.dim() < 1 or states.shape[-1] != obs_dim:
        raise ValueError(f"actor_mean: states must be [..., {obs_dim}], got {list(states.shape)}")


def _check_weights(act_dim, obs_dim, w_in, b_in, ln_w, ln_b, w_hidden, b_hidden, w_out, b_out) -> tuple[int, int]:
    """(layers, hidden) after checking every weight tensor against the layout ``FusedActor`` builds (the kernel
    reads them through raw pointers, so a wrong size would read out of bounds): ValueError saying which."""
    if ln_w.dim() != 2:
        raise ValueError(f"actor_mean: ln_w must be [layers, hidden], got {list(ln_w.shape)}")
    layers, hidden = ln_w.shape
    if layers < 1 or hidden < HIDDEN_MULTIPLE or hidden % HIDDEN_MULTIPLE or obs_dim < 1 or act_dim < 1:
        raise ValueError(f"actor_mean: need layers, obs_dim, act_dim >= 1 and hidden a multiple of "
                         f"{HIDDEN_MULTIPLE}, got layers {layers}, hidden {hidden}, obs_dim {obs_dim}, "
                         f"act_dim {act_dim}")
    check_tensors("actor_mean", _layout(obs_dim, act_dim, hidden, layers), dict(
        w_in=w_in, b_in=b_in, ln_w=ln_w, ln_b=ln_b, w_hidden=w_hidden, b_hidden=b_hidden, w_out=w_out, b_out=b_out))
    return layers, hidden


def _layout(obs_dim: int, act_dim: int, hidden: int, layers: int) -> dict:
    """name -> (shape, dtype) of the kernel's weight tensors."""
    f32, bf16 = torch.float32, torch.bfloat16
    return {"w_in": (vnni_shape(hidden, obs_dim), bf16), "b_in": ((hidden,), f32),
            "ln_w": ((layers, hidden), f32), "ln_b": ((layers, hidden), f32),
            "w_hidden": ((layers - 1, *vnni_shape(hidden, hidden)), bf16), "b_hidden": ((layers - 1, hidden), f32),
            "w_out": (vnni_shape(act_dim, hidden), bf16), "b_out": ((round_up(act_dim, 16),), f32)}


def _actor_mean_impl(states, act_dim, obs_dim, w_in, b_in, ln_w, ln_b, w_hidden, b_hidden, w_out, b_out, eps):
    require_available("actor_mean")
    _check_states(states, obs_dim)
    layers, hidden = _check_weights(act_dim, obs_dim, w_in, b_in, ln_w, ln_b, w_hidden, b_hidden, w_out, b_out)
    states = states.contiguous()
    mean = states.new_empty(*states.shape[:-1], act_dim)
    rows = states.numel() // obs_dim
    if rows:
        _module.actor_mean(states.data_ptr(), rows, obs_dim, hidden, layers, act_dim, w_in.data_ptr(),
                           b_in.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), float(eps), w_hidden.data_ptr(),
                           b_hidden.data_ptr(), w_out.data_ptr(), b_out.data_ptr(), mean.data_ptr(),
                           torch.get_num_threads())
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
# (RuntimeError where ``available()`` is False); no autograd.
actor_mean = torch.ops.polygrad_fast.actor_mean


class FusedActor(nn.Module):
    """The sampler's policy call for a ``fusable`` actor: states fp32 [..., O] -> (mean, std) fp32 [..., A], mean
    from the native kernel, std the actor's own (state-independent, in the actor's dtype, cast to fp32). Holds the
    kernel's copy of the weights (buffers, not in any state dict the user sees); call ``refresh()`` after the
    actor's weights change."""

    def __init__(self, actor: Actor):
        super().__init__()
        if not fusable(actor):
            raise ValueError("FusedActor needs a polygrad_fast Actor with hidden width a multiple of "
                             f"{HIDDEN_MULTIPLE} on a CPU where cpu_actor.available() (AMX-BF16)")
        self.actor = actor
        linears, norms = _mlp_layers(actor)
        hidden, layers = linears[0].out_features, len(norms)
        self.eps = float(norms[0].eps)
        obs_dim, act_dim = linears[0].in_features, linears[-1].out_features
        self.obs_dim, self.act_dim = obs_dim, act_dim
        for name, (shape, dtype) in _layout(obs_dim, act_dim, hidden, layers).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the kernel's weights from the actor (in place: a compiled graph keeps reading the same buffers)."""
        linears, norms = _mlp_layers(self.actor)
        vnni_into(self.w_in, linears[0].weight)
        self.b_in.copy_(bf16_values(linears[0].bias))
        for i, ln in enumerate(norms):
            self.ln_w[i].copy_(bf16_values(ln.weight))
            self.ln_b[i].copy_(bf16_values(ln.bias))
        for i, lin in enumerate(linears[1:-1]):
            vnni_into(self.w_hidden[i], lin.weight)
            self.b_hidden[i].copy_(bf16_values(lin.bias))
        vnni_into(self.w_out, linears[-1].weight)
        self.b_out.zero_()[: self.act_dim].copy_(bf16_values(linears[-1].bias))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and (states.requires_grad or any(p.requires_grad for p in self.actor.parameters())):
            raise RuntimeError("FusedActor has no autograd: call it under torch.no_grad() / torch.inference_mode(), "
                               "or differentiate the Actor itself")
        mean = actor_mean(states, self.act_dim, self.obs_dim, self.w_in, self.b_in, self.ln_w, self.ln_b,
                          self.w_hidden, self.b_hidden, self.w_out, self.b_out, self.eps)
        return mean, self.actor.std().float().expand_as(mean)


@functools.lru_cache(maxsize=None)
def _pays_off(obs_dim: int, act_dim: int, hidden: int, layers: int, rows: int) -> bool:
    with torch.random.fork_rng():  # the caller's global RNG stream is left as it was
        torch.manual_seed(0)
        actor = Actor(obs_dim, act_dim, hidden, layers).to(torch.bfloat16).eval()
        states = torch.randn(rows, obs_dim)
    fused = FusedActor(actor)
    return fused_is_faster(lambda: actor(states.to(torch.bfloat16)), lambda: fused(states))


def fused_actor_pays_off(actor: Actor, rows: int = 2560) -> bool:
    """True when ``FusedActor`` measured faster than the actor's bf16 forward on ``rows`` states on this CPU
    (``backend.choose_fastest``, the plain forward preferred; measured once per actor shape and process, a few ms);
    False unless ``fusable(actor)``. rows: the sampler's B·H (2,560 at the paper's B = 256, H = 10)."""
    if not fusable(actor):
        return False
    linears, norms = _mlp_layers(actor)
    return _pays_off(linears[0].in_features, linears[-1].out_features, linears[0].out_features, len(norms), rows)
