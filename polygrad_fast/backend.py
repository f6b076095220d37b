"""Which implementation runs the guided sampler's per-step ops: one detection function for the whole package.

- ``triton``: fused Triton kernels (``polygrad_fast.kernels``), only on a CUDA device with a working Triton driver;
- ``torch``: the fast torch path (closed-form guidance, no autograd), any device;
- ``reference``: the paper-style sampler (fp32, autograd guidance), any device.

``POLYGRAD_FAST_BACKEND`` (one of the names above or ``auto``) overrides the requested backend, so a whole run
(tests, CI) can be forced onto one path without touching code.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "reference", "triton")
ENV_VAR = "POLYGRAD_FAST_BACKEND"


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
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r} (from the {source}); expected 'auto' or one of {BACKENDS}")
    if name == "auto":
        return "triton" if triton_usable(device) else "torch"
    if name == "triton" and not triton_usable(device):
        raise ValueError(f"backend 'triton' (from the {source}) needs a CUDA device with a working Triton driver; "
                         f"device is {torch.device(device)}, CUDA available: {torch.cuda.is_available()}")
    return name
