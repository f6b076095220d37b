"""Print what this installation of polygrad_fast runs on: ``polygrad-fast env-report [--json]``
(also ``python -m polygrad_fast.env_report``).

Versions of Python and the key packages, the native extension's build info, the CPU/GPU features that
choose the fast paths, and which backend each component will use.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from dataclasses import dataclass


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed (no __version__)")
    except Exception as exc:  # an optional dependency may be missing or broken: report, don't crash
        return f"not available ({type(exc).__name__}: {exc})"


def _cpu_ops_report(mod, error: str | None) -> dict:
    """Fused CPU kernels (polygrad_fast._cpu_ops): availability, the LayerNorm kernel's ISA, the bf16 GEMM of the
    fused bf16 kernels (actor mean, MLP trunk: 'amx', 'avx512bf16' or None), OpenMP."""
    if mod is None:
        return {"available": False, "error": error}
    from . import bf16_layout

    return {"available": True, "layer_norm_act_isa": mod.isa(), "bf16_kernels": bf16_layout.isa(),
            "openmp": mod.openmp()}


def collect() -> dict:
    """The report as a JSON-serialisable dict."""
    import torch

    from . import __version__, backend
    from ._native import CPU_OPS, extension, extension_error, native_available, native_build_info

    cuda = torch.cuda.is_available()
    return {
        "polygrad_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {m: _version(m) for m in ("torch", "numpy", "triton", "mujoco", "gymnasium")},
        "torch": {
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda_available": cuda,
            "cuda_version": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
        },
        "native_buffer": {"available": native_available(), "build": native_build_info()},
        "native_cpu_ops": _cpu_ops_report(extension(CPU_OPS), extension_error(CPU_OPS)),
        "backends": {
            "sampler_cpu": backend.select_backend("cpu"),
            "sampler_cuda": backend.select_backend("cuda") if cuda else "unavailable (no CUDA device)",
            "triton_kernels": "compiled (GPU)" if cuda and backend.triton_usable("cuda") else
                              "interpreter/AOT-compile only (no usable GPU)",
            "trajectory_buffer": "native C++" if native_available() else "numpy reference",
            "cpu_kernels_and_noise": "native C++" if extension(CPU_OPS) is not None else "torch",
            "forced_by_env": os.environ.get(backend.ENV_VAR) or None,
        },
    }


@dataclass(frozen=True)
class EnvReportArgs:
    """Versions, native build and active backends of this installation of polygrad_fast."""

    json: bool = False
    """Print the report as JSON."""


def cli(argv: list[str] | None = None, prog: str = "polygrad-fast env-report") -> None:
    """The ``env-report`` command line (``polygrad_fast.cli`` runs it)."""
    import tyro

    args = tyro.cli(EnvReportArgs, args=argv, prog=prog, use_underscores=True)
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return
    width = max(len(k) for v in report.values() if isinstance(v, dict) for k in v)
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<{width}} {v}")
        else:
            print(f"{key:<{width + 2}} {value}")


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["env-report", *sys.argv[1:]]))
