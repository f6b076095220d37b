"""TrajectoryBuffer: the batched trajectory buffer of polygrad_fast (native C++ core, numpy fallback).

    buf = TrajectoryBuffer(obs_dim=11, act_dim=3, sim_state_dim=58, capacity=1_000_000)
    buf.add_episode(obs[L,11], act[L,3], rew[L], sim[L,58], terminated=True, truncated=False)
    batch = buf.sample_windows(batch=256, horizon=10, seed=step)   # WindowBatch of torch tensors [B,H,*]

Storage is a ring of ``capacity`` transitions holding whole episodes contiguously; when full, whole oldest episodes
are evicted. Per-field normalisation statistics are maintained incrementally as data is added and evicted.
The semantics are specified (and implemented in numpy) by polygrad_fast.reference.buffer; the native core in csrc/
produces bit-identical windows and statistics for the same seed.

Large gathers use the calling thread plus helper threads (POLYGRAD_FAST_BUFFER_THREADS, default: all cores, or
``polygrad_fast._native.native().set_gather_threads(n)`` at run time); the result does not depend on the count.
"""
from __future__ import annotations

from . import _native
from .reference.buffer import NumpyTrajectoryBuffer, WindowBatch, _NumpyCore, _TrajectoryBufferBase

__all__ = ["TrajectoryBuffer", "WindowBatch", "NumpyTrajectoryBuffer"]

_BACKENDS = ("auto", "native", "numpy")


class TrajectoryBuffer(_TrajectoryBufferBase):
    """Ring buffer of whole episodes with batched window sampling.

    Args:
        obs_dim, act_dim, sim_state_dim: per-step sizes O, A, S (observations/actions float32, sim states float64 —
            the exact simulator state before the step, for replay).
        capacity: maximum number of stored transitions (steps), across all episodes.
        backend: "native" (C++ core; error if unavailable), "numpy" (reference), or "auto" (native if it loads,
            else numpy with one warning).

    Episodes are added whole (``add_episode``) or step by step (``add_step`` … ``end_episode``); an open episode
    is sampleable like a truncated one. ``sample_windows`` documents the window semantics (padding after a
    terminated end; windows of truncated/open episodes never run past their end). Input is validated before
    anything is written, so a rejected add leaves the stored data intact.
    """

    def __init__(self, obs_dim: int, act_dim: int, sim_state_dim: int, capacity: int, backend: str = "auto"):
        super().__init__(obs_dim, act_dim, sim_state_dim, capacity, backend=backend)

    def _make_core(self, obs_dim, act_dim, sim_state_dim, capacity, backend="auto"):
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
        mod = _native.native() if backend != "numpy" else None
        if backend == "native" and mod is None:
            raise RuntimeError(f"backend='native' but the native extension is unavailable: {_native.native_error()}")
        if mod is not None:
            self.backend = "native"
            return mod.BufferCore(obs_dim, act_dim, sim_state_dim, capacity)
        if backend == "auto":
            _native.warn_fallback_once()
        self.backend = "numpy"
        return _NumpyCore(obs_dim, act_dim, sim_state_dim, capacity)

    def __repr__(self) -> str:
        return (f"TrajectoryBuffer(obs_dim={self.obs_dim}, act_dim={self.act_dim}, sim_state_dim={self.sim_state_dim},"
                f" capacity={self.capacity}, backend={self.backend!r}, transitions={self.num_transitions},"
                f" episodes={self.num_episodes})")
