"""Native C++ core vs numpy reference on random episode layouts (hypothesis, derandomized).

Both backends implement the same algorithms operation for operation, so everything is compared for EXACT equality:
stored data, episode table, statistics, and sampled windows (raw and normalised). Statistics are also checked
against a from-scratch recompute to 1e-6 relative.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polygrad_fast import _native
from polygrad_fast.buffer import TrajectoryBuffer
from polygrad_fast.reference.buffer import window_draws

needs_native = pytest.mark.skipif(not _native.native_available(),
                                  reason=f"native extension unavailable: {_native.native_error()}")

SETTINGS = settings(max_examples=200, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FIELDS = ("observations", "actions", "rewards", "terminals", "start_obs", "sim_states", "episode_ids", "start_steps")

episode_spec = st.tuples(
    st.integers(1, 40),  # length (clipped to capacity)
    st.sampled_from(["terminated", "truncated", "both", "neither"]),
    st.sampled_from(["whole", "steps"]),
)


@st.composite
def layouts(draw):
    return {
        "dims": (draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(0, 5))),
        "capacity": draw(st.integers(8, 150)),
        "episodes": draw(st.lists(episode_spec, min_size=1, max_size=25)),
        "open_steps": draw(st.integers(0, 12)),
        "offset": draw(st.sampled_from([0.0, 3.0, 1e4])),
        "scale": draw(st.sampled_from([1e-3, 1.0, 50.0])),
        "data_seed": draw(st.integers(0, 2**32 - 1)),
        "samples": draw(st.lists(st.tuples(st.integers(1, 70), st.integers(1, 45), st.integers(0, 2**64 - 1),
                                           st.booleans()), min_size=1, max_size=4)),
    }


def full_stats(buf):
    sd = buf.state_dict()
    term = np.zeros(len(sd["rewards"]))
    term[(np.cumsum(sd["episode_lengths"]) - 1)[sd["terminated"]]] = 1.0
    out = {}
    for k, x in (("observations", sd["observations"]), ("actions", sd["actions"]), ("rewards", sd["rewards"]),
                 ("terminals", term)):
        x = np.asarray(x, np.float64)
        out[k] = (x.mean(axis=0), x.std(axis=0), np.abs(x).max(initial=1.0))
    return out


def build(layout, backend):
    O, A, S = layout["dims"]
    C = layout["capacity"]
    buf = TrajectoryBuffer(O, A, S, C, backend=backend)
    rng = np.random.default_rng(layout["data_seed"])
    off, scale = layout["offset"], layout["scale"]
    for L, end, mode in layout["episodes"]:
        L = min(L, C)
        obs = rng.normal(off, scale, size=(L, O))
        act = rng.normal(size=(L, A))
        rew = rng.normal(off, scale, size=L)
        sim = rng.normal(size=(L, S))
        term, trunc = end in ("terminated", "both"), end in ("truncated", "both")
        if mode == "whole":
            buf.add_episode(obs, act, rew, sim, terminated=term, truncated=trunc)
        else:
            for t in range(L):
                buf.add_step(obs[t], act[t], rew[t], sim[t])
            buf.end_episode(terminated=term, truncated=trunc)
    for _ in range(min(layout["open_steps"], C)):
        buf.add_step(rng.normal(off, scale, size=O), rng.normal(size=A), rng.normal(off, scale), rng.normal(size=S))
    return buf


@needs_native
@SETTINGS
@given(layouts())
def test_native_matches_numpy_exactly(layout):
    nat, ref = build(layout, "native"), build(layout, "numpy")
    assert nat.backend == "native" and ref.backend == "numpy"
    a, b = nat.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # same data, table, moments (bit for bit)
    sa, sb, want = nat.stats(), ref.stats(), full_stats(ref)
    for k in want:
        np.testing.assert_array_equal(sa[k][0], sb[k][0])
        np.testing.assert_array_equal(sa[k][1], sb[k][1])
        mean, std, scale = want[k]
        np.testing.assert_allclose(sa[k][0], mean, rtol=1e-6, atol=1e-12 * scale, err_msg=k)
        np.testing.assert_allclose(sa[k][1], std, rtol=1e-6, atol=1e-12 * scale, err_msg=k)
    longest = int(nat.episode_lengths().max())
    for batch, horizon, seed, normalize in layout["samples"]:
        horizon = min(horizon, longest)
        x = nat.sample_windows(batch, horizon, seed, normalize=normalize)
        y = ref.sample_windows(batch, horizon, seed, normalize=normalize)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f).numpy(), getattr(y, f).numpy(), err_msg=f)
    with pytest.raises(ValueError, match="exceeds the longest stored episode"):
        nat.sample_windows(1, longest + 1, 0)


def test_rng_reference_values():
    # Pin the generator: splitmix64 finaliser of mix64(seed + G) + (i + 1) * G. Changing it changes every window.
    got = window_draws(0, 3).tolist()
    G, M = 0x9E3779B97F4A7C15, (1 << 64) - 1

    def mix(z):
        z &= M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    key = mix(G)
    assert got == [mix(key + (i + 1) * G) for i in range(3)]
    assert window_draws(2**64 - 1, 2).dtype == np.uint64


@needs_native
def test_large_batch_parallel_path_matches():
    # Big enough for the threaded gather (>= 256 KB of output) on the native side.
    nat, ref = (TrajectoryBuffer(11, 3, 58, 20_000, backend=b) for b in ("native", "numpy"))
    rng = np.random.default_rng(0)
    for i in range(40):
        L = int(rng.integers(50, 1000))
        args = (rng.normal(size=(L, 11)), rng.normal(size=(L, 3)), rng.normal(size=L), rng.normal(size=(L, 58)))
        for b in (nat, ref):
            b.add_episode(*args, terminated=bool(i % 2), truncated=not i % 2)
    for H in (10, 50):
        x, y = nat.sample_windows(1024, H, 5), ref.sample_windows(1024, H, 5)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f).numpy(), getattr(y, f).numpy(), err_msg=f)
        lean = nat.sample_windows(1024, H, 5, sim_states=False)  # the parallel gather without the sim states
        assert lean.sim_states is None
        for f in FIELDS:
            if f != "sim_states":
                np.testing.assert_array_equal(getattr(lean, f).numpy(), getattr(y, f).numpy(), err_msg=f)
