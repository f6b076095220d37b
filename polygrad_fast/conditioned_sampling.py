"""Ancestral sampling of a trajectory given its actions: the plain (unguided) reverse process of the paper.

Used where the actions are known rather than imagined: the dataset-actions check of the world-model evaluation
(real windows' actions in, compared with the real next states) and the autoregressive-diffusion baseline (one
H=2 window per step). Reverse step t: x0 = denoiser(x_t, sqrt(abar_t) a, t); mu = c1_t x0 + c2_t x_t;
x_{t-1} = mu + sigma_t z (no noise at t = 0); the first observation is re-imposed after every step, and x0 is
not re-conditioned before the posterior (as the paper's default sampler). The twin is
``polygrad_fast.reference.guided_sampling.action_conditioned_sample``; both draw ``SamplerNoise`` the same way, so
a generator seed gives them the same noise.

Shapes: B batch, H horizon, O obs dim, D = O + 2, A action dim, T diffusion steps.
"""
from __future__ import annotations

import torch

from .noise import SamplerNoise
from .schedule import NoiseSchedule
from .step_ops import COEF1, COEF2, SIGMA, SQRT_ABAR, impose_start_obs


def _check(name: str, x, dims: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims or x.dtype != torch.float32:
        raise ValueError(f"{name}: expected a {dims}-d float32 tensor, got {list(x.shape)} {x.dtype}")
    return x


@torch.inference_mode()
def action_conditioned_sample(denoiser, schedule: NoiseSchedule, start_obs: torch.Tensor, actions: torch.Tensor,
                              *, sampling_steps: int | None = None, noise: SamplerNoise | None = None,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """x [B,H,D] (normalised) sampled given start_obs [B,O] and actions [B,H,A] (both normalised).

    ``denoiser(x [B,H,D], actions [B,H,A], t [B]) -> x0 [B,H,D]``. sampling_steps: None for all T trained steps,
    K in 2..T for the respaced K-step chain (``NoiseSchedule.respaced``; the denoiser gets the trained t_i).
    Noise: ``noise`` for the K steps (explicit; only ``x_T`` and ``state`` are read) or one draw from ``generator``.
    """
    B, O = _check("start_obs", start_obs, 2).shape
    _check("actions", actions, 3)
    if actions.shape[0] != B or actions.device != start_obs.device:
        raise ValueError(f"actions {list(actions.shape)} on {actions.device} do not match start_obs "
                         f"{list(start_obs.shape)} on {start_obs.device}: expected [B={B}, H, A] on the same device")
    _, H, A = actions.shape
    dev = start_obs.device
    K = schedule.n_steps if sampling_steps is None else sampling_steps
    timesteps, table = schedule.respaced(K, device=dev)
    if noise is None:
        noise = SamplerNoise.draw(K, B, H, O + 2, A, generator=generator, device=dev)
    noise.check(K, B, H, O + 2, A, device=dev)
    steps = timesteps[:, None].expand(K, B)
    x = impose_start_obs(noise.x_T, start_obs)
    for i in reversed(range(K)):
        coef = table[i]
        x0 = denoiser(x, coef[SQRT_ABAR] * actions, steps[i])
        mean = coef[COEF1] * x0 + coef[COEF2] * x
        x = impose_start_obs(mean if i == 0 else mean + coef[SIGMA] * noise.state[i], start_obs)
    return x
