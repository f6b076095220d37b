"""Advantage-guided diffusion: the gradient that moves the predicted clean states towards high critic advantage.

At a guided reverse step t >= 1, on the denoiser's x0 prediction (first observation imposed), with raw states s_k,
raw rewards r_k and binarised terminals d_k (raw terminal > 0.5), rewards and terminals detached:

  A_k = r_k + gamma (1 - d_k) V(s_{k+1}) - V(s_k),  k = 0..H-2   (V the agent's online critic, on RAW states),
  log w = sum_k log sigmoid(A_k)  ('sag', sigmoid guidance)   or   sum_k A_k  ('eag', exponential guidance),

and the sampler shifts x0's state columns by c sigma_t^4 grad_s log w (``GuidedStep``). The gradient is taken with
respect to the NORMALISED state columns of x0 (raw = normalised * scale + mean, so it is the raw gradient times the
scale). Its row for the last state s_{H-1} is zero by definition (the last state only enters as a bootstrap target
and is left to the denoiser); the row of s_0 is not computed (zero) since the start state is re-imposed anyway.

This is the fast form: the closed-form d log w / d A_k (sigmoid(-A_k) for 'sag', 1 for 'eag'), turned into
d log w / d V(s_j) = gamma (1 - d_{j-1}) dA_{j-1} - dA_j and pulled back through the critic by ONE vector-Jacobian
product over the states s_1..s_{H-2} of the whole batch; the end states' values (needed by 'sag' only) are
evaluated without autograd. The reference restates log w and calls autograd on it
(``reference.guided_sampling.advantage_guided_prediction``).

Shapes: B batch, H horizon, O obs dim, D = O + 2.
"""
from __future__ import annotations

import typing
from typing import Callable, Literal

import torch

from .normalizer import Normalizer

StateGuidance = Literal["none", "sag", "eag"]
STATE_GUIDANCE_TYPES: tuple[str, ...] = typing.get_args(StateGuidance)


def _values(critic: Callable, states: torch.Tensor) -> torch.Tensor:
    """V(states) [B, n] for raw states [B, n, O], checked to be a floating tensor of that shape."""
    v = critic(states)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.shape != states.shape[:-1]:
        got = f"{v.dtype} {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"the critic must map raw states {list(states.shape)} to values {list(states.shape[:-1])} "
                         f"(a floating tensor), got {got}")
    return v


def advantage_log_weight_grad(x0: torch.Tensor, critic: Callable, normalizer: Normalizer, kind: str,
                              gamma: float) -> torch.Tensor:
    """grad of log w w.r.t. x0's normalised state columns: [B,H,O], rows 0 and H-1 zero.

    x0 [B,H,D] normalised, the first observation already imposed; kind 'sag' or 'eag'; critic: raw states
    [..., O] -> V [...]. Runs with autograd on for the critic only (the caller may be under no_grad).
    """
    obs_dim, horizon = normalizer.obs_dim, x0.shape[1]
    grad = torch.zeros_like(x0[..., :obs_dim])
    if horizon < 3:  # no state strictly between the first (re-imposed) and the last (zero row)
        return grad
    with torch.no_grad():
        states = normalizer.unnormalize(x0[..., :obs_dim], "observations")
        rewards = normalizer.unnormalize(x0[..., obs_dim], "rewards")[:, :-1]
        discount = gamma * (1.0 - (normalizer.unnormalize(x0[..., obs_dim + 1], "terminals") > 0.5).float())[:, :-1]
    middle = states[:, 1:-1].detach().requires_grad_(True)
    with torch.enable_grad():
        v_middle = _values(critic, middle)
    if kind == "sag":
        with torch.no_grad():
            v_ends = _values(critic, states[:, [0, -1]])
            v = torch.cat([v_ends[:, :1], v_middle.detach(), v_ends[:, 1:]], dim=1)
            d_adv = torch.sigmoid(-(rewards + discount * v[:, 1:] - v[:, :-1]))  # d log sigmoid(A) / dA
    elif kind == "eag":
        d_adv = torch.ones_like(rewards)
    else:
        raise ValueError(f"state guidance must be 'sag' or 'eag', got {kind!r}")
    # V(s_j) for j = 1..H-2 enters A_{j-1} as gamma (1 - d_{j-1}) V(s_j) and A_j as -V(s_j)
    d_values = discount[:, :-1] * d_adv[:, :-1] - d_adv[:, 1:]
    (g_raw,) = torch.autograd.grad(v_middle, middle, grad_outputs=d_values.to(v_middle.dtype))
    grad[:, 1:-1] = g_raw * normalizer["observations"].scale
    return grad
