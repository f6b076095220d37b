"""Reference twins of the fused per-step ops: plain, readable torch, one elementwise sequence each.

Every fast implementation (the fused Triton kernels in ``polygrad_fast.kernels``, the fast torch path of
``FastGuidedSampler``) is tested element by element against these functions with explicit noise.

Shapes: B batch, H horizon, D = O + 2 (normalised obs, reward, terminal), O obs dim, A action dim.
``t`` is the reverse-step index (python int, ``T-1 .. 0``); per-t coefficients come from
``NoiseSchedule.step_table()`` [T, 4] with columns ``STEP_TABLE_COLUMNS``.
"""
from __future__ import annotations

import torch

from ..schedule import STEP_TABLE_COLUMNS

# The paper clamps the posterior-mean change only in the last reverse steps, where the noise is small and a
# denoiser error would otherwise jump the state (polygrad-reference.md S3).
CLIP_STATE_CHANGE_MAX_T = 10
GUIDANCE_TYPES = ("grad", "sample", "none")
STATES_FOR_GUIDANCE = ("recon", "posterior_mean")

_SQRT_ABAR, _COEF1, _COEF2, _SIGMA = (STEP_TABLE_COLUMNS.index(c) for c in (
    "sqrt_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_std"))


def impose_start_obs(x: torch.Tensor, start_obs: torch.Tensor) -> torch.Tensor:
    """Copy of x [B,H,D] with the first step's observation set to start_obs [B,O]."""
    x = x.clone()
    x[:, 0, : start_obs.shape[-1]] = start_obs
    return x


def guided_state_update(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    start_obs: torch.Tensor,
    t: int,
    step_table: torch.Tensor,
    obs_mean: torch.Tensor,
    obs_scale: torch.Tensor,
    clip_state_change: float | None,
    noise: torch.Tensor | None,
    states_for_guidance: str = "recon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """State half of one guided reverse step (kernel A).

    x, x0_pred, noise: [B,H,D] (normalised); start_obs: [B,O] normalised; obs_mean, obs_scale: [O] (raw = x*scale+mean).
    Returns (x_next [B,H,D], posterior mean before noise [B,H,D], guide_states [B,H,O] in raw units): x0 gets the
    first observation imposed; mean = coef1_t*x0 + coef2_t*x, its change clamped to +-clip_state_change when
    t <= 10; x_next = mean + sigma_t*noise (no noise at t = 0) with the first observation imposed again.
    The policy is evaluated on guide_states: x0 ('recon') or the (clamped) posterior mean ('posterior_mean').
    """
    if states_for_guidance not in STATES_FOR_GUIDANCE:
        raise ValueError(f"states_for_guidance must be one of {STATES_FOR_GUIDANCE}, got {states_for_guidance!r}")
    return state_update_at(
        x, x0_pred, start_obs, step_table[t], obs_mean, obs_scale,
        clip_state_change if t <= CLIP_STATE_CHANGE_MAX_T else None, None if t == 0 else noise,
        states_for_guidance)


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
    """``guided_state_update`` with step t resolved by the caller: coef = step_table[t] [4]; clip_state_change
    None unless t <= 10; noise None at t = 0. Branches only on Python values, so ``torch.compile`` traces one
    graph per (clip, noise) combination instead of one per t.
    """
    x0 = impose_start_obs(x0_pred, start_obs)
    mean = coef[_COEF1] * x0 + coef[_COEF2] * x
    if clip_state_change is not None:
        mean = x + (mean - x).clamp(-clip_state_change, clip_state_change)
    x_next = mean if noise is None else mean + coef[_SIGMA] * noise
    x_next = impose_start_obs(x_next, start_obs)
    obs_dim = start_obs.shape[-1]
    guide = (x0 if states_for_guidance == "recon" else mean)[..., :obs_dim]
    return x_next, mean, guide * obs_scale + obs_mean


def guided_action_update(
    actions: torch.Tensor,
    policy_mean: torch.Tensor,
    policy_std: torch.Tensor,
    act_mean: torch.Tensor,
    act_scale: torch.Tensor,
    t: int,
    step_table: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    clip_std: float | None,
    noise: torch.Tensor | None,
    action_noise_scale: float = 1.0,
    guidance_type: str = "grad",
) -> torch.Tensor:
    """Action half of one guided reverse step (kernel B), closed-form guidance for a Normal policy.

    actions, noise: [B,H,A] normalised; policy_mean, policy_std: [B,H,A] (or broadcastable) in raw action units;
    act_mean, act_scale: [A]. Returns the new normalised actions [B,H,A].
      t = 0 (any type): clamp raw actions to mean +- clip_std*std only (the last step is never guided).
      'grad':   clamp, then a += w * d/da log N(a; mean, std) = w * (mean - a) / std^2, renormalise,
                add action_noise_scale * sigma_t * noise.
      'sample': the policy's sample mean + std*noise, normalised (no clamp, no extra noise).
      'none':   actions unchanged.
    """
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"guidance_type must be one of {GUIDANCE_TYPES}, got {guidance_type!r}")
    return action_update_at(actions, policy_mean, policy_std, act_mean, act_scale, step_table[t], guidance_scale,
                            clip_std, noise, action_noise_scale, guidance_type, last=t == 0)


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
    """``guided_action_update`` with step t resolved by the caller: coef = step_table[t] [4], last = (t == 0)."""
    a = actions * act_scale + act_mean
    if last or guidance_type == "grad":
        if clip_std is not None:
            a = torch.minimum(torch.maximum(a, policy_mean - clip_std * policy_std), policy_mean + clip_std * policy_std)
        if last:
            return (a - act_mean) / act_scale
        a = a + guidance_scale * (policy_mean - a) / policy_std**2
        return (a - act_mean) / act_scale + action_noise_scale * coef[_SIGMA] * noise
    if guidance_type == "sample":
        return (policy_mean + policy_std * noise - act_mean) / act_scale
    return actions.clone()


def q_sample(
    x0: torch.Tensor,
    actions: torch.Tensor,
    t: torch.Tensor,
    step_table_sqrt_abar: torch.Tensor,
    step_table_sqrt_one_minus_abar: torch.Tensor,
    noise: torch.Tensor,
    action_noise: torch.Tensor | None = None,
    action_noise_scale: float = 0.0,
    obs_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time forward noising (kernel C).

    x0, noise: [B,H,D]; actions, action_noise: [B,H,A]; t: [B] int64; the two tables: [T].
    Returns (x_t [B,H,D] with x0's first observation imposed when obs_dim is given,
             act_t = sqrt(abar_t)*a + sqrt(1-abar_t)*action_noise_scale*action_noise [B,H,A]).
    """
    sa = step_table_sqrt_abar[t].view(-1, 1, 1)
    s1 = step_table_sqrt_one_minus_abar[t].view(-1, 1, 1)
    x_t = sa * x0 + s1 * noise
    if obs_dim is not None:
        x_t = impose_start_obs(x_t, x0[:, 0, :obs_dim])
    act_t = sa * actions
    if action_noise is not None and action_noise_scale != 0.0:
        act_t = act_t + s1 * action_noise_scale * action_noise
    return x_t, act_t
