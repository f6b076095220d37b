"""Weight layout and argument checks shared by the fused AMX kernels (``cpu_actor``, ``cpu_residual_mlp``).

The kernels (csrc/cpu_ops/amx_gemm.hpp) take every weight matrix W [N, K] as bf16 in AMX's VNNI tile order,
zero-padded to K a multiple of 32 and N of 16, and read all their tensors through raw pointers, so each op checks
them against the layout first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._native import CPU_OPS, extension
from .backend import cpu_isa

_module = extension(CPU_OPS)


def available() -> bool:
    """True when the AMX kernels can run in this process: extension loaded, AMX-BF16 usable, PGF_CPU_OPS_NO_AMX
    unset, and ``backend.cpu_isa()`` is 'AMX' (so capping oneDNN with ONEDNN_MAX_CPU_ISA to rehearse another CPU
    turns them off too)."""
    return _module is not None and bool(_module.actor_mean_available()) and cpu_isa() == "AMX"


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def bf16_values(t: torch.Tensor) -> torch.Tensor:
    """fp32 copy of t rounded to bf16 (what a bf16 tensor of t holds)."""
    return t.detach().to(torch.bfloat16).float()


def vnni_shape(n: int, k: int) -> tuple[int, int, int, int]:
    return round_up(n, 16) // 16, round_up(k, 32) // 2, 16, 2


def vnni(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> bf16 ``vnni_shape(N, K)`` contiguous, zero-padded to N' = N rounded up to 16 and K' to 32: entry
    (nb, kp, n, j) = W[16 nb + n, 2 kp + j], AMX's tile order for the K x N operand W^T."""
    n, k = weight.shape
    w = F.pad(weight.detach().to(torch.bfloat16), (0, round_up(k, 32) - k, 0, round_up(n, 16) - n))
    n, k = w.shape
    return w.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def check_tensors(op: str, want: dict[str, tuple[tuple[int, ...], torch.dtype]], given: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first of ``given`` that is not a contiguous CPU tensor of the shape and dtype in
    ``want``."""
    for name, (shape, dtype) in want.items():
        t = given[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous {dtype} CPU tensor of shape {list(shape)}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")


def require_available(op: str) -> None:
    if not available():
        raise RuntimeError(f"{op}: the fused AMX kernel does not run here (it needs polygrad_fast._cpu_ops and an "
                           "AMX-BF16 CPU; see polygrad_fast.amx_layout.available()); use the module itself")
