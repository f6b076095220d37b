"""DiffusionTrainer / DiffusionLoss against hostile input: bad batches, non-finite steps, foreign state dicts, configs.

A rejected step must leave model, EMA, optimiser, scaler, generator and step tensor-equal to what they were, and the
next good step must equal the step of a trainer that never saw the bad batch.
"""
import math
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.diffusion import DiffusionLoss
from polygrad_fast.diffusion_trainer import DiffusionTrainer, DiffusionTrainerConfig, NonFiniteUpdateError, cloned
from polygrad_fast.schedule import NoiseSchedule

from test_a2c import assert_tree_equal

B, H, O, A, T = 6, 4, 3, 2, 16
FIELDS = ("observations", "actions", "rewards", "terminals")
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CONFIG = DiffusionTrainerConfig(step_start_ema=2, update_ema_every=1, seed=3)


def make_trainer(seed=0, hidden=32, config=CONFIG) -> DiffusionTrainer:
    torch.manual_seed(seed)
    return DiffusionTrainer(ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=hidden, num_layers=2)),
                            NoiseSchedule(T), config)


def window_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return types.SimpleNamespace(observations=torch.randn(B, H, O, generator=g), actions=torch.randn(B, H, A, generator=g),
                                 rewards=torch.randn(B, H, generator=g), terminals=torch.randn(B, H, generator=g))


def snapshot(trainer: DiffusionTrainer) -> dict:
    return cloned(trainer.state_dict())


@pytest.fixture(scope="module")
def warm_state():
    t = make_trainer()
    for s in range(4):  # past step_start_ema: the EMA averages
        t.train_step(window_batch(s))
    return snapshot(t)


def warm_trainer(state, seed=7):
    t = make_trainer(seed)
    t.load_state_dict(state)
    return t


# ------------------------------------------------------------------------------------------------ non-finite steps
@pytest.mark.parametrize("field", FIELDS)
def test_huge_finite_values_raise_change_nothing_and_a_good_step_follows(warm_state, field):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    bad = window_batch(9)
    getattr(bad, field)[(1, 2)] = 3e38
    with pytest.raises(NonFiniteUpdateError, match=rf"diffusion loss is (inf|nan): batch\.{field} contain values "
                                                   r"of magnitude 3e\+38.*unchanged"):
        t.train_step(bad)
    assert_tree_equal(before, snapshot(t))
    fresh = warm_trainer(warm_state, seed=11)
    good = window_batch(10)
    assert t.train_step(good) == fresh.train_step(good)
    assert_tree_equal(snapshot(t), snapshot(fresh))


class NaNGradDenoiser(nn.Module):
    """x0_hat = 0.5 x + 0·sqrt(z) with z = 0: a finite loss whose gradient w.r.t. z is 0·inf = NaN."""

    horizon, transition_dim, action_dim = H, O + 2, A

    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, actions, t):
        return 0.5 * self.w * x + 0.0 * self.z.sqrt()


def test_non_finite_gradient_with_a_finite_loss_is_refused():
    t = DiffusionTrainer(NaNGradDenoiser(), NoiseSchedule(T), CONFIG)
    before = snapshot(t)
    with pytest.raises(NonFiniteUpdateError, match="gradient norm is not finite.*networks themselves diverged"):
        t.train_step(window_batch(0))
    assert_tree_equal(before, snapshot(t))
    assert t.step == 0 and all(p.grad is None for p in t.model.parameters())


# ------------------------------------------------------------------------------------------------ bad batches
@HYPOTHESIS
@given(field=st.sampled_from(FIELDS), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       flat_index=st.integers(0, 10_000))
def test_non_finite_fields_are_rejected_naming_the_field(warm_state, field, value, flat_index):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    b = window_batch(1)
    x = getattr(b, field)
    x.view(-1)[flat_index % x.numel()] = value
    with pytest.raises(ValueError, match=rf"batch\.{field} contain NaN or inf \(nothing was changed\)"):
        t.train_step(b)
    assert_tree_equal(before, snapshot(t))  # the generator too: t and noise are drawn again next time


@HYPOTHESIS
@given(field=st.sampled_from(FIELDS), shape=st.lists(st.integers(0, 7), min_size=0, max_size=4))
def test_wrong_shapes_are_rejected_naming_the_field(warm_state, field, shape):
    b = window_batch(0)
    if list(shape) == list(getattr(b, field).shape):
        return
    setattr(b, field, torch.zeros(shape))
    with pytest.raises(ValueError, match=r"batch\.(observations|actions|rewards|terminals)"):
        warm_trainer(warm_state).train_step(b)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("bad,exc,pattern", [
    (lambda x: x.double(), TypeError, "must be torch.float32 \\(the denoiser's dtype\\), got torch.float64"),
    (lambda x: x.long(), TypeError, "must be torch.float32"),
    (lambda x: x.numpy(), TypeError, "must be a torch.Tensor, got ndarray"),
    (lambda x: torch.empty_like(x, device="meta"), ValueError, "is on the meta device"),
])
def test_wrong_types_and_dtypes_are_rejected(warm_state, field, bad, exc, pattern):
    b = window_batch(0)
    setattr(b, field, bad(getattr(b, field)))
    with pytest.raises(exc, match=rf"batch\.{field} {pattern}"):
        warm_trainer(warm_state).train_step(b)


def test_empty_batch_is_rejected():
    b = window_batch(0)
    for name in FIELDS:
        setattr(b, name, getattr(b, name)[:0])
    with pytest.raises(ValueError, match="the batch is empty"):
        make_trainer().train_step(b)


# ------------------------------------------------------------------------------------------------ state dicts
def test_state_dict_from_another_config_or_size_is_refused(warm_state):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    other = make_trainer(config=DiffusionTrainerConfig(lr=1e-3, loss_type="l1", step_start_ema=2, update_ema_every=1,
                                                       seed=3))
    with pytest.raises(ValueError, match=r"nothing was loaded.*config lr 0\.001 \(state dict\) vs 0\.0003 \(this "
                                         r"trainer\); config loss_type 'l1' \(state dict\) vs 'l2'"):
        t.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match=r"model\.trunk\.input\.weight: shape \[16, .*\] in the state dict but \[32, "
                                         r".*more shape mismatches"):
        t.load_state_dict(make_trainer(hidden=16).state_dict())
    assert_tree_equal(before, snapshot(t))


def test_saved_predict_epsilon_true_is_refused_and_false_is_ignored(warm_state):
    t = warm_trainer(warm_state)
    state = snapshot(t)
    state["config"]["predict_epsilon"] = True
    with pytest.raises(ValueError, match="trained with predict_epsilon=True .*x0-prediction denoisers only"):
        t.load_state_dict(state)
    with pytest.raises(ValueError, match="predict_epsilon=True"):
        DiffusionTrainerConfig.from_saved({"predict_epsilon": True})
    state["config"]["predict_epsilon"] = False
    t.load_state_dict(state)
    assert t.step == 4
    assert DiffusionTrainerConfig.from_saved({"predict_epsilon": False, "lr": 1e-3}) == DiffusionTrainerConfig(lr=1e-3)


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda s: s["model"]["trunk.input.weight"].view(-1).__setitem__(3, math.nan),
     "model.trunk.input.weight contains NaN or inf"),
    (lambda s: s["ema"]["trunk.output.bias"].fill_(-math.inf), "ema.trunk.output.bias contains NaN or inf"),
    (lambda s: s.pop("generator"), "missing key 'generator'"),
    (lambda s: s["model"].pop("trunk.norm.weight"), r"model: missing trunk.norm.weight \[32\]"),
    (lambda s: s["config"].__setitem__("colour", 1), r"unknown DiffusionTrainerConfig fields \['colour'\]"),
    (lambda s: s["config"].__setitem__("lr", -1.0), "lr must be > 0"),
    (lambda s: s.__setitem__("step", -3), "step must be an int >= 0, got -3"),
    (lambda s: s.__setitem__("generator", torch.zeros(3)), "generator: not a generator state"),
])
def test_corrupt_state_dicts_are_refused_and_nothing_is_loaded(warm_state, corrupt, pattern):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    state = snapshot(t)
    corrupt(state)
    with pytest.raises(ValueError, match=pattern):
        t.load_state_dict(state)
    assert_tree_equal(before, snapshot(t))


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("field,value,pattern", [
    ("loss_type", "huber", r"loss_type must be one of \['l1', 'l2'\], got 'huber'"),
    ("mixed_precision", "int8", r"mixed_precision must be one of \['auto', 'fp32', 'fp16', 'bf16'\], got 'int8'"),
    ("lr", 0.0, "lr must be > 0"), ("lr", math.inf, "lr must be a finite number"), ("lr", "3e-4", "lr must be"),
    ("batch_size", 0, "batch_size must be >= 1"), ("batch_size", 2.5, "batch_size must be a finite int"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"), ("ema_decay", -0.1, "ema_decay"),
    ("step_start_ema", -1, "step_start_ema must be >= 0"), ("update_ema_every", 0, "update_ema_every must be >= 1"),
    ("action_condition_noise_scale", math.nan, "action_condition_noise_scale must be a finite number"),
    ("seed", -1, "seed must be >= 0"), ("seed", True, "seed must be a finite int"),
])
def test_invalid_config_values_raise_at_construction(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        DiffusionTrainerConfig(**{field: value})


def test_predict_epsilon_is_no_longer_an_option():
    with pytest.raises(TypeError, match="predict_epsilon"):
        DiffusionTrainerConfig(predict_epsilon=True)
    with pytest.raises(TypeError, match="predict_epsilon"):
        DiffusionLoss(NoiseSchedule(T), predict_epsilon=True)


@HYPOTHESIS
@given(lr=st.floats(allow_nan=True, allow_infinity=True), decay=st.floats(allow_nan=True, allow_infinity=True))
def test_lr_and_ema_decay_ranges(lr, decay):
    ok = math.isfinite(lr) and lr > 0 and math.isfinite(decay) and 0 <= decay < 1
    if ok:
        DiffusionTrainerConfig(lr=lr, ema_decay=decay)
    else:
        with pytest.raises(ValueError, match="lr|ema_decay"):
            DiffusionTrainerConfig(lr=lr, ema_decay=decay)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(loss_type="l3"), "loss_type must be one of"),
    (dict(action_condition_noise_scale=-1.0), "action_condition_noise_scale must be a finite number >= 0"),
])
def test_loss_arguments_are_validated(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DiffusionLoss(NoiseSchedule(T), **kwargs)


def test_trainer_rejects_a_non_config():
    with pytest.raises(TypeError, match="config must be a DiffusionTrainerConfig, got dict"):
        DiffusionTrainer(NaNGradDenoiser(), NoiseSchedule(T), {"lr": 1e-3})


def test_two_trainers_loaded_from_one_state_dict_share_no_optimizer_state(warm_state):
    """torch's Optimizer.load_state_dict keeps the given tensors: without a copy both trainers would step the same
    Adam moments and the second one's update would start from the first one's."""
    a, b = warm_trainer(warm_state), warm_trainer(warm_state, seed=11)
    good = window_batch(10)
    assert a.train_step(good) == b.train_step(good)
    assert_tree_equal(snapshot(a), snapshot(b))
