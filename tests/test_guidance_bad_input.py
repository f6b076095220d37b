"""GuidanceScaleTuner against hostile input: invalid settings, non-finite act_std, corrupt state dicts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polygrad_fast.guidance import GuidanceScaleTuner

HYPOTHESIS = settings(max_examples=50, deadline=None)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


@HYPOTHESIS
@given(initial=ANY_FLOAT, lr=ANY_FLOAT, target=ANY_FLOAT)
def test_constructor_accepts_exactly_finite_positive_settings(initial, lr, target):
    f32 = torch.finfo(torch.float32)
    ok = all(math.isfinite(v) for v in (initial, lr, target)) and f32.tiny <= initial <= f32.max and lr >= 0 \
        and target > 0
    if ok:
        tuner = GuidanceScaleTuner(initial, lr, target)
        assert tuner.scale.item() == pytest.approx(initial, rel=1e-5)
    else:
        with pytest.raises(ValueError, match="initial guidance scale|lr|target_std"):
            GuidanceScaleTuner(initial, lr, target)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(initial=-0.1), "initial guidance scale must be a finite number > 0, got -0.1"),
    (dict(lr=math.nan), "lr must be a finite number >= 0, got nan"),
    (dict(target_std=-1.0), "target_std must be a finite number > 0, got -1.0"),
    (dict(target_std=math.inf), "target_std must be a finite number > 0, got inf"),
    (dict(initial=True), "initial guidance scale must be a finite number"),
    (dict(initial=1e-300), "initial guidance scale must be in float32's normal range"),
])
def test_constructor_messages(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GuidanceScaleTuner(**kwargs)


@HYPOTHESIS
@given(bad=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.floats(max_value=-1e-30),
                     st.floats(min_value=1e5, allow_infinity=False)),
       as_tensor=st.booleans())
def test_bad_act_std_is_skipped_and_counted_without_changing_the_scale(bad, as_tensor):
    """Skipped: NaN, inf, negative act_std, and a finite act_std whose step would overflow exp(log_scale)."""
    tuner = GuidanceScaleTuner(initial=0.005, lr=3e-3)
    reference = GuidanceScaleTuner(initial=0.005, lr=3e-3)
    for t in (tuner, reference):
        t.update(1.3)
    # 1e5 * 3e-3 = 300 > log(float32 max) ~ 88.7: the step itself overflows the scale
    tuner.update(torch.tensor(bad) if as_tensor else bad)
    assert torch.equal(tuner.log_scale, reference.log_scale)
    assert int(tuner.skipped_updates) == 1
    for t in (tuner, reference):
        t.update(torch.tensor(0.7))
    assert torch.equal(tuner.log_scale, reference.log_scale) and math.isfinite(tuner.scale.item())


@HYPOTHESIS
@given(act_std=st.floats(min_value=0.0, max_value=100.0))
def test_valid_act_std_is_applied(act_std):
    tuner = GuidanceScaleTuner(initial=0.005, lr=3e-3)
    tuner.update(act_std)
    assert tuner.log_scale.item() == pytest.approx(math.log(0.005) + 3e-3 * (act_std - 1.0), abs=1e-5)
    assert int(tuner.skipped_updates) == 0


@pytest.mark.parametrize("value,exc,pattern", [
    (torch.ones(3), ValueError, r"act_std must have one element, got shape \[3\]"),
    (torch.ones(0), ValueError, r"one element, got shape \[0\]"),
    ("1.0", TypeError, "act_std must be a one-element tensor or a number, got str"),
    (None, TypeError, "got NoneType"),
    (True, TypeError, "got bool"),
])
def test_malformed_act_std_raises(value, exc, pattern):
    tuner = GuidanceScaleTuner()
    with pytest.raises(exc, match=pattern):
        tuner.update(value)
    assert tuner.scale.item() == pytest.approx(0.005)


def test_one_element_tensors_of_any_shape_and_dtype_are_accepted():
    tuner = GuidanceScaleTuner(initial=1.0, lr=0.5)
    tuner.update(torch.tensor([[1.5]], dtype=torch.float64))
    assert tuner.scale.dim() == 0 and tuner.log_scale.item() == pytest.approx(0.25)


def test_state_dict_round_trip_keeps_the_skip_count():
    tuner = GuidanceScaleTuner()
    tuner.update(math.nan)
    other = GuidanceScaleTuner(initial=1.0)
    other.load_state_dict(tuner.state_dict())
    assert int(other.skipped_updates) == 1 and torch.equal(other.log_scale, tuner.log_scale)


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda s: s.__setitem__("log_scale", torch.tensor(math.nan)), "log_scale in the state dict is nan"),
    (lambda s: s.__setitem__("log_scale", torch.zeros(2)), "log_scale must be a one-element tensor"),
    (lambda s: s.__setitem__("lr", -1.0), "lr must be a finite number >= 0"),
    (lambda s: s.__setitem__("target_std", 0.0), "target_std must be a finite number > 0"),
    (lambda s: s.pop("lr"), r"lacks \['lr'\]"),
])
def test_corrupt_state_dicts_are_refused_and_nothing_is_loaded(corrupt, pattern):
    tuner = GuidanceScaleTuner(initial=0.02, lr=1e-2)
    state = GuidanceScaleTuner(initial=0.5).state_dict()
    corrupt(state)
    with pytest.raises(ValueError, match=pattern):
        tuner.load_state_dict(state)
    assert tuner.scale.item() == pytest.approx(0.02) and tuner.lr == 1e-2
