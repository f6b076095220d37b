"""Guided sampling at the paper's Hopper shapes: FastGuidedSampler (fast torch path) vs the paper-style reference.

Shapes: H=10, O=11, A=3, D=13, ResidualMLPDenoiser(hidden 1024, 6 blocks), T=128 (tau 0.1 as Hopper), grad
guidance, clip_std 3, clip_state_change 0.25, batch 256 and 1024. Reference = fp32 denoiser + autograd guidance,
one step at a time (polygrad_fast.reference.guided_sampling); fast = the 'auto' dtype (bf16 copies of the
denoiser and policy where bf16 GEMMs measure faster than fp32 on this CPU, else fp32), closed-form guidance,
torch.compile ('fast') or eager ('fast-eager').
Every timing is the min over rounds (the host is shared and noisy); the fast tests record ``speedup_vs_reference``
(reference min / fast min) in extra_info, with the thread count and the load average at the time.

The GEMM floor, measured in the same run: the denoiser's per-step GEMMs alone (its Linears but the time MLP's,
which runs once per call; rows = B, the MLP flattens the window), back to back the CPU's fastest way (the
fastest of fp32 and bf16, each plain and oneDNN-prepacked, bf16 only where oneDNN runs it, and on AMX and
AVX512-BF16 CPUs this package's own bf16 GEMM, which the fused trunk runs), timed as T chains back to back
before each of the sampler's rounds, per chain, min over rounds (``FloorTimer``: a shared host's speed drifts by
several % within a minute, so a floor timed once after all the rounds would be compared with steps timed in
other spells). The
fast tests record the CPU's ISA (``backend.cpu_isa``), the floor and ``step_over_gemm_floor`` (fast per-step time /
floor; the target is <= 1.25 at B=256 and B=1024 on every x86 CPU), and beside it the policy's GEMMs on the B·H
guide states measured the same way and ``step_over_all_gemms`` (step / both floors: the step's unavoidable
arithmetic, which the 1.25x target's floor leaves the policy out of).
Under ``--benchmark-disable`` (CI smoke) the chains are shortened to T=8. Run:

    pytest benches/bench_sampler.py --benchmark-only --benchmark-columns=min,median,rounds -s
"""
from __future__ import annotations

import math
import os
import typing
from time import perf_counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polygrad_fast import backend, bf16_layout, cpu_packed
from polygrad_fast._native import CPU_OPS, extension
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser, low_precision_copy
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor, policy_distribution
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.step_ops import SIGMA, action_update_at, state_update_at
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.schedule import NoiseSchedule

H, O, A, D = 10, 11, 3, 13
BATCHES = [256, 1024]
OPTIONS = dict(guidance_type="grad", guidance_scale=0.005, clip_std=3.0, clip_state_change=0.25)
ROUNDS = {"reference": 3, "fast": 5, "fast-eager": 3}
_MIN: dict[tuple, float] = {}  # (batch, path) -> min seconds


TARGET_STEP_OVER_FLOOR = 1.25


def _conditions() -> dict:
    return {"threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__,
            "isa": backend.cpu_isa()}


def _step_gemm_shapes(denoiser: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of the Linears one reverse step runs: all but the time MLP's (embedded once per call)."""
    return [(m.in_features, m.out_features) for name, m in denoiser.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith("time_mlp")]


def _policy_gemm_shapes(policy: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of the policy's Linears, which every guided step runs on the B·H guide states."""
    return [(m.in_features, m.out_features) for m in policy.modules() if isinstance(m, nn.Linear)]


def _gemm_chain(shapes, rows: int, precision: str) -> typing.Callable[[], list]:
    """A call running the GEMMs [rows, in] x [out, in]^T + bias of ``shapes`` back to back, in 'float32',
    'bfloat16', 'float32-packed' or 'bfloat16-packed' (oneDNN-prepacked weights, as cpu_packed runs them) or
    'bfloat16-native' (this package's bf16 GEMM, AMX or AVX-512 BF16 as ``bf16_layout.isa()``, as cpu_residual_mlp's
    kernel runs each layer); to time in inference mode."""
    dtype = torch.float32 if precision.startswith("float32") else torch.bfloat16
    g = torch.Generator().manual_seed(5)
    ops = []
    for i, o in shapes:
        x = torch.randn(rows, i, generator=g).to(dtype)
        w, b = (torch.randn(o, i, generator=g) / i ** 0.5).to(dtype), torch.zeros(o, dtype=dtype)
        if precision.endswith("-packed"):
            p = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            ops.append(lambda x=x, p=p, b=b: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], ""))
        elif precision.endswith("-native"):  # this package's bf16 GEMM, as the fused trunk runs each layer
            xp = F.pad(x, (0, bf16_layout.round_up(i, 32) - i)).contiguous()
            wv, n = bf16_layout.vnni(w), bf16_layout.round_up(o, 16)
            bp, out, native = torch.zeros(n), torch.empty(rows, n), extension(CPU_OPS)
            ops.append(lambda xp=xp, wv=wv, n=n, bp=bp, out=out: native.bf16_linear(
                xp.data_ptr(), rows, xp.shape[1], wv.data_ptr(), n, bp.data_ptr(), out.data_ptr(),
                torch.get_num_threads(), bf16_layout.isa()))
        else:
            ops.append(lambda x=x, w=w, b=b: F.linear(x, w, b))
    return lambda: [op() for op in ops]


def fastest_gemm_chain(rows: int, shapes, rounds: int = 5) -> tuple[typing.Callable[[], list], str]:
    """(call, precision): the GEMM chain of ``shapes`` (``_gemm_chain``) in the precision this CPU runs fastest,
    timed interleaved (``backend.interleaved_min_times``): bf16 only where oneDNN runs it, prepacked where
    ``cpu_packed.available(dtype)``, this package's bf16 GEMM where ``bf16_layout.available()`` (rows % 32 == 0)."""
    precisions = ["float32"] + (["bfloat16"] if backend.cpu_bf16_gemm_supported() else []) + [
        f"{name}-packed" for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
        if cpu_packed.available(dtype)] + (["bfloat16-native"] if bf16_layout.available() and rows % 32 == 0 else [])
    chains = {p: _gemm_chain(shapes, rows, p) for p in precisions}
    with torch.inference_mode():
        times = backend.interleaved_min_times(chains, reps=rounds)
    best = min(times, key=times.get)
    return chains[best], best


class FloorTimer:
    """The denoiser's per-step GEMM floor and the policy's GEMMs on the B·H guide states, each the fastest chain,
    timed between the sampler's rounds (``time()`` as pytest-benchmark's setup: untimed for the sampler) so that the
    floor sees the same spells of a shared host as the step it is compared with, and like the step: ``n_steps``
    chains back to back per round, the mean per chain (the step is a T-step call's mean). ``floor`` / ``policy``:
    the minima over rounds of those means (seconds per step); ``floor_single``: the fastest single denoiser chain
    seen, which a host's brief fast moments reach and a 1.3 s call does not (on a 2-core Zen 4: min 7.8 ms, median
    8.0-8.1, mean 8.0-8.2 over 128 chains)."""

    def __init__(self, hopper, batch: int, n_steps: int):
        with torch.random.fork_rng():
            self.chain, self.precision = fastest_gemm_chain(batch, _step_gemm_shapes(hopper[0]))
            self.policy_chain, _ = fastest_gemm_chain(batch * H, _policy_gemm_shapes(hopper[1]))
        self.n_steps, self.floor, self.policy, self.floor_single = n_steps, math.inf, math.inf, math.inf

    def _chains(self, call) -> tuple[float, float]:
        """(mean, min) seconds of ``n_steps`` calls back to back."""
        singles = []
        t0 = perf_counter()
        for _ in range(self.n_steps):
            t1 = perf_counter()
            call()
            singles.append(perf_counter() - t1)
        return (perf_counter() - t0) / self.n_steps, min(singles)

    def time(self) -> None:
        with torch.inference_mode():
            (mean, single), (policy, _) = self._chains(self.chain), self._chains(self.policy_chain)
        self.floor, self.policy = min(self.floor, mean), min(self.policy, policy)
        self.floor_single = min(self.floor_single, single)


@pytest.fixture(scope="module")
def hopper():
    torch.manual_seed(0)
    denoiser = ResidualMLPDenoiser(H, D, A, MLPDenoiserConfig(hidden_dim=1024, num_layers=6)).eval()
    policy = Actor(O, A)
    rng = np.random.default_rng(0)
    normalizer = Normalizer({"observations": (rng.normal(size=O), rng.uniform(0.2, 3.0, O)),
                             "actions": (rng.normal(size=A) * 0.1, rng.uniform(0.5, 0.7, A)),
                             "rewards": (1.0, 0.8), "terminals": (0.01, 0.1)})
    return denoiser, policy, normalizer


def _n_steps(benchmark) -> int:
    return 8 if benchmark.disabled else 128


def _sampler(hopper, n_steps, path):
    denoiser, policy, normalizer = hopper
    kw = {"reference": dict(backend="reference"), "fast": dict(backend="torch", compile=True),
          "fast-eager": dict(backend="torch")}[path]
    return FastGuidedSampler(denoiser, NoiseSchedule(n_steps, tau=0.1), policy, normalizer, **OPTIONS, **kw)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("path", ["reference", "fast", "fast-eager"])
def test_guided_sampling(benchmark, hopper, batch, path):
    sampler = _sampler(hopper, _n_steps(benchmark), path)
    start = torch.randn(batch, O, generator=torch.Generator().manual_seed(1)) * 2
    floors = None
    if path != "reference":
        sampler.sample(start)  # warm-up outside the timing: torch.compile and first-touch allocations
        floors = FloorTimer(hopper, batch, sampler.schedule.n_steps)
    benchmark.pedantic(lambda: sampler.sample(start), setup=floors and floors.time, rounds=ROUNDS[path],
                       iterations=1)
    if benchmark.disabled:
        if path == "fast":  # smoke: the floor's code ran too (input/trunk-input, 6 blocks, output per step)
            assert len(_step_gemm_shapes(hopper[0])) == 9
            assert 0 < floors.floor < math.inf and 0 < floors.policy < math.inf
        return
    mine = benchmark.stats.stats.min
    _MIN[(batch, path)] = mine
    benchmark.extra_info.update(batch=batch, path=path, denoiser_dtype=str(getattr(sampler, "denoiser_dtype", "fp32")),
                                **_conditions())
    ref = _MIN.get((batch, "reference"))
    line = f"\n[bench_sampler] B={batch} {path}: {mine:.3f} s per guided batch (T=128)"
    if ref is not None and path != "reference":
        benchmark.extra_info["speedup_vs_reference"] = ref / mine
        line += f", reference {ref:.3f} s -> {ref / mine:.2f}x"
    if path != "reference":
        floor, precision, policy_floor = floors.floor, floors.precision, floors.policy
        step = mine / sampler.schedule.n_steps
        benchmark.extra_info.update(gemm_floor_ms=floor * 1e3, gemm_floor_precision=precision, step_ms=step * 1e3,
                                    step_over_gemm_floor=step / floor, policy_gemm_floor_ms=policy_floor * 1e3,
                                    step_over_all_gemms=step / (floor + policy_floor),
                                    gemm_floor_single_ms=floors.floor_single * 1e3,
                                    step_over_single_chain=step / floors.floor_single)
        line += (f"; ISA {backend.cpu_isa()}: step {step * 1e3:.2f} ms vs the denoiser's GEMMs alone ({precision}, "
                 f"T chains) {floor * 1e3:.2f} ms -> {step / floor:.2f}x the floor (target <= "
                 f"{TARGET_STEP_OVER_FLOOR}; {step / floors.floor_single:.2f}x the fastest single chain, "
                 f"{floors.floor_single * 1e3:.2f} ms); "
                 f"with the policy's GEMMs on the B·H guide states ({policy_floor * 1e3:.2f} ms) "
                 f"{step / (floor + policy_floor):.2f}x all the step's GEMMs")
    print(line + f" [threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}]")


def test_fast_statistics_match_reference(hopper):
    """Fast (bf16, closed form, compiled) vs reference (fp32, autograd) on the same start states and noise.

    Only the precision differs (bf16 has a 2^-8 relative step), so per-dimension means and stds over the 256×10
    imagined steps must agree far better than what any semantic error produces: a dropped guidance step or a
    missing clamp changes the standardised action std by > 2x (tests/test_guidance.py). Bound: |Δmean| ≤ 0.1·std
    and |std ratio − 1| ≤ 0.1 per dimension, and act_std / act_mean within 0.1.
    """
    n_steps, batch = 128, 256
    start = torch.randn(batch, O, generator=torch.Generator().manual_seed(2)) * 2
    noise = SamplerNoise.draw(n_steps, batch, H, D, A, generator=torch.Generator().manual_seed(3))
    fast = _sampler(hopper, n_steps, "fast").sample(start, noise=noise)
    ref = _sampler(hopper, n_steps, "reference").sample(start, noise=noise)
    for name in ("observations", "actions", "rewards"):
        f, r = (getattr(b, name).reshape(-1, getattr(b, name).shape[-1] if name != "rewards" else 1)
                for b in (fast, ref))
        scale = r.std(0).clamp_min(1e-3)
        dmean = ((f.mean(0) - r.mean(0)).abs() / scale).max().item()
        dstd = (f.std(0) / scale - 1).abs().max().item()
        print(f"\n[bench_sampler] {name}: max |Δmean|/std {dmean:.4f}, max |std ratio - 1| {dstd:.4f}")
        assert dmean <= 0.1 and dstd <= 0.1, name
    for key in ("act_std", "act_mean"):
        assert abs(fast.metrics[key].item() - ref.metrics[key].item()) <= 0.1, key


FEW_STEP_CHAINS = [128, 32, 16, 8]  # K of the T=128 trained steps
_FEW_STEP: dict[int, float] = {}  # K -> min seconds


@pytest.mark.parametrize("K", FEW_STEP_CHAINS)
def test_few_step_sampling(benchmark, hopper, K):
    """One B=256 guided batch (fast path, compiled) on the K-step chain of the T=128 schedule; extra_info gives the
    time against K=128 measured in the same run and act_std (the guidance is per trained step, so it should stay
    near K=128's for the same w)."""
    n_steps = _n_steps(benchmark)
    k = max(2, K * n_steps // 128)
    denoiser, policy, normalizer = hopper
    sampler = FastGuidedSampler(denoiser, NoiseSchedule(n_steps, tau=0.1), policy, normalizer, **OPTIONS,
                                backend="torch", compile=True, sampling_steps=k)
    start = torch.randn(256, O, generator=torch.Generator().manual_seed(1)) * 2
    sampler.sample(start)
    benchmark.pedantic(lambda: sampler.sample(start), rounds=ROUNDS["fast"], iterations=1)
    if benchmark.disabled:
        return
    _FEW_STEP[K] = mine = benchmark.stats.stats.min
    act_std = float(sampler.sample(start, generator=torch.Generator().manual_seed(2)).metrics["act_std"])
    benchmark.extra_info.update(K=K, act_std=act_std, **_conditions())
    line = f"\n[bench_sampler] B=256 K={K}: {mine:.3f} s per guided batch, act_std {act_std:.3f}"
    if 128 in _FEW_STEP and K != 128:
        benchmark.extra_info["time_vs_k128"] = mine / _FEW_STEP[128]
        line += f", {_FEW_STEP[128] / mine:.1f}x less time than K=128"
    print(line + f" [ISA {backend.cpu_isa()}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}]")


# ---------------------------------------------------------------- per-step breakdown (B = 256 and 1024, one step)
def _step_inputs(hopper, batch):
    denoiser, policy, normalizer = hopper
    g = torch.Generator().manual_seed(4)
    x, a = torch.randn(batch, H, D, generator=g), torch.randn(batch, H, A, generator=g)
    t = torch.full((batch,), 64)
    return x, a, t, torch.randn(batch, H, D, generator=g), torch.randn(batch, H, A, generator=g)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["fp32", "bf16", "bf16-compiled"])
def test_step_denoiser(benchmark, hopper, batch, variant):
    denoiser = hopper[0] if variant == "fp32" else low_precision_copy(hopper[0], torch.bfloat16)
    if variant == "bf16-compiled":
        denoiser = torch.compile(denoiser)
    x, a, t, _, _ = _step_inputs(hopper, batch)
    with torch.inference_mode():
        denoiser(x, a, t)
        benchmark.pedantic(lambda: denoiser(x, a, t), rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(batch=batch, variant=variant, **_conditions())


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["reference-autograd", "fast-closed-form", "fast-compiled"])
def test_step_guidance(benchmark, hopper, batch, variant):
    """The action half of a step after the denoiser: unnormalise, policy forward, clamp, guidance, renormalise,
    noise. Reference: fp32 policy + autograd log-prob backward; fast: bf16 policy copy + closed form."""
    _, policy, normalizer = hopper
    x, a, _, _, a_noise = _step_inputs(hopper, batch)
    schedule = NoiseSchedule(128, tau=0.1)
    sampler = _sampler(hopper, 128, "fast")
    coef, act = schedule.step_table()[64], normalizer["actions"]
    guide = normalizer.unnormalize(x[..., :O], "observations")
    g = torch.tensor(0.005)

    def reference():
        raw = normalizer.unnormalize(a, "actions")
        with torch.no_grad():
            dist = policy_distribution(policy(guide))
        raw = torch.clamp(raw, dist.mean - 3.0 * dist.stddev, dist.mean + 3.0 * dist.stddev).requires_grad_(True)
        dist.log_prob(raw).sum().backward()
        raw = (raw + g * raw.grad).detach()
        return normalizer.normalize(raw, "actions") + coef[SIGMA] * a_noise

    def fast(policy_fn, action_fn):
        def run():
            p_mean, p_std = policy_fn(guide)
            return action_fn(a, p_mean, p_std, act.mean, act.scale, coef, g, 3.0, a_noise, 1.0, "grad", False)
        return run

    if variant == "reference-autograd":
        fn = reference
    elif variant == "fast-closed-form":
        fn = fast(sampler.guided_step.policy, action_update_at)
    else:
        fn = fast(torch.compile(sampler.guided_step.policy), torch.compile(action_update_at))
    ctx = torch.enable_grad() if variant == "reference-autograd" else torch.inference_mode()
    with ctx:
        fn()
        benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(batch=batch, variant=variant, **_conditions())


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_step_elementwise(benchmark, hopper, batch, variant):
    """Kernel A + kernel B arithmetic alone (no denoiser, no policy): the part the Triton kernels fuse on a GPU."""
    _, _, normalizer = hopper
    x, a, _, noise, a_noise = _step_inputs(hopper, batch)
    x0 = x * 0.9
    start = x[:, 0, :O].clone()
    coef = NoiseSchedule(128, tau=0.1).step_table()[64]
    obs, act = normalizer["observations"], normalizer["actions"]
    p_mean, p_std = torch.zeros(batch, H, A), torch.full((batch, H, A), 0.5)
    g = torch.tensor(0.005)
    state_fn, action_fn = ((state_update_at, action_update_at) if variant == "eager"
                           else (torch.compile(state_update_at), torch.compile(action_update_at)))

    def run():
        out = state_fn(x, x0, start, coef, obs.mean, obs.scale, None, noise, "recon")
        return out, action_fn(a, p_mean, p_std, act.mean, act.scale, coef, g, 3.0, a_noise, 1.0, "grad", False)

    with torch.inference_mode():
        run()
        benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(batch=batch, variant=variant, **_conditions())
