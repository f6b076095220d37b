"""Fused CPU LayerNorm + activation (polygrad_fast.cpu_layer_norm) vs torch.compile/inductor and eager, same run.

The two shapes the guided sampler runs in bf16: the policy's LayerNorm(eps=1e-3) + ELU on 2560 x 256 and the
denoiser's LayerNorm(eps=1e-5) + ReLU on 256 x 1024, each on 1 and 2 threads. Variants:
  eager     nn.LayerNorm then F.elu / F.relu, no compile
  inductor  torch.compile(lambda h: act(ln(h))), compiled afresh for each thread count (inductor's C++ kernels are
            generated for the thread count current at compile time)
  native    FusedLayerNormAct.forward (eager: the kernel call plus the module's checks)
  native-op torch.ops.polygrad_fast.layer_norm_act, what a torch.compile'd graph calls (adds the custom-op dispatch)
The host is shared and noisy: min and median over many rounds; the native variants record
``ratio_vs_inductor_min`` / ``ratio_vs_inductor_median`` (native / inductor, < 1 is faster) in extra_info. Run:

    pytest benches/bench_cpu_ops.py --benchmark-columns=min,median,rounds -s
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polygrad_fast import cpu_layer_norm as cln

# (rows, width, eps, activation)
SHAPES = [(2560, 256, 1e-3, "elu"), (256, 1024, 1e-5, "relu")]
SHAPE_IDS = [f"{r}x{w}-{a}" for r, w, _, a in SHAPES]
_SKIP_NATIVE = pytest.mark.skipif(not cln.available(), reason=f"native _cpu_ops unavailable: {cln.native_error()}")
VARIANTS = ["eager", "inductor", pytest.param("native", marks=_SKIP_NATIVE),
            pytest.param("native-op", marks=_SKIP_NATIVE)]

_STATS: dict[tuple, tuple[float, float]] = {}  # (shape id, threads, variant) -> (min, median) seconds


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _setup(rows, width, eps, act):
    g = torch.Generator().manual_seed(0)
    ln = nn.LayerNorm(width, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(width, generator=g))
        ln.bias.copy_(0.1 * torch.randn(width, generator=g))
    x = torch.randn(rows, width, generator=g).to(torch.bfloat16)
    return ln, x, (F.elu if act == "elu" else F.relu)


# Collected with the variant varying fastest: each native measurement runs right after its inductor reference.
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=["1thread", "2threads"])
def test_layer_norm_act(benchmark, variant, shape, threads):
    rows, width, eps, act = shape
    ln, x, act_fn = _setup(*shape)
    if variant == "eager":
        fn = lambda: act_fn(ln(x))  # noqa: E731
    elif variant == "inductor":
        torch._dynamo.reset()  # compile for the current thread count
        compiled = torch.compile(lambda h: act_fn(ln(h)))
        fn = lambda: compiled(x)  # noqa: E731
    elif variant == "native":
        fused = cln.FusedLayerNormAct.from_layer_norm(ln, act)
        fn = lambda: fused(x)  # noqa: E731
    else:
        op = torch.ops.polygrad_fast.layer_norm_act.default
        fn = lambda: op(x, ln.weight, ln.bias, eps, act)  # noqa: E731
    with torch.no_grad():
        y = fn()  # (compiles the inductor variant)
        ref = act_fn(F.layer_norm(x.float(), (width,), ln.weight.float(), ln.bias.float(), eps)).to(x.dtype)
        # sanity: ref is rounded once from fp32, so a right kernel is within 2^-7 |ref| (one bf16 ulp) of it; eager
        # rounds twice (LayerNorm, then the activation) and inductor's fused ELU differs by up to 2 ulps (measured
        # 1.8 x 2^-7 |ref|): allow 2^-6 |ref|. A wrong eps (x100) or a dropped bias is off by 10^4+ ulps.
        assert ((y.float() - ref.float()).abs() <= 2**-6 * ref.float().abs()).all()
        rounds = 300 if benchmark.disabled is False else 1
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=20)
    if benchmark.disabled:  # --benchmark-disable (CI smoke run): the body ran once, nothing was timed
        return
    sid = SHAPE_IDS[SHAPES.index(shape)]
    st = benchmark.stats.stats
    _STATS[(sid, threads, variant)] = (st.min, st.median)
    benchmark.extra_info.update(variant=variant, rows=rows, width=width, activation=act, eps=eps, dtype="bfloat16",
                                threads=threads, isa=cln._module.isa() if cln.available() else None)
    ind = _STATS.get((sid, threads, "inductor"))
    msg = f"\n[bench_cpu_ops] {sid} {threads}T {variant}: min {st.min * 1e6:.1f} us, median {st.median * 1e6:.1f} us"
    if variant.startswith("native") and ind is not None:
        benchmark.extra_info["ratio_vs_inductor_min"] = st.min / ind[0]
        benchmark.extra_info["ratio_vs_inductor_median"] = st.median / ind[1]
        msg += (f"; inductor min {ind[0] * 1e6:.1f} / median {ind[1] * 1e6:.1f} us -> ratio "
                f"{st.min / ind[0]:.2f} (min), {st.median / ind[1]:.2f} (median)")
    print(msg)
