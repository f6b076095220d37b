"""GPU benchmarks of the fused step kernels and of CUDA-graph guided sampling, each next to its reference.

Run: ``pytest benches/bench_kernels.py --benchmark-only`` on a CUDA machine. Fused and reference share a
benchmark group per shape, so the table of one run gives their ratio. Recorded in ``extra_info``: the GPU name,
peak allocated memory and, for the fused sampler, the fraction of the step's GPU kernel time spent in the
denoiser's matrix multiplies (torch.profiler, eager runs). Skipped without a GPU.
"""
import re

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only benchmarks: no CUDA device here (expected on CPU-only machines)")

O, A = 11, 3  # Hopper
STEPS_PER_ROUND = 50  # per-step update: many launches per timed round, one synchronisation
GEMM_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|matmul", re.IGNORECASE)


def _gpu_info(benchmark):
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark.extra_info["torch"] = torch.__version__


def _step_inputs(batch, horizon):
    from polygrad_fast.schedule import NoiseSchedule

    dev, g = "cuda", torch.Generator("cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=dev, generator=g)

    D = O + 2
    return dict(x=randn(batch, horizon, D), x0=randn(batch, horizon, D), start=randn(batch, O),
                obs_mean=randn(O), obs_scale=randn(O).abs() + 0.5, act=randn(batch, horizon, A),
                pmean=randn(batch, horizon, A).tanh(), pstd=torch.full((A,), 0.5, device=dev), act_mean=randn(A),
                act_scale=randn(A).abs() + 0.5, state_noise=randn(batch, horizon, D),
                act_noise=randn(batch, horizon, A),
                table=NoiseSchedule(128).step_table(device=dev), w=torch.tensor(0.01, device=dev),
                seed=torch.tensor(1, device=dev))


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("batch", [256, 1024])
def test_step_update(benchmark, batch, impl):
    """Kernels A + B of one reverse step (t = 5: the clamp is on) vs the torch row-level ops they fuse."""
    from polygrad_fast import kernels, step_ops

    v = _step_inputs(batch, 10)
    coef = v["table"][5]
    if impl == "fused":
        state, action = kernels.state_update_at, kernels.action_update_at
        noise, seeded = dict(state=None, action=None), dict(seed=v["seed"], step=5)
    else:
        state, action = step_ops.state_update_at, step_ops.action_update_at
        noise, seeded = dict(state=v["state_noise"], action=v["act_noise"]), {}

    def steps():
        for _ in range(STEPS_PER_ROUND):
            _, _, guide = state(v["x"], v["x0"], v["start"], coef, v["obs_mean"], v["obs_scale"], 0.25,
                                noise["state"], "recon", **seeded)
            action(v["act"], v["pmean"], v["pstd"], v["act_mean"], v["act_scale"], coef, v["w"], 3.0,
                   noise["action"], 1.0, "grad", False, **seeded)
        torch.cuda.synchronize()

    benchmark.group = f"step-update B={batch} H=10 x{STEPS_PER_ROUND}"
    _gpu_info(benchmark)
    benchmark.pedantic(steps, rounds=20, warmup_rounds=2)


def _sampler(backend, batch, horizon, hidden):
    from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
    from polygrad_fast.normalizer import Normalizer
    from polygrad_fast.policy import Actor
    from polygrad_fast.sampler import FastGuidedSampler
    from polygrad_fast.schedule import NoiseSchedule

    torch.manual_seed(0)
    denoiser = ResidualMLPDenoiser(horizon, O + 2, A, MLPDenoiserConfig(hidden_dim=hidden, num_layers=6)).cuda()
    policy = Actor(O, A).cuda()
    return FastGuidedSampler(denoiser, NoiseSchedule(128, tau=0.1), policy, Normalizer.identity(O, A, "cuda"),
                             backend=backend, clip_std=3.0, clip_state_change=0.25)


def _kernel_time(fn, name_pattern=None):
    """Total GPU kernel time (us) of one ``fn()`` under torch.profiler, optionally only kernels matching a regex.

    Only the kernel events count: a CPU op's device time is its kernels' time again.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and (name_pattern is None or name_pattern.search(e.key)))


def _denoiser_gemm_fraction(sampler, start):
    """GEMM kernel time of the T denoiser calls over the kernel time of one whole fused sampling loop, both run
    eagerly (a graph replay hides its kernels from the profiler)."""
    from polygrad_fast.gpu_sampling import GuidedLoop

    step = sampler.guided_step
    loop = GuidedLoop(step, sampler.step_table, start.shape[0], sampler.denoiser.horizon)
    loop.start.copy_(start)
    x = torch.randn(loop.batch, loop.horizon, O + 2, device="cuda")
    a = torch.randn(loop.batch, loop.horizon, A, device="cuda")
    inputs = step.step_inputs(sampler.schedule.n_steps, loop.batch, x.device)

    def denoise_all():
        for t in range(sampler.schedule.n_steps):
            step.denoise(x, a, inputs[t])

    return _kernel_time(denoise_all, GEMM_KERNEL) / _kernel_time(loop.run)


@pytest.mark.parametrize("impl", ["fused+graph", "reference"])
@pytest.mark.parametrize("batch,horizon,hidden", [(256, 10, 1024), (1024, 10, 1024), (256, 50, 2048),
                                                  (1024, 50, 2048)])
def test_guided_sampling(benchmark, batch, horizon, hidden, impl):
    """One full T=128 guided sampling call: bf16 denoiser + fused kernels in a CUDA graph vs the paper-style
    reference (fp32 denoiser, autograd guidance)."""
    sampler = _sampler("triton" if impl == "fused+graph" else "reference", batch, horizon, hidden)
    start = torch.randn(batch, O, device="cuda")
    sampler.sample(start)  # warm-up: Triton JIT and, for the fused path, the graph capture
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"guided-sampling T=128 B={batch} H={horizon} hidden={hidden}"
    _gpu_info(benchmark)
    benchmark.pedantic(lambda: sampler.sample(start), rounds=5, warmup_rounds=1)
    benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if impl == "fused+graph":
        benchmark.extra_info["denoiser_gemm_fraction_of_step_time"] = _denoiser_gemm_fraction(sampler, start)
