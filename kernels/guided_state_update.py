"""Kernel A: the state half of one guided reverse step in one pass (twin: ``reference.step_ops.guided_state_update``).

Tile: [BLOCK_R rows of B*H, BLOCK_D >= D columns]; math in fp32, whatever the input dtypes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.step_ops import CLIP_STATE_CHANGE_MAX_T, STATES_FOR_GUIDANCE
from ._common import STATE_STREAM, check_same_device, device_scalar, row_block, rows_per_program, standard_normal


@triton.jit
def _guided_state_update_kernel(
    x_ptr, x0_ptr, start_ptr, table_ptr, obs_mean_ptr, obs_scale_ptr, noise_ptr, seed_ptr,
    x_next_ptr, mean_ptr, guide_ptr,
    n_rows, horizon, D, O, t, clip, clip_on, noise_on,
    RECON_GUIDE: tl.constexpr, PHILOX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok = row_block(n_rows, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = row_ok & (cols < D)
    idx = rows * D + cols
    # The first step's observation is pinned to start_obs: rows with h == 0, columns < O.
    pinned = mask & (rows % horizon == 0) & (cols < O)
    start = tl.load(start_ptr + (rows // horizon) * O + cols, mask=pinned).to(tl.float32)

    coef1 = tl.load(table_ptr + 4 * t + 1).to(tl.float32)
    coef2 = tl.load(table_ptr + 4 * t + 2).to(tl.float32)
    sigma = tl.load(table_ptr + 4 * t + 3).to(tl.float32)

    x = tl.load(x_ptr + idx, mask=mask).to(tl.float32)
    x0 = tl.where(pinned, start, tl.load(x0_ptr + idx, mask=mask).to(tl.float32))
    mean = coef1 * x0 + coef2 * x
    mean = tl.where(clip_on, x + tl.minimum(tl.maximum(mean - x, -clip), clip), mean)
    if PHILOX:
        z = standard_normal(tl.load(seed_ptr), t, idx, STATE_STREAM)
    else:
        z = tl.load(noise_ptr + idx, mask=mask & noise_on).to(tl.float32)  # no noise tensor is needed at t = 0
    x_next = tl.where(noise_on, mean + sigma * z, mean)
    x_next = tl.where(pinned, start, x_next)
    tl.store(x_next_ptr + idx, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + idx, mean.to(mean_ptr.dtype.element_ty), mask=mask)

    obs = cols < O
    guide = x0 if RECON_GUIDE else mean
    obs_scale = tl.load(obs_scale_ptr + cols, mask=obs).to(tl.float32)
    guide = guide * obs_scale + tl.load(obs_mean_ptr + cols, mask=obs).to(tl.float32)
    tl.store(guide_ptr + rows * O + cols, guide.to(guide_ptr.dtype.element_ty), mask=row_ok & obs)


def _launch_args(x, x0_pred, start_obs, t, step_table, obs_mean, obs_scale, clip_state_change, noise,
                 states_for_guidance, seed):
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
    if step_table.dim() != 2 or step_table.shape[1] != 4 or not 0 <= t < step_table.shape[0]:
        raise ValueError(f"need step_table [T,4] and 0 <= t < T, got {tuple(step_table.shape)} and t={t}")
    if noise is not None and seed is not None:
        raise ValueError("pass either noise or seed, not both")
    if t > 0 and noise is None and seed is None:
        raise ValueError("t > 0 needs noise or a seed")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must be {tuple(x.shape)}, got {tuple(noise.shape)}")
    device = check_same_device(x=x, x0_pred=x0_pred, start_obs=start_obs, step_table=step_table, obs_mean=obs_mean,
                               obs_scale=obs_scale, **({} if noise is None else {"noise": noise}))
    x, x0_pred, start_obs, step_table, obs_mean, obs_scale = (
        v.contiguous() for v in (x, x0_pred, start_obs, step_table, obs_mean, obs_scale))
    philox = seed is not None
    seed_t = device_scalar(seed, device, torch.int64) if philox else x  # never read in the other mode
    noise = noise.contiguous() if noise is not None else x  # never read: PHILOX, or masked off at t = 0

    x_next, mean = torch.empty_like(x), torch.empty_like(x)
    guide = torch.empty((B, H, O), dtype=x.dtype, device=device)
    block_d = triton.next_power_of_2(D)
    block_r = rows_per_program(B * H, block_d)
    args = dict(
        x_ptr=x, x0_ptr=x0_pred, start_ptr=start_obs, table_ptr=step_table, obs_mean_ptr=obs_mean,
        obs_scale_ptr=obs_scale, noise_ptr=noise, seed_ptr=seed_t, x_next_ptr=x_next, mean_ptr=mean, guide_ptr=guide,
        n_rows=B * H, horizon=H, D=D, O=O, t=t,
        clip=0.0 if clip_state_change is None else float(clip_state_change),
        clip_on=clip_state_change is not None and t <= CLIP_STATE_CHANGE_MAX_T, noise_on=t > 0,
        RECON_GUIDE=states_for_guidance == "recon", PHILOX=philox, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return (triton.cdiv(B * H, block_r),), args


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
    seed: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``reference.step_ops.guided_state_update``: returns (x_next [B,H,D], mean [B,H,D], guide [B,H,O]).

    Same arguments; outputs have x's dtype. With ``noise=None`` and ``seed`` (int or one-element int64 device
    tensor) the noise is drawn in the kernel from (seed, t, element).
    """
    grid, args = _launch_args(x, x0_pred, start_obs, t, step_table, obs_mean, obs_scale, clip_state_change, noise,
                              states_for_guidance, seed)
    _guided_state_update_kernel[grid](**args)
    return args["x_next_ptr"], args["mean_ptr"], args["guide_ptr"]
