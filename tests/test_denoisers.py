"""Denoiser networks: sizes as the paper's, input checks, time embedding, causality, low-precision copies."""
import math

import pytest
import torch

from polygrad_fast.denoisers import (
    MLPDenoiserConfig,
    ResidualMLPDenoiser,
    TransformerDenoiser,
    TransformerDenoiserConfig,
    build_denoiser,
    low_precision_copy,
)

HOPPER = dict(horizon=10, transition_dim=13, action_dim=3)  # O=11, A=3
WALKER = dict(horizon=10, transition_dim=19, action_dim=6)  # O=17, A=6
SMALL_MLP = MLPDenoiserConfig(hidden_dim=32, num_layers=2)
SMALL_TF = TransformerDenoiserConfig(n_embd=16, n_head=2, num_layers=2)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def inputs(B, H, D, A, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, D, generator=g), torch.randn(B, H, A, generator=g), torch.randint(0, 128, (B,), generator=g)


@pytest.mark.parametrize("dims, expected", [(HOPPER, 6_664_458), (WALKER, 6_893_718)])
def test_mlp_parameter_count_matches_paper(dims, expected):
    m = build_denoiser(MLPDenoiserConfig(), **dims)
    # The paper's count includes its 8 fixed Fourier frequencies (a requires_grad=False Parameter there, a buffer here).
    assert n_params(m) + m.time_features.weights.numel() == expected
    assert all(p.requires_grad for p in m.parameters())
    assert m.input_proj.out_features == dims["horizon"] * (dims["transition_dim"] + dims["action_dim"])


def test_mlp_embed_dim_is_a_minimum():
    m = ResidualMLPDenoiser(2, 3, 1, MLPDenoiserConfig(embed_dim=128, hidden_dim=16, num_layers=1))
    assert m.input_proj.out_features == 128


def transformer_param_formula(horizon, transition_dim, action_dim, n=312, layers=6):
    """The architecture's count, biases and LayerNorm affines included: token embedding Linear(D + A, n), H
    learned positions, time MLP 2 x Linear(n, n), per block 2 LayerNorms (4n) + attention qkv/proj (4n^2 + 4n) +
    MLP n -> 4n -> n (8n^2 + 5n), head Linear(n, D)."""
    block = 4 * n + (4 * n * n + 4 * n) + (8 * n * n + 5 * n)
    return ((transition_dim + action_dim + 1) * n + horizon * n + 2 * (n * n + n) + layers * block
            + (n + 1) * transition_dim)


@pytest.mark.parametrize("dims, expected", [(HOPPER, 7_240_909), (WALKER, 7_245_595)])
def test_transformer_parameter_count_matches_paper(dims, expected):
    assert transformer_param_formula(**dims) == expected
    assert n_params(build_denoiser(TransformerDenoiserConfig(), **dims)) == expected


def test_transformer_init():
    torch.manual_seed(0)
    m = TransformerDenoiser(**HOPPER)
    c_proj = torch.cat([b.attn.c_proj.weight.flatten() for b in m.blocks] + [b.mlp.c_proj.weight.flatten() for b in m.blocks])
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.02)
    assert m.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(mod.bias.abs().max() == 0 for mod in m.modules() if isinstance(mod, torch.nn.Linear))


@pytest.mark.parametrize("config", [SMALL_MLP, SMALL_TF])
def test_output_shape_and_dtype(config):
    m = build_denoiser(config, 5, 4, 2)
    x, a, t = inputs(3, 5, 4, 2)
    y = m(x, a, t)
    assert y.shape == (3, 5, 4) and y.dtype == torch.float32
    assert (m.horizon, m.transition_dim, m.action_dim) == (5, 4, 2)
    assert m(x, a, t.to(torch.int32)).shape == y.shape


@pytest.mark.parametrize("config", [SMALL_MLP, SMALL_TF])
def test_input_errors_name_expected_and_given(config):
    m = build_denoiser(config, 10, 13, 3)
    x, a, t = inputs(4, 10, 13, 3)
    with pytest.raises(ValueError, match=r"x: expected \[B, 10, 13\], got \[4, 9, 13\]"):
        m(x[:, :9], a, t)
    with pytest.raises(ValueError, match=r"actions: expected \[4, 10, 3\], got \[4, 10, 2\]"):
        m(x, a[..., :2], t)
    with pytest.raises(ValueError, match=r"t: expected \[4\], got \[4, 1\]"):
        m(x, a, t[:, None])
    with pytest.raises(TypeError, match=r"t: expected torch.int64.*got torch.float32"):
        m(x, a, t.float())
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor, got torch.int64"):
        m(x.long(), a, t)
    with pytest.raises(ValueError, match=r"x: expected device cpu.*got meta"):
        m(x.to("meta"), a, t)


def test_build_denoiser_rejects_unknown_config():
    with pytest.raises(TypeError, match="MLPDenoiserConfig or TransformerDenoiserConfig"):
        build_denoiser({"hidden_dim": 8}, 10, 13, 3)


def test_mlp_input_is_step_major_interleaved():
    m = ResidualMLPDenoiser(3, 4, 2, SMALL_MLP)
    x, a, t = inputs(2, 3, 4, 2)
    seen = []
    m.input_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    m(x, a, t)
    expected = torch.cat([torch.cat([x[:, k], a[:, k]], dim=-1) for k in range(3)], dim=-1)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_mlp_time_embedding_is_fixed_random_fourier_of_raw_t():
    m = ResidualMLPDenoiser(3, 4, 2, SMALL_MLP)
    w = m.time_features.weights
    assert w.shape == (8,) and not w.requires_grad
    assert "time_features.weights" in m.state_dict()
    assert all(p is not w for p in m.parameters())
    t = torch.tensor([0, 7, 127])
    phase = t.double()[:, None] * w.double()[None] * 2 * math.pi
    expected = torch.cat([t.double()[:, None], phase.sin(), phase.cos()], dim=-1)
    torch.testing.assert_close(m.time_features(t).double(), expected, rtol=0, atol=2e-4)  # fp32 phases up to ~2e3 rad


def test_transformer_is_causal():
    torch.manual_seed(0)
    m = TransformerDenoiser(6, 4, 2, SMALL_TF).eval()
    x, a, t = inputs(3, 6, 4, 2)
    y = m(x, a, t)
    for k in range(5):
        x2, a2 = x.clone(), a.clone()
        x2[:, k + 1:] += torch.randn_like(x2[:, k + 1:])
        a2[:, k + 1:] += torch.randn_like(a2[:, k + 1:])
        y2 = m(x2, a2, t)
        torch.testing.assert_close(y2[:, : k + 1], y[:, : k + 1], rtol=0, atol=1e-6)
        assert (y2[:, k + 1:] - y[:, k + 1:]).abs().max() > 1e-4  # later steps do see the change


@pytest.mark.parametrize("make", [lambda: ResidualMLPDenoiser(**HOPPER), lambda: TransformerDenoiser(**HOPPER)])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_copy_matches_fp32(make, dtype, tol):
    # Tolerance: the copy rounds weights and activations at ~15 stages in series (input, 8 Linear/attention
    # layers, LayerNorms); each adds a relative error of about the unit roundoff u (bf16 2^-8 = 3.9e-3, fp16
    # 2^-11 = 4.9e-4) with random sign, so the output's relative error is about sqrt(15)*u = 1.5e-2 / 1.9e-3.
    # We allow twice that (measured at these shapes: bf16 0.8e-2, fp16 1.0e-3 for both networks).
    torch.manual_seed(0)
    m = make()
    lp = low_precision_copy(m, dtype)
    x, a, t = inputs(32, 10, 13, 3)
    with torch.no_grad():
        y, y_lp = m(x, a, t), lp(x, a, t)
    assert y_lp.dtype == torch.float32
    assert ((y_lp - y).norm() / y.norm()).item() < tol
    assert all(p.dtype == dtype and not p.requires_grad for p in lp.parameters())
    assert all(b.dtype == torch.float32 for b in lp.buffers())  # Fourier frequencies are not rounded
    assert all(p.dtype == torch.float32 and p.requires_grad for p in m.parameters())  # original untouched
    assert not lp.training


def test_low_precision_copy_rejects_fp32():
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        low_precision_copy(ResidualMLPDenoiser(2, 3, 1, SMALL_MLP), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make", [lambda: ResidualMLPDenoiser(**HOPPER), lambda: TransformerDenoiser(**HOPPER)])
def test_low_precision_copy_on_cuda(make):
    torch.manual_seed(0)
    m = make().cuda()
    x, a, t = (v.cuda() for v in inputs(32, 10, 13, 3))
    with torch.no_grad():
        y, y_lp = m(x, a, t), low_precision_copy(m, torch.float16)(x, a, t)
    assert y_lp.dtype == torch.float32
    assert ((y_lp - y).norm() / y.norm()).item() < 4e-3  # same budget as the CPU fp16 test
