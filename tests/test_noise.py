"""Counter-based normal noise (polygrad_fast.noise, csrc/cpu_ops/normal_noise.cpp) vs its numpy twin, its
statistics, its reproducibility, and the torch.randn fallback."""
import math

import numpy as np
import pytest
import torch

from polygrad_fast import noise
from polygrad_fast._native import extension
from polygrad_fast.reference import noise as ref

native = pytest.mark.skipif(not noise.native_available(), reason="polygrad_fast._cpu_ops not built")


def test_reference_philox_known_answer():
    """Random123's known-answer vector for philox4x32_10: counter 0, key 0."""
    assert [hex(w) for w in ref.philox4x32_10(0, np.array([0], dtype=np.uint64))[0]] == [
        "0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@native
@pytest.mark.parametrize("seed,group", [(0, 0), (1, 0), (2**64 - 1, 2**64 - 1), (0x0123456789ABCDEF, 12345),
                                        (7, 2**32 - 1), (7, 2**32)])
def test_native_philox_equals_reference(seed, group):
    want = [int(w) for w in ref.philox4x32_10(seed, np.array([group], dtype=np.uint64))[0]]
    assert list(extension("_cpu_ops").philox4x32_10(seed, group)) == want


@native
@pytest.mark.parametrize("n", [1, 3, 4, 5, 63, 64, 65, 1000, 70001])
@pytest.mark.parametrize("seed,offset", [(0, 0), (0x0123456789ABCDEF, 77), (2**63 - 2, 2**33 - 5)])
def test_native_equals_reference(n, seed, offset):
    """fp32 polynomials for ln / sin / cos vs float64 numpy: a few fp32 ulps. Measured worst case over 1M draws
    5.4e-7 absolute, 2.5e-7 relative (u1 and u2 are exact in fp32, so the only differences are the polynomials'
    and fp32 rounding); bound 1e-6 relative plus 1e-7 absolute."""
    out = noise.native_standard_normal_(torch.empty(n), seed, offset).double().numpy()
    want = ref.standard_normal(n, seed, offset)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)


@native
def test_thread_count_chunks_and_offsets_do_not_change_the_bits():
    n = 200_003  # > the serial threshold, not a multiple of 4 or of a block
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = noise.native_standard_normal_(torch.empty(n), 99)
        torch.set_num_threads(2)
        two = noise.native_standard_normal_(torch.empty(n), 99)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    head = noise.native_standard_normal_(torch.empty(4 * 1001), 99)
    tail = noise.native_standard_normal_(torch.empty(n - 4 * 1001), 99, offset=1001)
    assert torch.equal(torch.cat([head, tail]), one)  # a fill split at a counter boundary is the same stream


@native
def test_statistics():
    """2^22 draws from a fixed seed. Bounds are ~5 standard errors (so a correct generator passes with
    overwhelming probability for a fresh seed too): mean 5/sqrt(n), variance 5 sqrt(2/n), kurtosis 5 sqrt(24/n),
    correlations 5/sqrt(n); Kolmogorov-Smirnov D below its 0.1% critical value 1.95/sqrt(n); the two-sided 3-sigma
    tail frequency within 5 binomial standard errors of 0.0026998."""
    n = 2**22
    z = noise.native_standard_normal_(torch.empty(n), 2024).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(24) * se
    assert abs((z**3).mean()) < 5 * math.sqrt(6) * se
    for lag in (1, 2, 4):  # 1: the two members of a Box-Muller pair; 2, 4: across pairs and counters
        assert abs((z[:-lag] * z[lag:]).mean()) < 5 * se, lag
    cdf = torch.special.ndtr(z.sort().values)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert max((grid - cdf).abs().max(), (cdf - grid + 1 / n).abs().max()) < 1.95 * se
    p3 = 0.0026997960632601866
    assert abs((z.abs() > 3).double().mean() - p3) < 5 * math.sqrt(p3 * (1 - p3)) * se


def test_fill_is_reproducible_for_a_seeded_generator_and_advances_it():
    buf = torch.empty(5, 7, 3)
    a = noise.fill_standard_normal(buf.clone(), torch.Generator().manual_seed(3))
    b = noise.fill_standard_normal(buf.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    first, second = (noise.fill_standard_normal(buf.clone(), g) for _ in range(2))
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    c = noise.fill_standard_normal(buf.clone())
    torch.manual_seed(11)
    assert torch.equal(c, noise.fill_standard_normal(buf.clone()))  # the global generator when None


@native
def test_fill_uses_the_native_stream_on_cpu_float32():
    out = noise.fill_standard_normal(torch.empty(1001), torch.Generator().manual_seed(5))
    seed = noise.draw_seed(torch.Generator().manual_seed(5))
    assert torch.equal(out, noise.native_standard_normal_(torch.empty(1001), seed))


@pytest.mark.parametrize("make", [lambda: torch.empty(6, 8, dtype=torch.float64),
                                  lambda: torch.empty(8, 6).T])  # float64; non-contiguous
def test_fill_falls_back_to_torch_randn(make):
    out = noise.fill_standard_normal(make(), torch.Generator().manual_seed(4))
    assert torch.equal(out, make().normal_(generator=torch.Generator().manual_seed(4)))
    if out.is_contiguous():
        assert torch.equal(out, torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype))


@native
def test_native_rejects_bad_outputs():
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        noise.native_standard_normal_(torch.empty(4, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        noise.native_standard_normal_(torch.empty(4, 4).T, 1)
    with pytest.raises(ValueError, match=r"\[0, 2\^64\)"):
        noise.native_standard_normal_(torch.empty(4), -1)
