"""A TrajectoryBuffer shared by threads: concurrent adds (whole episodes from two threads, or step by step, with
evictions) and samples never produce a window that mixes episodes, on both backends.

Every stored step carries (episode tag, step) in obs[:, 0:2] and sim[:, 0]; a window is correct iff its tag is
constant and its steps are start, start+1, ... (the last step repeated on padding after a terminated end).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from polygrad_fast import _native
from polygrad_fast.buffer import TrajectoryBuffer

BACKENDS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(
    not _native.native_available(), reason=f"native extension unavailable: {_native.native_error()}"))]

O, A, S, H = 3, 2, 2, 8


def tagged_episode(tag: int, L: int):
    obs = np.zeros((L, O), np.float32)
    obs[:, 0], obs[:, 1] = tag, np.arange(L)
    sim = np.zeros((L, S))
    sim[:, 0] = tag
    return obs, np.full((L, A), float(tag), np.float32), np.full(L, float(tag), np.float32), sim


def window_errors(w) -> int:
    """Number of windows of the (unnormalised) batch ``w`` that are not one contiguous piece of one episode."""
    obs = w.observations.numpy()
    tag, step = obs[:, :, 0], obs[:, :, 1]
    one_episode = (tag == tag[:, :1]).all(1) & (w.sim_states.numpy()[:, :, 0] == tag[:, :1]).all(1)
    want = w.start_steps.numpy()[:, None] + np.arange(H)
    last = step.max(1, keepdims=True)  # padding repeats the last stored step
    contiguous = ((step == want) | ((step == last) & (want > last))).all(1)
    return int((~(one_episode & contiguous)).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adding", ["whole", "steps"])
def test_concurrent_adds_and_samples_never_mix_episodes(backend, adding):
    # (whole-episode adds and step-by-step adds do not mix in one buffer: an open episode refuses add_episode)
    buf = TrajectoryBuffer(O, A, S, 600, backend=backend)  # ~20 episodes: adding evicts all the time
    for tag in range(20):
        buf.add_episode(*tagged_episode(tag, 30), terminated=tag % 2 == 0, truncated=tag % 2 == 1)
    errors: list[BaseException] = []
    bad_windows = [0]
    lock = threading.Lock()

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
        return run

    def add_whole(first_tag):
        rng = np.random.default_rng(first_tag)
        for tag in range(first_tag, first_tag + 150):
            buf.add_episode(*tagged_episode(tag, int(rng.integers(H, 60))), terminated=bool(tag % 2),
                            truncated=not tag % 2)

    def add_steps(first_tag):
        for tag in range(first_tag, first_tag + 40):
            obs, act, rew, sim = tagged_episode(tag, 25)
            for t in range(25):
                buf.add_step(obs[t], act[t], rew[t], sim[t])
            buf.end_episode(terminated=True, truncated=False)

    def sample(seed0):
        for seed in range(seed0, seed0 + 150):
            w = buf.sample_windows(64, H, seed=seed, normalize=False)
            n_bad = window_errors(w)
            with lock:
                bad_windows[0] += n_bad

    adders = ([lambda: add_whole(1000), lambda: add_whole(2000)] if adding == "whole" else [lambda: add_steps(3000)])
    threads = [threading.Thread(target=guarded(fn)) for fn in adders] + [
               threading.Thread(target=guarded(lambda: sample(0))),
               threading.Thread(target=guarded(lambda: sample(10_000)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish within 120 s (deadlock?)"
    assert not errors, errors
    assert bad_windows[0] == 0, f"{bad_windows[0]} of {2 * 150 * 64} windows mix episodes"
    # nothing was lost or duplicated: the survivors are whole, distinct episodes and the statistics add up
    sd = buf.state_dict()
    tags = sd["observations"][:, 0]
    starts = np.concatenate([[0], np.cumsum(sd["episode_lengths"])[:-1]])
    assert len(set(tags[starts].tolist())) == buf.num_episodes
    for s0, L in zip(starts, sd["episode_lengths"]):
        assert (tags[s0:s0 + L] == tags[s0]).all() and (sd["observations"][s0:s0 + L, 1] == np.arange(L)).all()
    np.testing.assert_allclose(buf.stats()["rewards"][0], sd["rewards"].astype(np.float64).mean(), rtol=1e-9)
