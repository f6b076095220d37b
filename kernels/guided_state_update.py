"""Kernel A: the state half of one guided reverse step in one pass.

Fuses ``polygrad_fast.step_ops.state_update_at`` (t resolved by the caller into the coefficient row, the clip
switch and the noise). Tile: [BLOCK_R rows of B*H, BLOCK_D >= D columns]; math in
fp32, whatever the input dtypes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schedule import STEP_TABLE_COLUMNS
from ..step_ops import STATES_FOR_GUIDANCE
from ._common import (COEF1_COL, COEF2_COL, SIGMA_COL, STATE_STREAM, check_noise_source, check_same_device,
                      device_scalar, row_block, rows_per_program, standard_normal)


@triton.jit
def _guided_state_update_kernel(
    x_ptr, x0_ptr, start_ptr, coef_ptr, obs_mean_ptr, obs_scale_ptr, noise_ptr, seed_ptr,
    x_next_ptr, mean_ptr, guide_ptr,
    n_rows, horizon, D, O, step, clip, clip_on, noise_on,
    RECON_GUIDE: tl.constexpr, PHILOX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok = row_block(n_rows, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = row_ok & (cols < D)
    idx = rows * D + cols
    # The first step's observation is pinned to start_obs: rows with h == 0, columns < O.
    pinned = mask & (rows % horizon == 0) & (cols < O)
    start = tl.load(start_ptr + (rows // horizon) * O + cols, mask=pinned).to(tl.float32)

    coef1 = tl.load(coef_ptr + COEF1_COL).to(tl.float32)
    coef2 = tl.load(coef_ptr + COEF2_COL).to(tl.float32)
    sigma = tl.load(coef_ptr + SIGMA_COL).to(tl.float32)

    x = tl.load(x_ptr + idx, mask=mask).to(tl.float32)
    x0 = tl.where(pinned, start, tl.load(x0_ptr + idx, mask=mask).to(tl.float32))
    mean = coef1 * x0 + coef2 * x
    mean = tl.where(clip_on, x + tl.minimum(tl.maximum(mean - x, -clip), clip), mean)
    if PHILOX:
        z = standard_normal(tl.load(seed_ptr), step, idx, STATE_STREAM)
    else:
        z = tl.load(noise_ptr + idx, mask=mask & noise_on).to(tl.float32)  # no noise tensor at the last step
    x_next = tl.where(noise_on, mean + sigma * z, mean)
    x_next = tl.where(pinned, start, x_next)
    tl.store(x_next_ptr + idx, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + idx, mean.to(mean_ptr.dtype.element_ty), mask=mask)

    obs = cols < O
    guide = x0 if RECON_GUIDE else mean
    obs_scale = tl.load(obs_scale_ptr + cols, mask=obs).to(tl.float32)
    guide = guide * obs_scale + tl.load(obs_mean_ptr + cols, mask=obs).to(tl.float32)
    tl.store(guide_ptr + rows * O + cols, guide.to(guide_ptr.dtype.element_ty), mask=row_ok & obs)


def _launch_args(x, x0_pred, start_obs, coef, obs_mean, obs_scale, clip_state_change, noise, states_for_guidance,
                 seed, step):
    """(grid, kernel arguments) of one launch; split from the launch so the AOT build test sees the real variants."""
    if states_for_guidance not in STATES_FOR_GUIDANCE:
        raise ValueError(f"states_for_guidance must be one of {STATES_FOR_GUIDANCE}, got {states_for_guidance!r}")
    if x.dim() != 3 or x0_pred.shape != x.shape:
        raise ValueError(f"x and x0_pred must both be [B,H,D], got {tuple(x.shape)} and {tuple(x0_pred.shape)}")
    B, H, D = x.shape
    O = start_obs.shape[-1]
    if start_obs.shape != (B, O) or O > D or obs_mean.shape != (O,) or obs_scale.shape != (O,):
        raise ValueError(f"start_obs must be [B,O] with O <= D and obs stats [O]; got x {tuple(x.shape)}, "
                         f"start_obs {tuple(start_obs.shape)}, obs_mean {tuple(obs_mean.shape)}, "
                         f"obs_scale {tuple(obs_scale.shape)}")
    if coef.shape != (len(STEP_TABLE_COLUMNS),):
        raise ValueError(f"coef must be one step-table row [{len(STEP_TABLE_COLUMNS)}], got {tuple(coef.shape)}")
    check_noise_source(noise, seed, step, x.shape)
    device = check_same_device(x=x, x0_pred=x0_pred, start_obs=start_obs, coef=coef, obs_mean=obs_mean,
                               obs_scale=obs_scale, **({} if noise is None else {"noise": noise}))
    x, x0_pred, start_obs, coef, obs_mean, obs_scale = (
        v.contiguous() for v in (x, x0_pred, start_obs, coef, obs_mean, obs_scale))
    philox, noise_on = seed is not None, seed is not None or noise is not None
    # Pointers that the chosen variant never reads get a harmless stand-in.
    seed_t = device_scalar(seed, device, torch.int64) if philox else x
    noise = noise.contiguous() if noise is not None else x

    x_next, mean = torch.empty_like(x), torch.empty_like(x)
    guide = torch.empty((B, H, O), dtype=x.dtype, device=device)
    block_d = triton.next_power_of_2(D)
    block_r = rows_per_program(B * H, block_d)
    args = dict(
        x_ptr=x, x0_ptr=x0_pred, start_ptr=start_obs, coef_ptr=coef, obs_mean_ptr=obs_mean, obs_scale_ptr=obs_scale,
        noise_ptr=noise, seed_ptr=seed_t, x_next_ptr=x_next, mean_ptr=mean, guide_ptr=guide,
        n_rows=B * H, horizon=H, D=D, O=O, step=0 if step is None else step,
        clip=0.0 if clip_state_change is None else float(clip_state_change), clip_on=clip_state_change is not None,
        noise_on=noise_on,
        RECON_GUIDE=states_for_guidance == "recon", PHILOX=philox, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return (triton.cdiv(B * H, block_r),), args


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
    *,
    seed: int | torch.Tensor | None = None,
    step: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``polygrad_fast.step_ops.state_update_at``: (x_next [B,H,D], mean [B,H,D], guide [B,H,O]), x's dtype.

    coef = step_table[t] [6]; clip_state_change None disables the clamp; the noise is ``noise`` [B,H,D], or with
    ``seed`` (int or one-element int64 device tensor) drawn in the kernel from (seed, step, element), or absent
    when both are None (the last step).
    """
    grid, args = _launch_args(x, x0_pred, start_obs, coef, obs_mean, obs_scale, clip_state_change, noise,
                              states_for_guidance, seed, step)
    _guided_state_update_kernel[grid](**args)
    return args["x_next_ptr"], args["mean_ptr"], args["guide_ptr"]
