"""CPU instruction-set naming and the choices measured on the running CPU (polygrad_fast.backend,
cpu_packed.packing_pays_off): the decision rules with injected timings, the environment overrides, the caps."""
import math

import pytest
import torch

from polygrad_fast import backend, cpu_packed
from polygrad_fast.backend import ISAS, choose_fastest
from polygrad_fast.denoisers.mlp import ResidualMLP


# ---------------------------------------------------------------- choose_fastest
def test_choose_fastest_picks_the_clearly_faster():
    assert choose_fastest({"float32": 1.0, "bfloat16": 0.5}, prefer="float32") == "bfloat16"
    assert choose_fastest({"float32": 0.5, "bfloat16": 1.0}, prefer="float32") == "float32"
    assert choose_fastest({"a": 3.0, "b": 2.0, "c": 1.0}, prefer="a") == "c"


def test_choose_fastest_ties_go_to_the_preferred():
    # 5% faster is inside the 10% tolerance: the preferred (more precise) candidate stays; 20% faster wins
    assert choose_fastest({"float32": 1.0, "bfloat16": 0.95}, prefer="float32") == "float32"
    assert choose_fastest({"float32": 1.0, "bfloat16": 1.0}, prefer="float32") == "float32"
    assert choose_fastest({"float32": 1.0, "bfloat16": 0.8}, prefer="float32") == "bfloat16"
    # the edge: exactly at the tolerance is still a tie; a custom tolerance moves it
    assert choose_fastest({"p": 1.1, "q": 1.0}, prefer="p", tie_tolerance=0.1) == "p"
    assert choose_fastest({"p": 1.1, "q": 1.0}, prefer="p", tie_tolerance=0.05) == "q"


def test_choose_fastest_never_picks_an_unsupported_candidate():
    assert choose_fastest({"float32": 1.0, "bfloat16": None}, prefer="float32") == "float32"
    assert choose_fastest({"float32": 1.0, "bfloat16": None, "float16": 0.1}, prefer="float32") == "float16"


@pytest.mark.parametrize("timings,match", [
    ({"bfloat16": 0.5}, "preferred candidate 'float32'"),
    ({"float32": None, "bfloat16": 0.5}, "preferred candidate 'float32'"),
    ({"float32": 1.0, "bfloat16": math.nan}, "positive finite"),
    ({"float32": 1.0, "bfloat16": -1.0}, "positive finite"),
    ({"float32": math.inf}, "positive finite"),
    ({"float32": 1.0, "bfloat16": "fast"}, "positive finite"),
])
def test_choose_fastest_rejects_bad_timings(timings, match):
    with pytest.raises(ValueError, match=match):
        choose_fastest(timings, prefer="float32")


def test_min_time_is_the_smallest_call(monkeypatch):
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # three timed calls: 5, 1 and 3 seconds
    calls = []
    monkeypatch.setattr(backend, "perf_counter", lambda: next(ticks))
    assert backend.min_time(lambda: calls.append(1), reps=3, warmup=2) == 1.0
    assert len(calls) == 5  # 2 warm-up + 3 timed


def test_interleaved_min_times_rotates_the_order_and_takes_each_min(monkeypatch):
    clock = [0.0]
    cost = {"a": iter([9.0, 4.0, 6.0, 5.0]), "b": iter([9.0, 2.0, 8.0, 3.0])}  # warm-up first, then 3 rounds
    order = []

    def call(name):
        def run():
            order.append(name)
            clock[0] += next(cost[name])
        return run
    monkeypatch.setattr(backend, "perf_counter", lambda: clock[0])
    times = backend.interleaved_min_times({"a": call("a"), "b": call("b")}, reps=3, warmup=1)
    assert times == {"a": 4.0, "b": 2.0}
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds rotated by one each


# ---------------------------------------------------------------- the measured dtype
class _FakeCall:
    """A candidate call whose measured time is ``seconds``; records ``label`` in ``timed`` when it is timed."""

    def __init__(self, seconds, timed, label):
        self.seconds, self.timed, self.label = seconds, timed, label


def _fake_interleaved_min_times(calls, **_):
    for c in calls.values():
        c.timed.append(c.label)
    return {name: c.seconds for name, c in calls.items()}


def _measured(monkeypatch, *, bf16_supported, fp32, bf16):
    """measured_cpu_dtype's body (not its process cache) with injected GEMM times."""
    timed = []
    monkeypatch.setattr(backend, "cpu_bf16_gemm_supported", lambda: bf16_supported)
    monkeypatch.setattr(backend, "linear_call", lambda rows, i, o, dtype: _FakeCall(
        {torch.float32: fp32, torch.bfloat16: bf16}[dtype], timed, (rows, i, o, dtype)))
    monkeypatch.setattr(backend, "interleaved_min_times", _fake_interleaved_min_times)
    return backend.measured_cpu_dtype.__wrapped__(), timed


def test_measured_dtype_takes_bf16_only_where_it_is_faster(monkeypatch):
    dtype, timed = _measured(monkeypatch, bf16_supported=True, fp32=6e-4, bf16=2e-4)  # Sapphire Rapids-like
    assert dtype == torch.bfloat16
    assert sorted(timed, key=str) == sorted([(256, 1024, 1024, torch.float32), (256, 1024, 1024, torch.bfloat16)],
                                            key=str)  # the denoiser's hidden Linear at B=256, both dtypes
    # bf16 advertised but not faster (e.g. AVX512 without BF16: emulated, or oneDNN capped): fp32
    assert _measured(monkeypatch, bf16_supported=True, fp32=6e-4, bf16=9e-4)[0] == torch.float32
    assert _measured(monkeypatch, bf16_supported=True, fp32=6e-4, bf16=5.8e-4)[0] == torch.float32  # a tie


def test_measured_dtype_without_bf16_support_times_nothing(monkeypatch):
    dtype, timed = _measured(monkeypatch, bf16_supported=False, fp32=6e-4, bf16=1e-9)
    assert dtype == torch.float32 and timed == []


def test_measured_dtype_is_cached_per_process():
    assert backend.measured_cpu_dtype() is backend.measured_cpu_dtype()
    assert backend.measured_cpu_dtype.cache_info().currsize == 1


def test_auto_dtype_env_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(backend, "measured_cpu_dtype", lambda: pytest.fail("measured despite the override"))
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32), (" Float32 ", torch.float32)):
        monkeypatch.setenv(backend.CPU_DTYPE_ENV_VAR, name)
        assert backend.resolve_dtype("auto", cpu) == dtype
    assert backend.resolve_dtype("float32", cpu) == torch.float32  # explicit dtypes ignore it
    monkeypatch.setenv(backend.CPU_DTYPE_ENV_VAR, "float16")
    with pytest.raises(ValueError, match="POLYGRAD_FAST_CPU_DTYPE='float16': expected 'float32' or 'bfloat16'"):
        backend.resolve_dtype("auto", cpu)


def test_auto_dtype_without_override_is_the_measured_one(monkeypatch):
    monkeypatch.delenv(backend.CPU_DTYPE_ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "measured_cpu_dtype", lambda: torch.bfloat16)
    assert backend.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert backend.resolve_dtype("auto", torch.device("meta")) == torch.float32  # neither CPU nor CUDA


def test_linear_call_and_packed_linear_call_run_the_same_gemm():
    plain = backend.linear_call(8, 16, 4, torch.float32)()
    assert plain.shape == (8, 4) and plain.dtype == torch.float32
    if cpu_packed.available(torch.float32):  # same inputs (same seed), packed weight: fp32 reduction order only
        torch.testing.assert_close(cpu_packed.packed_linear_call(8, 16, 4, torch.float32)(), plain)
    if cpu_packed.available(torch.float32):  # with the skip connection: F.linear then the add vs in the epilogue
        torch.testing.assert_close(cpu_packed.packed_linear_call(8, 16, 4, torch.float32, residual=True)(),
                                   backend.linear_call(8, 16, 4, torch.float32, residual=True)())
    t = backend.interleaved_min_times({"plain": backend.linear_call(8, 16, 4, torch.float32)}, reps=2)["plain"]
    assert 0 < t < 1.0  # an 8x16x4 GEMM: microseconds; a second would mean it timed something else


# ---------------------------------------------------------------- the measured prepack
def _pays_off(monkeypatch, plain, packed, available=True, dtype=torch.bfloat16, residual=False):
    monkeypatch.setattr(cpu_packed, "available", lambda d: available)
    timed = []
    monkeypatch.setattr(cpu_packed, "linear_call",
                        lambda rows, i, o, d, res: _FakeCall(plain, timed, ("plain", d, res)))
    monkeypatch.setattr(cpu_packed, "packed_linear_call",
                        lambda rows, i, o, d, res: _FakeCall(packed, timed, ("packed", d, res)))
    monkeypatch.setattr(cpu_packed, "interleaved_min_times", _fake_interleaved_min_times)
    pays = cpu_packed.packing_pays_off.__wrapped__(256, 1024, 1024, dtype, residual)
    if available:  # both sides timed, in the asked dtype, with the skip connection where asked
        assert sorted(timed) == [("packed", dtype, residual), ("plain", dtype, residual)]
    return pays


def test_packing_pays_off_only_when_measured_faster(monkeypatch):
    assert _pays_off(monkeypatch, plain=3.0e-4, packed=2.2e-4)  # Sapphire Rapids, 1024x1024 at B=256
    assert not _pays_off(monkeypatch, plain=3.0e-4, packed=3.5e-4)
    assert not _pays_off(monkeypatch, plain=3.0e-4, packed=2.9e-4)  # a tie: plain
    assert not _pays_off(monkeypatch, plain=3.0e-4, packed=1e-9, available=False)
    assert _pays_off(monkeypatch, plain=9.0e-3, packed=7.0e-3, dtype=torch.float32)  # fp32, AVX2-like
    assert _pays_off(monkeypatch, plain=9.0e-3, packed=7.0e-3, dtype=torch.float32, residual=True)


def test_prepack_measures_a_residual_blocks_linear_with_its_skip_connection(monkeypatch):
    asked = []
    monkeypatch.setattr(cpu_packed, "packing_pays_off", lambda rows, i, o, d, res: asked.append((i, o, res)))
    monkeypatch.setenv(cpu_packed.PREPACK_ENV_VAR, "measure")
    trunk = ResidualMLP(160, 256, 2, 130, dropout=0.0)
    assert cpu_packed.prepack_linears(trunk) == 0  # every answer was None: nothing packed
    assert asked == [(160, 256, False), (256, 130, False), (256, 256, True), (256, 256, True)]  # modules() order


def test_prepack_mode_env(monkeypatch):
    monkeypatch.delenv(cpu_packed.PREPACK_ENV_VAR, raising=False)
    assert cpu_packed.prepack_mode() == "measure"
    monkeypatch.setenv(cpu_packed.PREPACK_ENV_VAR, "Always")
    assert cpu_packed.prepack_mode() == "always"
    monkeypatch.setenv(cpu_packed.PREPACK_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="POLYGRAD_FAST_CPU_PREPACK='sometimes': expected one of"):
        cpu_packed.prepack_mode()


def test_prepack_linears_packs_what_measured_faster(monkeypatch):
    """'measure' asks packing_pays_off per Linear shape, 'never' packs nothing. The packing itself is faked (no
    oneDNN bf16 needed): what is checked is which Linears are swapped."""
    from torch import nn

    monkeypatch.setattr(cpu_packed, "available", lambda dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(cpu_packed.PackedLinear, "repack", lambda self, force=False: True)
    asked = []
    monkeypatch.setattr(cpu_packed, "packing_pays_off",
                        lambda rows, i, o, d, res: asked.append((rows, i, o, d)) or i == 512 and not res)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256), nn.Linear(8, 8)).to(torch.bfloat16)
    monkeypatch.delenv(cpu_packed.PREPACK_ENV_VAR, raising=False)
    assert cpu_packed.prepack_linears(model, batch_hint=128) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "PackedLinear", "Linear"]
    bf16 = torch.bfloat16  # every Linear is timed, the 8x8 one too (no size threshold)
    assert asked == [(128, 256, 512, bf16), (128, 512, 256, bf16), (128, 8, 8, bf16)]
    fp16 = nn.Sequential(nn.Linear(256, 512)).to(torch.float16)  # a dtype oneDNN packing is not available in
    assert cpu_packed.prepack_linears(fp16) == 0 and len(asked) == 3
    fresh = nn.Sequential(nn.Linear(256, 512)).to(torch.bfloat16)
    monkeypatch.setenv(cpu_packed.PREPACK_ENV_VAR, "never")
    assert cpu_packed.prepack_linears(fresh) == 0 and type(fresh[0]) is nn.Linear


# ---------------------------------------------------------------- instruction sets
@pytest.mark.parametrize("cap,expected", [("SSE41", "default"), ("avx2", "AVX2"), ("AVX512_CORE", "AVX512"),
                                          ("AVX512_CORE_BF16", "AVX512-BF16"), ("AVX512_CORE_AMX", "AMX"),
                                          ("", None), ("NOT_AN_ISA", None)])
def test_onednn_cap_names(monkeypatch, cap, expected):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert backend.onednn_isa_cap() == expected


@pytest.mark.parametrize("hardware,cap,isa,fast_bf16", [
    ("AMX", None, "AMX", True), ("AMX", "AVX512_CORE_BF16", "AVX512-BF16", True), ("AMX", "AVX2", "AVX2", False),
    ("AVX512-BF16", "AVX512_CORE", "AVX512", False), ("AVX2", "AVX512_CORE_AMX", "AVX2", False),
    ("AVX2", "SSE41", "default", False)])
def test_cpu_isa_is_the_hardware_capped(monkeypatch, hardware, cap, isa, fast_bf16):
    monkeypatch.setattr(backend, "cpu_isa_hardware", lambda: hardware)
    monkeypatch.setattr(backend, "onednn_isa_cap", lambda: None if cap is None else backend._ONEDNN_CAPS[cap])
    assert backend.cpu_isa() == isa and backend.cpu_has_fast_bf16() is fast_bf16


def test_cpu_isa_of_this_machine_is_consistent_with_torch():
    hw = backend.cpu_isa_hardware()
    assert hw in ISAS and ISAS.index(backend.cpu_isa()) <= ISAS.index(hw)
    assert (hw in ("AMX", "AVX512-BF16")) == bool(torch.cpu._is_avx512_bf16_supported() or
                                                  torch.cpu._is_amx_tile_supported())
    assert (hw == "default") == (not torch.cpu._is_avx2_supported() and not torch.cpu._is_avx512_supported())
