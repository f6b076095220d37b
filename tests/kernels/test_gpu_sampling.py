"""The CUDA-graph sampling path: its pure-Python parts and its loop body on the CPU, the graph itself on a GPU.

On the CPU the loop body (``GuidedLoop.run``) runs eagerly under the Triton interpreter and is compared with the
sampler's torch path fed the very noise the kernels draw (recovered with ``q_sample`` at unit tables).
"""
import copy
import warnings

import pytest
import torch

from polygrad_fast import _native
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.gpu_sampling import GuidedLoop, ShapeKeyedCache, graph_runner_for
from polygrad_fast.guided_step import triton_ops
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.schedule import NoiseSchedule

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
O, A = 5, 3
# Graph replay vs eager: the same kernels on the same data, but cuBLAS may pick another (e.g. split-K) algorithm
# on the capture stream; wrong noise, seeds or buffers show up as O(1) differences, far outside this.
GRAPH_TOL = dict(atol=1e-2, rtol=1e-2)


def make_sampler(device, horizon=3, n_steps=4, hidden=32, backend="torch", **options):
    torch.manual_seed(0)
    denoiser = ResidualMLPDenoiser(horizon, O + 2, A, MLPDenoiserConfig(embed_dim=16, hidden_dim=hidden,
                                                                        num_layers=1)).to(device)
    policy = Actor(O, A, hidden=16, layers=1).to(device)
    g = torch.Generator().manual_seed(1)
    stats = {"observations": (torch.randn(O, generator=g), torch.rand(O, generator=g) + 0.5),
             "actions": (torch.randn(A, generator=g) * 0.1, torch.rand(A, generator=g) + 0.5),
             "rewards": (0.5, 2.0), "terminals": (0.1, 0.3)}
    stats = {k: tuple(v.numpy() if torch.is_tensor(v) else v for v in pair) for k, pair in stats.items()}
    options = dict(dict(denoiser_dtype="float32", policy_dtype="float32", clip_std=1.0, guidance_scale=0.5),
                   **options)
    return FastGuidedSampler(denoiser, NoiseSchedule(n_steps), policy, Normalizer(stats, device=device),
                             backend=backend, **options)


def kernel_noise(seed, n_steps, batch, horizon, device) -> SamplerNoise:
    """The noise GuidedLoop's kernels draw for ``seed``: step t < T for the reverse steps, step T initially."""
    from polygrad_fast.kernels import q_sample

    x, a = torch.zeros(batch, horizon, O + 2, device=device), torch.zeros(batch, horizon, A, device=device)
    unit = torch.zeros(n_steps + 1, device=device), torch.ones(n_steps + 1, device=device)
    draws = [q_sample(x, a, torch.full((batch,), t, device=device), *unit, None, action_noise_scale=1.0, seed=seed)
             for t in range(n_steps + 1)]
    return SamplerNoise(x_T=draws[-1][0], a_T=draws[-1][1], state=torch.stack([d[0] for d in draws[:-1]]),
                        action=torch.stack([d[1] for d in draws[:-1]]))


def kernel_step(sampler):
    """The sampler's GuidedStep with the kernels' ops (what backend 'triton' builds), whatever its backend."""
    step = copy.copy(sampler.guided_step)
    step.ops = triton_ops()
    return step


def run_loop(sampler, start, seed, guidance_scale=0.5):
    loop = GuidedLoop(kernel_step(sampler), sampler.step_table, start.shape[0], sampler.denoiser.horizon,
                      sampler.timesteps)
    loop.start.copy_(start)
    loop.seed.fill_(seed)
    loop.guidance_scale.fill_(guidance_scale)
    with torch.inference_mode():
        return loop.run()


def test_shape_keyed_cache_is_lru():
    cache, builds = ShapeKeyedCache(2), []

    def build(key):
        return lambda: builds.append(key) or f"graph{key}"

    assert cache.get((1, 10), build((1, 10))) == "graph(1, 10)"
    assert cache.get((1, 10), build((1, 10))) == "graph(1, 10)"  # hit: not rebuilt
    cache.get((2, 10), build((2, 10)))
    cache.get((1, 10), build((1, 10)))  # (2, 10) is now the least recently used
    cache.get((3, 10), build((3, 10)))
    assert builds == [(1, 10), (2, 10), (3, 10)]
    assert cache.keys() == [(1, 10), (3, 10)] and len(cache) == 2
    with pytest.raises(ValueError):
        ShapeKeyedCache(0)


def test_runner_unavailable_on_cpu_warns_once(monkeypatch):
    monkeypatch.setattr(_native, "_warned", set())
    sampler = make_sampler("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert graph_runner_for(sampler.guided_step, sampler.step_table, sampler._sample_loop) is None
        assert graph_runner_for(sampler.guided_step, sampler.step_table, sampler._sample_loop) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "CUDA" in messages[0]


@pytest.mark.parametrize("options", [dict(), dict(guidance_type="sample", states_for_guidance="posterior_mean"),
                                     dict(guidance_type="none", clip_std=None)])
def test_loop_body_matches_torch_path_with_the_kernels_noise(options, device):
    sampler = make_sampler(device, n_steps=12, **options)  # 12 steps: both the clamped tail and t > 10
    start = torch.randn(2, O, device=device)
    x, a, change, std_min = run_loop(sampler, start, seed=5)
    noise = kernel_noise(5, 12, 2, 3, device)
    batch = sampler.sample(start, normalized=True, noise=noise)
    torch.testing.assert_close(x[..., :O], batch.observations_normalized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x[..., O], batch.rewards_normalized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, batch.actions_normalized, atol=1e-5, rtol=1e-5)
    policy_called = options.get("guidance_type") != "none"
    assert change.shape == x.shape and (0 < std_min < float("inf")) == policy_called  # the std is tracked


def test_loop_body_runs_the_respaced_chain(device):
    """sampling_steps = K < T: the loop body reads the K-row table, gives the denoiser the trained t_i and draws
    the kernels' noise of chain steps 0..K (what the torch path consumes as SamplerNoise of K steps)."""
    sampler = make_sampler(device, n_steps=24, sampling_steps=5)  # kept t = 0, 6, 12, 17, 23: clamped only at 0, 6
    start = torch.randn(3, O, device=device)
    x, a, _, _ = run_loop(sampler, start, seed=4)
    batch = sampler.sample(start, normalized=True, noise=kernel_noise(4, 5, 3, 3, device))
    torch.testing.assert_close(x[..., :O], batch.observations_normalized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, batch.actions_normalized, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"timesteps: expected \[5\]"):
        GuidedLoop(kernel_step(sampler), sampler.step_table, 3, 3, torch.arange(24))


def test_loop_body_seeds(device):
    sampler = make_sampler(device)
    start = torch.randn(2, O, device=device)
    x1, a1, _, _ = run_loop(sampler, start, seed=1)
    x1b, a1b, _, _ = run_loop(sampler, start, seed=1)
    x2, a2, _, _ = run_loop(sampler, start, seed=2)
    assert torch.equal(x1, x1b) and torch.equal(a1, a1b)
    assert not torch.equal(x1, x2) and not torch.equal(a1, a2)
    torch.testing.assert_close(x1[:, 0, :O], start, atol=0, rtol=0)  # first observation pinned


def test_sampler_with_triton_ops_matches_torch_ops(device):
    """The row-level kernels plug into the sampler's own loop (what backend 'triton' runs with explicit noise)."""
    start = torch.randn(2, O, device=device)
    noise = SamplerNoise.draw(12, 2, 3, O + 2, A, generator=torch.Generator(device).manual_seed(3), device=device)
    torch_path = make_sampler(device, n_steps=12).sample(start, normalized=True, noise=noise)
    fused_sampler = make_sampler(device, n_steps=12)
    calls = {"state_update": 0, "action_update": 0}

    def counted(name, op):
        def call(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return call

    kernels = triton_ops()
    fused_sampler.guided_step.ops = type(kernels)(*(counted(n, op) for n, op in zip(kernels._fields, kernels)))
    fused = fused_sampler.sample(start, normalized=True, noise=noise)
    # the kernels ran at every step (guidance 'grad' with clip_std: the action update also at t = 0), so the
    # comparison below is kernels vs torch, not torch vs torch
    assert calls == {"state_update": 12, "action_update": 12}
    torch.testing.assert_close(fused.observations_normalized, torch_path.observations_normalized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.actions_normalized, torch_path.actions_normalized, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_graph_replay_equals_eager_loop():
    sampler = make_sampler("cuda", backend="triton", denoiser_dtype="bfloat16", policy_dtype="bfloat16")
    runner = sampler._graph_runner
    start = torch.randn(4, O, device="cuda")
    g = torch.tensor(0.5, device="cuda")
    x, a, _, _ = runner.sample(start, 3, g, seed=9)
    x_eager, a_eager, _, _ = run_loop(sampler, start, seed=9)
    torch.testing.assert_close(x, x_eager, **GRAPH_TOL)
    torch.testing.assert_close(a, a_eager, **GRAPH_TOL)
    x_again, _, _, _ = runner.sample(start, 3, g, seed=9)  # replay of the cached graph
    torch.testing.assert_close(x_again, x, atol=0, rtol=0)
    runner.sample(torch.randn(2, O, device="cuda"), 3, g, seed=9)
    assert runner._graphs.keys() == [(4, 3), (2, 3)] and runner.enabled


@pytest.mark.gpu
@needs_gpu
def test_graph_follows_guidance_scale_and_weights_without_recapture():
    sampler = make_sampler("cuda", backend="triton")
    runner = sampler._graph_runner
    start = torch.randn(4, O, device="cuda")
    x1, a1, _, _ = runner.sample(start, 3, torch.tensor(0.5, device="cuda"), seed=3)
    x2, a2, _, _ = runner.sample(start, 3, torch.tensor(2.0, device="cuda"), seed=3)
    assert not torch.equal(a1, a2)
    # the replay at w = 2 is the eager loop at w = 2 (the graph reads the scale tensor, no stale capture)
    x2_eager, a2_eager, _, _ = run_loop(sampler, start, seed=3, guidance_scale=2.0)
    torch.testing.assert_close(x2, x2_eager, **GRAPH_TOL)
    torch.testing.assert_close(a2, a2_eager, **GRAPH_TOL)
    with torch.no_grad():
        for p in sampler.denoiser.parameters():
            p.mul_(0.5)
    x3, _, _, _ = runner.sample(start, 3, torch.tensor(0.5, device="cuda"), seed=3)
    x3_eager, _, _, _ = run_loop(sampler, start, seed=3)
    torch.testing.assert_close(x3, x3_eager, **GRAPH_TOL)
    assert (x3 - x1).abs().max() > 10 * GRAPH_TOL["atol"]  # the halved weights moved the trajectory
    assert len(runner._graphs) == 1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("guidance_type", ["grad", "sample", "none"])
def test_triton_sampler_matches_reference_on_gpu(guidance_type):
    """Full sampler, fp32 denoiser, explicit noise: the triton backend's eager loop against the paper-style one."""
    fast = make_sampler("cuda", n_steps=16, backend="triton", guidance_type=guidance_type)
    ref = make_sampler("cuda", n_steps=16, backend="reference", guidance_type=guidance_type)
    start = torch.randn(8, O, device="cuda")
    noise = SamplerNoise.draw(16, 8, 3, O + 2, A, generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    got, want = fast.sample(start, normalized=True, noise=noise), ref.sample(start, normalized=True, noise=noise)
    torch.testing.assert_close(got.observations_normalized, want.observations_normalized, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.actions_normalized, want.actions_normalized, atol=1e-4, rtol=1e-4)
