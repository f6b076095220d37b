"""The fused native residual trunk (polygrad_fast.cpu_residual_mlp) against its plain-torch twin, and its use by the
sampler.

Tolerances: the kernel and the twin round at the same points (bf16 weights, input, post-ReLU activations and output)
and differ only in fp32 summation order (AMX tile or AVX-512 BF16 products vs torch's GEMM, a few fp32 ulps), which
can tip a bf16 rounding of an activation or of the output: one bf16 ulp (2^-8 relative) there, a little more
downstream of a tipped activation. Measured: at width 1024, 6 blocks, 256 rows, 1.9% of outputs more than 2^-7
(relative, floor 1e-2) off and the largest difference 0.016 at output scale 5.2; at width 256 0.07%; none at the small
widths. Bounds: at most 5% of outputs beyond 2^-7 relative, every |diff| <= 1% of the output scale. A wrong weight
layout, a dropped bias or residual moves most outputs by far more.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from polygrad_fast import bf16_layout, cpu_residual_mlp as crm
from polygrad_fast.cpu_layer_norm import fuse_layer_norm_acts
from polygrad_fast.denoisers.mlp import ResidualMLP
from polygrad_fast.policy import Actor
from test_cpu_actor import sampler_pair, same_noise_batches

needs_bf16 = pytest.mark.skipif(not bf16_layout.available(), reason="the fused trunk needs AMX or AVX512-BF16")
ISAS = [pytest.param("amx", marks=pytest.mark.skipif(bf16_layout.isa() != "amx", reason="needs AMX-BF16")),
        pytest.param("avx512bf16", marks=needs_bf16)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """The bf16 GEMM under test, forced (an AMX CPU runs both)."""
    monkeypatch.setattr(bf16_layout, "isa", lambda: request.param)
    return request.param


def _trunk(in_dim, width, depth, out_dim, seed=1):
    torch.manual_seed(seed)
    trunk = ResidualMLP(in_dim, width, depth, out_dim, 0.0).eval()
    with torch.no_grad():  # move LayerNorm affines and biases off their 1 / 0 init so each one matters
        for p in trunk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return trunk


def _assert_close_to_twin(got, want):
    got, want = got.float(), want.float()
    d = (got - want).abs()
    assert (d / want.abs().clamp_min(1e-2) > 2**-7).float().mean().item() <= 0.05
    assert d.max().item() <= 0.01 * want.abs().max().item()


# (in_dim, width, depth, out_dim, rows): the paper's Hopper trunk; one row; no residual block; widths 32 / 96 / 256;
# in_dim below and above one 32-wide tile; out_dim 1, 17 (a 16-column tail), 130; rows off the 32-row blocks and
# above one 128-row chunk.
SHAPES = [(160, 1024, 6, 130, 256), (13, 32, 0, 1, 1), (40, 96, 1, 17, 33), (160, 256, 3, 130, 300), (7, 64, 2, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"in{i}-w{w}-d{d}-out{o}-r{r}" for i, w, d, o, r in SHAPES])
def test_kernel_matches_twin(isa, shape):
    in_dim, width, depth, out_dim, rows = shape
    trunk = _trunk(in_dim, width, depth, out_dim)
    x = torch.randn(rows, in_dim, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.inference_mode():
        got = crm.FusedResidualMLP.from_trunk(trunk)(x)
        want = crm.residual_mlp_reference(trunk, x)
    assert got.shape == (rows, out_dim) and got.dtype == torch.bfloat16
    _assert_close_to_twin(got, want)


def test_twin_is_the_trunk_in_bf16():
    """The twin itself: the trunk's own fp32 forward up to bf16 rounding, on any CPU."""
    trunk = _trunk(160, 256, 3, 130)
    x = torch.randn(100, 160).to(torch.bfloat16)
    with torch.no_grad():
        d = (crm.residual_mlp_reference(trunk, x).float() - trunk(x.float())).abs()
    assert d.max().item() < 0.05 and d.mean().item() < 5e-3


def test_threads_batch_dims_nan_and_empty(isa):
    fused = crm.FusedResidualMLP.from_trunk(_trunk(40, 64, 2, 17))
    x = torch.randn(9, 30, 40).to(torch.bfloat16)
    before = torch.get_num_threads()
    with torch.inference_mode():
        try:
            torch.set_num_threads(1)
            one = fused(x)
        finally:
            torch.set_num_threads(before)
        many = fused(x)
        assert one.shape == (9, 30, 17) and torch.equal(one, many)  # the bits do not depend on the thread count
        assert torch.equal(fused(x[:, 3]), many[:, 3])
        assert fused(torch.empty(0, 40, dtype=torch.bfloat16)).shape == (0, 17)
        x[2, 5, 0] = float("nan")
        out = fused(x)
    assert out[2, 5].isnan().all()
    mask = torch.ones(9, 30, dtype=torch.bool)
    mask[2, 5] = False
    assert out[mask].isfinite().all()


def test_shares_the_modules_refreshes_and_falls_back(isa):
    trunk = _trunk(40, 64, 2, 17)
    fused = crm.FusedResidualMLP.from_trunk(trunk)
    assert fused.state_dict().keys() == trunk.state_dict().keys()
    x = torch.randn(50, 40).to(torch.bfloat16)
    with torch.no_grad():
        trunk.blocks[1].linear.weight.mul_(-1.5)
        trunk.norm.bias.add_(0.3)
    fused.refresh()
    with torch.inference_mode():
        _assert_close_to_twin(fused(x), crm.residual_mlp_reference(trunk, x))
        torch.testing.assert_close(fused(x.float()), trunk(x.float()))  # fp32 input: the plain forward
    y = fused(x.float().requires_grad_(True))  # autograd: the plain forward, differentiable
    y.sum().backward()
    trainable = crm.FusedResidualMLP.from_trunk(_trunk(40, 64, 2, 17).to(torch.bfloat16))
    trainable(x).float().sum().backward()  # bf16 input, trainable weights: the plain forward, gradients arrive
    assert trainable.blocks[0].linear.weight.grad is not None


def test_fused_layer_norm_copy_and_compile(isa):
    trunk = _trunk(160, 256, 2, 130)
    copy = _trunk(160, 256, 2, 130).to(torch.bfloat16)
    assert fuse_layer_norm_acts(copy) == 3
    x = torch.randn(64, 160).to(torch.bfloat16)
    with torch.inference_mode():
        eager = crm.FusedResidualMLP.from_trunk(copy)(x)
        compiled = torch.compile(crm.FusedResidualMLP.from_trunk(copy))(x)
        _assert_close_to_twin(eager, crm.residual_mlp_reference(trunk, x))
    assert torch.equal(eager, compiled)


def test_fusable_only_for_the_kernels_networks():
    assert not crm.fusable(nn.Linear(4, 4))
    assert not crm.fusable(ResidualMLP(16, 48, 2, 8, 0.0))  # width not a multiple of 32
    assert not crm.fusable(ResidualMLP(16, 64, 2, 8, 0.1))  # dropout
    gelu = ResidualMLP(16, 64, 2, 8, 0.0)
    gelu.blocks[0].act = nn.GELU()
    assert not crm.fusable(gelu)
    with pytest.raises(ValueError, match="multiple of 32"):
        crm.FusedResidualMLP.from_trunk(ResidualMLP(16, 48, 2, 8, 0.0))
    assert crm.fusable(ResidualMLP(16, 64, 2, 8, 0.0)) == bf16_layout.available()


@needs_bf16
def test_bad_inputs_are_rejected():
    fused = crm.FusedResidualMLP.from_trunk(_trunk(40, 64, 2, 17))
    weights = [fused.w_in, fused.b_in, fused.ln_w, fused.ln_b, fused.w_blocks, fused.b_blocks, fused.w_out,
               fused.b_out]
    with pytest.raises(TypeError, match="bfloat16 CPU tensor"):
        crm.residual_mlp(torch.randn(4, 40, dtype=torch.float16), 17, *weights, 1e-5)
    with pytest.raises(ValueError, match=r"w_in must be .* \[4, 48, 16, 2\], got torch.bfloat16 \[4, 32, 16, 2\]"):
        crm.residual_mlp(torch.randn(4, 80).to(torch.bfloat16), 17, *weights, 1e-5)  # 80 inputs: three tiles
    with pytest.raises(ValueError, match=r"w_out must be"):
        crm.residual_mlp(torch.randn(4, 40).to(torch.bfloat16), 33, *weights, 1e-5)


def test_amx_off_leaves_avx512_bf16_and_the_cap_applies():
    code = "from polygrad_fast import bf16_layout; print(bf16_layout.isa())"
    for env, at_most in (({"PGF_CPU_OPS_NO_AMX": "1"}, "avx512bf16"), ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "None")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "PATH": ""}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == (at_most if bf16_layout.available() else "None"), env


@pytest.mark.parametrize("rows, k, n", [(32, 32, 16), (64, 96, 48), (96, 1024, 1040)])
def test_bf16_linear_is_the_gemm(isa, rows, k, n):
    """The GEMM alone (bf16_linear, the bench's floor): bf16 products are exact in fp32, so it is F.linear on the
    bf16 values up to fp32 summation order (k terms of size <= 1: ~k 2^-24 each), over odd panel counts (1, 3, 65
    16-column panels: the 32-column tiles' tail)."""
    g = torch.Generator().manual_seed(3)
    a, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g)
    bias, wv, out = torch.randn(n, generator=g), bf16_layout.vnni(w), torch.empty(rows, n)
    crm._module.bf16_linear(a.data_ptr(), rows, k, wv.data_ptr(), n, bias.data_ptr(), out.data_ptr(),
                            torch.get_num_threads(), isa)
    want = F.linear(a.float(), bf16_layout.bf16_values(w), bias)
    torch.testing.assert_close(out, want, atol=1e-5 * k ** 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="isa must be one of 'amx', 'avx512bf16'"):
        crm._module.bf16_linear(a.data_ptr(), rows, k, 0, n, 0, 0, 1, "avx2")


def test_pays_off_check_keeps_the_global_rng():
    trunk = ResidualMLP(24, 96, 1, 8, 0.0).to(torch.bfloat16)  # a shape no other test measured (lru_cache)
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    crm.fused_trunk_pays_off(trunk)
    assert torch.equal(torch.rand(3), want)


@needs_bf16
@pytest.mark.parametrize("compile", [False, True])
def test_sampler_uses_it_and_follows_the_live_denoiser(compile, monkeypatch):
    """bf16 sampler with the fused trunk vs without (same noise): the same trajectories up to bf16-level
    differences compounded over the chain; both follow a change of the user's denoiser; its Linears stay unpacked
    (the kernel taken whatever it measured, to test what it computes)."""
    monkeypatch.setattr(crm, "fused_trunk_pays_off", crm.fusable)
    denoiser, _, fused, plain = sampler_pair(compile, "cpu_fuse_trunk", denoiser_hidden=256, policy=Actor(11, 3, 64, 2))
    assert fused._fused_trunk is not None and plain._fused_trunk is None
    assert not any(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in fused._fused_trunk.modules())
    # a large change of x0 after the first round: both samplers must follow it
    for a, b in same_noise_batches(fused, plain, lambda: denoiser.trunk.output.bias.add_(0.5)):
        for name in ("observations", "actions"):
            d = (getattr(a, name) - getattr(b, name)).abs()
            assert d.max().item() < 0.1 and d.mean().item() < 5e-3, name
