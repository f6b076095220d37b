"""Pure-numpy reference trajectory buffer, and the one place where buffer input is validated.

This module is the executable specification of the trajectory buffer. The C++ core (``csrc/``) implements exactly
the same algorithms (same RNG, same episode selection, same floating-point operation order for the statistics),
so for the same data and seed both produce bit-identical windows; the tests check that.

Layout: a ring of ``capacity`` TRANSITIONS (not ``[max_episodes, max_len, dim]``), episodes stored contiguously in
insertion order, oldest first. When a new step does not fit, whole oldest episodes are evicted.

Everything user-facing (argument checking, error messages, save/load, ``state_dict``) lives in
``_TrajectoryBufferBase``; a *core* (``_NumpyCore`` here, ``BufferCore`` in the native extension) only does the
storage work on already-validated, contiguous arrays of the right dtype.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from typing import Any

import numpy as np
import torch

__all__ = ["NumpyTrajectoryBuffer", "WindowBatch", "window_draws", "FORMAT_VERSION"]

# ----------------------------------------------------------------------------------------------------------------------
# Counter-based RNG (splitmix64). Window i of a call with seed s uses draw(s, i) only, so C++ (any thread order) and
# numpy produce the same windows. Mirrored by pgf::seed_key / pgf::draw in csrc/trajectory_buffer.hpp.
# ----------------------------------------------------------------------------------------------------------------------
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def window_draws(seed: int, count: int) -> np.ndarray:
    """The first ``count`` uint64 draws for ``seed``: mix64(mix64(seed + G) + (i + 1) * G), i = 0..count-1."""
    key = np.uint64(_mix64_int(seed + _GOLDEN))
    with np.errstate(over="ignore"):
        z = key + (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z = z ^ (z >> np.uint64(31))
    return z


# ----------------------------------------------------------------------------------------------------------------------
# Output type
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WindowBatch:
    """A batch of B windows of H consecutive steps (torch tensors sharing memory with the sampler's numpy output).

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
# Validation (the only place; both backends go through it)
# ----------------------------------------------------------------------------------------------------------------------


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("L" if s is None else str(s) for s in shape) + "]"


def _check_array(name: str, x: Any, dtype, shape: tuple) -> np.ndarray:
    """``x`` as a C-contiguous ``dtype`` array of ``shape`` (None = free length), or an error naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name}: expected an array of shape {_fmt_shape(shape)}, got {type(x).__name__} ({exc})")
    if arr.dtype == np.bool_ or arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real floating-point array (stored as {np.dtype(dtype).name}), "
                        f"got dtype {arr.dtype}")
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got {list(arr.shape)}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing cast becomes inf, reported just below
        arr = np.ascontiguousarray(arr, dtype=dtype) if arr.ndim else arr.astype(dtype)  # (keeps 0-d as 0-d)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise ValueError(f"{name}: contains NaN or inf (first at index {bad}, as {np.dtype(dtype).name})")
    return arr


def _check_flag(name: str, x: Any) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return bool(x)


def _check_int(name: str, x: Any, minimum: int) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if int(x) < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {int(x)}")
    return int(x)


# ----------------------------------------------------------------------------------------------------------------------
# Moments (n, mean, M2) in float64. The operation order is part of the spec: csrc/trajectory_buffer.cpp does the same
# IEEE operations in the same order, so both backends hold bit-identical statistics.
# ----------------------------------------------------------------------------------------------------------------------


def _chan_add(na: int, ma: np.ndarray, qa: np.ndarray, nb: int, mb: np.ndarray, qb: np.ndarray):
    """Merge moments of two disjoint sets (Chan et al.)."""
    if na == 0:
        return nb, mb.copy(), qb.copy()
    if nb == 0:
        return na, ma.copy(), qa.copy()
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (float(nb) / float(n))
    m2 = qa + qb + delta * delta * (float(na) * float(nb) / float(n))
    return n, mean, m2


def _chan_sub(n: int, m: np.ndarray, q: np.ndarray, nb: int, mb: np.ndarray, qb: np.ndarray):
    """Remove a subset's moments from a total. Returns (na, mean, m2, ill_conditioned)."""
    na = n - nb
    if na == 0:
        return 0, np.zeros_like(m), np.zeros_like(q), False
    mean = (m * float(n) - mb * float(nb)) / float(na)
    delta = mb - mean
    m2 = q - qb - delta * delta * (float(na) * float(nb) / float(n))
    m2 = np.maximum(m2, 0.0)
    # Cancellation amplifies the rounding error of the total by q/m2 (and n/na for the mean): past 16x, the caller
    # recomputes exactly from the per-episode moments instead.
    ill = bool(na * 16 < n or np.any(m2 * 16.0 < q))
    return na, mean, m2, ill


def _episode_moments(obs: np.ndarray, act: np.ndarray, rew: np.ndarray, terminated: bool):
    """Two-pass moments of one whole episode over the stat columns [obs | act | reward | terminal]."""
    L, O = obs.shape
    A = act.shape[1]
    x = np.empty((L, O + A + 2), np.float64)
    x[:, :O] = obs
    x[:, O:O + A] = act
    x[:, O + A] = rew
    x[:, O + A + 1] = 0.0
    mean = x.sum(axis=0) / float(L)  # reduction over axis 0 of a C array: sequential in i, like the C++ loop
    d = x - mean
    m2 = (d * d).sum(axis=0)
    _set_terminal_moments(mean, m2, L, terminated)
    return mean, m2


def _set_terminal_moments(mean: np.ndarray, m2: np.ndarray, L: int, terminated: bool) -> None:
    # The per-step terminal flags of an episode are 0...0 then 1 on the last step iff terminated: closed form.
    k = 1.0 if terminated else 0.0
    mean[-1] = k / float(L)
    m2[-1] = k * (float(L) - k) / float(L)


# ----------------------------------------------------------------------------------------------------------------------
# The numpy core
# ----------------------------------------------------------------------------------------------------------------------


class _NumpyCore:
    """Storage + sampling on validated inputs. Same protocol as the native ``BufferCore``."""

    def __init__(self, obs_dim: int, act_dim: int, sim_state_dim: int, capacity: int):
        self.O, self.A, self.S, self.C = obs_dim, act_dim, sim_state_dim, capacity
        self.D = obs_dim + act_dim + 2
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.act = np.zeros((capacity, act_dim), np.float32)
        self.rew = np.zeros((capacity,), np.float32)
        self.sim = np.zeros((capacity, sim_state_dim), np.float64)
        self.tail = 0  # physical index of the oldest stored step
        self.n = 0  # stored steps
        # Episode table: a FIFO over rows e0..e0+E-1 of growable arrays (oldest first).
        self.e0 = 0
        self.E = 0
        self._alloc_table(16)
        self.open = False  # the last episode is still being added step by step
        self.next_id = 0
        self.agg_n = 0  # moments over closed episodes only; an open episode's moments sit in its row
        self.agg_mean = np.zeros(self.D)
        self.agg_m2 = np.zeros(self.D)
        self.removals = 0  # evictions since the last exact recompute
        self._prefix_cache: tuple | None = None  # (horizon, version, prefix)
        self.version = 0

    # -- episode table ------------------------------------------------------------------------------------------------
    def _alloc_table(self, rows: int) -> None:
        self.t_id = np.zeros(rows, np.int64)
        self.t_start = np.zeros(rows, np.int64)
        self.t_len = np.zeros(rows, np.int64)
        self.t_term = np.zeros(rows, np.bool_)
        self.t_trunc = np.zeros(rows, np.bool_)
        self.t_mean = np.zeros((rows, self.D))
        self.t_m2 = np.zeros((rows, self.D))

    _TABLE = ("t_id", "t_start", "t_len", "t_term", "t_trunc", "t_mean", "t_m2")

    def _push_row(self) -> int:
        rows = len(self.t_id)
        if self.e0 + self.E == rows:
            new_rows = rows * 2 if self.E * 2 > rows else rows  # compact in place when at most half is live
            live = slice(self.e0, self.e0 + self.E)
            old = {k: getattr(self, k)[live].copy() for k in self._TABLE}
            self._alloc_table(new_rows)
            for k, v in old.items():
                getattr(self, k)[: self.E] = v
            self.e0 = 0
        row = self.e0 + self.E
        self.E += 1
        return row

    def _rows(self) -> slice:
        return slice(self.e0, self.e0 + self.E)

    # -- moments --------------------------------------------------------------------------------------------------
    def _recompute_agg(self) -> None:
        n, mean, m2 = 0, np.zeros(self.D), np.zeros(self.D)
        closed = self.E - (1 if self.open else 0)
        for r in range(self.e0, self.e0 + closed):
            n, mean, m2 = _chan_add(n, mean, m2, int(self.t_len[r]), self.t_mean[r], self.t_m2[r])
        self.agg_n, self.agg_mean, self.agg_m2 = n, mean, m2
        self.removals = 0

    def _evict_oldest(self) -> None:
        r = self.e0
        L = int(self.t_len[r])
        self.agg_n, self.agg_mean, self.agg_m2, ill = _chan_sub(
            self.agg_n, self.agg_mean, self.agg_m2, L, self.t_mean[r], self.t_m2[r])
        self.e0 += 1
        self.E -= 1
        self.tail = (self.tail + L) % self.C
        self.n -= L
        self.removals += 1
        closed = self.E - (1 if self.open else 0)
        if ill or self.removals >= max(64, closed):  # amortised O(D) per eviction; bounds error accumulation
            self._recompute_agg()

    def _make_room(self, steps: int) -> None:
        while self.n + steps > self.C:
            self._evict_oldest()

    def _write(self, pos: int, obs, act, rew, sim) -> None:
        L = len(rew)
        k = min(L, self.C - pos)  # first chunk up to the end of the ring, the rest wraps to 0
        for dst, src in ((self.obs, obs), (self.act, act), (self.rew, rew), (self.sim, sim)):
            dst[pos:pos + k] = src[:k]
            dst[: L - k] = src[k:]

    # -- adding -------------------------------------------------------------------------------------------------------
    def add_episode(self, obs, act, rew, sim, terminated: bool, truncated: bool) -> None:
        L = len(rew)
        mean, m2 = _episode_moments(obs, act, rew, terminated)
        self._make_room(L)
        pos = (self.tail + self.n) % self.C
        self._write(pos, obs, act, rew, sim)
        self.n += L
        r = self._push_row()
        self.t_id[r], self.t_start[r], self.t_len[r] = self.next_id, pos, L
        self.t_term[r], self.t_trunc[r] = terminated, truncated
        self.t_mean[r], self.t_m2[r] = mean, m2
        self.next_id += 1
        self.agg_n, self.agg_mean, self.agg_m2 = _chan_add(self.agg_n, self.agg_mean, self.agg_m2, L, mean, m2)
        self.version += 1

    def add_step(self, obs, act, rew: float, sim) -> None:
        self._make_room(1)
        pos = (self.tail + self.n) % self.C
        self.obs[pos], self.act[pos], self.rew[pos], self.sim[pos] = obs, act, rew, sim
        self.n += 1
        if not self.open:
            r = self._push_row()
            self.t_id[r], self.t_start[r], self.t_len[r] = self.next_id, pos, 0
            self.t_term[r] = self.t_trunc[r] = False
            self.t_mean[r] = 0.0
            self.t_m2[r] = 0.0
            self.next_id += 1
            self.open = True
        r = self.e0 + self.E - 1
        self.t_len[r] += 1
        x = np.empty(self.D)
        x[: self.O] = obs
        x[self.O:self.O + self.A] = act
        x[self.O + self.A] = np.float32(rew)
        x[-1] = 0.0
        # Welford; same operation order as the C++ core.
        cnt = float(self.t_len[r])
        delta = x - self.t_mean[r]
        self.t_mean[r] = self.t_mean[r] + delta / cnt
        self.t_m2[r] = self.t_m2[r] + delta * (x - self.t_mean[r])
        self.version += 1

    def end_episode(self, terminated: bool, truncated: bool) -> None:
        r = self.e0 + self.E - 1
        L = int(self.t_len[r])
        self.t_term[r], self.t_trunc[r] = terminated, truncated
        _set_terminal_moments(self.t_mean[r], self.t_m2[r], L, terminated)
        self.agg_n, self.agg_mean, self.agg_m2 = _chan_add(
            self.agg_n, self.agg_mean, self.agg_m2, L, self.t_mean[r], self.t_m2[r])
        self.open = False
        self.version += 1

    # -- queries ------------------------------------------------------------------------------------------------------
    def num_transitions(self) -> int:
        return self.n

    def num_episodes(self) -> int:
        return self.E

    def has_open_episode(self) -> bool:
        return self.open

    def open_length(self) -> int:
        return int(self.t_len[self.e0 + self.E - 1]) if self.open else 0

    def episode_lengths(self) -> np.ndarray:
        return self.t_len[self._rows()].copy()

    def max_episode_length(self) -> int:
        return int(self.t_len[self._rows()].max()) if self.E else 0

    def moments(self):
        """(n, mean[D], M2[D]) over every stored step, columns [obs | act | reward | terminal]."""
        if self.open:
            r = self.e0 + self.E - 1
            return _chan_add(self.agg_n, self.agg_mean, self.agg_m2, int(self.t_len[r]), self.t_mean[r], self.t_m2[r])
        return self.agg_n, self.agg_mean.copy(), self.agg_m2.copy()

    def _prefix(self, horizon: int) -> np.ndarray:
        c = self._prefix_cache
        if c is not None and c[0] == horizon and c[1] == self.version:
            return c[2]
        rows = self._rows()
        L = self.t_len[rows]
        # Terminated: any start 0..L-1 (padding after the end). Truncated/open: 0..L-H, so windows end inside.
        counts = np.where(self.t_term[rows], L, np.maximum(L - horizon + 1, 0))
        prefix = np.zeros(self.E + 1, np.int64)
        np.cumsum(counts, out=prefix[1:])
        self._prefix_cache = (horizon, self.version, prefix)
        return prefix

    def num_valid_starts(self, horizon: int) -> int:
        return int(self._prefix(horizon)[-1])

    def normalizer(self):
        """(mean[D], 1/(std+1e-6)[D]) in float64, the normalisation applied by sample()."""
        n, mean, m2 = self.moments()
        std = np.sqrt(m2 / float(n)) if n else np.zeros(self.D)
        return mean, 1.0 / (std + 1e-6)

    # -- sampling -----------------------------------------------------------------------------------------------------
    def sample(self, batch: int, horizon: int, seed: int, normalize: bool, with_sim: bool = True):
        prefix = self._prefix(horizon)
        j = (window_draws(seed, batch) % np.uint64(prefix[-1])).astype(np.int64)
        e = np.searchsorted(prefix, j, side="right") - 1  # episode k holds flat starts prefix[k] <= j < prefix[k+1]
        start = j - prefix[e]
        rows = self.e0 + e
        L = self.t_len[rows][:, None]
        steps = start[:, None] + np.arange(horizon)
        phys = (self.t_start[rows][:, None] + np.minimum(steps, L - 1)) % self.C  # padding repeats the last step
        obs = self.obs[phys]
        act = self.act[phys]
        sim = self.sim[phys] if with_sim else None
        rew = np.where(steps < L, self.rew[phys], np.float32(0.0))
        term = (self.t_term[rows][:, None] & (steps >= L - 1)).astype(np.float32)
        if normalize:
            mean, inv = self.normalizer()
            O, A = self.O, self.A
            obs = ((obs - mean[:O]) * inv[:O]).astype(np.float32)
            act = ((act - mean[O:O + A]) * inv[O:O + A]).astype(np.float32)
            rew = ((rew - mean[O + A]) * inv[O + A]).astype(np.float32)
            term = ((term - mean[O + A + 1]) * inv[O + A + 1]).astype(np.float32)
        start_obs = obs[:, 0].copy()
        return obs, act, rew, term, start_obs, sim, self.t_id[rows].copy(), start

    # -- state ----------------------------------------------------------------------------------------------------
    def export_state(self) -> dict:
        idx = (self.tail + np.arange(self.n)) % self.C  # logical order, oldest first
        rows = self._rows()
        return {
            "observations": self.obs[idx], "actions": self.act[idx], "rewards": self.rew[idx],
            "sim_states": self.sim[idx],
            "episode_ids": self.t_id[rows].copy(), "episode_lengths": self.t_len[rows].copy(),
            "terminated": self.t_term[rows].copy(), "truncated": self.t_trunc[rows].copy(),
            "episode_mean": self.t_mean[rows].copy(), "episode_m2": self.t_m2[rows].copy(),
            "open_episode": np.bool_(self.open), "next_episode_id": np.int64(self.next_id),
            "agg_n": np.int64(self.agg_n), "agg_mean": self.agg_mean.copy(), "agg_m2": self.agg_m2.copy(),
            "removals": np.int64(self.removals),
        }

    def import_state(self, sd: dict) -> None:
        """Load a state checked by _check_state_dict into this fresh core (logical order -> physical 0..n-1)."""
        n = len(sd["rewards"])
        self.obs[:n], self.act[:n], self.rew[:n], self.sim[:n] = (
            sd["observations"], sd["actions"], sd["rewards"], sd["sim_states"])
        self.tail, self.n = 0, n
        E = len(sd["episode_lengths"])
        self._alloc_table(max(16, E))
        self.e0, self.E = 0, E
        self.t_id[:E], self.t_len[:E] = sd["episode_ids"], sd["episode_lengths"]
        self.t_start[:E] = np.concatenate([[0], np.cumsum(sd["episode_lengths"])[:-1]]) if E else []
        self.t_term[:E], self.t_trunc[:E] = sd["terminated"], sd["truncated"]
        self.t_mean[:E], self.t_m2[:E] = sd["episode_mean"], sd["episode_m2"]
        self.open = bool(sd["open_episode"])
        self.next_id = int(sd["next_episode_id"])
        self.agg_n = int(sd["agg_n"])
        self.agg_mean, self.agg_m2 = sd["agg_mean"].copy(), sd["agg_m2"].copy()
        self.removals = int(sd["removals"])
        self.version += 1

    def nbytes(self) -> int:
        table = sum(getattr(self, k).nbytes for k in self._TABLE)
        return self.obs.nbytes + self.act.nbytes + self.rew.nbytes + self.sim.nbytes + table


# ----------------------------------------------------------------------------------------------------------------------
# File format: MAGIC | u32 version | u32 header length | 32-byte sha256(header + payload) | header (JSON) | payload.
# The header lists the arrays (name, dtype, shape, offset, nbytes) of the state dict; the payload is their raw bytes.
# ----------------------------------------------------------------------------------------------------------------------
FORMAT_MAGIC = b"PGFTRAJB"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII32s")

_STATE_SCALARS = {"format_version", "obs_dim", "act_dim", "sim_state_dim", "capacity", "open_episode",
                  "next_episode_id", "agg_n", "removals"}


def _atomic_write_state(path: str | os.PathLike, sd: dict) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    arrays, offset = [], 0
    for name, value in sd.items():
        a = np.asarray(value)
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
        arrays.append((name, a, offset))
        offset += a.nbytes
    header = json.dumps({"arrays": [[name, a.dtype.str, list(a.shape), off, a.nbytes] for name, a, off in arrays],
                         "payload_nbytes": offset}).encode()
    digest = hashlib.sha256(header)
    for _, a, _ in arrays:
        digest.update(a.reshape(-1).view(np.uint8))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(FORMAT_MAGIC, FORMAT_VERSION, len(header), digest.digest()))
            f.write(header)
            for _, a, _ in arrays:
                f.write(a.reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the complete new one
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


def _read_state(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _PREFIX.size or data[:8] != FORMAT_MAGIC:
        raise ValueError(f"{os.fspath(path)!r} is not a polygrad_fast trajectory buffer file (bad magic)")
    _, version, hlen, digest = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r}: trajectory buffer format version {version}, "
                         f"this polygrad_fast reads version {FORMAT_VERSION}")
    body = memoryview(data)[_PREFIX.size:]
    try:
        header = json.loads(bytes(body[:hlen]).decode())
        payload_nbytes = int(header["payload_nbytes"])
    except Exception:
        raise ValueError(f"{os.fspath(path)!r}: corrupt or truncated trajectory buffer file (unreadable header)")
    if len(body) != hlen + payload_nbytes:
        raise ValueError(f"{os.fspath(path)!r}: truncated or padded trajectory buffer file "
                         f"(payload {len(body) - hlen} bytes, header says {payload_nbytes})")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{os.fspath(path)!r}: trajectory buffer file checksum mismatch (corrupt)")
    payload = body[hlen:]
    sd = {}
    for name, dtype, shape, off, nbytes in header["arrays"]:
        sd[name] = np.frombuffer(payload[off:off + nbytes], dtype=np.dtype(dtype)).reshape(shape)
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# The user-facing API, shared by NumpyTrajectoryBuffer and polygrad_fast.buffer.TrajectoryBuffer
# ----------------------------------------------------------------------------------------------------------------------


class _TrajectoryBufferBase:
    """Validation, statistics views, save/load; delegates storage and sampling to ``self._core``."""

    def __init__(self, obs_dim: int, act_dim: int, sim_state_dim: int, capacity: int, **core_kwargs):
        self._obs_dim = _check_int("obs_dim", obs_dim, 1)
        self._act_dim = _check_int("act_dim", act_dim, 1)
        self._sim_dim = _check_int("sim_state_dim", sim_state_dim, 0)
        self._capacity = _check_int("capacity", capacity, 1)
        self._core = self._make_core(self._obs_dim, self._act_dim, self._sim_dim, self._capacity, **core_kwargs)

    def _make_core(self, obs_dim, act_dim, sim_state_dim, capacity, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- properties ---------------------------------------------------------------------------------------------------
    obs_dim = property(lambda self: self._obs_dim)
    act_dim = property(lambda self: self._act_dim)
    sim_state_dim = property(lambda self: self._sim_dim)
    capacity = property(lambda self: self._capacity)

    @property
    def num_transitions(self) -> int:
        return int(self._core.num_transitions())

    def __len__(self) -> int:
        return self.num_transitions

    @property
    def num_episodes(self) -> int:
        """Stored episodes, including a still-open one."""
        return int(self._core.num_episodes())

    @property
    def has_open_episode(self) -> bool:
        return bool(self._core.has_open_episode())

    def episode_lengths(self) -> np.ndarray:
        """[E] int64 lengths of the stored episodes, oldest first (an open episode last)."""
        return np.asarray(self._core.episode_lengths(), dtype=np.int64)

    def nbytes(self) -> int:
        """Bytes held by the storage (ring + episode table)."""
        return int(self._core.nbytes())

    def raw_nbytes(self) -> int:
        """Bytes of the stored data itself: per-step fields plus two flag bytes per episode."""
        per_step = 4 * (self._obs_dim + self._act_dim + 1) + 8 * self._sim_dim
        return self.num_transitions * per_step + 2 * self.num_episodes

    # -- adding -------------------------------------------------------------------------------------------------------
    def add_episode(self, observations, actions, rewards, sim_states, terminated: bool, truncated: bool) -> None:
        """Add a whole episode: observations [L,O], actions [L,A], rewards [L], sim_states [L,S] (state before step).

        Evicts whole oldest episodes if needed. Nothing is written unless every argument is valid.
        """
        if self._core.has_open_episode():
            raise ValueError("add_episode: an episode is still open (add_step); call end_episode() first")
        obs = _check_array("observations", observations, np.float32, (None, self._obs_dim))
        L = obs.shape[0]
        if L == 0:
            raise ValueError("observations: empty episode (length 0)")
        if L > self._capacity:
            raise ValueError(f"episode of length {L} is longer than the buffer capacity {self._capacity}")
        act = _check_array("actions", actions, np.float32, (L, self._act_dim))
        rew = _check_array("rewards", rewards, np.float32, (L,))
        sim = _check_array("sim_states", sim_states, np.float64, (L, self._sim_dim))
        term = _check_flag("terminated", terminated)
        trunc = _check_flag("truncated", truncated)
        self._core.add_episode(obs, act, rew, sim, term, trunc)

    def add_step(self, obs, action, reward, sim_state) -> None:
        """Append one step (obs [O], action [A], reward scalar, sim_state [S]) to the open episode (opens one)."""
        o = _check_array("obs", obs, np.float32, (self._obs_dim,))
        a = _check_array("action", action, np.float32, (self._act_dim,))
        r = _check_array("reward", reward, np.float32, ())
        s = _check_array("sim_state", sim_state, np.float64, (self._sim_dim,))
        if self._core.open_length() + 1 > self._capacity:
            raise ValueError(f"add_step: the open episode would exceed the buffer capacity {self._capacity}")
        self._core.add_step(o, a, float(r), s)

    def end_episode(self, terminated: bool, truncated: bool) -> None:
        """Close the open episode. ``terminated``: true end (terminal flag and padding); ``truncated``: time limit."""
        term = _check_flag("terminated", terminated)
        trunc = _check_flag("truncated", truncated)
        if not self._core.has_open_episode():
            raise ValueError("end_episode: no open episode (add_step first)")
        self._core.end_episode(term, trunc)

    # -- statistics ---------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{field: (mean, population std)} float64 over all stored steps (open episode included).

        observations [O], actions [A], rewards [] and terminals [] (per-step flags, 1 on the last step of terminated
        episodes). Zeros when empty.
        """
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
        Raises ValueError if horizon exceeds the longest stored episode or no valid window exists.
        """
        batch = _check_int("batch", batch, 1)
        horizon = _check_int("horizon", horizon, 1)
        seed = _check_int("seed", seed, 0)
        if seed >= 1 << 64:
            raise ValueError(f"seed: expected < 2**64, got {seed}")
        for name, flag in (("normalize", normalize), ("sim_states", sim_states)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        longest = int(self._core.max_episode_length())
        if horizon > longest:
            raise ValueError(f"horizon {horizon} exceeds the longest stored episode ({longest} steps)")
        if self._core.num_valid_starts(horizon) == 0:
            raise ValueError(f"no valid window of horizon {horizon}: no terminated episode and no truncated/open "
                             f"episode of length >= {horizon}")
        out = self._core.sample(batch, horizon, seed, bool(normalize), bool(sim_states))
        return WindowBatch(**{k: None if v is None else torch.from_numpy(v) for k, v in zip(_SAMPLE_FIELDS, out)})

    # -- state --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild an identical buffer, as numpy arrays (stored data in logical order)."""
        sd = {"format_version": np.int64(FORMAT_VERSION), "obs_dim": np.int64(self._obs_dim),
              "act_dim": np.int64(self._act_dim), "sim_state_dim": np.int64(self._sim_dim),
              "capacity": np.int64(self._capacity)}
        sd.update(self._core.export_state())
        return {k: np.asarray(v) for k, v in sd.items()}

    @classmethod
    def from_state_dict(cls, state: dict, **kwargs):
        """Rebuild a buffer from ``state_dict()`` output (kwargs go to the constructor, e.g. backend=)."""
        sd = _check_state_dict(state)
        buf = cls(int(sd["obs_dim"]), int(sd["act_dim"]), int(sd["sim_state_dim"]), int(sd["capacity"]), **kwargs)
        buf._core.import_state(sd)
        return buf

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the buffer to ``path`` (temp file in the same directory, fsync, rename, fsync dir)."""
        _atomic_write_state(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs):
        """Read a file written by ``save``; ValueError on a wrong, truncated, corrupt or other-version file."""
        return cls.from_state_dict(_read_state(path), **kwargs)


def _check_state_dict(state: dict) -> dict:
    """Check a state dict for completeness and consistency; return it with arrays of the canonical dtypes."""
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict of arrays, got {type(state).__name__}")
    if "format_version" not in state or int(np.asarray(state["format_version"])) != FORMAT_VERSION:
        got = state.get("format_version")
        raise ValueError(f"state: trajectory buffer format version {got}, expected {FORMAT_VERSION}")
    dims = {k: int(np.asarray(state.get(k, -1))) for k in ("obs_dim", "act_dim", "sim_state_dim", "capacity")}
    O, A, S, C = dims["obs_dim"], dims["act_dim"], dims["sim_state_dim"], dims["capacity"]
    if O < 1 or A < 1 or S < 0 or C < 1:
        raise ValueError(f"state: bad dimensions {dims}")
    spec = {"observations": (np.float32, (None, O)), "actions": (np.float32, (None, A)),
            "rewards": (np.float32, (None,)), "sim_states": (np.float64, (None, S)),
            "episode_ids": (np.int64, (None,)), "episode_lengths": (np.int64, (None,)),
            "terminated": (np.bool_, (None,)), "truncated": (np.bool_, (None,)),
            "episode_mean": (np.float64, (None, O + A + 2)), "episode_m2": (np.float64, (None, O + A + 2)),
            "agg_mean": (np.float64, (O + A + 2,)), "agg_m2": (np.float64, (O + A + 2,))}
    sd = dict(dims, format_version=FORMAT_VERSION)
    for key in _STATE_SCALARS - set(sd):
        if key not in state:
            raise ValueError(f"state: missing {key!r}")
        sd[key] = np.asarray(state[key]).item()
    for key, (dtype, shape) in spec.items():
        if key not in state:
            raise ValueError(f"state: missing {key!r}")
        a = np.asarray(state[key])
        if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            raise ValueError(f"state[{key!r}]: expected shape {_fmt_shape(shape)}, got {list(a.shape)}")
        sd[key] = np.ascontiguousarray(a, dtype=dtype)
    n, E = len(sd["rewards"]), len(sd["episode_lengths"])
    lens = sd["episode_lengths"]
    if not (len(sd["observations"]) == len(sd["actions"]) == len(sd["sim_states"]) == n):
        raise ValueError("state: per-step arrays have different lengths")
    if any(len(sd[k]) != E for k in ("episode_ids", "terminated", "truncated", "episode_mean", "episode_m2")):
        raise ValueError("state: per-episode arrays have different lengths")
    if n > C or int(lens.sum()) != n or (E and lens.min() < 1):
        raise ValueError(f"state: episode lengths (sum {int(lens.sum())}) inconsistent with {n} stored steps "
                         f"and capacity {C}")
    if bool(sd["open_episode"]) and E == 0:
        raise ValueError("state: open episode flagged but no episode stored")
    closed = int(lens[: E - 1].sum()) if bool(sd["open_episode"]) else n
    if int(sd["agg_n"]) != closed:
        raise ValueError(f"state: statistics cover {int(sd['agg_n'])} steps, closed episodes hold {closed}")
    ids = sd["episode_ids"]
    if E and (np.any(np.diff(ids) <= 0) or int(ids[-1]) >= int(sd["next_episode_id"])):
        raise ValueError("state: episode ids must increase and stay below next_episode_id")
    return sd


class NumpyTrajectoryBuffer(_TrajectoryBufferBase):
    """The pure-numpy trajectory buffer: same interface and bit-identical results as the native one.

    NumpyTrajectoryBuffer(obs_dim, act_dim, sim_state_dim, capacity); see TrajectoryBuffer for the semantics.
    """

    backend = "numpy"

    def _make_core(self, obs_dim, act_dim, sim_state_dim, capacity):
        return _NumpyCore(obs_dim, act_dim, sim_state_dim, capacity)
