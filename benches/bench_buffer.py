"""Trajectory buffer benchmarks: native C++ core vs the numpy reference, in the same run.

Hopper-like dims (obs 11, act 3, sim state 58 float64 = mjSTATE_INTEGRATION for Hopper), a 1M-transition ring of
episodes of mixed length (20..1000, half terminated, half truncated), normalize=True, B in {256, 1024},
H in {10, 200}. Each timing is the min over rounds (the host is shared and noisy); the native test records
``speedup_vs_numpy`` (numpy min / native min) in extra_info. Run:

    pytest benches/bench_buffer.py --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from polygrad_fast import _native
from polygrad_fast.buffer import TrajectoryBuffer

OBS, ACT, SIM = 11, 3, 58
CAPACITY = 1_000_000
SHAPES = [(256, 10), (1024, 10), (256, 200), (1024, 200)]
_SKIP_NATIVE = pytest.mark.skipif(not _native.native_available(),
                                  reason=f"native extension unavailable: {_native.native_error()}")
BACKENDS = ["numpy", pytest.param("native", marks=_SKIP_NATIVE)]
# "native-1thread": the native core with its helper threads off (what a fully busy host gets); "native-nosim":
# sim_states=False, the training windows (the sim states are 88% of a window's bytes).
VARIANTS = BACKENDS + [pytest.param(v, marks=_SKIP_NATIVE) for v in ("native-1thread", "native-nosim")]

_MIN: dict[tuple, float] = {}  # (B, H, backend) -> min seconds


def _fill(buf: TrajectoryBuffer, seed: int = 0) -> None:
    """Fill to capacity with episodes of mixed length, wrapping the ring once (so evictions happened)."""
    rng = np.random.default_rng(seed)
    pool = (rng.normal(size=(3000, OBS)).astype(np.float32), rng.normal(size=(3000, ACT)).astype(np.float32),
            rng.normal(size=3000).astype(np.float32), rng.normal(size=(3000, SIM)))
    added = 0
    while added < CAPACITY + CAPACITY // 10:
        L = int(rng.integers(20, 1001))
        o = int(rng.integers(0, 2000))
        term = bool(rng.random() < 0.5)
        buf.add_episode(pool[0][o:o + L], pool[1][o:o + L], pool[2][o:o + L], pool[3][o:o + L],
                        terminated=term, truncated=not term)
        added += L


@pytest.fixture(scope="module")
def buffers():
    out = {}
    for backend in ("numpy", "native"):
        if backend == "native" and not _native.native_available():
            continue
        buf = TrajectoryBuffer(OBS, ACT, SIM, CAPACITY, backend=backend)
        t = time.perf_counter()
        _fill(buf)
        out[backend] = (buf, time.perf_counter() - t)
    return out


@pytest.fixture
def gather_threads(request):
    """Set the native gather's thread count for one test, restoring it afterwards."""
    if not _native.native_available():
        yield None
        return
    mod = _native.native()
    before = mod.gather_threads()
    yield mod.set_gather_threads
    mod.set_gather_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-H{h}" for b, h in SHAPES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sample_windows(benchmark, buffers, gather_threads, variant, shape):
    batch, horizon = shape
    backend = variant.split("-")[0]
    if variant == "native-1thread":
        gather_threads(1)
    buf, _ = buffers[backend]
    seeds = itertools.count()
    rounds = 20 if horizon == 10 else 8
    with_sim = variant != "native-nosim"
    benchmark.pedantic(lambda: buf.sample_windows(batch, horizon, seed=next(seeds), normalize=True,
                                                  sim_states=with_sim), rounds=rounds, iterations=1, warmup_rounds=2)
    if benchmark.disabled:  # --benchmark-disable (CI smoke run): the body ran once, nothing was timed
        return
    _MIN[(batch, horizon, variant)] = benchmark.stats.stats.min
    benchmark.extra_info.update(variant=variant, batch=batch, horizon=horizon, transitions=len(buf),
                                episodes=buf.num_episodes,
                                threads=_native.native().gather_threads() if backend == "native" else 1)
    numpy_min = _MIN.get((batch, horizon, "numpy"))
    if backend == "native" and numpy_min is not None:
        mine = _MIN[(batch, horizon, variant)]
        benchmark.extra_info["speedup_vs_numpy"] = numpy_min / mine
        line = (f"\n[bench_buffer] B={batch} H={horizon}: {variant} {mine * 1e3:.3f} ms, "
                f"numpy {numpy_min * 1e3:.3f} ms, speedup {numpy_min / mine:.2f}x")
        native_min = _MIN.get((batch, horizon, "native"))
        if not with_sim and native_min is not None:
            benchmark.extra_info["speedup_vs_native_with_sim"] = native_min / mine
            line += f"; vs native with sim states {native_min / mine:.2f}x"
        print(line)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_and_build(benchmark, buffers, backend):
    """Records nbytes / raw data size of the 1M buffer and how long filling it took (min of 2 fresh builds)."""
    buf, first_build = buffers[backend]
    ratio = buf.nbytes() / buf.raw_nbytes()

    def build():
        fresh = TrajectoryBuffer(OBS, ACT, SIM, CAPACITY, backend=backend)
        _fill(fresh, seed=1)
        return fresh

    benchmark.pedantic(build, rounds=2, iterations=1)
    assert ratio <= 1.2
    if benchmark.disabled:
        return
    benchmark.extra_info.update(backend=backend, memory_ratio=ratio, nbytes=buf.nbytes(), raw_nbytes=buf.raw_nbytes(),
                                transitions=len(buf), episodes=buf.num_episodes, first_build_s=first_build)
    print(f"\n[bench_buffer] {backend}: memory {ratio:.4f}x raw ({buf.nbytes() / 2**20:.1f} MiB), "
          f"fill {CAPACITY // 1000}k+10% steps: {benchmark.stats.stats.min:.2f} s")
