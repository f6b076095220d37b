"""TrajectoryBuffer against hostile input: every wrong argument is refused with an error that names the argument,
says what was expected and what was given, and leaves the stored data untouched; save/load failures name the file.
Property-based (hypothesis, derandomized) where the input space is large."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polygrad_fast import _native
from polygrad_fast.buffer import TrajectoryBuffer
from polygrad_fast.buffer_format import remove_stale_temp_files

BACKENDS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(
    not _native.native_available(), reason=f"native extension unavailable: {_native.native_error()}"))]
needs_native = pytest.mark.skipif(not _native.native_available(), reason=f"native: {_native.native_error()}")
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

O, A, S = 3, 2, 2


def filled(backend, capacity=100, lengths=(12, 20, 7)):
    buf = TrajectoryBuffer(O, A, S, capacity, backend=backend)
    rng = np.random.default_rng(0)
    for i, L in enumerate(lengths):
        buf.add_episode(rng.normal(size=(L, O)), rng.normal(size=(L, A)), rng.normal(size=L), rng.normal(size=(L, S)),
                        terminated=i % 2 == 0, truncated=i % 2 == 1)
    return buf


def snapshot(buf):
    return {k: np.array(v, copy=True) for k, v in buf.state_dict().items()}


def assert_unchanged(buf, before):
    after = snapshot(buf)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def assert_says(exc_info, *words):
    """The message names each of ``words`` and says what was expected."""
    msg = str(exc_info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "expected" in msg, msg


# ----------------------------------------------------------------------------------------------------------------------
# constructor
# ----------------------------------------------------------------------------------------------------------------------

_NOT_INTS = [1.0, "3", None, True, np.float64(2.0), [3], torch.tensor(3)]


@pytest.mark.parametrize("field", ["obs_dim", "act_dim", "sim_state_dim", "capacity"])
@pytest.mark.parametrize("value", _NOT_INTS, ids=repr)
def test_constructor_refuses_non_ints(field, value):
    args = dict(obs_dim=O, act_dim=A, sim_state_dim=S, capacity=10)
    args[field] = value
    with pytest.raises(TypeError) as e:
        TrajectoryBuffer(**args, backend="numpy")
    assert_says(e, field, type(value).__name__)


@SETTINGS
@given(o=st.integers(-3, 4), a=st.integers(-3, 4), s=st.integers(-3, 4), c=st.integers(-3, 50),
       backend=st.sampled_from(["numpy", "native"] if _native.native_available() else ["numpy"]))
def test_constructor_bounds(o, a, s, c, backend):
    bad = [name for name, v, lo in (("obs_dim", o, 1), ("act_dim", a, 1), ("sim_state_dim", s, 0),
                                    ("capacity", c, 1)) if v < lo]
    if not bad:
        buf = TrajectoryBuffer(o, a, s, c, backend=backend)
        assert (buf.obs_dim, buf.act_dim, buf.sim_state_dim, buf.capacity, len(buf)) == (o, a, s, c, 0)
        return
    with pytest.raises(ValueError) as e:
        TrajectoryBuffer(o, a, s, c, backend=backend)
    assert_says(e, bad[0])
    assert re.search(rf"{bad[0]}: expected >= \d, got -?\d+", str(e.value))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity", [10**12, 2**62, 2**100])
def test_constructor_refuses_capacities_beyond_memory(backend, capacity):
    # before: 2**62 was accepted by the native core (size overflow) and adding then segfaulted; 10**12 raised a bare
    # std::bad_alloc
    with pytest.raises(MemoryError, match=rf"capacity {capacity} transitions of obs 11, act 3, sim 58 would need "
                                          r"[\d.]+ GB \(\d+ bytes\), more than this machine's [\d.]+ GB of memory"):
        TrajectoryBuffer(11, 3, 58, capacity, backend=backend)


def test_constructor_refuses_absurd_dims_and_backends():
    with pytest.raises(ValueError, match=r"obs_dim: expected <= 2147483648, got 2147483649"):
        TrajectoryBuffer(2**31 + 1, 1, 1, 10)
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'native', 'numpy'\), got 'cuda'"):
        TrajectoryBuffer(1, 1, 1, 10, backend="cuda")


@needs_native
def test_native_core_checks_sizes_itself():
    # The C++ core does not rely on the Python checks: overflow-checked size arithmetic, allocation failure named.
    core = _native.native().BufferCore
    with pytest.raises(ValueError, match=r"capacity 4611686018427387904 transitions of obs 11, act 3, sim 58 "
                                         r"\(ring bytes\) overflows int64"):
        core(11, 3, 58, 2**62)
    with pytest.raises(MemoryError, match=r"capacity 1000000000000 transitions of obs 11, act 3, sim 58 would need "
                                          r"528000\.0 GB \(528000000000000 bytes\): allocation failed"):
        core(11, 3, 58, 10**12)
    with pytest.raises(ValueError, match=r"obs_dim \+ act_dim overflows int64"):
        core(2**62, 2**62, 1, 1)
    with pytest.raises(ValueError, match=r"expected obs_dim, act_dim >= 1 and sim_state_dim >= 0, got 0, 1, 1"):
        core(0, 1, 1, 1)
    assert _native.native().record_bytes(11, 3, 58) == 8 * (8 + 58)  # 16 floats padded to 8 doubles, then sim


# ----------------------------------------------------------------------------------------------------------------------
# add_episode: shapes, dtypes, non-finite values, lengths, flags (property-based against a simple oracle)
# ----------------------------------------------------------------------------------------------------------------------

_DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "bool", "complex64", "str"]


def _make(kind: str, dtype: str, shape: tuple, fill: float):
    """An argument of this kind (numpy / tensor / list), dtype and shape; float ones filled with ``fill``."""
    floaty = dtype.startswith("float") or dtype == "bfloat16"
    if dtype == "str":
        return np.full(shape, "x")
    if kind == "list":
        value = {"bool": True, "complex64": 1 + 1j}.get(dtype, fill if floaty else 1)
        return np.full(shape, value).tolist()
    if kind == "tensor":
        return torch.full(shape, fill).to(getattr(torch, dtype)) if dtype != "bool" else torch.ones(shape, dtype=torch.bool)
    with np.errstate(invalid="ignore"):  # NaN cast to an int/bool dtype: refused for the dtype anyway
        return np.full(shape, fill).astype(dtype)


@st.composite
def episode_args(draw):
    L = draw(st.sampled_from([5, 7, 3, 10, 1, 12, 0]))  # typical, full, shortest, too long for capacity 10, empty
    fields = {}
    for name, shape in (("observations", (L, O)), ("actions", (L, A)), ("rewards", (L,)), ("sim_states", (L, S))):
        kind = draw(st.sampled_from(["numpy", "tensor", "list"]))
        dtype = draw(st.sampled_from(_DTYPES[:4] * 8 + _DTYPES[4:]))  # mostly valid, so later fields get checked
        if dtype == "bfloat16" or (kind == "tensor" and dtype == "str"):
            kind = "tensor" if dtype == "bfloat16" else "numpy"
        if draw(st.sampled_from([False] * 9 + [True])):  # a wrong shape, now and then
            shape = draw(st.sampled_from([shape[:-1], shape + (1,), tuple(d + 1 for d in shape)]))
        fields[name] = (kind, dtype, shape)
    nan_field = draw(st.sampled_from([None] * 6 + ["observations", "actions", "rewards", "sim_states"]))
    return L, fields, nan_field


def _oracle(L, fields, nan_field, capacity):
    """The buffer's verdict, in its order of checks: (field, message regex) of the first refusal, or None."""
    want = {"observations": (None, O), "actions": (L, A), "rewards": (L,), "sim_states": (L, S)}
    for name, (kind, dtype, shape) in fields.items():
        floaty = dtype.startswith("float") or dtype == "bfloat16"
        if not (floaty or (kind == "list" and dtype.startswith("int"))):  # Python ints in lists are numbers
            given_ = "<U1" if dtype == "str" else dtype.rstrip("0123456789")
            return name, rf"{name}: expected a real floating-point array.*got .*{given_}"
        w = want[name]
        if len(shape) != len(w) or any(x is not None and x != y for x, y in zip(w, shape)):
            return name, rf"{name}: expected shape \[.*\], got \[.*\]"
        if name == nan_field and floaty and np.prod(shape) > 0:
            return name, rf"{name}: contains NaN or inf \(first: nan at index \[0(, 0)?\].*expected finite values"
        if name == "observations":
            if shape[0] == 0:
                return name, "observations: expected an episode of length >= 1, got length 0"
            if shape[0] > capacity:
                return name, "longer than the buffer capacity"
            L = shape[0]
            want = {"observations": (None, O), "actions": (L, A), "rewards": (L,), "sim_states": (L, S)}
    return None


@pytest.mark.parametrize("backend", BACKENDS)
@settings(SETTINGS, max_examples=100)
@given(args=episode_args(), terminated=st.booleans())
def test_add_episode_refuses_exactly_the_bad_input(backend, args, terminated):
    L, fields, nan_field = args
    buf = filled(backend, capacity=10, lengths=(4, 3, 2))
    before = snapshot(buf)
    values = {name: _make(kind, dtype, shape, np.nan if name == nan_field else 0.5)
              for name, (kind, dtype, shape) in fields.items()}
    # (an empty nested list loses its inner dimensions and its dtype: [] is float64 of shape [0] whatever was meant)
    fields = {name: (kind, str(np.asarray(values[name]).dtype) if kind == "list" and not np.size(values[name])
                     else dtype, np.shape(values[name]) if kind == "list" else shape)
              for name, (kind, dtype, shape) in fields.items()}
    verdict = _oracle(L, fields, nan_field, buf.capacity)
    if verdict is None:
        n_before = len(buf)
        buf.add_episode(**values, terminated=terminated, truncated=not terminated)
        assert buf.episode_lengths()[-1] == L and len(buf) <= n_before + L
        got = buf.state_dict()["observations"][-L:]
        obs_kind, obs_dtype, _ = fields["observations"]
        fill = 1.0 if obs_kind == "list" and obs_dtype.startswith("int") else 0.5  # exact in every float dtype
        np.testing.assert_array_equal(got, np.full((L, O), fill, np.float32))
        return
    name, pattern = verdict
    with pytest.raises((TypeError, ValueError), match=pattern):
        buf.add_episode(**values, terminated=terminated, truncated=not terminated)
    assert_unchanged(buf, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_episode_converts_every_float_dtype_exactly_like_a_float32_cast(backend):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, O)) * 1e3
    ref = TrajectoryBuffer(O, A, S, 100, backend=backend)
    ref.add_episode(x.astype(np.float32), np.zeros((6, A), np.float32), np.zeros(6, np.float32), np.zeros((6, S)),
                    terminated=True, truncated=False)
    for value in (torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(x).half(), x.astype(np.float16),
                  torch.from_numpy(x), x.tolist()):
        buf = TrajectoryBuffer(O, A, S, 100, backend=backend)
        buf.add_episode(value, np.zeros((6, A)), np.zeros(6), np.zeros((6, S)), terminated=True, truncated=False)
        want = (value.float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32))
        np.testing.assert_array_equal(buf.state_dict()["observations"], want.astype(np.float32))
    # rounding to float32 is the only change: float64 input gives what a float32 cast gives
    buf = TrajectoryBuffer(O, A, S, 100, backend=backend)
    buf.add_episode(x, np.zeros((6, A)), np.zeros(6), np.zeros((6, S)), terminated=True, truncated=False)
    np.testing.assert_array_equal(buf.state_dict()["observations"], ref.state_dict()["observations"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, field", [(np.inf, "actions"), (-np.inf, "rewards"), (np.nan, "sim_states"),
                                          (1e39, "observations")])
def test_non_finite_values_name_field_value_and_first_index(backend, value, field):
    buf = filled(backend)
    before = snapshot(buf)
    args = {"observations": np.zeros((5, O)), "actions": np.zeros((5, A)), "rewards": np.zeros(5),
            "sim_states": np.zeros((5, S))}
    args[field] = args[field].copy()
    args[field][(3,) + (1,) * (args[field].ndim - 1)] = value
    args[field][4] = value  # only the first bad index is named
    shown = "inf" if value == 1e39 else str(np.float32(value) if field != "sim_states" else value)
    idx = "[3]" if field == "rewards" else "[3, 1]"
    with pytest.raises(ValueError, match=rf"{field}: contains NaN or inf \(first: {shown} at index "
                                         rf"{re.escape(idx)}, as float(32|64)\); expected finite values"):
        buf.add_episode(**args, terminated=True, truncated=False)
    assert_unchanged(buf, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", [1, 0, None, "yes", torch.tensor(True), np.array([True])], ids=repr)
def test_flags_must_be_bools(backend, flag):
    buf = filled(backend)
    before = snapshot(buf)
    ep = (np.zeros((4, O)), np.zeros((4, A)), np.zeros(4), np.zeros((4, S)))
    with pytest.raises(TypeError) as e:
        buf.add_episode(*ep, terminated=flag, truncated=False)
    assert_says(e, "terminated: expected a bool", type(flag).__name__)
    with pytest.raises(TypeError, match="truncated: expected a bool"):
        buf.add_episode(*ep, terminated=True, truncated=flag)
    buf.add_step(ep[0][0], ep[1][0], 0.0, ep[3][0])
    with pytest.raises(TypeError, match="terminated: expected a bool"):
        buf.end_episode(terminated=flag, truncated=False)
    assert buf.has_open_episode  # the refused end_episode did not close it
    buf.end_episode(terminated=np.bool_(True), truncated=False)
    assert not buf.has_open_episode and len(buf) == len(before["rewards"]) + 1


# ----------------------------------------------------------------------------------------------------------------------
# add_step / end_episode
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_step_and_end_episode_errors(backend):
    buf = filled(backend, capacity=40)
    before = snapshot(buf)
    o, a, s = np.zeros(O), np.zeros(A), np.zeros(S)
    cases = [
        (ValueError, r"obs: expected shape \[3\], got \[1, 3\]", (o[None], a, 0.0, s)),
        (ValueError, r"action: expected shape \[2\], got \[3\]", (o, np.zeros(3), 0.0, s)),
        (ValueError, r"reward: expected shape \[\], got \[1\]", (o, a, np.zeros(1), s)),
        (ValueError, r"sim_state: expected shape \[2\], got \[\]", (o, a, 0.0, 0.0)),
        (ValueError, r"reward: contains NaN or inf \(first: nan at index \[\]", (o, a, float("nan"), s)),
        (ValueError, r"obs: contains NaN or inf \(first: inf at index \[2\]", (np.array([0, 0, np.inf]), a, 0.0, s)),
        (TypeError, r"reward: expected a real floating-point array.*got dtype int64", (o, a, np.int64(1), s)),
        (TypeError, r"action: expected a real floating-point array.*got a tensor of dtype torch.int64",
         (o, torch.zeros(A, dtype=torch.int64), 0.0, s)),
        (TypeError, r"obs: expected a real floating-point array.*got NoneType of dtype object", (None, a, 0.0, s)),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            buf.add_step(*args)
    with pytest.raises(ValueError, match=r"end_episode: expected an open episode \(add_step first\), but none"):
        buf.end_episode(terminated=True, truncated=False)
    assert_unchanged(buf, before)
    # plain Python numbers are fine for the reward (ints too); an open episode blocks add_episode
    buf.add_step(o, a, 1, s)
    buf.add_step(o.tolist(), [0, 0], 2.5, torch.zeros(S, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="add_episode: an episode is still open"):
        buf.add_episode(np.zeros((2, O)), np.zeros((2, A)), np.zeros(2), np.zeros((2, S)), terminated=True,
                        truncated=False)
    for _ in range(38):
        buf.add_step(o, a, 0.0, s)
    with pytest.raises(ValueError, match=r"add_step: the open episode would exceed the buffer capacity 40"):
        buf.add_step(o, a, 0.0, s)
    assert buf.episode_lengths().tolist() == [40]  # the open episode evicted every closed one, and is intact
    buf.end_episode(terminated=False, truncated=True)


# ----------------------------------------------------------------------------------------------------------------------
# sample_windows
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_windows_errors(backend):
    empty = TrajectoryBuffer(O, A, S, 100, backend=backend)
    with pytest.raises(ValueError, match=r"sample_windows: the buffer is empty \(add episodes first\)"):
        empty.sample_windows(4, 1, seed=0)
    buf = TrajectoryBuffer(O, A, S, 100, backend=backend)
    buf.add_episode(np.zeros((5, O)), np.zeros((5, A)), np.zeros(5), np.zeros((5, S)), terminated=False,
                    truncated=True)
    buf.add_episode(np.zeros((3, O)), np.zeros((3, A)), np.zeros(3), np.zeros((3, S)), terminated=True,
                    truncated=False)
    cases = [
        (ValueError, r"batch: expected >= 1, got 0", dict(batch=0)),
        (ValueError, r"batch: expected >= 1, got -5", dict(batch=-5)),
        (ValueError, r"horizon: expected >= 1, got 0", dict(horizon=0)),
        (ValueError, r"horizon 6 exceeds the longest stored episode \(5 steps\)", dict(horizon=6)),
        (ValueError, r"seed: expected >= 0, got -1", dict(seed=-1)),
        (ValueError, r"seed: expected <= 18446744073709551615, got 18446744073709551616", dict(seed=2**64)),
        (TypeError, r"seed: expected an int, got float", dict(seed=1.0)),
        (TypeError, r"seed: expected an int, got NoneType", dict(seed=None)),
        (TypeError, r"seed: expected an int, got bool", dict(seed=True)),
        (TypeError, r"seed: expected an int, got str", dict(seed="1")),
        (TypeError, r"seed: expected an int, got Tensor", dict(seed=torch.tensor(1))),
        (TypeError, r"batch: expected an int, got float", dict(batch=4.0)),
        (TypeError, r"horizon: expected an int, got NoneType", dict(horizon=None)),
        (TypeError, r"normalize: expected a bool, got int", dict(normalize=1)),
        (TypeError, r"sim_states: expected a bool, got str", dict(sim_states="no")),
        (MemoryError, r"sample_windows: 1000000000000 windows of horizon 5 would need [\d.]+ GB .*more than this "
                      r"machine's", dict(batch=10**12)),
    ]
    for exc, msg, kw in cases:
        args = dict(batch=4, horizon=5, seed=0) | kw
        with pytest.raises(exc, match=msg):
            buf.sample_windows(**args)
    # horizon 4 fits only the truncated 5-step episode's starts 0..1 and the terminated one's (padded) 0..2
    w = buf.sample_windows(64, 4, seed=np.uint64(2**64 - 1))
    assert set(w.start_steps.tolist()) <= {0, 1, 2}
    assert buf.sample_windows(8, 4, seed=np.int64(3)).observations.shape == (8, 4, O)


# ----------------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_errors_name_the_target(backend, tmp_path):
    buf = filled(backend)
    target = tmp_path / "missing_dir" / "buf.pgbuf"
    with pytest.raises(FileNotFoundError, match=rf"cannot save the trajectory buffer to "
                                                rf"{re.escape(repr(str(target)))}: No such file or directory"):
        buf.save(target)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"cannot save the trajectory buffer to .*file/buf.pgbuf'"):
        buf.save(not_a_dir / "buf.pgbuf")
    (tmp_path / "dir.pgbuf").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot save the trajectory buffer to .*dir\.pgbuf'"):
        buf.save(tmp_path / "dir.pgbuf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.pgbuf", "file"]  # no temp file left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pgbuf"))):
        TrajectoryBuffer.load(tmp_path / "nope.pgbuf")
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        TrajectoryBuffer.load(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_checks_expected_dimensions(backend, tmp_path):
    path = tmp_path / "buf.pgbuf"
    filled(backend).save(path)
    loaded = TrajectoryBuffer.load(path, obs_dim=O, act_dim=A, sim_state_dim=S, backend=backend)
    assert (loaded.obs_dim, loaded.act_dim, loaded.sim_state_dim, len(loaded)) == (O, A, S, 39)
    for field, want, have in (("obs_dim", 11, O), ("act_dim", 3, A), ("sim_state_dim", 58, S)):
        with pytest.raises(ValueError, match=rf"^{re.escape(repr(str(path)))}: {field} is {have} in the stored "
                                             rf"buffer, expected {want}$"):
            TrajectoryBuffer.load(path, **{field: want})
    with pytest.raises(TypeError, match="obs_dim: expected an int, got float"):
        TrajectoryBuffer.load(path, obs_dim=3.0)
    sd = loaded.state_dict()
    with pytest.raises(ValueError, match=r"^state: act_dim is 2 in the stored buffer, expected 1$"):
        TrajectoryBuffer.from_state_dict(sd, act_dim=1)


@SETTINGS
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000), mode=st.sampled_from(["truncate", "flip", "append"]))
def test_load_refuses_any_damaged_file(tmp_path_factory, cut, flip, mode):
    d = tmp_path_factory.mktemp("damaged")
    path = d / "buf.pgbuf"
    filled("numpy", capacity=60).save(path)
    data = bytearray(path.read_bytes())
    if mode == "truncate":
        data = data[: cut % len(data)]
    elif mode == "flip":
        data[flip % len(data)] ^= 1 << (flip % 8)
    else:
        data += b"\0" * (1 + cut % 7)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        TrajectoryBuffer.load(path)
    assert repr(str(path)) in str(e.value)
    assert re.search(r"bad magic|format version|truncated|corrupt|checksum", str(e.value)), str(e.value)


def test_state_dict_with_wrong_types_is_refused():
    sd = filled("numpy").state_dict()
    with pytest.raises(TypeError, match="state: expected a dict of arrays, got list"):
        TrajectoryBuffer.from_state_dict([sd])
    with pytest.raises(ValueError, match=r"state: 'obs_dim' expected an integer scalar, got <U1"):
        TrajectoryBuffer.from_state_dict(dict(sd, obs_dim=np.array("x")))
    with pytest.raises(ValueError, match=r"state\['observations'\]: expected shape \[L, 3\], got \[39, 4\]"):
        TrajectoryBuffer.from_state_dict(dict(sd, observations=np.zeros((39, 4), np.float32)))
    with pytest.raises(ValueError, match=r"state\['observations'\]: expected dtype float32, got <U1"):
        TrajectoryBuffer.from_state_dict(dict(sd, observations=np.full((39, 3), "a")))
    bad = sd["rewards"].copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match=r"state\['rewards'\]: contains NaN or inf; expected finite values"):
        TrajectoryBuffer.from_state_dict(dict(sd, rewards=bad))
    with pytest.raises(MemoryError, match=r"capacity 1000000000000 transitions of obs 3, act 2, sim 2"):
        TrajectoryBuffer.from_state_dict(dict(sd, capacity=np.int64(10**12)))


_KILLED_SAVE = """
import os, signal, sys
import numpy as np
from polygrad_fast.buffer import TrajectoryBuffer
buf = TrajectoryBuffer(3, 2, 2, 50, backend="numpy")
buf.add_episode(np.zeros((5, 3)), np.zeros((5, 2)), np.zeros(5), np.zeros((5, 2)), terminated=True, truncated=False)
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # killed after the temp file is written
buf.save(sys.argv[1])
"""


@pytest.mark.parametrize("then", ["save", "load"])
def test_a_killed_save_leaves_a_temp_file_that_the_next_save_or_load_removes(tmp_path, then):
    path = tmp_path / "buf.pgbuf"
    filled("numpy").save(path)
    before = path.read_bytes()
    res = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    stale = [p.name for p in tmp_path.iterdir() if p.name != "buf.pgbuf"]
    assert len(stale) == 1 and stale[0].startswith(".buf.pgbuf.") and stale[0].endswith(".tmp"), stale
    assert path.read_bytes() == before  # the old file is intact
    (tmp_path / "other.pgbuf").write_bytes(b"")  # other targets' files and the user's files are not touched
    (tmp_path / ".other.pgbuf.1.abc.tmp").write_bytes(b"")
    if then == "save":
        filled("numpy").save(path)
    else:
        TrajectoryBuffer.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pgbuf.1.abc.tmp", "buf.pgbuf", "other.pgbuf"]


def test_temp_files_of_live_writers_are_kept(tmp_path):
    path = tmp_path / "buf.pgbuf"
    mine = tmp_path / f".buf.pgbuf.{os.getpid()}.abc123.tmp"  # another thread of this process is saving
    mine.write_bytes(b"")
    assert remove_stale_temp_files(path) == [] and mine.exists()
