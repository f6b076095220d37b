"""Fused CPU LayerNorm + activation (polygrad_fast.cpu_layer_norm, csrc/cpu_ops/) against its torch twin.

The native-kernel tests skip cleanly when the extension is absent (or POLYGRAD_FAST_NO_NATIVE=1); the module tests
(state dict, fallback, torch.compile) run either way, since FusedLayerNormAct falls back to plain torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polygrad_fast import cpu_layer_norm as cln

needs_native = pytest.mark.skipif(not cln.available(), reason=f"native _cpu_ops unavailable: {cln.native_error()}")

ROWS = [1, 7, 2560]
WIDTHS = [1, 3, 17, 256, 1000, 1024]
DTYPES = [torch.float32, torch.bfloat16]


def twin(x, w, b, eps, act):
    """The reference: torch LayerNorm + activation computed in fp32, then rounded once to x's dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if w is None else w.float(), None if b is None else b.float(),
                     eps)
    y = F.elu(y) if act == "elu" else F.relu(y) if act == "relu" else y
    return y.to(x.dtype)


def make(rows, width, dtype, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * scale + shift).to(dtype)
    w = (1.0 + 0.5 * torch.randn(width, generator=g)).to(dtype)
    b = (0.3 * torch.randn(width, generator=g)).to(dtype)
    return x, w, b


def bf16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 ulps (both bf16, finite): distance of their bit patterns on the ordered number line."""
    def ordered(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)  # sign-magnitude -> ordered integers (+0 and -0 both 0)
    return (ordered(a) - ordered(b)).abs()


def assert_close_to_twin(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if y.dtype == torch.float32:
        # fp32: the kernel and torch sum the row in different orders (rounding ~ width * 2^-24 relative on mean and
        # variance, < 1e-6 here) and the ELU polynomial is within ~2 ulps of expm1; the LayerNorm outputs are O(1..10)
        # so 1e-5 absolute + 1e-5 relative leaves a >10x margin over those errors and still catches any real bug
        # (a wrong eps, biased/unbiased variance or a missing affine term is off by >= 1e-4).
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    else:
        # bf16: both sides round an fp32 value that differs in its last fp32 bits, so an element whose value lies
        # next to a bf16 rounding boundary can round the other way: one bf16 ulp, and rarely. The exception is an
        # output that is tiny because x_hat * w + b cancels (|y| ~ 1e-7): there the fp32 difference itself (a few
        # fp32 ulps of |b| ~ 0.3, i.e. ~1e-7 absolute) spans several of those tiny values' bf16 ulps, so an absolute
        # 1e-6 is also accepted.
        d = bf16_ulp_distance(y, ref)
        bad = (d > 1) & ((y.float() - ref.float()).abs() > 1e-6)
        assert not bool(bad.any()), f"{int(bad.sum())} elements off by more than 1 bf16 ulp, max {int(d.max())}"
        assert float((d > 0).float().mean()) < 0.01


def native(x, w, b, eps, act):
    return cln.layer_norm_act(x, w, b, eps, act)


@needs_native
@pytest.mark.parametrize("act", cln.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_native_matches_twin(rows, width, dtype, act):
    for eps in (1e-5, 1e-3):
        x, w, b = make(rows, width, dtype, seed=rows * 7919 + width)
        assert_close_to_twin(native(x, w, b, eps, act), twin(x, w, b, eps, act))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_native_without_affine_and_3d_input(dtype):
    x, w, b = make(6 * 5, 40, dtype, seed=3)
    x = x.view(6, 5, 40)
    for weight, bias in ((None, None), (w, None), (None, b)):
        for act in cln.ACTIVATIONS:
            y = native(x, weight, bias, 1e-5, act)
            assert y.shape == x.shape
            assert_close_to_twin(y, twin(x, weight, bias, 1e-5, act))


@needs_native
def test_native_non_contiguous_input_is_handled():
    x, w, b = make(64, 256, torch.float32, seed=4)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    y = native(xt, w, b, 1e-5, "elu")
    assert y.is_contiguous()
    assert_close_to_twin(y, twin(x, w, b, 1e-5, "elu"))


@needs_native
def test_elu_expm1_accuracy_fp32():
    """The kernel's ELU vs float64 expm1 on exact inputs: a constant row normalises to 0, so the output is
    act(bias) and the bias carries the test values (dense grid, tiny magnitudes, the clamp region, +-0)."""
    grid = torch.cat([torch.linspace(-100.0, 5.0, 50001), -torch.logspace(-38, 1, 4000), torch.tensor(
        [0.0, -0.0, -1e-45, -88.0, -88.7, -90.0, -1e30, -3.4e38, 1e-30, 3.4e38])])
    out = native(torch.zeros(3, grid.numel()), None, grid, 1e-5, "elu")
    exact = torch.where(grid > 0, grid.double(), torch.expm1(grid.double()))
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    for row in out:
        assert float(((row.double() - exact).abs() / ulp).max()) <= 2.0


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_large_magnitude_rows_two_pass_variance(dtype):
    """Rows ~1e4 with unit spread: a one-pass E[x^2] - E[x]^2 variance would lose everything (E[x^2] ~ 1e8 has an
    fp32 ulp of 8); the two-pass kernel stays as close to the float64 truth as torch itself."""
    x, w, b = make(64, 1024, torch.float32, seed=5, scale=1.0, shift=1e4)
    x = x.to(dtype)
    x64 = x.double()
    truth = F.elu(F.layer_norm(x64, (1024,), w.double(), b.double(), 1e-5))
    y = native(x, w.to(dtype), b.to(dtype), 1e-5, "elu")
    torch_err = float((twin(x, w.to(dtype), b.to(dtype), 1e-5, "elu").double() - truth).abs().max())
    err = float((y.double() - truth).abs().max())
    tol = 1e-3 if dtype == torch.float32 else 0.05
    assert err <= max(2 * torch_err, tol), (err, torch_err)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", cln.ACTIVATIONS)
def test_nan_propagates(dtype, act):
    x, w, b = make(8, 300, dtype, seed=6)
    x[2, 17] = float("nan")
    y = native(x, w, b, 1e-5, act)
    ref = twin(x, w, b, 1e-5, act)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert bool(torch.isnan(y[2]).all()) and not bool(torch.isnan(y[[0, 1, 3]]).any())


@needs_native
def test_bf16_denormal_outputs_round_like_torch():
    """Outputs in fp32's denormal range: the AVX512-BF16 conversion would flush them to zero; torch keeps them."""
    x, _, _ = make(32, 256, torch.float32, seed=7)
    w = torch.full((256,), 3e-39)  # fp32 denormal scale -> denormal outputs
    xb, wb = x.bfloat16(), w.bfloat16()
    assert bool((wb != 0).all())
    for act in cln.ACTIVATIONS:
        y = native(xb, wb, None, 1e-5, act)
        ref = twin(xb, wb, None, 1e-5, act)
        assert bool((y != 0).any())
        assert int(bf16_ulp_distance(y, ref).max()) <= 1


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_thread_counts_give_identical_bits(dtype):
    x, w, b = make(2563, 256, dtype, seed=8)  # not a multiple of the 4-row groups: group and tail rows mix
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(native(x, w, b, 1e-3, "elu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       outs[1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


@needs_native
def test_portable_paths_match_twin_in_a_subprocess():
    """The AVX-512 kernel (where the CPU has it) is the default; the portable (auto-vectorised) kernel and the integer bf16
    rounding (CPUs without AVX512-BF16) are chosen once per process, so check them in child processes."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_cpu_layer_norm import make, twin, assert_close_to_twin
        from polygrad_fast import cpu_layer_norm as cln, _cpu_ops
        print(_cpu_ops.isa())
        for rows in (1, 7, 300):
            for width in (1, 3, 17, 256, 1000):
                for dtype in (torch.float32, torch.bfloat16):
                    for act in cln.ACTIVATIONS:
                        x, w, b = make(rows, width, dtype, seed=rows + width)
                        assert_close_to_twin(cln.layer_norm_act(x, w, b, 1e-3, act), twin(x, w, b, 1e-3, act))
                        xn = x.clone(); xn[0, 0] = float("nan")
                        assert bool(torch.isnan(cln.layer_norm_act(xn, w, b, 1e-3, act)[0]).all())
    """)
    # Without AVX-512 the fp32 rows of widths 256 and 1000 (multiples of 8) take the AVX2 kernel, the rest the
    # portable one; on an AVX2-only CPU (e.g. Zen 3) capping AVX512-BF16 leaves the same.
    below_avx512 = "avx2" if _cpu_has("avx2") and _cpu_has("fma") else "generic"
    capped_bf16 = "avx512" if _cpu_has("avx512f") else below_avx512
    for env_var, isa in (("PGF_CPU_OPS_NO_AVX512", below_avx512), ("PGF_CPU_OPS_NO_AVX512BF16", capped_bf16)):
        env = dict(os.environ, **{env_var: "1"})
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines()[0].startswith(isa), r.stdout


def test_input_errors_are_clear():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight has shape"):
        cln.layer_norm_act(x, torch.ones(7), None, 1e-5, "relu")
    with pytest.raises(ValueError, match="dtype"):
        cln.layer_norm_act(x, torch.ones(8, dtype=torch.bfloat16), None, 1e-5, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        cln.layer_norm_act(x, None, None, 1e-5, "gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        cln.FusedLayerNormAct.from_layer_norm(nn.LayerNorm(8), "tanh")


def test_other_dtypes_fall_back_to_torch():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 12, dtype=torch.float64, generator=g)
    w, b = torch.rand(12, dtype=torch.float64, generator=g), torch.rand(12, dtype=torch.float64, generator=g)
    ref = F.elu(F.layer_norm(x, (12,), w, b, 1e-5))  # in float64 (the fp32 twin would not be exact here)
    torch.testing.assert_close(cln.layer_norm_act(x, w, b, 1e-5, "elu"), ref)


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(11, 256), nn.LayerNorm(256, eps=1e-3), nn.ELU(), nn.Linear(256, 256),
                         nn.LayerNorm(256), nn.ReLU(), nn.LayerNorm(256), nn.Tanh(), nn.ELU(alpha=0.5),
                         nn.Linear(256, 3)).to(dtype)


def test_fuse_keeps_state_dict_and_outputs():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(33, 11)
    with torch.no_grad():
        ref = net(x)
    assert cln.fuse_layer_norm_acts(net) == 2  # LN+ELU, LN+ReLU; LN+Tanh and ELU(alpha=0.5) are left alone
    assert isinstance(net[1], cln.FusedLayerNormAct) and net[1].activation == "elu"
    assert isinstance(net[4], cln.FusedLayerNormAct) and net[4].activation == "relu"
    assert isinstance(net[2], nn.Identity) and isinstance(net[5], nn.Identity) and type(net[6]) is nn.LayerNorm
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert cln.fuse_layer_norm_acts(net) == 0  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    net.load_state_dict(before)  # loads into the shared Parameters


def test_fuse_norm_act_children_of_the_mlp_denoiser():
    """The denoiser's blocks apply act(norm(h)) with children named ``norm`` and ``act``: all 6 + 1 pairs fuse,
    the state dict is unchanged and the fp32 outputs agree to fp32 rounding."""
    from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
    torch.manual_seed(0)
    model = ResidualMLPDenoiser(4, 7, 3, MLPDenoiserConfig(hidden_dim=96, num_layers=6)).eval()
    keys = list(model.state_dict())
    x, a, t = torch.randn(5, 4, 7), torch.randn(5, 4, 3), torch.randint(0, 10, (5,))
    with torch.no_grad():
        ref = model(x, a, t)
        assert cln.fuse_layer_norm_acts(model) == 7
        assert all(isinstance(b.norm, cln.FusedLayerNormAct) and isinstance(b.act, nn.Identity)
                   for b in model.trunk.blocks)
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(x, a, t), ref, atol=1e-5, rtol=1e-5)


def test_fused_module_falls_back_when_grad_is_needed():
    net = _net()
    x = torch.randn(9, 11)
    ref = net(x)
    cln.fuse_layer_norm_acts(net)
    y = net(x)  # grad enabled, parameters require grad: plain torch path, differentiable
    assert y.requires_grad
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    assert net[1].weight.grad is not None and net[4].bias.grad is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_module_under_torch_compile(dtype):
    net = _net(dtype)
    x = torch.randn(64, 11).to(dtype)
    with torch.no_grad():
        ref = net(x)
        cln.fuse_layer_norm_acts(net)
        eager = net(x)
        compiled = torch.compile(net)
        y = compiled(x)
        y2 = compiled(x * 0.5)
        ref2 = net(x * 0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    else:
        # bf16 end to end (outputs |y| < 0.75): the compiled Linears/LayerNorms round differently from eager ones,
        # measured max difference 0.0039 (a few bf16 ulps); a wrong activation in the fused op gives 0.45.
        torch.testing.assert_close(y.float(), ref.float(), atol=0.02, rtol=0)
    torch.testing.assert_close(y, eager, atol=1e-4 if dtype == torch.float32 else 0.05, rtol=0.02)
    torch.testing.assert_close(y2, ref2, atol=1e-4 if dtype == torch.float32 else 0.05, rtol=0.02)
    if cln.available():  # one graph, with the fused op in it (opaque custom op, no graph break)
        with torch.no_grad():
            explained = torch._dynamo.explain(net)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        code = "\n".join(g.code for g in explained.graphs)
        assert code.count("polygrad_fast.layer_norm_act") == 2
