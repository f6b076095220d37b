"""Semantics of TrajectoryBuffer (both backends): layout, eviction, padding, window rules, statistics, validation,
save/load. The native-vs-numpy equivalence on random layouts is in test_buffer_equivalence.py."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from polygrad_fast import _native
from polygrad_fast.buffer import NumpyTrajectoryBuffer, TrajectoryBuffer, WindowBatch
from polygrad_fast.buffer_format import FORMAT_VERSION

BACKENDS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(
    not _native.native_available(), reason=f"native extension unavailable: {_native.native_error()}"))]

O, A, S = 4, 2, 3


def make(backend, capacity=200, o=O, a=A, s=S):
    return TrajectoryBuffer(o, a, s, capacity, backend=backend)


def episode(L, ep_tag=0, o=O, a=A, s=S, rng=None):
    """Episode whose obs[:, 0] encodes (tag, step) so windows can be checked against their source."""
    rng = rng or np.random.default_rng(ep_tag)
    obs = rng.normal(size=(L, o)).astype(np.float32)
    obs[:, 0] = ep_tag * 1000 + np.arange(L)
    act = rng.normal(size=(L, a)).astype(np.float32)
    rew = rng.normal(size=L).astype(np.float32)
    sim = rng.normal(size=(L, s))
    sim[:, 0] = ep_tag * 1000 + np.arange(L)
    return obs, act, rew, sim


def snapshot(buf):
    return {k: np.array(v, copy=True) for k, v in buf.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def full_stats(buf):
    """Statistics recomputed from scratch from the stored data (float64, population std)."""
    sd = buf.state_dict()
    term = np.zeros(len(sd["rewards"]))
    ends = np.cumsum(sd["episode_lengths"]) - 1
    term[ends[sd["terminated"]]] = 1.0
    f = lambda x: (np.mean(np.asarray(x, np.float64), axis=0), np.std(np.asarray(x, np.float64), axis=0))  # noqa
    return {"observations": f(sd["observations"]), "actions": f(sd["actions"]), "rewards": f(sd["rewards"]),
            "terminals": f(term)}


def assert_stats_close(buf, rtol=1e-6):
    got, want = buf.stats(), full_stats(buf)
    for k in want:
        for g, w in zip(got[k], want[k]):
            scale = max(1.0, float(np.abs(buf.state_dict()[k if k != "terminals" else "rewards"]).max()))
            np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-12 * scale, err_msg=k)


# ----------------------------------------------------------------------------------------------------------------------
# layout and eviction
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties_and_whole_episode_eviction(backend):
    buf = make(backend, capacity=100)
    assert (buf.obs_dim, buf.act_dim, buf.sim_state_dim, buf.capacity) == (O, A, S, 100)
    assert len(buf) == 0 and buf.num_episodes == 0
    lengths = [30, 40, 20, 25, 50, 10]
    for i, L in enumerate(lengths):
        buf.add_episode(*episode(L, i), terminated=i % 2 == 0, truncated=i % 2 == 1)
    # 30+40+20 = 90; +25 evicts ep0 (85); +50 evicts ep1, ep2 (75); +10 -> 85.
    np.testing.assert_array_equal(buf.episode_lengths(), [25, 50, 10])
    assert len(buf) == buf.num_transitions == 85 and buf.num_episodes == 3
    sd = buf.state_dict()
    np.testing.assert_array_equal(sd["episode_ids"], [3, 4, 5])  # stable ids
    want = np.concatenate([episode(L, i)[0] for i, L in list(enumerate(lengths))[3:]])
    np.testing.assert_array_equal(sd["observations"], want)  # survivors intact across the wrap-around
    np.testing.assert_array_equal(sd["sim_states"], np.concatenate([episode(L, i)[3] for i, L in
                                                                    list(enumerate(lengths))[3:]]))
    np.testing.assert_array_equal(sd["terminated"], [False, True, False])
    np.testing.assert_array_equal(sd["truncated"], [True, False, True])
    assert_stats_close(buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stepwise_equals_whole_and_open_episode(backend):
    whole, steps = make(backend, 50), make(backend, 50)
    rng = np.random.default_rng(1)
    for i in range(8):
        L = int(rng.integers(3, 20))
        ep = episode(L, i)
        whole.add_episode(*ep, terminated=bool(i % 3 == 0), truncated=bool(i % 3 != 0))
        for t in range(L):
            steps.add_step(ep[0][t], ep[1][t], float(ep[2][t]), ep[3][t])
        assert steps.has_open_episode
        steps.end_episode(terminated=bool(i % 3 == 0), truncated=bool(i % 3 != 0))
    a, b = whole.state_dict(), steps.state_dict()
    for k in ("observations", "actions", "rewards", "sim_states", "episode_ids", "episode_lengths", "terminated"):
        np.testing.assert_array_equal(a[k], b[k])
    for k in whole.stats():
        for x, y in zip(whole.stats()[k], steps.stats()[k]):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    # An open episode counts in the stats and is sampled like a truncated one.
    ep = episode(12, 99)
    for t in range(12):
        steps.add_step(ep[0][t], ep[1][t], ep[2][t], ep[3][t])
    assert steps.has_open_episode and steps.episode_lengths()[-1] == 12
    assert_stats_close(steps)
    ids = steps.state_dict()["episode_ids"]
    wb = steps.sample_windows(4000, 5, seed=3, normalize=False)
    sel = wb.episode_ids.numpy() == ids[-1]
    assert sel.any()
    assert wb.start_steps.numpy()[sel].max() == 12 - 5  # never past the open end
    assert (wb.terminals.numpy()[sel] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stepwise_evicts_older_episodes_not_the_open_one(backend):
    buf = make(backend, 20)
    buf.add_episode(*episode(8, 0), terminated=True, truncated=False)
    buf.add_episode(*episode(8, 1), terminated=True, truncated=False)
    ep = episode(15, 2)
    for t in range(15):
        buf.add_step(ep[0][t], ep[1][t], ep[2][t], ep[3][t])
    np.testing.assert_array_equal(buf.episode_lengths(), [15])
    assert_stats_close(buf)
    for t in range(5):
        buf.add_step(ep[0][t], ep[1][t], ep[2][t], ep[3][t])
    with pytest.raises(ValueError, match="exceed the buffer capacity 20"):
        buf.add_step(ep[0][0], ep[1][0], ep[2][0], ep[3][0])
    assert len(buf) == 20
    buf.end_episode(terminated=False, truncated=True)


# ----------------------------------------------------------------------------------------------------------------------
# windows
# ----------------------------------------------------------------------------------------------------------------------


def _expected_window(ep, L, s, H, terminated):
    obs, act, rew, sim = ep
    idx = np.minimum(np.arange(s, s + H), L - 1)
    inside = np.arange(s, s + H) < L
    term = ((np.arange(s, s + H) >= L - 1) & terminated).astype(np.float32)
    return obs[idx], act[idx], np.where(inside, rew[idx], 0).astype(np.float32), term, sim[idx]


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_contents_padding_and_boundaries(backend):
    buf = make(backend, 500)
    eps, lens, terms = {}, [5, 30, 3, 12, 9, 40], [True, False, True, False, True, True]
    for i, (L, term) in enumerate(zip(lens, terms)):
        eps[i] = episode(L, i)
        buf.add_episode(*eps[i], terminated=term, truncated=not term)
    H = 8
    wb = buf.sample_windows(3000, H, seed=11, normalize=False)
    assert isinstance(wb, WindowBatch)
    assert wb.observations.shape == (3000, H, O) and wb.observations.dtype == torch.float32
    assert wb.actions.shape == (3000, H, A) and wb.rewards.shape == (3000, H) and wb.terminals.shape == (3000, H)
    assert wb.sim_states.shape == (3000, H, S) and wb.sim_states.dtype == torch.float64
    assert wb.start_obs.shape == (3000, O) and wb.episode_ids.dtype == torch.int64
    torch.testing.assert_close(wb.start_obs, wb.observations[:, 0], rtol=0, atol=0)
    starts = {i: set() for i in eps}
    for b in range(3000):
        e, s = int(wb.episode_ids[b]), int(wb.start_steps[b])
        L, term = lens[e], terms[e]
        starts[e].add(s)
        # Terminated: any start 0..L-1. Truncated: 0..L-H (never past the cut; episodes shorter than H never).
        assert 0 <= s <= (L - 1 if term else L - H)
        want = _expected_window(eps[e], L, s, H, term)
        got = (wb.observations[b], wb.actions[b], wb.rewards[b], wb.terminals[b], wb.sim_states[b])
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.numpy(), w)  # never crosses into another episode
    assert starts[0] == set(range(5)) and starts[2] == set(range(3))  # incl. start L-1 (reference's off-by-one)
    assert starts[1] == set(range(30 - H + 1)) and starts[3] == set(range(12 - H + 1))
    # Padding past a terminated end: terminal 1, reward 0, last obs/action/sim_state repeated.
    sel = (wb.episode_ids == 2).numpy()
    w = wb.observations.numpy()[sel]
    assert (wb.terminals.numpy()[sel][:, -1] == 1).all() and (wb.rewards.numpy()[sel][:, -1] == 0).all()
    np.testing.assert_array_equal(w[:, -1], np.broadcast_to(eps[2][0][-1], w[:, -1].shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_terminated_and_truncated_both_set_counts_as_terminated(backend):
    buf = make(backend)
    buf.add_episode(*episode(4, 0), terminated=True, truncated=True)
    wb = buf.sample_windows(64, 4, seed=0, normalize=False)
    assert (wb.terminals.numpy()[:, -1] == 1).all() and wb.start_steps.max() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisation_uses_stats(backend):
    buf = make(backend)
    rng = np.random.default_rng(5)
    for i in range(6):
        o, a, r, s = episode(int(rng.integers(5, 30)), i)
        buf.add_episode(o * 3 + 7, a, r * 10 - 2, s, terminated=bool(i % 2), truncated=not i % 2)
    raw = buf.sample_windows(512, 6, seed=9, normalize=False)
    nrm = buf.sample_windows(512, 6, seed=9, normalize=True)
    st = buf.stats()
    norm = lambda x, k: ((x.numpy().astype(np.float64) - st[k][0]) / (st[k][1] + 1e-6)).astype(np.float32)  # noqa
    for field, key in (("observations", "observations"), ("actions", "actions"), ("rewards", "rewards"),
                       ("terminals", "terminals"), ("start_obs", "observations")):
        np.testing.assert_allclose(getattr(nrm, field).numpy(), norm(getattr(raw, field), key), rtol=1e-6,
                                   atol=1e-6, err_msg=field)
    torch.testing.assert_close(nrm.sim_states, raw.sim_states, rtol=0, atol=0)  # never normalised
    assert st["rewards"][0].shape == () and st["observations"][0].shape == (O,)
    assert all(v.dtype == np.float64 for pair in st.values() for v in pair)


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_per_seed(backend):
    buf = make(backend)
    for i in range(5):
        buf.add_episode(*episode(20, i), terminated=i == 0, truncated=i != 0)
    a = buf.sample_windows(100, 5, seed=42)
    b = buf.sample_windows(100, 5, seed=42)
    c = buf.sample_windows(100, 5, seed=43)
    for f in ("observations", "episode_ids", "start_steps", "sim_states"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)
    assert not torch.equal(a.start_steps * 100 + a.episode_ids, c.start_steps * 100 + c.episode_ids)
    # the i-th window depends on (seed, i) only: a bigger batch extends a smaller one
    d = buf.sample_windows(300, 5, seed=42)
    torch.testing.assert_close(d.observations[:100], a.observations, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_sampling_without_sim_states(backend, normalize):
    """sim_states=False: the same windows (every other field bit-equal), sim_states None."""
    buf = make(backend)
    for i in range(6):
        buf.add_episode(*episode(15 + i, i), terminated=i % 2 == 0, truncated=i % 2 == 1)
    full = buf.sample_windows(64, 7, seed=3, normalize=normalize)
    lean = buf.sample_windows(64, 7, seed=3, normalize=normalize, sim_states=False)
    assert lean.sim_states is None and full.sim_states.shape == (64, 7, buf.sim_state_dim)
    for f in ("observations", "actions", "rewards", "terminals", "start_obs", "episode_ids", "start_steps"):
        assert torch.equal(getattr(lean, f), getattr(full, f)), f


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi2(df) by Wilson-Hilferty; z = 3.719 is the normal quantile for p = 1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_over_valid_starts(backend):
    buf = make(backend, 1000)
    lens, terms = [7, 50, 3, 20, 33, 11], [True, False, True, True, False, False]
    for i, (L, t) in enumerate(zip(lens, terms)):
        buf.add_episode(*episode(L, i), terminated=t, truncated=not t)
    H = 5
    cells = [(e, s) for e, (L, t) in enumerate(zip(lens, terms)) for s in range(L if t else L - H + 1)]
    n = 200_000
    wb = buf.sample_windows(n, H, seed=2024, normalize=False)
    keys = wb.episode_ids.numpy() * 1000 + wb.start_steps.numpy()
    uniq, counts = np.unique(keys, return_counts=True)
    assert set(uniq.tolist()) == {e * 1000 + s for e, s in cells}  # exactly the valid pairs, all reached
    expected = n / len(cells)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(len(cells) - 1), (chi2, len(cells))


# ----------------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_full_recompute_after_many_evictions(backend):
    buf = make(backend, capacity=400)
    rng = np.random.default_rng(7)
    for i in range(1500):
        L = int(rng.integers(1, 60))
        o, a, r, s = episode(L, i, rng=rng)
        # Drifting offsets and scales: stresses cancellation in the incremental (un)merging.
        scale = 10.0 ** rng.uniform(-3, 2)
        offset = 1e4 * math.sin(i / 100)
        o = (o * scale + offset).astype(np.float32)
        o[:, 0] = offset + rng.normal(size=L) * 1e-3  # tiny variance on a large mean
        if i % 3 == 0:
            for t in range(L):
                buf.add_step(o[t], a[t], r[t] * scale, s[t])
            buf.end_episode(terminated=bool(rng.random() < 0.5), truncated=False)
        else:
            buf.add_episode(o, a, r * scale, s, terminated=bool(rng.random() < 0.3), truncated=True)
        if i % 250 == 0:
            assert_stats_close(buf)
    assert_stats_close(buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_empty_and_terminal_rate(backend):
    buf = make(backend)
    assert all((m == 0).all() and (s == 0).all() for m, s in buf.stats().values())
    buf.add_episode(*episode(10, 0), terminated=True, truncated=False)
    buf.add_episode(*episode(30, 1), terminated=False, truncated=True)
    m, s = buf.stats()["terminals"]
    assert m == pytest.approx(1 / 40) and s == pytest.approx(math.sqrt(1 / 40 * 39 / 40))


# ----------------------------------------------------------------------------------------------------------------------
# validation: clear errors, nothing written
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_leave_data_intact(backend):
    buf = make(backend, capacity=60)
    for i in range(3):
        buf.add_episode(*episode(15, i), terminated=True, truncated=False)
    before, stats_before = snapshot(buf), buf.stats()
    o, a, r, s = episode(10, 9)
    nan_obs = o.copy()
    nan_obs[3, 1] = np.nan
    inf_sim = s.copy()
    inf_sim[0, 0] = np.inf
    cases = [
        (ValueError, r"observations: expected shape \[L, 4\], got \[10, 5\]", (np.zeros((10, 5)), a, r, s)),
        (ValueError, r"actions: expected shape \[10, 2\], got \[9, 2\]", (o, a[:9], r, s)),
        (ValueError, r"rewards: expected shape \[10\], got \[10, 1\]", (o, a, r[:, None], s)),
        (ValueError, r"sim_states: expected shape \[10, 3\], got \[10, 2\]", (o, a, r, s[:, :2])),
        (ValueError, r"observations: contains NaN or inf \(first: nan at index \[3, 1\]", (nan_obs, a, r, s)),
        (ValueError, r"sim_states: contains NaN or inf", (o, a, r, inf_sim)),
        (ValueError, r"observations: expected an episode of length >= 1, got length 0", (o[:0], a[:0], r[:0], s[:0])),
        (ValueError, r"longer than the buffer capacity 60", episode(61, 3)),
        (TypeError, r"observations: expected a real floating-point array.*got dtype <U1", (np.full((10, 4), "x"),
                                                                                         a, r, s)),
        (TypeError, r"actions: expected a real floating-point array.*got dtype bool", (o, a > 0, r, s)),
        (ValueError, r"observations: contains NaN or inf", (np.full((10, 4), 1e39), a, r, s)),  # f32 overflow
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            buf.add_episode(*args, terminated=True, truncated=False)
    with pytest.raises(TypeError, match="terminated: expected a bool, got int"):
        buf.add_episode(o, a, r, s, terminated=1, truncated=False)
    with pytest.raises(ValueError, match=r"obs: expected shape \[4\], got \[5\]"):
        buf.add_step(np.zeros(5), a[0], 0.0, s[0])
    with pytest.raises(ValueError, match="reward: contains NaN"):
        buf.add_step(o[0], a[0], float("nan"), s[0])
    with pytest.raises(ValueError, match="end_episode: expected an open episode"):
        buf.end_episode(terminated=True, truncated=False)
    assert_same_state(before, snapshot(buf))
    assert all((x == y).all() for k in stats_before for x, y in zip(stats_before[k], buf.stats()[k]))
    buf.add_step(o[0], a[0], r[0], s[0])
    with pytest.raises(ValueError, match="an episode is still open"):
        buf.add_episode(o, a, r, s, terminated=True, truncated=False)
    # torch tensors and float64 input are accepted (converted) and stored as given: a and r are float32 values
    # (exact in float64), s goes through float32 (stored as float64)
    buf.end_episode(terminated=False, truncated=True)
    buf.add_episode(torch.from_numpy(o), torch.from_numpy(a).double(), r.astype(np.float64), s.astype(np.float32),
                    terminated=np.bool_(True), truncated=False)
    np.testing.assert_array_equal(buf.episode_lengths(), [15, 15, 15, 1, 10])  # nothing evicted (56 of 60)
    sd = buf.state_dict()
    assert bool(sd["terminated"][-1]) and not bool(sd["truncated"][-1]) and not bool(sd["open_episode"])
    want = {"observations": o, "actions": a, "rewards": r, "sim_states": s.astype(np.float32).astype(np.float64)}
    for k, v in want.items():
        assert sd[k].dtype == (np.float64 if k == "sim_states" else np.float32), k
        np.testing.assert_array_equal(sd[k][-10:], v, err_msg=k)
    assert_stats_close(buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_argument_errors(backend):
    buf = make(backend)
    with pytest.raises(ValueError, match="the buffer is empty"):
        buf.sample_windows(4, 1, seed=0)
    buf.add_episode(*episode(10, 0), terminated=False, truncated=True)
    with pytest.raises(ValueError, match=r"horizon 11 exceeds the longest stored episode \(10 steps\)"):
        buf.sample_windows(4, 11, seed=0)
    with pytest.raises(ValueError, match="batch: expected >= 1, got 0"):
        buf.sample_windows(0, 5, seed=0)
    with pytest.raises(ValueError, match="horizon: expected >= 1, got -1"):
        buf.sample_windows(4, -1, seed=0)
    with pytest.raises(ValueError, match="seed: expected >= 0"):
        buf.sample_windows(4, 5, seed=-1)
    with pytest.raises(TypeError, match="batch: expected an int, got float"):
        buf.sample_windows(4.0, 5, seed=0)
    assert buf.sample_windows(4, 10, seed=2**64 - 1).start_steps.tolist() == [0, 0, 0, 0]
    with pytest.raises(TypeError, match="sim_states: expected a bool, got str"):
        buf.sample_windows(4, 5, seed=0, sim_states="no")


def test_constructor_errors():
    with pytest.raises(ValueError, match="capacity: expected >= 1, got 0"):
        TrajectoryBuffer(3, 1, 2, 0)
    with pytest.raises(TypeError, match="obs_dim: expected an int, got float"):
        TrajectoryBuffer(3.0, 1, 2, 10)
    with pytest.raises(ValueError, match="backend: expected one of"):
        TrajectoryBuffer(3, 1, 2, 10, backend="gpu")


# ----------------------------------------------------------------------------------------------------------------------
# save / load / state_dict
# ----------------------------------------------------------------------------------------------------------------------


def _filled(backend, capacity=120, open_steps=4):
    buf = make(backend, capacity)
    rng = np.random.default_rng(3)
    for i in range(20):
        buf.add_episode(*episode(int(rng.integers(1, 30)), i), terminated=bool(i % 2), truncated=not i % 2)
    ep = episode(open_steps, 77)
    for t in range(open_steps):
        buf.add_step(ep[0][t], ep[1][t], ep[2][t], ep[3][t])
    return buf


def _assert_same_sampling(a, b, horizons=(1, 4, 9)):
    for H in horizons:
        for norm in (False, True):
            x, y = a.sample_windows(64, H, seed=H, normalize=norm), b.sample_windows(64, H, seed=H, normalize=norm)
            for f in ("observations", "actions", "rewards", "terminals", "start_obs", "sim_states", "episode_ids",
                      "start_steps"):
                torch.testing.assert_close(getattr(x, f), getattr(y, f), rtol=0, atol=0)
    for k in a.stats():
        for u, v in zip(a.stats()[k], b.stats()[k]):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(backend, tmp_path):
    buf = _filled(backend)
    path = tmp_path / "buf.pgfb"
    buf.save(path)
    written = snapshot(buf)
    loaded = TrajectoryBuffer.load(path, backend=backend)
    assert loaded.backend == backend
    _assert_same_sampling(buf, loaded)
    # ... and they keep behaving identically (evictions, ids, the open episode)
    for b in (buf, loaded):
        b.add_step(*[x[0] for x in episode(1, 5)])
        b.end_episode(terminated=True, truncated=False)
        b.add_episode(*episode(90, 6), terminated=False, truncated=True)
    _assert_same_sampling(buf, loaded)
    assert_same_state(snapshot(buf), snapshot(loaded))
    # cross-backend: the numpy reference reads what the native one wrote (and vice versa): the same stored state,
    # windows and statistics as the buffer that wrote the file (rebuilt on the writer's backend from its state)
    other_backend = "numpy" if backend == "native" else "native"
    if other_backend == "native" and not _native.native_available():
        other_backend = "numpy"  # no native reader here: at least a second, independent load
    other = (NumpyTrajectoryBuffer.load(path) if other_backend == "numpy"
             else TrajectoryBuffer.load(path, backend=other_backend))
    assert other.backend == other_backend
    assert_same_state(written, snapshot(other))
    _assert_same_sampling(TrajectoryBuffer.from_state_dict(written, backend=backend), other)
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend):
    buf = _filled(backend)
    sd = buf.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    for target in ("numpy", backend):
        _assert_same_sampling(buf, TrajectoryBuffer.from_state_dict(sd, backend=target))
    bad = dict(sd, episode_lengths=sd["episode_lengths"] + 1)
    with pytest.raises(ValueError, match="inconsistent"):
        TrajectoryBuffer.from_state_dict(bad)
    with pytest.raises(ValueError, match="format version"):
        TrajectoryBuffer.from_state_dict(dict(sd, format_version=np.int64(99)))
    with pytest.raises(ValueError, match="missing 'agg_m2'"):
        TrajectoryBuffer.from_state_dict({k: v for k, v in sd.items() if k != "agg_m2"})


def test_load_rejects_bad_files(tmp_path):
    buf = _filled("numpy")
    path = tmp_path / "buf.pgfb"
    buf.save(path)
    data = path.read_bytes()
    cases = {
        "garbage": (b"hello world, not a buffer" * 10, "not a polygrad_fast trajectory buffer file"),
        "empty": (b"", "bad magic"),
        "truncated": (data[: len(data) - 100], "truncated"),
        "truncated_header": (data[:60], "truncated|unreadable header"),
        "flipped": (data[:-50] + bytes([data[-50] ^ 0xFF]) + data[-49:], "checksum mismatch"),
        "version": (data[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + data[12:], "format version 2"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / f"{name}.pgfb"
        p.write_bytes(content)
        with pytest.raises(ValueError, match=msg):
            TrajectoryBuffer.load(p)
    with pytest.raises(FileNotFoundError):
        TrajectoryBuffer.load(tmp_path / "missing.pgfb")


def test_save_is_atomic(tmp_path, monkeypatch):
    old = _filled("numpy", open_steps=1)
    path = tmp_path / "buf.pgfb"
    old.save(path)
    before = path.read_bytes()
    new = _filled("numpy", open_steps=7)

    def boom(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        new.save(path)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buf.pgfb"]  # temp file cleaned up
    monkeypatch.undo()
    _assert_same_sampling(old, TrajectoryBuffer.load(path))


# ----------------------------------------------------------------------------------------------------------------------
# memory and backends
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_within_1_2x_of_raw_data(backend):
    # Hopper-like dims; episodes of mixed length (10..1000) filling the ring, with evictions.
    o, a, s = 11, 3, 58
    buf = TrajectoryBuffer(o, a, s, 60_000, backend=backend)
    rng = np.random.default_rng(0)
    while len(buf) < 59_000 or buf.num_episodes < 50:
        L = int(rng.integers(10, 1001))
        buf.add_episode(np.zeros((L, o), np.float32), np.zeros((L, a), np.float32), np.zeros(L, np.float32),
                        np.zeros((L, s)), terminated=bool(rng.random() < 0.5), truncated=False)
    assert buf.nbytes() <= 1.2 * buf.raw_nbytes(), (buf.nbytes(), buf.raw_nbytes())


@pytest.mark.skipif(not _native.native_available(), reason=f"native extension unavailable: {_native.native_error()}")
def test_native_is_default_and_build_info():
    assert TrajectoryBuffer(2, 1, 1, 10).backend == "native"
    info = _native.native_build_info()
    assert info["available"] is True
    assert {"compiler", "cxx_flags", "openmp", "gather_threads", "version"} <= info.keys()
    assert "-O3" in info["cxx_flags"]
    import polygrad_fast

    assert info["version"] == polygrad_fast.__version__


def test_fallback_without_native_warns_once():
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import polygrad_fast\n"
        "    from polygrad_fast.buffer import TrajectoryBuffer\n"
        "    from polygrad_fast._native import native_available, native_build_info\n"
        "    b1 = TrajectoryBuffer(2, 1, 1, 10); b2 = TrajectoryBuffer(2, 1, 1, 10)\n"
        "msgs = [str(x.message) for x in w if 'native trajectory buffer' in str(x.message)]\n"
        "assert b1.backend == b2.backend == 'numpy' and not native_available(), b1.backend\n"
        "assert len(msgs) == 1 and 'POLYGRAD_FAST_NO_NATIVE' in msgs[0], msgs\n"
        "assert native_build_info()['available'] is False\n"
        "try:\n"
        "    TrajectoryBuffer(2, 1, 1, 10, backend='native')\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n")
    env = dict(os.environ, POLYGRAD_FAST_NO_NATIVE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.skipif(not _native.native_available(), reason=f"native extension unavailable: {_native.native_error()}")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_native_parallel_gather_survives_fork():
    # The helper threads do not exist in a forked child; the gather must still complete there (serially).
    buf = TrajectoryBuffer(11, 3, 58, 20_000, backend="native")
    for i in range(20):
        buf.add_episode(*episode(900, i, 11, 3, 58), terminated=bool(i % 2), truncated=not i % 2)
    want = buf.sample_windows(1024, 10, seed=1)  # big enough for the threaded path; starts the helpers
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            got = buf.sample_windows(1024, 10, seed=1)
            # compare with numpy: torch ops may use the parent's OpenMP pool, which does not survive fork()
            ok = np.array_equal(got.observations.numpy(), want.observations.numpy()) and np.array_equal(
                got.sim_states.numpy(), want.sim_states.numpy())
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 60  # a deadlocked child must fail the test, not hang the suite
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("sampling in a forked child did not finish within 60 s (deadlock)")
    status = done[1]
    assert os.read(r, 1) == b"1" and status == 0


@pytest.mark.skipif(not _native.native_available(), reason=f"native extension unavailable: {_native.native_error()}")
def test_native_output_blocks_never_alias_live_batches():
    # Windows are zero-copy views of arrays the native core filled; a batch still referenced (even only through
    # one tensor) must never be overwritten by a later call.
    buf = TrajectoryBuffer(O, A, S, 5000, backend="native")
    for i in range(10):
        buf.add_episode(*episode(400, i), terminated=True, truncated=False)
    keep = buf.sample_windows(1024, 50, seed=1)
    obs_only = buf.sample_windows(1024, 50, seed=2).observations  # the rest of that batch is dropped
    copies = keep.observations.clone(), keep.sim_states.clone(), obs_only.clone()
    for seed in range(3, 8):
        buf.sample_windows(1024, 50, seed=seed)
    torch.testing.assert_close(keep.observations, copies[0], rtol=0, atol=0)
    torch.testing.assert_close(keep.sim_states, copies[1], rtol=0, atol=0)
    torch.testing.assert_close(obs_only, copies[2], rtol=0, atol=0)
    keep.observations.add_(1.0)  # outputs are writable


@pytest.mark.skipif(not _native.native_available(), reason=f"native extension unavailable: {_native.native_error()}")
def test_native_sampling_releases_the_gil():
    # A Python thread keeps ticking while the main thread is inside one long native gather. With the GIL held for
    # the call, the ticker would stall for (nearly) the whole call; released, its gaps stay short.
    import threading

    buf = TrajectoryBuffer(11, 3, 58, 300_000, backend="native")
    for i in range(300):
        buf.add_episode(*episode(1000, i, 11, 3, 58), terminated=True, truncated=False)
    mod = _native.native()
    threads = mod.gather_threads()
    mod.set_gather_threads(1)  # leave the second core to the ticker
    try:
        buf.sample_windows(1024, 200, seed=0)  # warm-up (first-touch of the output blocks)
        ticks: list[float] = []
        stop = threading.Event()

        def ticker():
            while not stop.is_set():
                ticks.append(time.perf_counter())

        thread = threading.Thread(target=ticker)
        thread.start()
        time.sleep(0.02)
        t0 = time.perf_counter()
        buf.sample_windows(1024, 200, seed=1)
        t1 = time.perf_counter()
        stop.set()
        thread.join()
    finally:
        mod.set_gather_threads(threads)
    call = t1 - t0
    assert call > 0.02, f"the gather ({1e3 * call:.1f} ms) was too short to tell"
    during = [t0] + [t for t in ticks if t0 <= t <= t1] + [t1]
    longest_gap = max(b - a for a, b in zip(during, during[1:]))
    assert longest_gap < 0.5 * call, (f"the ticker stalled {1e3 * longest_gap:.1f} ms of a {1e3 * call:.1f} ms "
                                      "native call: is the GIL held?")


def test_reference_core_imports_nothing_of_the_package():
    # The numpy core is the independent twin the native core is tested against: it must not lean on production
    # (or native) code. Imports of its source, read with the ast module.
    import ast

    import polygrad_fast.reference.buffer as ref

    tree = ast.parse(open(ref.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"numpy", "torch", "__future__"}, imported
