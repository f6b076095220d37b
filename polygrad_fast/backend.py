"""How the guided sampler executes (not what it computes): backend selection, compute dtypes, execution options.

Backends (``BACKENDS``):

- ``triton``: fused Triton kernels (``polygrad_fast.kernels``), only on a CUDA device with a working Triton driver;
- ``torch``: the fast torch path (closed-form guidance, no autograd), any device;
- ``reference``: the paper-style sampler (fp32, autograd guidance), any device.

``POLYGRAD_FAST_BACKEND`` (one of the names above or ``auto``) overrides the requested backend, so a whole run
(tests, CI) can be forced onto one path without touching code.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from typing import Literal

import torch

BackendName = Literal["torch", "reference", "triton"]
BackendChoice = Literal["auto", BackendName]
BACKENDS: tuple[str, ...] = typing.get_args(BackendName)
ENV_VAR = "POLYGRAD_FAST_BACKEND"

DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(DTYPES) == typing.get_args(DtypeChoice)[1:]


def check_fields(cfg) -> None:
    """ValueError/TypeError unless every field of the dataclass ``cfg`` has a value of its declared kind.

    ``Literal[...]`` fields must be one of the listed values; ``bool`` fields a bool; ``float`` fields (``| None``
    allowed where declared) a finite real number. Range checks beyond that are the dataclass's own.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        kinds = [a for a in args if a is not type(None)] if typing.get_origin(hint) is typing.Union else [hint]
        kind = kinds[0] if len(kinds) == 1 else hint
        if typing.get_origin(kind) is Literal:
            if value not in typing.get_args(kind):
                raise ValueError(f"{type(cfg).__name__}.{f.name} must be one of {list(typing.get_args(kind))}, "
                                 f"got {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{type(cfg).__name__}.{f.name} must be a bool, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{type(cfg).__name__}.{f.name} must be a finite number"
                                 f"{' or None' if type(None) in args else ''}, got {value!r}")


@dataclass(frozen=True)
class ExecutionOptions:
    """How ``FastGuidedSampler`` runs (the trajectories' distribution does not depend on these, up to precision).

    denoiser_dtype / policy_dtype: compute dtype of the fast path's copies ('auto': ``resolve_dtype``; the
    policy's 'auto' follows the resolved denoiser dtype). compile: ``torch.compile`` the whole reverse step
    (torch backend). backend: see ``select_backend``. sync_weights: refresh the low-precision copies from the
    live modules at every ``sample()`` call. cpu_prepack: the CPU bf16 denoiser copy runs its large Linears on
    oneDNN-prepacked weights (``polygrad_fast.cpu_packed``), the residual skip added in the GEMM epilogue, repacked
    at each weight sync; batches in ``cpu_packed.PLAIN_ROWS`` run plain. cpu_fuse_norm_act: CPU low-precision
    copies run LayerNorm followed by ReLU/ELU as one native kernel (``polygrad_fast.cpu_layer_norm``): the policy
    copy always, the denoiser copy only when not compiled (inductor already fuses it there).
    """

    denoiser_dtype: DtypeChoice = "auto"
    policy_dtype: DtypeChoice = "auto"
    compile: bool = False
    backend: BackendChoice = "auto"
    sync_weights: bool = True
    cpu_prepack: bool = True
    cpu_fuse_norm_act: bool = True

    def __post_init__(self) -> None:
        check_fields(self)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has AMX-BF16 or AVX512-BF16 (bf16 matmuls much faster than fp32 there)."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(c is not None for c in checks):
        return any(c() for c in checks)
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CPUs with fast bf16 and on CUDA devices with bf16 (fp16 on older GPUs), else fp32."""
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {list(typing.get_args(DtypeChoice))}")
    return DTYPES[name]


def triton_usable(device: torch.device | str) -> bool:
    """True when ``device`` is a CUDA device and Triton can launch compiled kernels on it."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton

        triton.runtime.driver.active.get_current_target()  # raises "0 active drivers" without a GPU
    except Exception:
        return False
    return True


def select_backend(device: torch.device | str, requested: str = "auto") -> str:
    """Resolve ``requested`` ('auto' or one of ``BACKENDS``) for ``device``; the env var takes precedence.

    'auto' -> 'triton' when ``triton_usable(device)``, else 'torch'. Asking for 'triton' where it is not usable,
    or for an unknown name, raises ValueError.
    """
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    source = f"environment variable {ENV_VAR}" if forced else "backend option"
    name = forced or requested
    if name not in typing.get_args(BackendChoice):
        raise ValueError(f"unknown backend {name!r} (from the {source}); expected 'auto' or one of {BACKENDS}")
    if name == "auto":
        return "triton" if triton_usable(device) else "torch"
    if name == "triton" and not triton_usable(device):
        raise ValueError(f"backend 'triton' (from the {source}) needs a CUDA device with a working Triton driver; "
                         f"device is {torch.device(device)}, CUDA available: {torch.cuda.is_available()}")
    return name
