"""Denoising training objective of the trajectory diffusion model: the paper's x0-prediction loss.

Trajectory layout: x0 [B,H,D], D = O + 2, columns (normalised obs [O], reward, terminal); actions [B,H,A] are a
separate conditioning input, scaled by sqrt(abar_t) rather than diffused. Only the first observation is fixed.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import torch
from torch import nn

from .step_ops import impose_start_obs, q_sample
from .schedule import NoiseSchedule

LossType = Literal["l1", "l2"]
LOSS_TYPES = get_args(LossType)


def make_x0(observations: torch.Tensor, rewards: torch.Tensor, terminals: torch.Tensor) -> torch.Tensor:
    """cat[obs [B,H,O], rew [B,H], term [B,H]] -> x0 [B,H,O+2]."""
    if observations.dim() != 3:
        raise ValueError(f"observations: expected [B, H, O], got {list(observations.shape)}")
    bh = list(observations.shape[:2])
    for name, v in (("rewards", rewards), ("terminals", terminals)):
        if list(v.shape) != bh:
            raise ValueError(f"{name}: expected {bh}, got {list(v.shape)}")
    return torch.cat([observations, rewards[..., None].to(observations.dtype),
                      terminals[..., None].to(observations.dtype)], dim=-1)


class DiffusionLoss(nn.Module):
    """Denoising loss: ``loss, metrics = loss_fn(denoiser, x0, actions)``.

    Per sample: t ~ U{0..T-1}; x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps with x0's first observation imposed;
    act_t = sqrt(abar_t) a (+ sqrt(1-abar_t) * action_condition_noise_scale * eps_a); x0_hat = denoiser(x_t, act_t, t)
    is the denoiser's estimate of x0 (the paper trains x0-prediction, and the samplers read the output as x0);
    x0's first observation is imposed on x0_hat, so those entries add 0 and get no gradient;
    loss = mean over all B*H*D entries of |x0_hat - x0| ('l1') or squared ('l2').

    ``noising_fn`` is the forward-noising op with ``reference.step_ops.q_sample``'s signature; a fused kernel can
    be swapped in by assigning the attribute. The schedule tables are non-persistent float32 buffers.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        loss_type: LossType = "l2",
        action_condition_noise_scale: float = 0.0,
        noising_fn: Callable = q_sample,
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        scale = action_condition_noise_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"action_condition_noise_scale must be a finite number >= 0, got {scale!r}")
        self.n_steps = schedule.n_steps
        self.loss_type = loss_type
        self.action_condition_noise_scale = float(scale)
        self.noising_fn = noising_fn
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            self.register_buffer(name, schedule.table(name), persistent=False)

    def forward(
        self,
        denoiser: nn.Module,
        x0: torch.Tensor,
        actions: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        action_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x0 [B,H,D], actions [B,H,A] -> (scalar fp32 loss, {'obs_mse', 'reward_mse', 'term_mse'} detached).

        t [B], noise [B,H,D], action_noise [B,H,A] are drawn from ``generator`` (in that order) unless given;
        action_noise only when action_condition_noise_scale != 0. Metrics are MSEs of x0_hat vs x0 per column group.
        """
        B, H, D = x0.shape
        obs_dim = D - 2
        if t is None:
            t = torch.randint(0, self.n_steps, (B,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if action_noise is None and self.action_condition_noise_scale != 0.0:
            action_noise = torch.randn(actions.shape, device=actions.device, dtype=actions.dtype, generator=generator)
        x_t, act_t = self.noising_fn(x0, actions, t, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod,
                                     noise, action_noise, self.action_condition_noise_scale, obs_dim)
        x0_hat = impose_start_obs(denoiser(x_t, act_t, t), x0[:, 0, :obs_dim])
        err = x0_hat.float() - x0.float()
        sq = err.square()
        loss = sq.mean() if self.loss_type == "l2" else err.abs().mean()
        sq = sq.detach()
        metrics = {"obs_mse": sq[..., :obs_dim].mean(), "reward_mse": sq[..., -2].mean(), "term_mse": sq[..., -1].mean()}
        return loss, metrics
