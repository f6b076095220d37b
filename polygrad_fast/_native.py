"""Loader of the native trajectory-buffer extension (polygrad_fast._buffer_native).

Importing polygrad_fast never fails because of the extension: if it is missing or does not load, ``native()``
returns None, the buffer falls back to the numpy reference, and one warning says why (once per process).
Set POLYGRAD_FAST_NO_NATIVE=1 to pretend the extension is absent (used by the fallback test).
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType

__all__ = ["native", "native_available", "native_build_info", "native_error", "warn_fallback_once"]

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_error: str | None = None
_warned = False


def _load() -> None:
    global _loaded, _module, _error
    with _lock:
        if _loaded:
            return
        if os.environ.get("POLYGRAD_FAST_NO_NATIVE", "0") not in ("", "0"):
            _error = "disabled by POLYGRAD_FAST_NO_NATIVE"
        else:
            try:
                _module = importlib.import_module("polygrad_fast._buffer_native")
            except Exception as exc:  # missing .so, ABI mismatch, missing libgomp, ...
                _error = (f"{type(exc).__name__}: {exc} (build it with `pip install -e .`, or "
                          f"`pip install -e . --no-build-isolation` after editing csrc/)")
        _loaded = True


def native() -> ModuleType | None:
    """The extension module, or None if it is unavailable."""
    _load()
    return _module


def native_available() -> bool:
    """True when the native trajectory buffer extension is importable."""
    return native() is not None


def native_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    _load()
    return _error


def warn_fallback_once() -> None:
    """Warn, once per process, that the numpy reference replaces the unavailable native buffer."""
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    warnings.warn(f"polygrad_fast: native trajectory buffer unavailable, using the numpy reference "
                  f"(slower): {native_error()}", RuntimeWarning, stacklevel=3)


def native_build_info() -> dict:
    """How the native extension was built, as reported by the extension itself.

    Keys when available: available=True, version, compiler, cxx_flags, build_type, openmp, openmp_max_threads,
    cuda_variant (and cuda_loadable), pybind11_version, path. When unavailable: available=False, error.
    """
    mod = native()
    if mod is None:
        return {"available": False, "error": native_error()}
    info = dict(mod.build_info())
    info["available"] = True
    info["path"] = getattr(mod, "__file__", None)
    if info.get("cuda_variant"):
        try:
            importlib.import_module("polygrad_fast._buffer_cuda")
            info["cuda_loadable"] = True
        except Exception as exc:
            info["cuda_loadable"] = False
            info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    return info
