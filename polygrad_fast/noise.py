"""Standard normal noise for the samplers, from one place.

``fill_standard_normal(out, generator)`` fills a tensor with N(0, 1) draws. On CPU (fp32, contiguous, native
extension present) it runs the counter-based generator of ``polygrad_fast._cpu_ops`` (csrc/cpu_ops/normal_noise.cpp:
Philox4x32-10 + Box-Muller, vectorised, on torch's OpenMP threads; numpy twin in
``polygrad_fast.reference.noise``): element j is a fixed function of (seed, j), so the result does not depend on the
thread count. The seed is one 63-bit integer drawn from ``generator`` (or torch's global generator), so a seeded
generator reproduces the noise and advances as a randn call would. The _cpu_ops build disables FMA contraction, so the
AVX-512, AVX2 and baseline builds of the kernel compute the same bits. Everything else uses ``Tensor.normal_`` (torch.randn's generator).

Why: torch.randn on CPU draws from one serial mt19937 stream; the 5.3M normals of one Hopper sampling call
(T=128, B=256) took 15 ms with torch.randn vs 5.2 ms native (2 threads) on the development VM.
``SamplerNoise`` holds all the noise of one sampling call, drawn here in one fill. The reference sampler draws
the same stream through its numpy twin (or takes a ``SamplerNoise``), so on CPU one generator seed gives both
paths the same noise (up to a few fp32 ulps of the transcendental functions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._native import CPU_OPS, extension

SEED_HIGH = 2**63 - 1  # seeds are drawn from [0, SEED_HIGH): non-negative int64, on any device


def native_available() -> bool:
    """True when the native counter-based generator is importable."""
    return extension(CPU_OPS) is not None


def _native_layout(out: torch.Tensor) -> bool:
    """What the native kernel fills: a contiguous CPU float32 tensor."""
    return out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One integer in [0, SEED_HIGH) from ``generator`` (torch's global CPU generator when None)."""
    return int(torch.randint(0, SEED_HIGH, (), generator=generator, device="cpu"))


def native_standard_normal_(out: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """Fill a contiguous CPU fp32 ``out`` (any shape) in place with elements offset*4 .. of stream ``seed``:
    element j is word j % 4 of Philox counter offset + j // 4. Raises when the extension is missing."""
    ops = extension(CPU_OPS)
    if ops is None:
        raise RuntimeError("polygrad_fast._cpu_ops is not available: build it with `pip install -e .`")
    if not _native_layout(out):
        raise ValueError(f"out must be a contiguous CPU float32 tensor, got {out.dtype} on {out.device} "
                         f"(contiguous={out.is_contiguous()})")
    if not (0 <= seed < 2**64 and 0 <= offset < 2**64):
        raise ValueError(f"seed and offset must be in [0, 2^64), got {seed}, {offset}")
    ops.normal_fill(out.data_ptr(), out.numel(), seed, offset, torch.get_num_threads())
    return out


def fill_standard_normal(out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` in place with N(0, 1) draws (see the module docstring for which generator) and return it."""
    if _native_layout(out) and native_available() and (generator is None or generator.device.type == "cpu"):
        return native_standard_normal_(out, draw_seed(generator))
    return out.normal_(generator=generator)  # what torch.randn does on a contiguous tensor


@dataclass
class SamplerNoise:
    """All the Gaussian noise of one sampling call, so two samplers can consume exactly the same numbers.

    x_T [B,H,D], a_T [B,H,A]: initial trajectory / actions; state [K,B,H,D], action [K,B,H,A]: the noise of
    the chain's reverse step i is ``state[i]`` / ``action[i]`` (``state[0]`` is unused: the last step adds no
    noise). K is the chain's number of steps: T, or ``SamplerConfig.sampling_steps`` for a respaced chain (its
    step i runs at trained timestep t_i), so a K-step chain draws K + 1 noise rows, not T + 1.
    """

    x_T: torch.Tensor
    a_T: torch.Tensor
    state: torch.Tensor
    action: torch.Tensor

    @classmethod
    def draw(cls, n_steps: int, batch: int, horizon: int, transition_dim: int, action_dim: int,
             generator: torch.Generator | None = None, device=None) -> "SamplerNoise":
        """One ``fill_standard_normal`` draw for the whole chain of ``n_steps`` = K steps: [K+1, B, H, D+A] (see
        ``from_buffer``)."""
        buf = torch.empty(n_steps + 1, batch, horizon, transition_dim + action_dim, device=device)
        return cls.from_buffer(fill_standard_normal(buf, generator), transition_dim)

    @classmethod
    def from_buffer(cls, buf: torch.Tensor, transition_dim: int) -> "SamplerNoise":
        """Views of buf [K+1, B, H, D+A]: index K holds (x_T, a_T), index i < K the noise of chain step i."""
        T, D = buf.shape[0] - 1, transition_dim
        return cls(x_T=buf[T, ..., :D], a_T=buf[T, ..., D:], state=buf[:T, ..., :D], action=buf[:T, ..., D:])

    def check(self, n_steps: int, batch: int, horizon: int, transition_dim: int, action_dim: int,
              device: torch.device | None = None) -> None:
        """ValueError/TypeError unless every field is a float32 tensor of its expected shape (on ``device``)."""
        expected = {"x_T": (batch, horizon, transition_dim), "a_T": (batch, horizon, action_dim),
                    "state": (n_steps, batch, horizon, transition_dim),
                    "action": (n_steps, batch, horizon, action_dim)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"noise.{name} must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(f"noise.{name} has shape {tuple(value.shape)}, expected {shape}")
            if value.dtype != torch.float32:
                raise TypeError(f"noise.{name} must be float32, got {value.dtype}")
            if device is not None and value.device != torch.device(device):
                raise ValueError(f"noise.{name} is on {value.device}, expected {torch.device(device)}")
