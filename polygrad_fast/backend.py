"""How the guided sampler executes (not what it computes): backend selection, compute dtypes, execution options.

Backends (``BACKENDS``):

- ``triton``: fused Triton kernels (``polygrad_fast.kernels``), only on a CUDA device with a working Triton driver;
- ``torch``: the fast torch path (closed-form guidance, no autograd), any device;
- ``reference``: the paper-style sampler (fp32, autograd guidance), any device.

``POLYGRAD_FAST_BACKEND`` (one of the names above or ``auto``) overrides the requested backend, so a whole run
(tests, CI) can be forced onto one path without touching code.

CPU instruction sets (``cpu_isa``: AMX / AVX512-BF16 / AVX512 / AVX2 / default) and the choices measured on the
running CPU rather than fixed thresholds: ``measured_cpu_dtype`` (what dtype 'auto' means on CPU) and
``choose_fastest``, the rule both it and ``cpu_packed.packing_pays_off`` apply to their timings.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass
from time import perf_counter
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

    denoiser_dtype / policy_dtype: compute dtype of the fast path's copies ('auto': ``resolve_dtype``, on CPU the
    faster of fp32 and bf16 as measured on the running CPU (``measured_cpu_dtype``), or ``POLYGRAD_FAST_CPU_DTYPE``;
    the policy's 'auto' follows the resolved denoiser dtype; an explicit dtype is never second-guessed). compile:
    ``torch.compile`` the whole reverse step (torch backend). backend: see ``select_backend``. sync_weights:
    refresh the sampler's copies from the live modules at every ``sample()`` call. cpu_prepack: the CPU denoiser
    copy (bf16, or fp32: the sampler makes fp32 inference copies on CPU for these kernels) runs its large Linears on
    oneDNN-prepacked weights (``polygrad_fast.cpu_packed``), bias and residual skip added in the GEMM epilogue,
    repacked at each weight sync, each Linear only where packing measured faster on this CPU
    (``cpu_packed.packing_pays_off``; ``POLYGRAD_FAST_CPU_PREPACK`` forces it); bf16 batches in
    ``cpu_packed.PLAIN_ROWS`` run plain. cpu_fuse_norm_act: the CPU copies run LayerNorm followed by ReLU/ELU as
    one native kernel (``polygrad_fast.cpu_layer_norm``): the policy copy always, the denoiser copy only when not
    compiled (inductor already fuses it there). cpu_fuse_actor: a policy copy that is a polygrad_fast ``Actor``
    computes its mean action in one native pass (``polygrad_fast.cpu_actor``: AMX or AVX-512 BF16 for a bf16 copy,
    AVX-512 or AVX2 FMA for an fp32 one) where that measured faster on this CPU (``cpu_actor.fused_actor_pays_off``).
    cpu_fuse_trunk: a bf16 ``ResidualMLPDenoiser`` copy runs its residual trunk as one native pass (AMX or AVX-512
    BF16, ``polygrad_fast.cpu_residual_mlp``) where that measured faster (``cpu_residual_mlp.fused_trunk_pays_off``).
    The user's modules are never changed.
    """

    denoiser_dtype: DtypeChoice = "auto"
    policy_dtype: DtypeChoice = "auto"
    compile: bool = False
    backend: BackendChoice = "auto"
    sync_weights: bool = True
    cpu_prepack: bool = True
    cpu_fuse_norm_act: bool = True
    cpu_fuse_actor: bool = True
    cpu_fuse_trunk: bool = True

    def __post_init__(self) -> None:
        check_fields(self)


# ---------------------------------------------------------------- CPU instruction sets
# What a CPU runs its GEMMs with, slowest first. "default": below AVX2 (SSE4.1 / AVX), what a capped run gets.
ISAS = ("default", "AVX2", "AVX512", "AVX512-BF16", "AMX")
# ONEDNN_MAX_CPU_ISA values (oneDNN's own names, as also read from DNNL_MAX_CPU_ISA) -> the highest entry of ISAS
# they allow. Names oneDNN adds later fall back to "no cap" (oneDNN itself caps to what it knows).
_ONEDNN_CAPS = {"SSE41": "default", "AVX": "default", "AVX2": "AVX2", "AVX2_VNNI": "AVX2", "AVX2_VNNI_2": "AVX2",
                "AVX512_CORE": "AVX512", "AVX512_CORE_VNNI": "AVX512", "AVX512_CORE_BF16": "AVX512-BF16",
                "AVX512_CORE_FP16": "AVX512-BF16", "AVX10_1_512": "AVX512-BF16", "AVX512_CORE_AMX": "AMX",
                "AVX10_1_512_AMX": "AMX", "AVX512_CORE_AMX_FP16": "AMX", "AVX10_1_512_AMX_FP16": "AMX",
                "DEFAULT": "AMX", "ALL": "AMX"}


def cpu_isa_hardware() -> str:
    """The best entry of ``ISAS`` this CPU has (cpuid through torch.cpu, else /proc/cpuinfo flags); no caps."""
    names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_avx512_supported", "_is_avx2_supported")
    checks = [getattr(torch.cpu, n, None) for n in names]
    if all(c is not None for c in checks):
        has = [c() for c in checks]
    else:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
        except OSError:
            flags = set()
        has = ["amx_bf16" in flags, "avx512_bf16" in flags, {"avx512f", "avx512bw", "avx512vl"} <= flags,
               "avx2" in flags]
    for isa, ok in zip(("AMX", "AVX512-BF16", "AVX512", "AVX2"), has):
        if ok:
            return isa
    return "default"


def onednn_isa_cap() -> str | None:
    """The entry of ``ISAS`` that ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) caps oneDNN to; None when unset
    or a name this table does not know (oneDNN reads the variable once, at its first GEMM)."""
    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return _ONEDNN_CAPS.get(value)


def cpu_isa() -> str:
    """The ISA the CPU's oneDNN GEMMs run with: ``cpu_isa_hardware()`` capped by ``onednn_isa_cap()``; one of
    ``ISAS`` (AMX / AVX512-BF16 / AVX512 / AVX2 / default). ATen's own kernels (elementwise, LayerNorm) follow
    ``torch.backends.cpu.get_cpu_capability()`` (capped by ATEN_CPU_CAPABILITY) instead; see docs/cpu_paths.md."""
    hw, cap = cpu_isa_hardware(), onednn_isa_cap()
    return hw if cap is None else ISAS[min(ISAS.index(hw), ISAS.index(cap))]


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 GEMMs natively here (``cpu_isa()`` AMX or AVX512-BF16), i.e. bf16 may pay off;
    whether it does is ``measured_cpu_dtype``'s call."""
    return ISAS.index(cpu_isa()) >= ISAS.index("AVX512-BF16")


# ---------------------------------------------------------------- choices measured on the running CPU
CPU_DTYPE_ENV_VAR = "POLYGRAD_FAST_CPU_DTYPE"  # float32 | bfloat16: what 'auto' means on CPU, no measurement
# A candidate other than the preferred (more precise / simpler) one is taken only if more than this much faster:
# below it the timings of a shared host do not tell the two apart, and bf16 costs precision.
TIE_TOLERANCE = 0.10
# The shape 'auto' is measured at: one hidden Linear of the paper's MLP denoiser (1024 wide) on a B=256 batch.
PROBE_ROWS, PROBE_WIDTH = 256, 1024


def choose_fastest(timings: typing.Mapping[str, float | None], prefer: str,
                   tie_tolerance: float = TIE_TOLERANCE) -> str:
    """The name with the smallest time in ``timings`` (seconds; None = unsupported here, never chosen), where any
    name other than ``prefer`` must beat ``prefer``'s time by more than ``tie_tolerance`` (relative) to be chosen.
    Raises ValueError if ``prefer`` is missing or unsupported, or a time is not a positive finite number."""
    if timings.get(prefer) is None:
        raise ValueError(f"choose_fastest: the preferred candidate {prefer!r} needs a time; got {dict(timings)}")
    for name, t in timings.items():
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                              or t <= 0):
            raise ValueError(f"choose_fastest: time of {name!r} must be a positive finite number of seconds or "
                             f"None (unsupported), got {t!r}")
    best = min((t, name) for name, t in timings.items() if t is not None)
    return best[1] if best[0] * (1 + tie_tolerance) < timings[prefer] else prefer


def min_time(fn: typing.Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Smallest wall time of ``reps`` calls of ``fn`` (seconds), after ``warmup`` untimed calls: the min is the
    least disturbed by other load on a shared host."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(reps):
        t0 = perf_counter()
        fn()
        best = min(best, perf_counter() - t0)
    return best


def interleaved_min_times(calls: typing.Mapping[str, typing.Callable[[], object]], reps: int = 7,
                          warmup: int = 1) -> dict[str, float]:
    """{name: smallest wall time (seconds) of ``calls[name]()`` over ``reps`` rounds}, after ``warmup`` untimed
    rounds; each round calls every candidate once, in an order rotated by one per round, so a slow spell of a shared
    host slows all candidates alike instead of one of them. Timed one after the other (``min_time`` each), the
    fp32 1024x1024 GEMM at 256 rows measured plain vs oneDNN-prepacked the wrong way round in 2 of 6 fresh processes
    on a loaded 2-core AVX2 EPYC (plain 23.9 vs packed 26.7 ms once, 13-14 vs 12 ms steady)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    best = dict.fromkeys(names, math.inf)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = perf_counter()
            calls[name]()
            best[name] = min(best[name], perf_counter() - t0)
    return best


def linear_call(rows: int, in_features: int, out_features: int, dtype: torch.dtype,
                residual: bool = False) -> typing.Callable[[], torch.Tensor]:
    """A call of one ``F.linear`` [rows, in] x [out, in]^T + bias in ``dtype`` on CPU (to time, in inference mode);
    ``residual``: then + a [rows, out] skip connection, as an unpacked residual block adds it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)).to(dtype)
    b = torch.zeros(out_features, dtype=dtype)
    if residual:
        skip = torch.randn(rows, out_features, generator=g).to(dtype)
        return lambda: skip + torch.nn.functional.linear(x, w, b)
    return lambda: torch.nn.functional.linear(x, w, b)


def cpu_bf16_gemm_supported() -> bool:
    """True when this torch runs bf16 GEMMs through oneDNN here (AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX); else its
    bf16 matmul is a scalar fallback, far slower than fp32, and not worth timing."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=1)
def measured_cpu_dtype() -> torch.dtype:
    """The faster of fp32 and bf16 for the denoiser's GEMM on this CPU, measured once per process (cached).

    Times ``linear_call(PROBE_ROWS, PROBE_WIDTH, PROBE_WIDTH)`` in fp32 and, where ``cpu_bf16_gemm_supported()``,
    in bf16 (``interleaved_min_times``, a few ms), at torch's current thread count, and returns ``choose_fastest``
    of the two with fp32 preferred (bf16 must be > ``TIE_TOLERANCE`` faster). No bf16 support: fp32 without timing anything.
    """
    timings: dict[str, float | None] = {"float32": None, "bfloat16": None}
    if cpu_bf16_gemm_supported():
        with torch.inference_mode():
            timings = interleaved_min_times({name: linear_call(PROBE_ROWS, PROBE_WIDTH, PROBE_WIDTH, DTYPES[name])
                                             for name in timings})
    else:
        timings["float32"] = 1.0  # the only candidate: no need to time it
    return DTYPES[choose_fastest(timings, prefer="float32")]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> on CPU ``POLYGRAD_FAST_CPU_DTYPE`` (float32 / bfloat16) when set, else ``measured_cpu_dtype()``;
    on CUDA bf16 where supported (fp16 on older GPUs); fp32 elsewhere. Any other name: that dtype."""
    if name == "auto":
        if device.type == "cpu":
            forced = os.environ.get(CPU_DTYPE_ENV_VAR, "").strip().lower()
            if not forced:
                return measured_cpu_dtype()
            if forced not in ("float32", "bfloat16"):
                raise ValueError(f"environment variable {CPU_DTYPE_ENV_VAR}={forced!r}: expected 'float32' or "
                                 "'bfloat16' (or unset: measure)")
            return DTYPES[forced]
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
