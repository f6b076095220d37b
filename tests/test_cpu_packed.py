"""oneDNN-prepacked bf16 Linears (polygrad_fast.cpu_packed): same outputs as plain bf16, weight refresh, no
recompile (CPU with fast bf16 only: there both paths are the same oneDNN bf16 GEMM); prepacked fp32 Linears against
F.linear (any CPU with torch's oneDNN); and the bf16 sampler with the fused LayerNorm+activation (cpu_fuse_norm_act)
against the unfused one (any CPU with the native ops)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polygrad_fast import cpu_layer_norm, cpu_packed
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser, low_precision_copy
from polygrad_fast.policy import Actor
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.backend import cpu_has_fast_bf16
from polygrad_fast.guided_step import GuidedStep
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.schedule import NoiseSchedule
from test_sampler import A, O, make_normalizer

# Every test but the fused-norm one compares packed with plain oneDNN bf16 GEMMs, which are the same GEMM only on a
# CPU with fast bf16 (AMX / AVX512-BF16).
needs_fast_bf16 = pytest.mark.skipif(not (cpu_packed.available() and cpu_has_fast_bf16()),
                                     reason="needs oneDNN and a CPU with fast bf16")
H = 4


@pytest.fixture(autouse=True)
def _always_prepack(monkeypatch):
    """These tests check what packing computes, not whether it pays off here: pack every eligible Linear (the
    measured choice, ``cpu_packed.packing_pays_off``, is tested with injected timings in test_backend.py)."""
    monkeypatch.setenv(cpu_packed.PREPACK_ENV_VAR, "always")


@needs_fast_bf16
@pytest.mark.parametrize("rows", [1, 7, 100, 200, 1030])
def test_packed_linear_equals_bf16_linear(rows):
    """Bit-equal to F.linear for row counts other than the batch hint (the layout is picked for 256); 200x3 rows are
    in cpu_packed.PLAIN_ROWS and take the plain path, 1030x3 rows the packed one again."""
    torch.manual_seed(0)
    lin = nn.Linear(320, 256).to(torch.bfloat16).requires_grad_(False)
    packed = cpu_packed.PackedLinear.from_linear(lin, batch_hint=256)
    x = torch.randn(rows, 3, 320).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))
    assert packed.weight is lin.weight and copy.deepcopy(packed).slot != packed.slot


def _models(seed=0):
    torch.manual_seed(seed)
    # hidden 256, 2 blocks: 7 Linears (input projection, 2 in the time MLP, trunk input, 2 blocks, trunk output)
    denoiser = ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=256, num_layers=2)).eval()
    return denoiser, Actor(O, A, hidden=256)


@needs_fast_bf16
def test_prepack_keeps_names_and_outputs():
    denoiser, _ = _models()
    plain, packed = low_precision_copy(denoiser), low_precision_copy(denoiser)
    n = cpu_packed.prepack_linears(packed)
    assert n == 7  # 'always': every Linear, whatever its size
    assert list(dict(packed.state_dict())) == list(dict(plain.state_dict()))
    x, a, t = torch.randn(9, H, O + 2), torch.randn(9, H, A), torch.randint(0, 10, (9,))
    with torch.inference_mode():
        exact, out_plain, out_packed = denoiser(x, a, t), plain(x, a, t), packed(x, a, t)
    # Not bit-equal: the packed blocks add the skip connection in the GEMM's fp32 epilogue (one bf16 rounding
    # instead of two), so they may differ from plain bf16 by an ulp per block, and must be no less accurate.
    err_plain, err_packed = (out_plain - exact).abs().max(), (out_packed - exact).abs().max()
    assert 0 < err_packed <= 1.25 * err_plain, (err_packed, err_plain)


@needs_fast_bf16
@pytest.mark.parametrize("rows", [1, 7, 256])
def test_packed_residual_is_one_rounding_of_the_exact_sum(rows):
    """x @ W.T + b + residual in the fp32 epilogue, rounded once: within one bf16 ulp of the fp32 result; the plain
    fallback (a non-contiguous residual) computes residual + F.linear."""
    torch.manual_seed(1)
    lin = nn.Linear(320, 256).to(torch.bfloat16).requires_grad_(False)
    packed = cpu_packed.PackedLinear.from_linear(lin, batch_hint=256)
    x, res = torch.randn(rows, 320).to(torch.bfloat16), torch.randn(rows, 256).to(torch.bfloat16)
    with torch.inference_mode():
        out = packed(x, residual=res)
        exact = x.float() @ lin.weight.float().T + lin.bias.float() + res.float()
        assert out.dtype == torch.bfloat16
        assert ((out.float() - exact).abs() <= torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-6).all()
        res_strided = torch.randn(rows, 512).to(torch.bfloat16)[:, ::2]
        assert torch.equal(packed(x, residual=res_strided), res_strided + F.linear(x, lin.weight, lin.bias))


def _pair(compile=False):
    denoiser, policy = _models()
    samplers = [FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), denoiser_dtype="bfloat16",
                                  backend="torch", compile=compile, cpu_prepack=flag, cpu_fuse_trunk=False)
                for flag in (True, False)]  # (the fused AMX trunk would replace the packed Linears)
    return denoiser, policy, samplers


@needs_fast_bf16
def test_sampler_packed_equals_plain_and_follows_weight_updates():
    denoiser, policy, (packed, plain) = _pair()
    assert packed._packed and not plain._packed
    start = torch.randn(6, O)
    noise = SamplerNoise.draw(5, 6, H, O + 2, A, generator=torch.Generator().manual_seed(1))
    before = packed.sample(start, noise=noise)
    # packed and plain differ only by bf16 roundings of the fused skip connection (see above): a few 1e-3 here
    close = dict(atol=0.03, rtol=0.02)
    torch.testing.assert_close(before.actions, plain.sample(start, noise=noise).actions, **close)
    with torch.no_grad():  # an in-place update, as an optimizer or EMA step does
        denoiser.trunk.blocks[1].linear.weight.mul_(1.5)
        policy.mlp[3].weight.add_(0.05)  # (the policy copy is not packed; checked anyway)
    after, after_plain = packed.sample(start, noise=noise), plain.sample(start, noise=noise)
    assert (after.observations - before.observations).abs().max() > 10 * close["atol"]  # a stale pack would show
    for name in ("observations", "actions"):
        torch.testing.assert_close(getattr(after, name), getattr(after_plain, name), **close)


@needs_fast_bf16
def test_compiled_refresh_does_not_recompile():
    torch._dynamo.reset()
    denoiser, policy, (packed, _) = _pair(compile=True)
    start = torch.randn(6, O)
    noise = SamplerNoise.draw(5, 6, H, O + 2, A, generator=torch.Generator().manual_seed(1))
    packed.sample(start, noise=noise)
    frames = dict(torch._dynamo.utils.counters["frames"])
    with torch.no_grad():
        denoiser.trunk.blocks[0].linear.weight.mul_(1.5)
    out = packed.sample(start, noise=noise)
    assert dict(torch._dynamo.utils.counters["frames"]) == frames  # no new frame compiled
    eager = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), denoiser_dtype="bfloat16",
                              backend="torch", cpu_prepack=False).sample(start, noise=noise)
    # compiled vs eager: inductor fuses LayerNorm/ReLU in fp32 before rounding, so bf16-level differences only
    torch.testing.assert_close(out.observations, eager.observations, atol=0.1, rtol=0.05)


@needs_fast_bf16
def test_more_compiled_samplers_reuse_the_graphs():
    """The packed-weight key is a buffer, not an int baked into the graph: further compiled samplers with the same
    options (new packed copies, new keys) run the graphs the first one compiled, so a training process that builds
    several samplers never reaches dynamo's recompile limit (8), and each still uses its own weights."""
    torch._dynamo.reset()
    start = torch.randn(6, O)
    noise = SamplerNoise.draw(5, 6, H, O + 2, A, generator=torch.Generator().manual_seed(1))
    outputs = []
    for i in range(3):
        denoiser, policy = _models(seed=i)
        sampler = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), denoiser_dtype="bfloat16",
                                    backend="torch", compile=True, cpu_fuse_trunk=False)
        assert sampler._packed
        outputs.append(sampler.sample(start, noise=noise).observations)
        if i == 0:
            frames = dict(torch._dynamo.utils.counters["frames"])
    assert dict(torch._dynamo.utils.counters["frames"]) == frames  # nothing compiled after the first sampler
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


@needs_fast_bf16
def test_differently_configured_compiled_samplers_all_run_compiled():
    """Each option set compiles up to 3 graphs of the one step function; five option sets must all stay compiled
    (dynamo's default limit of 8 entries per function would send the later ones to eager mode)."""
    torch._dynamo.reset()
    denoiser, policy = _models()
    start = torch.randn(6, O)
    noise = SamplerNoise.draw(5, 6, H, O + 2, A, generator=torch.Generator().manual_seed(1))
    for options in ({}, {"guidance_type": "sample"}, {"clip_std": None}, {"states_for_guidance": "posterior_mean"},
                    {"action_noise_scale": 0.5}):
        sampler = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), denoiser_dtype="bfloat16",
                                    backend="torch", compile=True, **options)
        sampler.sample(start, noise=noise)
    code = GuidedStep.__call__.__code__  # the sampler compiles its GuidedStep's __call__
    # 13 entries on torch 2.13 (a few option sets share graphs); capped at 8 without the sampler's raised limit
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) > 8


@pytest.mark.skipif(not cpu_layer_norm.available(), reason="polygrad_fast._cpu_ops not built")
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiling: ~1 min
def test_fused_norm_act_sampler_matches_unfused(compile):
    """cpu_fuse_norm_act: the policy copy (and, eager only, the denoiser copy) run the native LayerNorm+act kernel;
    with the same noise the trajectories match the unfused bf16 sampler to bf16 rounding (the kernel and torch
    differ by at most one bf16 ulp on rare elements), and the user's modules are never modified."""
    denoiser, policy = _models()
    kw = dict(denoiser_dtype="bfloat16", backend="torch", compile=compile)
    fused = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), **kw)
    plain = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), cpu_fuse_norm_act=False, **kw)
    fused_mods = lambda m: sum(isinstance(x, cpu_layer_norm.FusedLayerNormAct) for x in m.modules())  # noqa: E731
    assert fused_mods(fused._policy_copy) == 2 and fused_mods(plain._policy_copy) == 0
    assert fused_mods(fused._denoiser_fast) == (0 if compile else 3)  # 2 blocks + the trunk's final norm
    assert fused_mods(policy) == 0 and fused_mods(denoiser) == 0
    start = torch.randn(6, O)
    noise = SamplerNoise.draw(5, 6, H, O + 2, A, generator=torch.Generator().manual_seed(1))
    a, b = fused.sample(start, noise=noise), plain.sample(start, noise=noise)
    for name in ("observations", "actions"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0.03, rtol=0.02)


needs_onednn_fp32 = pytest.mark.skipif(not cpu_packed.available(torch.float32), reason="needs torch's oneDNN ops")


@needs_onednn_fp32
@pytest.mark.parametrize("rows", [1, 7, 256, 1030])
def test_packed_fp32_linear_matches_f_linear(rows):
    """fp32 weights run oneDNN's fp32 GEMM (on any x86 CPU), bias and residual in the epilogue: equal to F.linear
    (+ residual) up to fp32 reduction order. Tolerance: a 320-term fp32 dot product of O(1) terms reordered differs
    by a few 1e-6; a wrong bias, residual or transposed weight is off by O(1)."""
    torch.manual_seed(2)
    lin = nn.Linear(320, 256).requires_grad_(False)
    packed = cpu_packed.PackedLinear.from_linear(lin, batch_hint=256)
    x, res = torch.randn(rows, 3, 320), torch.randn(rows, 3, 256)
    with torch.inference_mode():
        plain = F.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(packed(x), plain, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x, residual=res), res + plain, atol=2e-5, rtol=1e-5)
        with torch.no_grad():
            lin.weight.mul_(-1.0)  # in place, as an optimizer step: stale until repacked
        assert cpu_packed.refresh(nn.Sequential(packed)) == 1
        torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias), atol=2e-5, rtol=1e-5)


@needs_onednn_fp32
def test_prepack_fp32_denoiser_copy_matches_plain():
    """An fp32 copy of the MLP denoiser with all its 7 Linears packed (the block Linears with the residual in the
    GEMM's epilogue) gives the plain fp32 output to fp32 rounding; the names and state dict are unchanged."""
    denoiser, _ = _models()
    packed = copy.deepcopy(denoiser).requires_grad_(False)
    assert cpu_packed.prepack_linears(packed) == 7
    assert sum(isinstance(m, cpu_packed.PackedLinear) for m in packed.modules()) == 7
    assert list(dict(packed.state_dict())) == list(dict(denoiser.state_dict()))
    x, a, t = torch.randn(9, H, O + 2), torch.randn(9, H, A), torch.randint(0, 10, (9,))
    with torch.inference_mode():
        torch.testing.assert_close(packed(x, a, t), denoiser(x, a, t), atol=1e-5, rtol=1e-5)


def test_explicit_bf16_sampler_with_default_prepack_runs_on_any_cpu():
    """oneDNN's bf16 weight reorder raises without AVX512-BW/VL/DQ or AVX-NE-CONVERT (e.g. on AVX2 Zen 3), so
    ``cpu_packed.available()`` must say no there and a bf16 sampler with the default ``cpu_prepack=True`` must run
    plain instead of crashing (it raised in ``prepack_linears`` before)."""
    torch.manual_seed(0)
    denoiser = ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=256, num_layers=1)).eval()
    sampler = FastGuidedSampler(denoiser, NoiseSchedule(2), Actor(O, A, hidden=16), make_normalizer(),
                                denoiser_dtype="bfloat16", cpu_fuse_trunk=False)  # (the AMX trunk packs nothing)
    assert (len(sampler._packed) == 1) == cpu_packed.available()
    out = sampler.sample(torch.randn(3, O))
    assert torch.isfinite(out.observations).all() and torch.isfinite(out.actions).all()


@needs_onednn_fp32
@pytest.mark.skipif(not cpu_layer_norm.available(), reason="polygrad_fast._cpu_ops not built")
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fp32_cpu_copies_match_the_users_modules(compile):
    """An fp32 CPU sampler runs its own copies: the denoiser's Linears prepacked (and, eager, its LayerNorm +
    ReLU fused), the policy's LayerNorm + ELU fused; on the same noise the trajectories equal those of the sampler
    that runs the user's modules as given (cpu_prepack and cpu_fuse_norm_act off) up to fp32 reduction order
    (measured <= a few 1e-6; a stale weight or a dropped bias is off by O(0.1)), the user's modules stay plain, and
    a weight update reaches the copies at the next call (sync_weights)."""
    denoiser, policy = _models()
    kw = dict(denoiser_dtype="float32", backend="torch", compile=compile)
    fast = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), **kw)
    plain = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), cpu_prepack=False,
                              cpu_fuse_norm_act=False, **kw)
    count = lambda m, cls: sum(isinstance(x, cls) for x in m.modules())  # noqa: E731
    assert plain._denoiser_fast is denoiser and plain._policy_copy is None
    assert count(fast._denoiser_fast, cpu_packed.PackedLinear) == 7  # 'always' (this module's fixture): all 7
    assert count(fast._denoiser_fast, cpu_layer_norm.FusedLayerNormAct) == (0 if compile else 3)
    assert count(fast._policy_copy, cpu_layer_norm.FusedLayerNormAct) == 2
    assert count(denoiser, cpu_packed.PackedLinear) == 0 and count(policy, cpu_layer_norm.FusedLayerNormAct) == 0
    start = torch.randn(6, O, generator=torch.Generator().manual_seed(3))
    noise = SamplerNoise.draw(5, 6, H, O + 2, A, generator=torch.Generator().manual_seed(1))

    def check():
        a, b = fast.sample(start, noise=noise), plain.sample(start, noise=noise)
        for name in ("observations", "actions", "rewards"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=5e-5, rtol=1e-4)

    check()
    with torch.no_grad():  # an optimizer step on the live modules
        for p in (*denoiser.parameters(), *policy.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    check()


def test_fp32_copy_that_changes_nothing_is_dropped(monkeypatch):
    """With nothing to pack (prepack 'never') and nothing to fuse, the fp32 sampler runs the user's modules."""
    monkeypatch.setenv(cpu_packed.PREPACK_ENV_VAR, "never")
    denoiser, policy = _models()
    s = FastGuidedSampler(denoiser, NoiseSchedule(5), policy, make_normalizer(), denoiser_dtype="float32",
                          backend="torch", cpu_fuse_norm_act=False)
    assert s._denoiser_fast is denoiser and s._policy_copy is None
