"""A2CTrainer against hostile input: bad batches, non-finite updates, foreign state dicts, invalid configs.

Every rejected call must leave the trainer's full state (networks, target critic, the three optimisers with their
step counts, log actor LR, step) tensor-equal to what it was, and a later good update must match the update of a
trainer that never saw the bad call.
"""
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polygrad_fast.a2c import A2CConfig, A2CTrainer
from polygrad_fast.diffusion_trainer import NonFiniteUpdateError
from polygrad_fast.policy import Actor, Critic
from polygrad_fast.sampler import ImaginedBatch

from test_a2c import assert_tree_equal, make_batch, snapshot

O, A, B, H = 3, 2, 8, 4
# The line search is not what these tests are about; without it an update is ~10x faster.
FAST = dict(linesearch=False)
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def trainer(seed=0, hidden=16, **config) -> A2CTrainer:
    torch.manual_seed(seed)
    return A2CTrainer(Actor(O, A, hidden=hidden), Critic(O, hidden=hidden), A2CConfig(**config))


def batch(seed=0) -> ImaginedBatch:
    return make_batch(B=B, H=H, seed=seed)


def with_field(b: ImaginedBatch, name: str, value: torch.Tensor) -> ImaginedBatch:
    return replace(b, **{name: value})


@pytest.fixture(scope="module")
def warm_state():
    """A trainer state after two updates (non-empty AdamW moments, moved target critic, learned LR)."""
    t = trainer(**FAST)
    for s in range(2):
        t.update(batch(s))
    return snapshot(t)


def warm_trainer(state, seed=5, **config) -> A2CTrainer:
    t = trainer(seed=seed, **(FAST | config))
    t.load_state_dict(state)
    return t


# ------------------------------------------------------------------------------------------------ non-finite updates
@pytest.mark.parametrize("field,index", [("rewards", (0, 0)), ("observations", (1, 2, 0)), ("actions", (2, 1, 1))])
def test_huge_finite_values_raise_restore_and_a_good_update_follows(field, index):
    """3e38 is finite (passes the batch check) but its square overflows: the update must fail as a whole."""
    t = trainer()  # with the line search
    t.update(batch(0))
    before = snapshot(t)
    bad = batch(7)
    getattr(bad, field)[index] = 3e38
    with pytest.raises(NonFiniteUpdateError, match=rf"batch\.{field} contain values of magnitude 3e\+38") as info:
        t.update(bad)
    assert "restored" in str(info.value)
    assert_tree_equal(before, snapshot(t))
    assert all(p.grad is None for p in t.actor.parameters())
    # the next good update is exactly that of a fresh trainer loaded with the pre-bad-batch state
    fresh = trainer(seed=9)
    fresh.load_state_dict(before)
    good = batch(8)
    assert t.update(good) == fresh.update(good)
    assert_tree_equal(snapshot(t), snapshot(fresh))


def test_huge_rewards_name_the_critic_loss(warm_state):
    t = warm_trainer(warm_state)
    bad = batch(3)
    bad.rewards[0, 0] = 3e38
    with pytest.raises(NonFiniteUpdateError, match="critic loss is inf"):
        t.update(bad)


def test_log_only_non_finite_raises_and_changes_nothing(warm_state):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    bad = batch(3)
    bad.rewards[1, 1] = -3e38
    with pytest.raises(NonFiniteUpdateError, match="log_only: nothing was changed"):
        t.update(bad, log_only=True)
    assert_tree_equal(before, snapshot(t))


def test_non_finite_line_search_result_is_rolled_back(monkeypatch):
    """A line search whose measured |Δ log π| is inf (here forced) must not leave its re-steps behind."""
    t = trainer()
    t.update(batch(0))
    before = snapshot(t)
    monkeypatch.setattr(t, "_log_probs", lambda obs, act: torch.full(act.shape[:-1], float("inf")))
    with pytest.raises(NonFiniteUpdateError, match="line-search result update_delta_logprob_final is inf"):
        t.update(batch(4))
    assert_tree_equal(before, snapshot(t))


def test_non_finite_gradient_from_the_networks_is_rolled_back(warm_state):
    """A finite batch, but a critic weight at 1e38: V overflows, so its loss and gradient are not finite."""
    t = warm_trainer(warm_state)
    with torch.no_grad():
        t.critic.mlp[-1].weight.fill_(1e38)
        t.critic_target.mlp[-1].weight.fill_(1e38)
    before = snapshot(t)
    with pytest.raises(NonFiniteUpdateError, match="critic loss is (inf|nan)") as info:
        t.update(batch(5))
    assert "networks themselves diverged" in str(info.value)
    assert_tree_equal(before, snapshot(t))


def test_any_exception_inside_the_update_restores_the_state(warm_state, monkeypatch):
    t = warm_trainer(warm_state)
    before = snapshot(t)

    def boom(_):
        raise KeyboardInterrupt  # e.g. Ctrl-C after both optimisers stepped

    monkeypatch.setattr(t, "_update_actor_lr", boom)
    with pytest.raises(KeyboardInterrupt):
        t.update(batch(6))
    assert_tree_equal(before, snapshot(t))


# ------------------------------------------------------------------------------------------------ bad batches
@HYPOTHESIS
@given(field=st.sampled_from(["observations", "actions", "rewards"]), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       flat_index=st.integers(0, 10_000))
def test_non_finite_fields_are_rejected_naming_the_field(warm_state, field, value, flat_index):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    b = batch(1)
    x = getattr(b, field).clone()
    x.view(-1)[flat_index % x.numel()] = value
    with pytest.raises(ValueError, match=rf"batch\.{field} contains NaN or inf"):
        t.update(with_field(b, field, x))
    assert_tree_equal(before, snapshot(t))


@HYPOTHESIS
@given(value=st.floats(allow_nan=True, allow_infinity=True, width=32).filter(lambda v: v not in (0.0, 1.0)),
       flat_index=st.integers(0, B * H - 1))
def test_terminals_other_than_zero_and_one_are_rejected(warm_state, value, flat_index):
    t = warm_trainer(warm_state)
    b = batch(1)
    term = b.terminals.clone()
    term.view(-1)[flat_index] = value
    with pytest.raises(ValueError, match="batch.terminals contains values other than 0 and 1"):
        t.update(with_field(b, "terminals", term))


@HYPOTHESIS
@given(field=st.sampled_from(["observations", "actions", "rewards", "terminals"]),
       shape=st.lists(st.integers(0, 6), min_size=0, max_size=4))
def test_wrong_shapes_are_rejected_naming_the_field(warm_state, field, shape):
    good = batch(0)
    if list(shape) == list(getattr(good, field).shape) or (field == "observations" and len(shape) == 3
                                                           and shape[2] == O and shape[0] >= 1 and shape[1] >= 2):
        return  # the right shape, or another valid [B', H', O] (then the other fields are the mismatched ones)
    t = warm_trainer(warm_state)
    # a wrong observations shape is named as such; the other fields are checked against it
    with pytest.raises(ValueError, match=rf"batch\.{field}"):
        t.update(with_field(good, field, torch.zeros(shape)))


@pytest.mark.parametrize("field", ["observations", "actions", "rewards", "terminals"])
@pytest.mark.parametrize("bad,exc,pattern", [
    (lambda x: x.double(), TypeError, "must be torch.float32"),
    (lambda x: x.half(), TypeError, "must be torch.float32"),
    (lambda x: x.long(), TypeError, "must be torch.float32"),
    (lambda x: x.tolist(), TypeError, "must be a torch.Tensor, got list"),
    (lambda x: None, TypeError, "must be a torch.Tensor, got NoneType"),
    (lambda x: torch.empty_like(x, device="meta"), ValueError, "is on meta but the actor on cpu"),
])
def test_wrong_types_dtypes_devices_are_rejected(warm_state, field, bad, exc, pattern):
    t = warm_trainer(warm_state)
    b = batch(0)
    with pytest.raises(exc, match=rf"batch\.{field} {pattern}"):
        t.update(with_field(b, field, bad(getattr(b, field))))


def test_a_batch_without_fields_is_rejected():
    with pytest.raises(TypeError, match="batch.observations must be a torch.Tensor, got NoneType"):
        trainer().update(object())


# ------------------------------------------------------------------------------------------------ state dicts
def test_state_dict_from_another_config_is_refused_naming_the_fields(warm_state):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    other = trainer(**(FAST | dict(lr_actor=1e-3, gamma=0.9)))
    with pytest.raises(ValueError, match=r"nothing was loaded.*config gamma 0\.9 \(state dict\) vs 0\.99 \(this "
                                         r"trainer\); config lr_actor 0\.001 \(state dict\) vs 3e-05"):
        t.load_state_dict(other.state_dict())
    assert_tree_equal(before, snapshot(t))


def test_state_dict_from_other_network_sizes_is_refused(warm_state):
    t = warm_trainer(warm_state)
    before = snapshot(t)
    wide = trainer(hidden=32, **FAST)
    with pytest.raises(ValueError, match=r"actor hidden 32 \(state dict\) vs 16 .*critic hidden 32 .*"
                                         r"actor\.mlp\.0\.weight: shape \[32, 3\] in the state dict but \[16, 3\] here"):
        t.load_state_dict(wide.state_dict())
    fixed_std = A2CTrainer(Actor(O, A, hidden=16, learned_std=False), Critic(O, hidden=16), A2CConfig(**FAST))
    with pytest.raises(ValueError, match=r"actor learned_std False \(state dict\) vs True .*actor: missing logstd"):
        t.load_state_dict(fixed_std.state_dict())
    assert_tree_equal(before, snapshot(t))


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda s: s["actor"]["mlp.0.weight"].view(-1).__setitem__(0, math.nan), "actor.mlp.0.weight contains NaN or inf"),
    (lambda s: s["critic_target"]["mlp.3.bias"].fill_(math.inf), "critic_target.mlp.3.bias contains NaN or inf"),
    (lambda s: s.__setitem__("log_actor_lr", torch.tensor(math.nan)), "log_actor_lr contains NaN or inf"),
    (lambda s: s.pop("optimizer_critic"), "missing key 'optimizer_critic'"),
    (lambda s: s["config"].pop("gamma"), "config gamma missing in the state dict"),
    (lambda s: s.__setitem__("step", "3"), "step must be an int >= 0, got '3'"),
    (lambda s: s["config"].__setitem__("colour", "red"), "colour 'red' is not a field of A2CConfig"),
    (lambda s: s["optimizer_actor"]["state"][0].__setitem__("exp_avg", torch.zeros(5)),  # parameter 0: logstd [2]
     "optimizer_actor: state exp_avg of parameter 0 has shape"),
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
@HYPOTHESIS
@given(field=st.sampled_from(["gamma", "lambda_gae", "target_ema", "lr_actor", "lr_critic", "actorlr_lr",
                              "target_update", "entropy_weight", "weight_decay", "grad_clip", "linesearch_tolerance",
                              "linesearch_ratio"]),
       value=st.floats(allow_nan=True, allow_infinity=True))
def test_numeric_config_fields_are_range_checked(field, value):
    bounds = {"gamma": (0, 1, True), "lambda_gae": (0, 1, True), "target_ema": (0, 1, True),
              "linesearch_tolerance": (0, 1, "half"), "linesearch_ratio": (0, 1, False)}
    if field in bounds:
        lo, hi, closed = bounds[field]
        ok = (lo <= value <= hi) if closed is True else (lo <= value < hi) if closed == "half" else (lo < value < hi)
    elif field in ("entropy_weight", "weight_decay"):
        ok = value >= 0
    else:
        ok = value > 0
    ok = ok and math.isfinite(value)
    if ok:
        assert getattr(A2CConfig(**{field: value}), field) == value
    else:
        with pytest.raises(ValueError, match=field):
            A2CConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("linesearch_max_iters", 2.0), ("linesearch_max_iters", True),
                                         ("gamma", "0.9"), ("lr_actor", None), ("linesearch", "yes")])
def test_wrongly_typed_config_fields_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        A2CConfig(**{field: value})


def test_trainer_rejects_a_non_config():
    with pytest.raises(TypeError, match="config must be an A2CConfig, got dict"):
        A2CTrainer(Actor(O, A, hidden=8), Critic(O, hidden=8), {"gamma": 0.9})


def test_two_trainers_loaded_from_one_state_dict_share_no_optimizer_state(warm_state):
    """As for the diffusion trainer: the loaded AdamW moments must be copies, not the state dict's tensors."""
    state = warm_trainer(warm_state).state_dict()  # live tensors, as a checkpoint save would pass them
    a, b = warm_trainer(state), warm_trainer(state, seed=11)
    assert a.update(batch(3)) == b.update(batch(3))
    assert_tree_equal(snapshot(a), snapshot(b))


def test_trainer_rejects_other_network_types():
    with pytest.raises(TypeError, match="need a policy.Actor and a policy.Critic, got Linear and Critic"):
        A2CTrainer(torch.nn.Linear(O, A), Critic(O, hidden=8))
