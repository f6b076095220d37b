"""Kernel B: the action half of one guided reverse step in one pass.

Fuses ``polygrad_fast.step_ops.action_update_at`` (t resolved by the caller into the coefficient row and
``last``). Tile: [BLOCK_R rows of B*H, BLOCK_A >= A columns]; math in fp32. Closed-form
guidance for the Normal policy: d/da log N(a; mean, std) = (mean - a) / std^2, no autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schedule import STEP_TABLE_COLUMNS
from ..step_ops import GUIDANCE_STEP_CAP, GUIDANCE_TYPES
from ._common import (ACTION_STREAM, SPANNED_STD_COL, TRAINED_STEPS_COL, check_noise_source, check_same_device,
                      device_scalar, row_block, rows_per_program, standard_normal)

_GRAD, _NONE = (tl.constexpr(GUIDANCE_TYPES.index(g)) for g in ("grad", "none"))
_STEP_CAP = tl.constexpr(GUIDANCE_STEP_CAP)


@triton.jit
def _log1p_neg(c):
    """log(1 - c) for c in [0, 1], accurate for small c (Goldberg: log(u) c / (1 - u) with u = fl(1 - c)); u is
    floored at 1e-30 so that c = 1 gives -69 (the pull then rounds to 1) instead of -inf."""
    u = tl.maximum(1.0 - c, 1e-30)
    exact = u == 1.0  # c below half an ulp of 1: log(1 - c) = -c to fp32 precision
    return tl.where(exact, -c, tl.math.div_rn(tl.log(u) * c, tl.where(exact, 1.0, 1.0 - u)))


@triton.jit
def _expm1_nonpositive(y):
    """exp(y) - 1 for y <= 0, accurate for small |y| (Kahan: (e - 1) y / log(e) with e = fl(exp(y)))."""
    e = tl.exp(y)
    near_one = (e >= 0.5) & (e < 1.0)  # where e - 1 loses digits; below 0.5 it is exact enough
    log_e = tl.log(tl.where(near_one, e, 0.5))  # never log(1) = 0 as a divisor, never log(0)
    return tl.where(e == 1.0, y, tl.where(near_one, tl.math.div_rn((e - 1.0) * y, log_e), e - 1.0))


@triton.jit
def _guided_action_update_kernel(
    act_ptr, pmean_ptr, pstd_ptr, act_mean_ptr, act_scale_ptr, coef_ptr, w_ptr, noise_ptr, seed_ptr, out_ptr,
    n_rows, A, pmean_row_stride, pstd_row_stride, step, clip_std, clip_on, guide_on, noise_scale,
    GUIDANCE: tl.constexpr, PHILOX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr,
):
    rows, row_ok = row_block(n_rows, BLOCK_R)
    cols = tl.arange(0, BLOCK_A)[None, :]
    col_ok = cols < A
    mask = row_ok & col_ok
    idx = rows * A + cols
    act = tl.load(act_ptr + idx, mask=mask).to(tl.float32)
    pm = tl.load(pmean_ptr + rows * pmean_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    ps = tl.load(pstd_ptr + rows * pstd_row_stride + cols, mask=mask, other=1.0).to(tl.float32)
    am = tl.load(act_mean_ptr + cols, mask=col_ok).to(tl.float32)
    asc = tl.load(act_scale_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)

    # div_rn: IEEE division like torch's (Triton's default fp32 division is approximate on GPUs).
    a = act * asc + am
    clipped = tl.where(clip_on, tl.minimum(tl.maximum(a, pm - clip_std * ps), pm + clip_std * ps), a)
    out = tl.math.div_rn(clipped - am, asc)  # t = 0: clamp only, whatever the guidance type
    if GUIDANCE != _NONE:
        if PHILOX:
            z = standard_normal(tl.load(seed_ptr), step, idx, ACTION_STREAM)
        else:
            z = tl.load(noise_ptr + idx, mask=mask & guide_on).to(tl.float32)
        if GUIDANCE == _GRAD:
            w = tl.load(w_ptr).to(tl.float32)
            spanned_std = tl.load(coef_ptr + SPANNED_STD_COL).to(tl.float32)
            # the step's coefficient w / std^2 capped (never past the policy mean), compounded over the n trained
            # steps the row spans with their noise (step_ops.action_update_at)
            gain = tl.minimum(tl.math.div_rn(w, ps * ps), _STEP_CAP)
            n = tl.load(coef_ptr + TRAINED_STEPS_COL).to(tl.float32)
            pull = -_expm1_nonpositive(n * _log1p_neg(gain))
            pulled = gain > 0
            span_var = tl.math.div_rn(pull * (2.0 - pull), tl.where(pulled, gain * (2.0 - gain), 1.0))
            var_ratio = tl.where(pulled, span_var, n)
            guided = clipped + pull * (pm - clipped)
            moved = tl.math.div_rn(guided - am, asc) + (noise_scale * spanned_std) * tl.sqrt_rn(var_ratio) * z
        else:
            moved = tl.math.div_rn(pm + ps * z - am, asc)
    else:
        moved = act
    out = tl.where(guide_on, moved, out)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_of(p: torch.Tensor, B: int, H: int, A: int) -> torch.Tensor:
    """p broadcast to [B*H, A] with unit column stride; a per-dimension [A] tensor stays a row-stride-0 view."""
    p = p.expand(B, H, A).reshape(B * H, A)
    return p if p.stride(1) == 1 else p.contiguous()


def _launch_args(actions, policy_mean, policy_std, act_mean, act_scale, coef, guidance_scale, clip_std, noise,
                 action_noise_scale, guidance_type, last, seed, step):
    """(grid, kernel arguments) of one launch; split from the launch so the AOT build test sees the real variants."""
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"guidance_type must be one of {GUIDANCE_TYPES}, got {guidance_type!r}")
    if actions.dim() != 3:
        raise ValueError(f"actions must be [B,H,A], got {tuple(actions.shape)}")
    B, H, A = actions.shape
    if act_mean.shape != (A,) or act_scale.shape != (A,):
        raise ValueError(f"act_mean/act_scale must be [{A}], got {tuple(act_mean.shape)}, {tuple(act_scale.shape)}")
    if coef.shape != (len(STEP_TABLE_COLUMNS),):
        raise ValueError(f"coef must be one step-table row [{len(STEP_TABLE_COLUMNS)}], got {tuple(coef.shape)}")
    check_noise_source(noise, seed, step, actions.shape)
    moves = not last and guidance_type != "none"  # the update reads noise
    if moves and noise is None and seed is None:
        raise ValueError(f"guidance_type {guidance_type!r} before the last step needs noise or a seed")
    device = check_same_device(actions=actions, policy_mean=policy_mean, policy_std=policy_std, act_mean=act_mean,
                               act_scale=act_scale, coef=coef, **({} if noise is None else {"noise": noise}))
    actions, act_mean, act_scale, coef = (v.contiguous() for v in (actions, act_mean, act_scale, coef))
    pmean, pstd = _rows_of(policy_mean, B, H, A), _rows_of(policy_std, B, H, A)
    philox = seed is not None and moves
    # Pointers that the chosen variant never reads get a harmless stand-in.
    seed_t = device_scalar(seed, device, torch.int64) if philox else actions
    noise = noise.contiguous() if noise is not None else actions
    w = device_scalar(guidance_scale, device, torch.float32) if guidance_type == "grad" else actions

    out = torch.empty_like(actions)
    block_a = triton.next_power_of_2(A)
    block_r = rows_per_program(B * H, block_a)
    args = dict(
        act_ptr=actions, pmean_ptr=pmean, pstd_ptr=pstd, act_mean_ptr=act_mean, act_scale_ptr=act_scale,
        coef_ptr=coef, w_ptr=w, noise_ptr=noise, seed_ptr=seed_t, out_ptr=out,
        n_rows=B * H, A=A, pmean_row_stride=pmean.stride(0), pstd_row_stride=pstd.stride(0),
        step=0 if step is None else step,
        clip_std=0.0 if clip_std is None else float(clip_std), clip_on=clip_std is not None, guide_on=not last,
        noise_scale=float(action_noise_scale),
        GUIDANCE=GUIDANCE_TYPES.index(guidance_type), PHILOX=philox, BLOCK_R=block_r, BLOCK_A=block_a,
    )
    return (triton.cdiv(B * H, block_r),), args


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
    *,
    seed: int | torch.Tensor | None = None,
    step: int | None = None,
) -> torch.Tensor:
    """Fused ``polygrad_fast.step_ops.action_update_at``: the new normalised actions [B,H,A] (actions' dtype).

    coef = step_table[t] [6], last = (t == 0); policy_mean/std broadcast to [B,H,A]; guidance_scale may be a
    one-element device tensor (read in the kernel, so a tuned scale needs no host sync). The noise is ``noise``
    [B,H,A] or, with ``seed`` (int or one-element int64 device tensor), drawn in the kernel from (seed, step,
    element).
    """
    grid, args = _launch_args(actions, policy_mean, policy_std, act_mean, act_scale, coef, guidance_scale, clip_std,
                              noise, action_noise_scale, guidance_type, last, seed, step)
    _guided_action_update_kernel[grid](**args)
    return args["out_ptr"]
