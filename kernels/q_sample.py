"""Kernel C: training-time forward noising of states and actions in one pass.

Fuses ``polygrad_fast.step_ops.q_sample`` (paper-style twin: ``reference.step_ops.q_sample``).

Tiles: [BLOCK_R rows of B*H, BLOCK_D >= D] for the states and [BLOCK_R, BLOCK_A >= A] for the actions, with the
per-sample step t[b] gathered once per row; math in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ACTION_STREAM, STATE_STREAM, check_same_device, device_scalar, row_block, rows_per_program,
                      standard_normal)


@triton.jit
def _q_sample_kernel(
    x0_ptr, act_ptr, t_ptr, sqrt_abar_ptr, sqrt_1m_abar_ptr, noise_ptr, act_noise_ptr, seed_ptr, x_t_ptr, act_t_ptr,
    n_rows, horizon, D, A, O, act_noise_scale,
    PHILOX: tl.constexpr, ACT_NOISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    rows, row_ok = row_block(n_rows, BLOCK_R)
    t = tl.load(t_ptr + rows // horizon, mask=row_ok, other=0)
    sa = tl.load(sqrt_abar_ptr + t, mask=row_ok).to(tl.float32)
    s1 = tl.load(sqrt_1m_abar_ptr + t, mask=row_ok).to(tl.float32)
    if PHILOX:
        seed = tl.load(seed_ptr)

    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = row_ok & (cols < D)
    idx = rows * D + cols
    x0 = tl.load(x0_ptr + idx, mask=mask).to(tl.float32)
    if PHILOX:
        z = standard_normal(seed, t, idx, STATE_STREAM)
    else:
        z = tl.load(noise_ptr + idx, mask=mask).to(tl.float32)
    # x0's own first observation stays in place (rows with h == 0, columns < O).
    x_t = tl.where((rows % horizon == 0) & (cols < O), x0, sa * x0 + s1 * z)
    tl.store(x_t_ptr + idx, x_t.to(x_t_ptr.dtype.element_ty), mask=mask)

    cols = tl.arange(0, BLOCK_A)[None, :]
    mask = row_ok & (cols < A)
    idx = rows * A + cols
    act_t = sa * tl.load(act_ptr + idx, mask=mask).to(tl.float32)
    if ACT_NOISE:
        if PHILOX:
            za = standard_normal(seed, t, idx, ACTION_STREAM)
        else:
            za = tl.load(act_noise_ptr + idx, mask=mask).to(tl.float32)
        act_t = act_t + (s1 * act_noise_scale) * za
    tl.store(act_t_ptr + idx, act_t.to(act_t_ptr.dtype.element_ty), mask=mask)


def _launch_args(x0, actions, t, sqrt_abar, sqrt_1m_abar, noise, action_noise, action_noise_scale, obs_dim, seed):
    """(grid, kernel arguments) of one launch; split from the launch so the AOT build test sees the real variants."""
    if x0.dim() != 3 or actions.dim() != 3 or actions.shape[:2] != x0.shape[:2]:
        raise ValueError(f"x0 must be [B,H,D] and actions [B,H,A], got {tuple(x0.shape)} and {tuple(actions.shape)}")
    B, H, D = x0.shape
    A = actions.shape[-1]
    if t.shape != (B,) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"t must be an integer tensor [{B}], got {t.dtype} {tuple(t.shape)}")
    if sqrt_abar.dim() != 1 or sqrt_1m_abar.shape != sqrt_abar.shape:
        raise ValueError(f"the two tables must be [T], got {tuple(sqrt_abar.shape)} and {tuple(sqrt_1m_abar.shape)}")
    if obs_dim is not None and not 0 <= obs_dim <= D:
        raise ValueError(f"obs_dim must be in [0, {D}], got {obs_dim}")
    if (noise is None) == (seed is None):
        raise ValueError("pass exactly one of noise and seed")
    if seed is not None and action_noise is not None:
        raise ValueError("with a seed the action noise is drawn in the kernel; do not pass action_noise")
    if noise is not None and noise.shape != x0.shape:
        raise ValueError(f"noise must be {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if action_noise is not None and action_noise.shape != actions.shape:
        raise ValueError(f"action_noise must be {tuple(actions.shape)}, got {tuple(action_noise.shape)}")
    optional = {k: v for k, v in (("noise", noise), ("action_noise", action_noise)) if v is not None}
    device = check_same_device(x0=x0, actions=actions, t=t, sqrt_abar=sqrt_abar, sqrt_1m_abar=sqrt_1m_abar, **optional)
    x0, actions, t, sqrt_abar, sqrt_1m_abar = (v.contiguous() for v in (x0, actions, t, sqrt_abar, sqrt_1m_abar))
    philox = seed is not None
    act_noise = action_noise_scale != 0.0 and (philox or action_noise is not None)
    # Pointers that the chosen variant never reads get a harmless stand-in.
    seed_t = device_scalar(seed, device, torch.int64) if philox else x0
    noise = noise.contiguous() if noise is not None else x0
    action_noise = action_noise.contiguous() if action_noise is not None else actions

    x_t, act_t = torch.empty_like(x0), torch.empty_like(actions)
    block_d, block_a = triton.next_power_of_2(D), triton.next_power_of_2(A)
    block_r = rows_per_program(B * H, max(block_d, block_a))
    args = dict(
        x0_ptr=x0, act_ptr=actions, t_ptr=t, sqrt_abar_ptr=sqrt_abar, sqrt_1m_abar_ptr=sqrt_1m_abar, noise_ptr=noise,
        act_noise_ptr=action_noise, seed_ptr=seed_t, x_t_ptr=x_t, act_t_ptr=act_t,
        n_rows=B * H, horizon=H, D=D, A=A, O=0 if obs_dim is None else obs_dim,
        act_noise_scale=float(action_noise_scale),
        PHILOX=philox, ACT_NOISE=act_noise, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_A=block_a,
    )
    return (triton.cdiv(B * H, block_r),), args


def q_sample(
    x0: torch.Tensor,
    actions: torch.Tensor,
    t: torch.Tensor,
    step_table_sqrt_abar: torch.Tensor,
    step_table_sqrt_one_minus_abar: torch.Tensor,
    noise: torch.Tensor | None,
    action_noise: torch.Tensor | None = None,
    action_noise_scale: float = 0.0,
    obs_dim: int | None = None,
    seed: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``polygrad_fast.step_ops.q_sample``: returns (x_t [B,H,D], act_t [B,H,A]) in the inputs' dtypes.

    Same arguments; t: [B] integer tensor. With ``noise=None`` and ``seed`` (int or one-element int64 device
    tensor) both noises are drawn in the kernel from (seed, t[b], element).
    """
    grid, args = _launch_args(x0, actions, t, step_table_sqrt_abar, step_table_sqrt_one_minus_abar, noise,
                              action_noise, action_noise_scale, obs_dim, seed)
    _q_sample_kernel[grid](**args)
    return args["x_t_ptr"], args["act_t_ptr"]
