"""Pure-numpy trajectory buffer core: the executable specification of the buffer's semantics.

The C++ core (``csrc/trajectory_buffer.cpp``) implements exactly the same algorithms (same RNG, same episode
selection, same floating-point operation order for the statistics), so for the same data and seed both produce
bit-identical windows and statistics; tests/test_buffer_equivalence.py checks that. The user-facing buffer
(``polygrad_fast.buffer.TrajectoryBuffer``) validates all input and uses this core as its numpy backend; this
module imports nothing from the rest of the package.

Layout: a ring of ``capacity`` TRANSITIONS (not ``[max_episodes, max_len, dim]``), episodes stored contiguously in
insertion order, oldest first. When a new step does not fit, whole oldest episodes are evicted.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NumpyBufferCore", "window_draws"]
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


class NumpyBufferCore:
    """Storage + sampling of one buffer, on already-validated inputs; the same protocol as the native ``BufferCore``.

    Inputs are C-contiguous arrays of the stored dtypes: obs [L,O] f32, act [L,A] f32, rew [L] f32, sim [L,S] f64.
    Not thread-safe by itself: the caller serialises calls (the front-end holds a lock around each one).
    """

    @staticmethod
    def bytes_per_transition(obs_dim: int, act_dim: int, sim_state_dim: int) -> int:
        """Bytes of storage one transition takes (f32 obs, act, reward; f64 sim state)."""
        return 4 * (obs_dim + act_dim + 1) + 8 * sim_state_dim

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
        """Load a validated ``export_state()``-layout dict into this fresh core (logical order -> physical 0..n-1)."""
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
