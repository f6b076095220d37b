"""Reference twin of the native counter-based normal generator (csrc/cpu_ops/normal_noise.cpp), in numpy.

Philox4x32-10 (Salmon et al., SC'11) on counters (g mod 2^32, g >> 32, 0, 0) under key (seed mod 2^32, seed >> 32),
then Box-Muller on the word pairs (w0, w1) and (w2, w3) in float64:
u1 = (w0 >> 9) 2^-23 + 2^-24, u2 = (w1 >> 8) 2^-24 (both exact in fp32), z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2).
Element j of the stream (seed, offset) is word j % 4 of counter offset + j // 4.
"""
from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(seed: int, counters: np.ndarray) -> np.ndarray:
    """counters [N] uint64 -> [N, 4] uint32 Philox4x32-10 words under the 64-bit key ``seed``."""
    g = np.asarray(counters, dtype=np.uint64)
    c0, c1 = g & _MASK32, g >> np.uint64(32)
    c2, c3 = np.zeros_like(g), np.zeros_like(g)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2  # 32 x 32 -> 64-bit products, exact in uint64
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _MASK32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _MASK32)
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def standard_normal(n: int, seed: int, offset: int = 0) -> np.ndarray:
    """[n] float64: elements 0..n-1 of the stream (seed, offset)."""
    groups = offset + np.arange((n + 3) // 4, dtype=np.uint64)
    w = philox4x32_10(seed, groups).astype(np.float64)
    out = np.empty((len(groups), 4))
    for p in range(2):
        u1 = np.floor(w[:, 2 * p] / 512) * 2.0**-23 + 2.0**-24
        u2 = np.floor(w[:, 2 * p + 1] / 256) * 2.0**-24
        r = np.sqrt(-2 * np.log(u1))
        out[:, 2 * p], out[:, 2 * p + 1] = r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)
    return out.reshape(-1)[:n]
