"""Shared pieces of the fused step kernels: in-kernel normal noise and launcher helpers.

Noise is Philox keyed by the seed with the counter (element index, step t, stream, 0): every (seed, t, stream,
element) gets its own normal sample, independent of the launch's block sizes, so a sampling call is reproducible
for a seed and can be captured in a CUDA graph with the seed read from device memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..step_ops import COEF1, COEF2, SIGMA, SPANNED_STD, TRAINED_STEPS

# Columns of a step-table row the kernels read (one definition: schedule.STEP_TABLE_COLUMNS via step_ops).
COEF1_COL, COEF2_COL, SIGMA_COL, TRAINED_STEPS_COL, SPANNED_STD_COL = (
    tl.constexpr(c) for c in (COEF1, COEF2, SIGMA, TRAINED_STEPS, SPANNED_STD))

# Philox streams: kernels A and B run at the same (seed, t) over overlapping element indices, so the state and
# action noise must come from different counters.
STATE_STREAM = tl.constexpr(0)
ACTION_STREAM = tl.constexpr(1)

# Elements one program handles; large enough that the interpreter (about 0.7 ms per program) stays cheap on test
# shapes, small enough to keep register pressure modest with 4 warps on a GPU.
ELEMENTS_PER_PROGRAM = 2048


@triton.jit
def standard_normal(seed, step, index, STREAM: tl.constexpr):
    """N(0, 1) fp32 block shaped like ``index`` (int32 element indices) for the counter (index, step, STREAM).

    ``step`` is a scalar or a block broadcastable to ``index`` (per-row steps of q_sample).
    """
    zero = index * 0
    r0, r1, _, _ = tl.philox(seed, index, (zero + step).to(tl.int32), zero + STREAM, zero)
    z, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    return z


@triton.jit
def row_block(n_rows, BLOCK_R: tl.constexpr):
    """Row indices [BLOCK_R, 1] of this program and their in-range mask."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    return rows, rows < n_rows


def rows_per_program(n_rows: int, block_cols: int) -> int:
    """BLOCK_R (a power of 2) for a [BLOCK_R, block_cols] tile per program."""
    return max(1, min(triton.next_power_of_2(n_rows), ELEMENTS_PER_PROGRAM // block_cols))


def device_scalar(value, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """0-dim tensor on ``device`` that a kernel reads through a pointer.

    A python number becomes a fill kernel (no host-device copy, no sync); a one-element tensor is used as is
    (moved if it lives elsewhere), so a device-side value such as a tuned guidance scale needs no host sync.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a one-element tensor, got shape {tuple(value.shape)}")
        return value.reshape(()).to(device)
    return torch.full((), value, dtype=dtype, device=device)


def check_noise_source(noise: torch.Tensor | None, seed, step: int | None, shape: torch.Size) -> None:
    """ValueError unless the noise comes from at most one source: a tensor of ``shape`` or (seed, step)."""
    if noise is not None and seed is not None:
        raise ValueError("pass either noise or seed, not both")
    if noise is not None and noise.shape != shape:
        raise ValueError(f"noise must be {tuple(shape)}, got {tuple(noise.shape)}")
    if seed is not None and not (isinstance(step, int) and step >= 0):
        raise ValueError(f"in-kernel noise needs the step index: step must be an int >= 0, got {step!r}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The common device of ``tensors`` (a ValueError naming them otherwise)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return next(iter(devices.values()))
