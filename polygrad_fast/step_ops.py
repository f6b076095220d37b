"""The two row-level ops of one guided reverse step, and the forward noising, in plain torch.

What the fast torch path runs (eager or under ``torch.compile``) and what the fused Triton kernels
(``polygrad_fast.kernels``) implement in one pass each; both are tested against the paper-style twins in
``polygrad_fast.reference``.

Shapes: B batch, H horizon, D = O + 2 (normalised obs, reward, terminal), O obs dim, A action dim. A step t is
resolved by the caller into coef = ``NoiseSchedule.step_table()[t]`` [6] (columns ``STEP_TABLE_COLUMNS``, read
through the indices below), the clip switch (``CLIP_STATE_CHANGE_MAX_T``), ``noise=None`` at t = 0 and ``last``:
the ops branch only on Python values, so ``torch.compile`` traces one graph per branch instead of one per t.
"""
from __future__ import annotations

import typing
from typing import Literal

import torch

from .schedule import STEP_TABLE_COLUMNS

GuidanceType = Literal["grad", "sample", "none"]
StatesForGuidance = Literal["recon", "posterior_mean"]
GUIDANCE_TYPES: tuple[str, ...] = typing.get_args(GuidanceType)
STATES_FOR_GUIDANCE: tuple[str, ...] = typing.get_args(StatesForGuidance)

# The paper clamps the change of the posterior mean only in the last reverse steps t <= 10, where the noise is
# small and a denoiser error would otherwise jump the state.
CLIP_STATE_CHANGE_MAX_T = 10

# Column indices of a step-table row: sqrt(abar_t), the two posterior-mean coefficients, the posterior std, the
# number of trained steps the row spans and the root mean square of their posterior stds.
SQRT_ABAR, COEF1, COEF2, SIGMA, TRAINED_STEPS, SPANNED_STD = (STEP_TABLE_COLUMNS.index(c) for c in (
    "sqrt_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_std", "trained_steps",
    "spanned_posterior_std"))


def impose_start_obs(x: torch.Tensor, start_obs: torch.Tensor) -> torch.Tensor:
    """Copy of x [B,H,D] with the first step's observation set to start_obs [B,O]."""
    x = x.clone()
    x[:, 0, : start_obs.shape[-1]] = start_obs
    return x


def state_update_at(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    start_obs: torch.Tensor,
    coef: torch.Tensor,
    obs_mean: torch.Tensor,
    obs_scale: torch.Tensor,
    clip_state_change: float | None,
    noise: torch.Tensor | None,
    states_for_guidance: str = "recon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """State half of one guided reverse step.

    x, x0_pred, noise: [B,H,D] normalised; start_obs [B,O] normalised; obs_mean, obs_scale [O] (raw = x*scale+mean).
    x0 gets the first observation imposed; the posterior mean mu = coef1_t x0 + coef2_t x_t, its change mu - x_t
    clamped to +-clip_state_change (None: off); x_{t-1} = mu + sigma_t noise (noise None: none) with the first
    observation imposed again. Returns (x_{t-1} [B,H,D], mu [B,H,D], guide states [B,H,O] in RAW units: x0
    ('recon') or mu ('posterior_mean'), what the policy is evaluated on).
    """
    x0 = impose_start_obs(x0_pred, start_obs)
    mean = coef[COEF1] * x0 + coef[COEF2] * x
    if clip_state_change is not None:
        mean = x + (mean - x).clamp(-clip_state_change, clip_state_change)
    x_next = mean if noise is None else mean + coef[SIGMA] * noise
    x_next = impose_start_obs(x_next, start_obs)
    guide = (x0 if states_for_guidance == "recon" else mean)[..., : start_obs.shape[-1]]
    return x_next, mean, guide * obs_scale + obs_mean


# The guidance step's coefficient w / std^2 is capped at 1: a step that passes the policy's mean lowers log pi
# again (at 2 it lands as far on the other side, beyond 2 the actions diverge until clip_std stops them), and the
# spread it causes makes the guidance-scale tuner raise w further: on pendulum-cpu (seed 1) the scale ran from
# 0.005 to 2.6e12 within 1,200 env steps once w / std^2 crossed 1, and the agent's return fell to 2. Below the
# cap the update is the paper's.
GUIDANCE_STEP_CAP = 1.0


def compact_broadcast(t: torch.Tensor) -> torch.Tensor:
    """t with every broadcast (stride-0) dim narrowed to size 1: the same values, broadcastable back to t.shape.

    A state-independent policy std arrives as std [A] expanded to [B,H,A]; the guidance coefficients computed from
    it (a log1p, an expm1, a sqrt and two divisions per element) then run once per action dim instead of once per
    guide state (eager action update at H=10, A=3, AMX, 2 threads: 139 -> 104 us at B=256, 394 -> 240 us at
    B=1024), and torch.compile keeps them as an [A] buffer instead of recomputing them in the [B,H,A] loop (the
    compiled step's update kernel: 340 -> 309 us at B=1024)."""
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            t = t.narrow(d, 0, 1)
    return t


def action_update_at(
    actions: torch.Tensor,
    policy_mean: torch.Tensor,
    policy_std: torch.Tensor,
    act_mean: torch.Tensor,
    act_scale: torch.Tensor,
    coef: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    clip_std: float | None,
    noise: torch.Tensor | None,
    action_noise_scale: float,
    guidance_type: str,
    last: bool,
) -> torch.Tensor:
    """Action half of one guided reverse step, closed-form guidance for a diagonal Normal policy.

    actions, noise: [B,H,A] normalised; policy_mean, policy_std: [B,H,A] (or broadcastable) in RAW action units;
    act_mean, act_scale: [A]. Returns the new normalised actions [B,H,A]:
      last (t = 0, any type): clamp raw actions to mean +- clip_std*std only (the last step is never guided);
      'grad':   clamp, then a += p (mean - a), normalise, add action_noise_scale * s * noise, where the step
                w * d/da log N(a; mean, std) = w (mean - a) / std^2, capped where it would pass the policy mean
                (c = min(w / std^2, 1)), is compounded over the n = coef[TRAINED_STEPS] trained steps the row
                spans, as those steps would take it with their noise between them (the policy held fixed):
                p = 1 - (1 - c)^n and s^2 = coef[SPANNED_STD]^2 sum_{k<n} (1 - c)^(2k)
                = coef[SPANNED_STD]^2 p (2 - p) / (c (2 - c)) (n s_rms^2 at c = 0). On the trained chain (n = 1)
                this is the paper's step: p = c, s = sigma_t;
      'sample': the policy's sample mean + std * noise, normalised (no clamp, no extra noise);
      'none':   actions unchanged.
    """
    a = actions * act_scale + act_mean
    if last or guidance_type == "grad":
        if clip_std is not None:
            a = torch.minimum(torch.maximum(a, policy_mean - clip_std * policy_std), policy_mean + clip_std * policy_std)
        if last:
            return (a - act_mean) / act_scale
        # the step w (mean - a) / std^2 is capped at the policy mean (GUIDANCE_STEP_CAP), compounded over the
        # trained steps the row spans (docs/algorithm.md, "Few-step sampling"); expm1/log1p: p and c(2-c) stay
        # accurate for c << 1, where 1 - (1 - c)^n would lose their digits in fp32. On the trained chain (n = 1)
        # the extra ops are redundant: +30 us per step eager at B=256, H=10, A=3 (90 vs 60 us, AMX, 2 threads),
        # 0.6% of a Hopper-shape step; fused into the step's graph when compiled.
        c = torch.clamp(guidance_scale / compact_broadcast(policy_std)**2, max=GUIDANCE_STEP_CAP)
        n = coef[TRAINED_STEPS]
        p = -torch.expm1(n * torch.log1p(-c))
        noise_var_ratio = torch.where(c > 0, p * (2 - p) / (c * (2 - c)), n)
        a = a + p * (policy_mean - a)
        noise_std = coef[SPANNED_STD] * noise_var_ratio.sqrt()
        return (a - act_mean) / act_scale + action_noise_scale * noise_std * noise
    if guidance_type == "sample":
        return (policy_mean + policy_std * noise - act_mean) / act_scale
    return actions.clone()


def q_sample(
    x0: torch.Tensor,
    actions: torch.Tensor,
    t: torch.Tensor,
    sqrt_abar: torch.Tensor,
    sqrt_one_minus_abar: torch.Tensor,
    noise: torch.Tensor,
    action_noise: torch.Tensor | None = None,
    action_noise_scale: float = 0.0,
    obs_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time forward noising q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    x0, noise: [B,H,D]; actions, action_noise: [B,H,A]; t: [B] int64; the two tables: [T].
    Returns (x_t [B,H,D], with x0's first observation imposed when obs_dim is given,
             act_t = sqrt(abar_t) a + sqrt(1 - abar_t) action_noise_scale action_noise [B,H,A]).
    """
    sa = sqrt_abar[t].view(-1, 1, 1)
    s1 = sqrt_one_minus_abar[t].view(-1, 1, 1)
    x_t = sa * x0 + s1 * noise
    if obs_dim is not None:
        x_t = impose_start_obs(x_t, x0[:, 0, :obs_dim])
    act_t = sa * actions
    if action_noise is not None and action_noise_scale != 0.0:
        act_t = act_t + s1 * action_noise_scale * action_noise
    return x_t, act_t
