"""The fused native actor mean (polygrad_fast.cpu_actor) against its plain-torch twin, and its use by the sampler.

Four kernels: 'amx' and 'avx512bf16' (a bf16 actor: AMX tiles, AVX-512 BF16 register tiles; an AMX CPU runs
both), 'avx512' and 'avx2' (an fp32 actor, FMA register tiles; the AVX2 one runs on AVX-512 machines too, chosen as
``_fp32_isa`` would on an AVX2 CPU).

Tolerances, bf16: the kernel and the twin round at the same points (bf16 weights, states and post-ELU activations) and
differ only in fp32 summation order (tile products vs torch's GEMM), a few fp32 ulps. Such a difference can tip one
activation's bf16 rounding (one bf16 ulp, 2^-8 relative), which moves the outputs downstream of it by up to ~1e-3
(measured: max 1.1e-3 at 2,560 rows, 2.3e-3 at 10,240, 2.8e-3 at hidden 1024; 0.5-2% of outputs off by more than 1e-5,
mean 1e-6 to 2e-5; AVX-512 BF16 over 5 seeds: 0.5-0.7% at hidden 256, 1.3-6% of the 300 outputs at hidden 1024, where
each output sits downstream of 2,048 rounded activations). So: every |diff| <= 8e-3, at most 10% of outputs beyond
1e-5, mean <= 5e-5. fp32: nothing is rounded, so only summation order (FMA tiles vs torch's GEMM, the row kernel's
LayerNorm vs torch's) separates them: measured max 1.6e-6 at 2,560 rows, 2.0e-6 at 10,240; bound 2e-5. A wrong weight
layout, a dropped bias or a wrong eps moves nearly every output by > 1e-3.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from polygrad_fast import bf16_layout, cpu_actor
from polygrad_fast.cpu_layer_norm import fuse_layer_norm_acts
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor, Critic
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.schedule import NoiseSchedule
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser

needs_bf16 = pytest.mark.skipif(not bf16_layout.available(), reason="the fused bf16 kernels need AMX or AVX512-BF16")
_FP32_BEST = cpu_actor._fp32_isa()
BF16_KERNELS = ("amx", "avx512bf16")
KERNELS = [pytest.param("amx", marks=pytest.mark.skipif(bf16_layout.isa() != "amx", reason="needs AMX-BF16")),
           pytest.param("avx512bf16", marks=needs_bf16),
           pytest.param("avx512", marks=pytest.mark.skipif(_FP32_BEST != "avx512", reason="needs AVX-512")),
           pytest.param("avx2", marks=pytest.mark.skipif(_FP32_BEST is None, reason="needs AVX2 + FMA"))]


def _actor(obs_dim, act_dim, hidden, layers, seed=1):
    torch.manual_seed(seed)
    actor = Actor(obs_dim, act_dim, hidden, layers).eval()
    with torch.no_grad():  # move LayerNorm affines and biases off their 1 / 0 init so each one matters
        for p in actor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return actor


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """The kernel under test, that ISA forced: 'amx' / 'avx512bf16' take a bf16 actor, 'avx512' / 'avx2' an fp32
    one."""
    if request.param in BF16_KERNELS:
        monkeypatch.setattr(bf16_layout, "isa", lambda: request.param)
    else:
        monkeypatch.setattr(cpu_actor, "_fp32_isa", lambda: request.param)
    return request.param


def _kernel_actor(kernel, obs_dim, act_dim, hidden, layers, seed=1):
    actor = _actor(obs_dim, act_dim, hidden, layers, seed)
    return actor.to(torch.bfloat16) if kernel in BF16_KERNELS else actor


def _assert_close_to_twin(got, want, kernel="amx"):
    d = (got - want).abs()
    if kernel not in BF16_KERNELS:
        assert d.max().item() <= 2e-5, d.max().item()
        return
    assert d.max().item() <= 8e-3, d.max().item()
    assert (d > 1e-5).float().mean().item() <= 0.10
    assert d.mean().item() <= 5e-5


# (obs_dim, act_dim, hidden, layers, rows): odd rows and tails of the 32-row blocks, H = 1 style single rows,
# non-power-of-2 widths, obs_dim above one 32-wide tile, act_dim above one 16-wide tile, 1 and 3 hidden layers.
SHAPES = [(11, 3, 256, 2, 2560), (11, 3, 256, 2, 2565), (1, 1, 32, 1, 1), (17, 6, 96, 3, 33), (5, 2, 64, 2, 7),
          (40, 17, 160, 2, 50), (3, 1, 1024, 2, 300),
          (7, 5, 48, 2, 29), (11, 3, 80, 3, 100)]  # fp32 only: an odd number of 16-column panels


@pytest.mark.parametrize("shape", SHAPES, ids=[f"O{o}-A{a}-h{h}-L{l}-r{r}" for o, a, h, l, r in SHAPES])
def test_kernel_matches_twin(kernel, shape):
    obs_dim, act_dim, hidden, layers, rows = shape
    if kernel in BF16_KERNELS and hidden % 32:
        pytest.skip("the bf16 kernels take hidden widths that are multiples of 32")
    actor = _kernel_actor(kernel, obs_dim, act_dim, hidden, layers)
    states = torch.randn(rows, obs_dim, generator=torch.Generator().manual_seed(2)) * 2
    with torch.inference_mode():
        mean, std = cpu_actor.FusedActor(actor)(states)
        want = cpu_actor.actor_mean_reference(actor, states)
    assert mean.shape == (rows, act_dim) and mean.dtype == torch.float32
    _assert_close_to_twin(mean, want, kernel)
    torch.testing.assert_close(std, actor.std().float().expand(rows, act_dim))


def test_fp32_twin_is_the_actor_itself():
    actor = _actor(11, 3, 256, 2)
    states = torch.randn(500, 11) * 2
    with torch.no_grad():
        torch.testing.assert_close(cpu_actor.actor_mean_reference(actor, states), actor(states)[0])


def test_twin_is_the_actor_in_bf16():
    """The bf16 twin: the actor's own fp32 forward up to bf16 rounding (~1e-2 on tanh outputs), on any CPU."""
    actor = _actor(11, 3, 256, 2)
    states = torch.randn(500, 11) * 2
    with torch.no_grad():
        d = (cpu_actor.actor_mean_reference(actor.to(torch.bfloat16), states) - actor.float()(states)[0]).abs()
    assert d.max().item() < 0.05 and d.mean().item() < 5e-3


def test_batch_dims_threads_and_empty(kernel):
    actor = _kernel_actor(kernel, 11, 3, 64, 2)
    fused = cpu_actor.FusedActor(actor)
    states = torch.randn(7, 10, 11)
    before = torch.get_num_threads()
    with torch.inference_mode():
        try:
            torch.set_num_threads(1)
            one = fused(states)[0]
        finally:
            torch.set_num_threads(before)
        many = fused(states)[0]
        assert one.shape == (7, 10, 3)
        assert torch.equal(one, many)  # rows are independent: the bits do not depend on the thread count
        assert torch.equal(fused(states[:, 3])[0], many[:, 3])
        assert fused(torch.empty(0, 11))[0].shape == (0, 3)


def test_nan_state_gives_nan_mean_in_its_row_only(kernel):
    actor = _kernel_actor(kernel, 11, 3, 64, 2)
    states = torch.randn(40, 11)
    states[5, 2] = float("nan")
    with torch.inference_mode():
        mean = cpu_actor.FusedActor(actor)(states)[0]
    assert mean[5].isnan().all()
    assert mean[torch.arange(40) != 5].isfinite().all()


def test_refresh_follows_weight_changes(kernel):
    actor = _kernel_actor(kernel, 11, 3, 64, 2)
    fused = cpu_actor.FusedActor(actor)
    states = torch.randn(64, 11)
    with torch.no_grad():
        actor.mlp[3].weight.mul_(-1.5)
        actor.mlp[1].bias.add_(0.3)
    fused.refresh()
    with torch.inference_mode():
        _assert_close_to_twin(fused(states)[0], cpu_actor.actor_mean_reference(actor, states), kernel)


def test_fused_layer_norm_copy_and_compile(kernel):
    """The sampler's policy copy has its LayerNorm + ELU pairs fused (cpu_layer_norm); the kernel reads it the same,
    and the op runs inside a torch.compile'd graph."""
    actor = _kernel_actor(kernel, 11, 3, 256, 2)
    copy = _kernel_actor(kernel, 11, 3, 256, 2)
    assert fuse_layer_norm_acts(copy) == 2
    states = torch.randn(300, 11)
    with torch.inference_mode():
        eager = cpu_actor.FusedActor(copy)(states)[0]
        compiled = torch.compile(cpu_actor.FusedActor(copy))(states)[0]
        _assert_close_to_twin(eager, cpu_actor.actor_mean_reference(actor, states), kernel)
    assert torch.equal(eager, compiled)


def test_fusable_only_for_the_kernels_networks():
    assert not cpu_actor.fusable(Critic(11))
    assert not cpu_actor.fusable(Actor(11, 3, hidden=48).to(torch.bfloat16))  # bf16: not a multiple of 32
    assert not cpu_actor.fusable(Actor(11, 3, hidden=40))  # fp32: not a multiple of 16
    assert not cpu_actor.fusable(Actor(11, 3, hidden=64).double())
    relu = Actor(11, 3, hidden=64)
    relu.mlp[2] = nn.ReLU()
    assert not cpu_actor.fusable(relu)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_actor.FusedActor(Actor(11, 3, hidden=48).to(torch.bfloat16))
    assert cpu_actor.fusable(Actor(11, 3, hidden=64).to(torch.bfloat16)) == bf16_layout.available()
    assert cpu_actor.fusable(Actor(11, 3, hidden=48)) == (cpu_actor.kernel_isa(torch.float32) is not None)


@needs_bf16
@torch.no_grad()
def test_bad_states_are_rejected():
    fused = cpu_actor.FusedActor(_actor(11, 3, 64, 2).to(torch.bfloat16))
    with pytest.raises(TypeError, match="float32 CPU tensor, got torch.float64"):
        fused(torch.randn(4, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"states must be \[\.\.\., 11\], got \[4, 12\]"):
        fused(torch.randn(4, 12))
    # weights that do not match the layout would be read out of bounds: the op refuses them
    weights = [fused.w_in, fused.b_in, fused.ln_w, fused.ln_b, fused.w_hidden, fused.b_hidden, fused.w_out,
               fused.b_out]
    with pytest.raises(ValueError, match=r"w_out must be a contiguous torch.bfloat16 CPU tensor of shape"):
        cpu_actor.actor_mean(torch.randn(4, 11), 3, 11, *weights[:6], fused.w_out[:, :16], fused.b_out, 1e-3)
    with pytest.raises(ValueError, match=r"w_in must be .* \[4, 32, 16, 2\], got torch.bfloat16 \[4, 16, 16, 2\]"):
        cpu_actor.actor_mean(torch.randn(4, 40), 3, 40, *weights, 1e-3)  # 40 observations need two 32-wide tiles


@pytest.mark.skipif(_FP32_BEST is None, reason="needs AVX2 + FMA")
@torch.no_grad()
def test_bad_fp32_weights_are_rejected():
    fused = cpu_actor.FusedActor(_actor(11, 3, 64, 2))
    weights = [fused.w_in, fused.b_in, fused.ln_w, fused.ln_b, fused.w_hidden, fused.b_hidden, fused.w_out,
               fused.b_out]
    with pytest.raises(ValueError, match=r"w_in must be a contiguous torch.float32 CPU tensor of shape \[4, 12, 16\]"):
        cpu_actor.actor_mean(torch.randn(4, 12), 3, 12, *weights, 1e-3)
    with pytest.raises(ValueError, match="w_in must be bfloat16 .* or float32"):
        cpu_actor.actor_mean(torch.randn(4, 11), 3, 11, fused.w_in.double(), *weights[1:], 1e-3)
    with pytest.raises(ValueError, match="cannot run on this CPU|isa must be"):
        cpu_actor._module.actor_mean(0, 0, 11, 64, 2, 3, 0, 0, 0, 0, 1e-3, 0, 0, 0, 0, 0, 1, "sse")



def test_no_silent_loss_of_gradients(kernel):
    actor = _kernel_actor(kernel, 11, 3, 64, 2)  # trainable parameters
    with pytest.raises(RuntimeError, match="no autograd"):
        cpu_actor.FusedActor(actor)(torch.randn(4, 11))
    with torch.no_grad():
        assert cpu_actor.FusedActor(actor)(torch.randn(4, 11))[0].shape == (4, 3)


# env -> the bf16 kernel the process may run at most: AMX off leaves AVX-512 BF16 (where the CPU has it); the BF16
# kernel's switch or a oneDNN cap below AVX512_CORE_BF16 leaves none
SWITCHES = [({"PGF_CPU_OPS_NO_AMX": "1"}, "avx512bf16"), ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "avx512bf16"),
            ({"PGF_CPU_OPS_NO_AVX512BF16": "1"}, "None"), ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "None")]


@pytest.mark.parametrize("env, at_most", SWITCHES)
def test_bf16_kernels_can_be_switched_off(env, at_most):
    code = "import torch; from polygrad_fast import cpu_actor; print(cpu_actor.kernel_isa(torch.bfloat16))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PATH": ""}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == (at_most if bf16_layout.available() else "None")


def test_pays_off_check_keeps_the_global_rng():
    actor = Actor(11, 3, hidden=96).to(torch.bfloat16)  # a shape no other test measured (lru_cache)
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    cpu_actor.fused_actor_pays_off(actor)
    assert torch.equal(torch.rand(3), want)


def sampler_pair(compile, switch, denoiser_hidden=64, policy=None, dtype="bfloat16"):
    """(denoiser, policy, fused sampler, plain sampler with ``switch``=False): samplers in ``dtype`` on a small MLP
    denoiser (H=5, O=11, A=3, T=8), the same modules."""
    torch.manual_seed(0)
    H, O, A = 5, 11, 3
    denoiser = ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=denoiser_hidden, num_layers=2)).eval()
    policy = _actor(O, A, 64, 2) if policy is None else policy
    rng = np.random.default_rng(0)
    normalizer = Normalizer({"observations": (rng.normal(size=O), rng.uniform(0.5, 2.0, O)),
                             "actions": (np.zeros(A), np.ones(A)), "rewards": (0.0, 1.0), "terminals": (0.0, 1.0)})
    kw = dict(denoiser_dtype=dtype, compile=compile, backend="torch", guidance_scale=0.05)
    return (denoiser, policy, FastGuidedSampler(denoiser, NoiseSchedule(8), policy, normalizer, **kw),
            FastGuidedSampler(denoiser, NoiseSchedule(8), policy, normalizer, **{switch: False}, **kw))


def same_noise_batches(fused, plain, change):
    """Both samplers on the same start states and noise, twice: before and after ``change()`` of the live
    modules; yields the two batches each time."""
    start = torch.randn(37, 11)
    for _ in range(2):
        noise = SamplerNoise.draw(8, 37, 5, 13, 3, generator=torch.Generator().manual_seed(4))
        yield fused.sample(start, noise=noise), plain.sample(start, noise=noise)
        with torch.no_grad():
            change()


@needs_bf16
@pytest.mark.parametrize("compile", [False, True])
def test_sampler_uses_it_and_follows_the_live_policy(compile, monkeypatch):
    """bf16 sampler with the fused actor vs without (same noise): the same trajectories up to the twin's
    tolerance compounded over the chain, and both follow a change of the user's policy weights (the kernel taken
    whatever it measured, to test what it computes)."""
    monkeypatch.setattr(cpu_actor, "fused_actor_pays_off", cpu_actor.fusable)
    _, policy, fused, plain = sampler_pair(compile, "cpu_fuse_actor")
    assert fused._fused_actor is not None and plain._fused_actor is None
    # a large change of the mean action after the first round: both samplers must follow it
    for a, b in same_noise_batches(fused, plain, lambda: policy.mlp[-1].bias.add_(0.5)):
        d = (a.actions - b.actions).abs()
        assert d.max().item() < 0.05 and d.mean().item() < 2e-3


@pytest.mark.skipif(_FP32_BEST is None, reason="needs AVX2 + FMA")
@pytest.mark.parametrize("compile", [False, True])
def test_fp32_sampler_uses_it_and_follows_the_live_policy(compile, monkeypatch):
    """fp32 sampler with the fused fp32 actor vs without (same noise; the kernel taken whatever it measured, to test
    what it computes): the same trajectories up to fp32 summation order compounded over the chain."""
    monkeypatch.setattr(cpu_actor, "fused_actor_pays_off", cpu_actor.fusable)
    _, policy, fused, plain = sampler_pair(compile, "cpu_fuse_actor", dtype="float32")
    assert isinstance(fused._fused_actor, cpu_actor.FusedActor) and fused._fused_actor.dtype == torch.float32
    assert plain._fused_actor is None
    for a, b in same_noise_batches(fused, plain, lambda: policy.mlp[-1].bias.add_(0.5)):
        torch.testing.assert_close(a.actions, b.actions, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.observations, b.observations, atol=1e-4, rtol=0)
