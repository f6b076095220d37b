"""TrajectoryBuffer: the batched trajectory buffer of polygrad_fast (native C++ core, numpy fallback).

    buf = TrajectoryBuffer(obs_dim=11, act_dim=3, sim_state_dim=58, capacity=1_000_000)
    buf.add_episode(obs[L,11], act[L,3], rew[L], sim[L,58], terminated=True, truncated=False)
    batch = buf.sample_windows(batch=256, horizon=10, seed=step)   # WindowBatch of torch tensors [B,H,*]

Storage is a ring of ``capacity`` transitions holding whole episodes contiguously; when full, whole oldest episodes
are evicted. Per-field normalisation statistics are maintained incrementally as data is added and evicted.
This module is the front-end: it validates every input, serialises calls (a buffer may be shared by threads) and
turns the core's arrays into torch tensors. The storage work is done by a core: the native ``BufferCore``
(csrc/) or ``polygrad_fast.reference.buffer.NumpyBufferCore``, the numpy specification of the semantics; both
produce bit-identical windows and statistics for the same data and seed. The file format is in buffer_format.py.

Large native gathers use the calling thread plus helper threads (POLYGRAD_FAST_BUFFER_THREADS, default: all cores,
or ``polygrad_fast._native.native().set_gather_threads(n)`` at run time); the result does not depend on the count.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np
import torch

from . import _native
from .buffer_format import DIM_KEYS, FORMAT_VERSION, check_state_dict, read_state, write_state
from .reference.buffer import NumpyBufferCore

__all__ = ["TrajectoryBuffer", "WindowBatch", "NumpyTrajectoryBuffer"]

_BACKENDS = ("auto", "native", "numpy")
# Per-step sizes above this are certainly a mistake (and would overflow the native core's int64 byte counts).
_MAX_DIM = 1 << 31


@dataclasses.dataclass
class WindowBatch:
    """A batch of B windows of H consecutive steps (torch tensors sharing memory with the core's numpy output).

    observations [B,H,O] f32, actions [B,H,A] f32, rewards [B,H] f32, terminals [B,H] f32 (1 on the terminating step
    and on padding after it), start_obs [B,O] f32 (= observations[:, 0]), sim_states [B,H,S] f64 (never normalised;
    None when sampled with ``sim_states=False``),
    episode_ids [B] i64 (stable across evictions and save/load), start_steps [B] i64 (step of the episode at t=0).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminals: torch.Tensor
    start_obs: torch.Tensor
    sim_states: torch.Tensor | None
    episode_ids: torch.Tensor
    start_steps: torch.Tensor


_SAMPLE_FIELDS = [f.name for f in dataclasses.fields(WindowBatch)]

# ----------------------------------------------------------------------------------------------------------------------
# Input checks (every user input of both backends goes through these)
# ----------------------------------------------------------------------------------------------------------------------


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("L" if s is None else str(s) for s in shape) + "]"


def _check_array(name: str, x: Any, dtype, shape: tuple) -> np.ndarray:
    """``x`` as a C-contiguous ``dtype`` array of ``shape`` (None = free length), or an error naming ``name``.

    Arrays and tensors of any real floating dtype (bfloat16, float16, float32, float64) are converted (rounded to
    nearest); integer, bool and complex arrays are refused (an int array here is almost always the wrong variable).
    Plain Python numbers and (nested) lists may hold ints. NaN and inf are refused.
    """
    stored = np.dtype(dtype).name
    expected = f"a real floating-point array (any float dtype, stored as {stored})"
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected {expected}, got a tensor of dtype {x.dtype}")
        x = x.detach().cpu()
        arr = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()  # numpy has no bfloat16
    elif isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"{name}: expected {expected}, got dtype {arr.dtype}")
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name}: expected an array of shape {_fmt_shape(shape)}, got {type(x).__name__} "
                            f"({exc})") from None
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name}: expected {expected}, got {type(x).__name__} of dtype {arr.dtype}")
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got {list(arr.shape)}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing cast becomes inf, reported just below
        arr = np.ascontiguousarray(arr, dtype=dtype) if arr.ndim else arr.astype(dtype)  # (keeps 0-d as 0-d)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(f"{name}: contains NaN or inf (first: {arr[tuple(bad)]} at index {bad.tolist()}, as "
                         f"{stored}); expected finite values")
    return arr


def _check_flag(name: str, x: Any) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return bool(x)


def _check_int(name: str, x: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if int(x) < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {int(x)}")
    if maximum is not None and int(x) > maximum:
        raise ValueError(f"{name}: expected <= {maximum}, got {int(x)}")
    return int(x)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not a POSIX system
        return None


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _check_fits_in_memory(what: str, nbytes: int) -> None:
    """MemoryError before allocating ``nbytes`` that this machine's RAM could never hold."""
    memory = _physical_memory()
    if memory is not None and nbytes > memory:
        raise MemoryError(f"{what} would need {_gb(nbytes)} ({nbytes} bytes), more than this machine's "
                          f"{_gb(memory)} of memory")


# ----------------------------------------------------------------------------------------------------------------------
# The buffer
# ----------------------------------------------------------------------------------------------------------------------


class TrajectoryBuffer:
    """Ring buffer of whole episodes with batched window sampling.

    Args:
        obs_dim, act_dim, sim_state_dim: per-step sizes O, A, S (observations/actions stored as float32, sim states
            as float64 — the exact simulator state before the step, for replay).
        capacity: maximum number of stored transitions (steps), across all episodes. The whole ring is allocated
            up front; a capacity whose storage exceeds the machine's memory is refused with MemoryError.
        backend: "native" (C++ core; error if unavailable), "numpy" (reference core), or "auto" (native if it
            loads, else numpy with one warning).

    Episodes are added whole (``add_episode``) or step by step (``add_step`` … ``end_episode``); an open episode
    is sampleable like a truncated one. ``sample_windows`` documents the window semantics (padding after a
    terminated end; windows of truncated/open episodes never run past their end). Inputs may be numpy arrays,
    torch tensors (any device) or lists of any real floating dtype, converted to the stored dtype; integer/bool
    arrays, NaN and inf are refused. Input is validated before anything is written, so a rejected add leaves the
    stored data intact.

    Thread safety: every public method holds the buffer's lock, so one buffer may be shared by threads (adding
    and sampling at once); each call sees the buffer between whole adds. The native gather releases the GIL
    while it works.
    """

    def __init__(self, obs_dim: int, act_dim: int, sim_state_dim: int, capacity: int, backend: str = "auto"):
        self._obs_dim = _check_int("obs_dim", obs_dim, 1, _MAX_DIM)
        self._act_dim = _check_int("act_dim", act_dim, 1, _MAX_DIM)
        self._sim_dim = _check_int("sim_state_dim", sim_state_dim, 0, _MAX_DIM)
        self._capacity = _check_int("capacity", capacity, 1)
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
        mod = _native.native() if backend != "numpy" else None
        if backend == "native" and mod is None:
            raise RuntimeError(f"backend='native' but the native extension is unavailable: {_native.native_error()}")
        if backend == "auto" and mod is None:
            _native.warn_fallback_once()
        self.backend = "native" if mod is not None else "numpy"
        O, A, S, C = self._obs_dim, self._act_dim, self._sim_dim, self._capacity
        per_step = (mod.record_bytes(O, A, S) if mod is not None else NumpyBufferCore.bytes_per_transition(O, A, S))
        what = f"capacity {C} transitions of obs {O}, act {A}, sim {S}"
        _check_fits_in_memory(what, C * per_step)
        try:
            self._core = mod.BufferCore(O, A, S, C) if mod is not None else NumpyBufferCore(O, A, S, C)
        except MemoryError:  # fits in RAM, but not in what is free now (or the address space)
            raise MemoryError(f"{what} would need {_gb(C * per_step)} ({C * per_step} bytes): allocation "
                              f"failed") from None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
                f"sim_state_dim={self.sim_state_dim}, capacity={self.capacity}, backend={self.backend!r}, "
                f"transitions={self.num_transitions}, episodes={self.num_episodes})")

    # -- properties ---------------------------------------------------------------------------------------------------
    obs_dim = property(lambda self: self._obs_dim)
    act_dim = property(lambda self: self._act_dim)
    sim_state_dim = property(lambda self: self._sim_dim)
    capacity = property(lambda self: self._capacity)

    @property
    def num_transitions(self) -> int:
        with self._lock:
            return int(self._core.num_transitions())

    def __len__(self) -> int:
        return self.num_transitions

    @property
    def num_episodes(self) -> int:
        """Stored episodes, including a still-open one."""
        with self._lock:
            return int(self._core.num_episodes())

    @property
    def has_open_episode(self) -> bool:
        with self._lock:
            return bool(self._core.has_open_episode())

    def episode_lengths(self) -> np.ndarray:
        """[E] int64 lengths of the stored episodes, oldest first (an open episode last)."""
        with self._lock:
            return np.asarray(self._core.episode_lengths(), dtype=np.int64)

    def nbytes(self) -> int:
        """Bytes held by the storage (ring + episode table)."""
        with self._lock:
            return int(self._core.nbytes())

    def raw_nbytes(self) -> int:
        """Bytes of the stored data itself: per-step fields plus two flag bytes per episode."""
        with self._lock:
            per_step = NumpyBufferCore.bytes_per_transition(self._obs_dim, self._act_dim, self._sim_dim)
            return int(self._core.num_transitions()) * per_step + 2 * int(self._core.num_episodes())

    # -- adding -------------------------------------------------------------------------------------------------------
    def add_episode(self, observations, actions, rewards, sim_states, terminated: bool, truncated: bool) -> None:
        """Add a whole episode: observations [L,O], actions [L,A], rewards [L], sim_states [L,S] (state before step).

        Evicts whole oldest episodes if needed. Nothing is written unless every argument is valid.
        """
        obs = _check_array("observations", observations, np.float32, (None, self._obs_dim))
        L = obs.shape[0]
        if L == 0:
            raise ValueError("observations: expected an episode of length >= 1, got length 0")
        if L > self._capacity:
            raise ValueError(f"observations: episode of length {L} is longer than the buffer capacity "
                             f"{self._capacity}")
        act = _check_array("actions", actions, np.float32, (L, self._act_dim))
        rew = _check_array("rewards", rewards, np.float32, (L,))
        sim = _check_array("sim_states", sim_states, np.float64, (L, self._sim_dim))
        term = _check_flag("terminated", terminated)
        trunc = _check_flag("truncated", truncated)
        with self._lock:
            if self._core.has_open_episode():
                raise ValueError("add_episode: an episode is still open (add_step); call end_episode() first")
            self._core.add_episode(obs, act, rew, sim, term, trunc)

    def add_step(self, obs, action, reward, sim_state) -> None:
        """Append one step (obs [O], action [A], reward scalar, sim_state [S]) to the open episode (opens one)."""
        o = _check_array("obs", obs, np.float32, (self._obs_dim,))
        a = _check_array("action", action, np.float32, (self._act_dim,))
        r = _check_array("reward", reward, np.float32, ())
        s = _check_array("sim_state", sim_state, np.float64, (self._sim_dim,))
        with self._lock:
            if self._core.open_length() + 1 > self._capacity:
                raise ValueError(f"add_step: the open episode would exceed the buffer capacity {self._capacity} "
                                 f"(call end_episode() first)")
            self._core.add_step(o, a, float(r), s)

    def end_episode(self, terminated: bool, truncated: bool) -> None:
        """Close the open episode. ``terminated``: true end (terminal flag and padding); ``truncated``: time limit."""
        term = _check_flag("terminated", terminated)
        trunc = _check_flag("truncated", truncated)
        with self._lock:
            if not self._core.has_open_episode():
                raise ValueError("end_episode: expected an open episode (add_step first), but none is open")
            self._core.end_episode(term, trunc)

    # -- statistics ---------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{field: (mean, population std)} float64 over all stored steps (open episode included).

        observations [O], actions [A], rewards [] and terminals [] (per-step flags, 1 on the last step of terminated
        episodes). Zeros when empty.
        """
        with self._lock:
            n, mean, m2 = self._core.moments()
        mean = np.asarray(mean, np.float64)
        std = np.sqrt(np.asarray(m2, np.float64) / float(n)) if n else np.zeros_like(mean)
        O, A = self._obs_dim, self._act_dim
        return {"observations": (mean[:O].copy(), std[:O].copy()),
                "actions": (mean[O:O + A].copy(), std[O:O + A].copy()),
                "rewards": (mean[O + A].copy(), std[O + A].copy()),
                "terminals": (mean[O + A + 1].copy(), std[O + A + 1].copy())}

    # -- sampling -----------------------------------------------------------------------------------------------------
    def sample_windows(self, batch: int, horizon: int, seed: int, normalize: bool = True,
                       sim_states: bool = True) -> WindowBatch:
        """Sample ``batch`` windows of ``horizon`` steps, deterministically from ``seed`` (int in [0, 2**64)).

        Starts are uniform over all valid (episode, start) pairs; a window never crosses into another episode.
        - terminated episode of length L: starts 0..L-1; steps past the end are padding: terminal 1, reward 0, and
          the last observation, action and sim_state repeated;
        - truncated or still-open episode: starts 0..L-H only, i.e. windows always end inside the episode (nothing
          past a time-limit cut is ever sampled, as in the paper); episodes shorter than H are never sampled.
        With ``normalize``, observations, actions, rewards and terminals (start_obs too) are (x - mean) / (std + 1e-6)
        with the current ``stats()``; sim_states are never normalised. ``sim_states=False`` leaves them out
        (``WindowBatch.sim_states`` is None): they are 88% of a Hopper window's bytes, and diffusion training does not
        read them (1M-step ring, B=256, H=10: see benches/bench_buffer.py).
        Raises ValueError if the buffer is empty or horizon exceeds the longest stored episode.
        """
        batch = _check_int("batch", batch, 1)
        horizon = _check_int("horizon", horizon, 1)
        seed = _check_int("seed", seed, 0, (1 << 64) - 1)
        normalize = _check_flag("normalize", normalize)
        sim_states = _check_flag("sim_states", sim_states)
        O, A, S = self._obs_dim, self._act_dim, self._sim_dim
        out_bytes = batch * horizon * (4 * (O + A + 2) + (8 * S if sim_states else 0)) + batch * (4 * O + 16)
        _check_fits_in_memory(f"sample_windows: {batch} windows of horizon {horizon}", out_bytes)
        with self._lock:
            if self._core.num_transitions() == 0:
                raise ValueError("sample_windows: the buffer is empty (add episodes first)")
            longest = int(self._core.max_episode_length())
            if horizon > longest:
                raise ValueError(f"horizon {horizon} exceeds the longest stored episode ({longest} steps)")
            # (horizon <= longest: the longest episode has a valid start, terminated or not)
            out = self._core.sample(batch, horizon, seed, normalize, sim_states)
        return WindowBatch(**{k: None if v is None else torch.from_numpy(v) for k, v in zip(_SAMPLE_FIELDS, out)})

    # -- state --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild an identical buffer, as numpy arrays (stored data in logical order)."""
        sd = {"format_version": np.int64(FORMAT_VERSION), "obs_dim": np.int64(self._obs_dim),
              "act_dim": np.int64(self._act_dim), "sim_state_dim": np.int64(self._sim_dim),
              "capacity": np.int64(self._capacity)}
        with self._lock:
            sd.update(self._core.export_state())
        return {k: np.asarray(v) for k, v in sd.items()}

    @classmethod
    def from_state_dict(cls, state: dict, *, obs_dim: int | None = None, act_dim: int | None = None,
                        sim_state_dim: int | None = None, **kwargs):
        """Rebuild a buffer from ``state_dict()`` output (kwargs go to the constructor, e.g. backend=).

        ``obs_dim``/``act_dim``/``sim_state_dim``, when given, are the dimensions the caller expects: a state with
        others is refused (ValueError naming the field, the state's value and the expected one).
        """
        expected = {"obs_dim": obs_dim, "act_dim": act_dim, "sim_state_dim": sim_state_dim}
        return cls._rebuild(state, "state", expected, kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the buffer to ``path`` (see buffer_format.py); errors name ``path``."""
        write_state(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, *, obs_dim: int | None = None, act_dim: int | None = None,
             sim_state_dim: int | None = None, **kwargs):
        """Read a file written by ``save`` (kwargs go to the constructor, e.g. backend=).

        ``obs_dim``/``act_dim``/``sim_state_dim``, when given, must match the file's (ValueError naming the field,
        the file's value and the expected one). ValueError naming ``path`` on a wrong, truncated, corrupt or
        other-version file; FileNotFoundError and other OSErrors name it too.
        """
        expected = {"obs_dim": obs_dim, "act_dim": act_dim, "sim_state_dim": sim_state_dim}
        return cls._rebuild(read_state(path), repr(os.fspath(path)), expected, kwargs)

    @classmethod
    def _rebuild(cls, state: dict, where: str, expected: dict, kwargs: dict):
        for key, want in expected.items():
            if want is not None:
                _check_int(key, want, 0)
        sd = check_state_dict(state, where)
        for key, want in expected.items():
            if want is not None and sd[key] != int(want):
                raise ValueError(f"{where}: {key} is {sd[key]} in the stored buffer, expected {int(want)}")
        buf = cls(*(sd[k] for k in DIM_KEYS), **kwargs)
        with buf._lock:
            buf._core.import_state(sd)
        return buf


class NumpyTrajectoryBuffer(TrajectoryBuffer):
    """The trajectory buffer on the numpy reference core: same interface and bit-identical results as the native one.

    NumpyTrajectoryBuffer(obs_dim, act_dim, sim_state_dim, capacity) = TrajectoryBuffer(..., backend="numpy").
    """

    def __init__(self, obs_dim: int, act_dim: int, sim_state_dim: int, capacity: int):
        super().__init__(obs_dim, act_dim, sim_state_dim, capacity, backend="numpy")
