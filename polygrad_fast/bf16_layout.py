"""Which bf16 GEMM the fused bf16 kernels run, their weight layout and argument checks (``cpu_actor``,
``cpu_residual_mlp``).

The kernels (csrc/cpu_ops/bf16_gemm.hpp) run their GEMMs on AMX tiles (``isa()`` 'amx': Sapphire Rapids and later
Xeons) or with AVX-512 BF16 dot products ('avx512bf16': Zen 4 / Zen 5, Cooper Lake), take every weight matrix
W [N, K] as bf16 in AMX's VNNI tile order, zero-padded to K a multiple of 32 and N of 16 (the same buffers serve
both), and read all their tensors through raw pointers, so each op checks them against the layout first.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from ._native import CPU_OPS, extension
from .backend import choose_fastest, cpu_isa, interleaved_min_times

_module = extension(CPU_OPS)


@functools.cache  # every op call checks it (3 µs uncached); oneDNN itself reads its ISA cap once per process
def isa() -> str | None:
    """The bf16 GEMM of the fused kernels in this process: 'amx' (AMX-BF16 usable, PGF_CPU_OPS_NO_AMX unset and
    ``backend.cpu_isa()`` 'AMX'), else 'avx512bf16' (AVX-512 BF16 on the CPU, PGF_CPU_OPS_NO_AVX512BF16 unset and
    ``cpu_isa()`` 'AMX' or 'AVX512-BF16'), else None. Capping oneDNN with ONEDNN_MAX_CPU_ISA to rehearse another CPU
    caps these kernels too (an AMX CPU under ``AVX512_CORE_BF16`` runs 'avx512bf16')."""
    native = _module.bf16_kernels_isa() if _module is not None else ""
    cap = cpu_isa()
    if native == "amx" and cap == "AMX":
        return "amx"
    return "avx512bf16" if native in ("amx", "avx512bf16") and cap in ("AMX", "AVX512-BF16") else None


def available() -> bool:
    """True when a fused bf16 kernel runs in this process (``isa()`` is not None)."""
    return isa() is not None


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def bf16_values(t: torch.Tensor) -> torch.Tensor:
    """fp32 copy of t rounded to bf16 (what a bf16 tensor of t holds)."""
    return t.detach().to(torch.bfloat16).float()


def vnni_shape(n: int, k: int) -> tuple[int, int, int, int]:
    return round_up(n, 16) // 16, round_up(k, 32) // 2, 16, 2


def vnni_into(dst: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Write W [N, K] into ``dst`` (bf16, ``vnni_shape(N, K)``, contiguous), zero-padded to N' = N rounded up to 16
    and K' to 32: entry (nb, kp, n, j) = W[16 nb + n, 2 kp + j], AMX's tile order for the K x N operand W^T (and
    VDPBF16PS's: one 16-column panel's k-pair kp is one 64-byte vector). Each bf16 pair (j = 0, 1) moves as one
    32-bit word: 0.13 ms per 1024 x 1024 weight, against 0.84 ms moving bf16 elements (2 threads, Sapphire Rapids),
    and the sampler refreshes every weight at each call."""
    n, k = weight.shape
    w = weight.detach().to(torch.bfloat16)
    if n % 16 or k % 32:
        w = F.pad(w, (0, round_up(k, 32) - k, 0, round_up(n, 16) - n))
    n, k = w.shape
    words = w.contiguous().view(torch.int32).view(n // 16, 16, k // 2).permute(0, 2, 1)
    dst.view(torch.int32).view(n // 16, k // 2, 16).copy_(words)
    return dst


def vnni(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] in a new bf16 tensor of ``vnni_shape(N, K)`` (``vnni_into``)."""
    return vnni_into(torch.empty(vnni_shape(*weight.shape), dtype=torch.bfloat16), weight)


def check_tensors(op: str, want: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  given: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first of ``given`` that is not a contiguous CPU tensor of the shape and dtype in
    ``want``."""
    for name, (shape, dtype) in want.items():
        t = given[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous {dtype} CPU tensor of shape {list(shape)}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")


def fused_is_faster(plain: Callable[[], object], fused: Callable[[], object]) -> bool:
    """True when ``fused()`` measured faster than ``plain()`` (``backend.interleaved_min_times``, inference mode;
    ``backend.choose_fastest`` with the plain call preferred, so fused must win by more than the tie tolerance)."""
    with torch.inference_mode():
        timings = interleaved_min_times({"plain": plain, "fused": fused})
    return choose_fastest(timings, prefer="plain") == "fused"


def require_isa(op: str) -> str:
    """``isa()``, or RuntimeError saying that no fused bf16 kernel runs here."""
    name = isa()
    if name is None:
        raise RuntimeError(f"{op}: the fused bf16 kernel does not run here (it needs polygrad_fast._cpu_ops and an "
                           "AMX or AVX-512 BF16 CPU; see polygrad_fast.bf16_layout.isa()); use the module itself")
    return name
