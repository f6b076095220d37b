"""Loader of the native extensions: polygrad_fast._buffer_native (trajectory buffer) and polygrad_fast._cpu_ops
(fused CPU kernels: LayerNorm+activation, normal noise).

Importing polygrad_fast never fails because of an extension: if one is missing or does not load, ``extension(name)``
returns None and ``extension_error(name)`` says why; each user falls back to its pure torch/numpy twin (the buffer
also warns once per process). Set POLYGRAD_FAST_NO_NATIVE=1 to pretend every extension is absent (fallback tests).
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType

__all__ = ["extension", "extension_error", "native", "native_available", "native_build_info", "native_error",
           "warn_fallback_once", "warn_once"]

BUFFER, CPU_OPS = "_buffer_native", "_cpu_ops"
_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str | None] = {}
_warned: set[str] = set()


def _load(name: str) -> None:
    with _lock:
        if name in _modules:
            return
        module, error = None, None
        if os.environ.get("POLYGRAD_FAST_NO_NATIVE", "0") not in ("", "0"):
            error = "disabled by POLYGRAD_FAST_NO_NATIVE"
        else:
            try:
                module = importlib.import_module(f"polygrad_fast.{name}")
            except Exception as exc:  # missing .so, ABI mismatch, missing libgomp, ...
                error = (f"{type(exc).__name__}: {exc} (build it with `pip install -e .`, or "
                         f"`pip install -e . --no-build-isolation` after editing csrc/)")
        _modules[name], _errors[name] = module, error


def extension(name: str) -> ModuleType | None:
    """The extension module ``polygrad_fast.<name>``, or None if it is unavailable."""
    _load(name)
    return _modules[name]


def extension_error(name: str) -> str | None:
    """Why ``polygrad_fast.<name>`` is unavailable (None when it loaded)."""
    _load(name)
    return _errors[name]


def native() -> ModuleType | None:
    """The trajectory-buffer extension module, or None if it is unavailable."""
    return extension(BUFFER)


def native_available() -> bool:
    """True when the native trajectory buffer extension is importable."""
    return native() is not None


def native_error() -> str | None:
    """Why the buffer extension is unavailable (None when it loaded)."""
    return extension_error(BUFFER)


def warn_once(message: str, stacklevel: int = 3) -> None:
    """One RuntimeWarning per distinct message per process: a fallback is announced, not repeated every call."""
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def warn_fallback_once() -> None:
    """Warn, once per process, that the numpy reference replaces the unavailable native buffer."""
    warn_once(f"polygrad_fast: native trajectory buffer unavailable, using the numpy reference "
              f"(slower): {native_error()}", stacklevel=4)


def native_build_info() -> dict:
    """How the native extension was built, as reported by the extension itself.

    Keys when available: available=True, version, compiler, cxx_flags, build_type, openmp, parallelism,
    gather_threads, pybind11_version, path. When unavailable: available=False, error.
    """
    mod = native()
    if mod is None:
        return {"available": False, "error": native_error()}
    info = dict(mod.build_info())
    info["available"] = True
    info["path"] = getattr(mod, "__file__", None)
    return info
