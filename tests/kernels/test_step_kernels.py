"""The fused kernels against the reference's paper-style twins (step t) and against the torch row-level ops they
fuse (polygrad_fast.step_ops), element by element, with explicit noise.

Runs under the Triton interpreter without a GPU (see conftest.py), so shapes stay tiny and each call is one or a
few programs. fp32 must agree to 1e-6; bf16 inputs are compared with the twin run on the upcast values.
"""
import itertools

import pytest
import torch

from polygrad_fast import step_ops as torch_ops
from polygrad_fast.kernels import action_update_at, q_sample, state_update_at
from polygrad_fast.reference import step_ops as ref
from polygrad_fast.schedule import NoiseSchedule

T = 32
O, A = 11, 3  # non-powers of 2 (D = O + 2 = 13)
SHAPES = [(1, 1), (3, 10), (7, 50), (1, 50), (7, 1)]  # (B, H)
STEPS = [T - 1, 20, 10, 1, 0]  # t > 10, the clamped tail 1 <= t <= 10, and the last step t = 0
FP32_TOL = dict(atol=1e-6, rtol=1e-6)
# bf16 keeps 8 significant bits: rounding the fp32 result (round-to-nearest on GPUs, truncation in the Triton
# interpreter) moves it by less than 2^-7 of its magnitude; the fp32 math before the store is the twin's.
BF16_TOL = dict(atol=1e-6, rtol=2.0**-7)


@pytest.fixture(scope="module")
def table():
    return NoiseSchedule(T, tau=1.0).step_table()


def _randn(*shape, gen, device, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _state_inputs(B, H, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = O + 2
    return dict(
        x=_randn(B, H, D, gen=g, device=device, dtype=dtype),
        x0_pred=_randn(B, H, D, gen=g, device=device, dtype=dtype),
        start_obs=_randn(B, O, gen=g, device=device, dtype=dtype),
        obs_mean=_randn(O, gen=g, device=device),
        obs_scale=(torch.rand(O, generator=g) + 0.5).to(device),
        noise=_randn(B, H, D, gen=g, device=device, dtype=dtype),
    )


def _action_inputs(B, H, device, dtype=torch.float32, seed=1, per_dim_std=False):
    g = torch.Generator().manual_seed(seed)
    std = torch.rand(A, generator=g) + 0.2 if per_dim_std else torch.rand(B, H, A, generator=g) + 0.2
    return dict(
        actions=_randn(B, H, A, gen=g, device=device, dtype=dtype),
        policy_mean=_randn(B, H, A, gen=g, device=device, dtype=dtype).tanh(),
        policy_std=std.to(device=device, dtype=dtype),
        act_mean=_randn(A, gen=g, device=device),
        act_scale=(torch.rand(A, generator=g) + 0.5).to(device),
        noise=_randn(B, H, A, gen=g, device=device, dtype=dtype),
    )


def guided_state_update(x, x0_pred, start_obs, t, step_table, obs_mean, obs_scale, clip_state_change, noise,
                        states_for_guidance="recon"):
    """Kernel A at step t, t resolved as the sampler resolves it (the reference twin's signature)."""
    clip = clip_state_change if t <= torch_ops.CLIP_STATE_CHANGE_MAX_T else None
    return state_update_at(x, x0_pred, start_obs, step_table[t], obs_mean, obs_scale, clip, None if t == 0 else noise,
                           states_for_guidance)


def guided_action_update(actions, policy_mean, policy_std, act_mean, act_scale, t, step_table, guidance_scale,
                         clip_std, noise, action_noise_scale=1.0, guidance_type="grad"):
    """Kernel B at step t (the reference twin's signature)."""
    return action_update_at(actions, policy_mean, policy_std, act_mean, act_scale, step_table[t], guidance_scale,
                            clip_std, noise, action_noise_scale, guidance_type, t == 0)


def _upcast(inputs):
    return {k: v.float() for k, v in inputs.items()}


def _as_tuple(out):
    return (out,) if torch.is_tensor(out) else out


def _assert_outputs(fast, expected, dtype, tol):
    for f, e in zip(_as_tuple(fast), _as_tuple(expected), strict=True):
        assert f.dtype == dtype and f.shape == e.shape
        torch.testing.assert_close(f.float().cpu(), e.float().cpu(), **tol)


@pytest.mark.parametrize("B,H", SHAPES)
def test_state_update_matches_twin(B, H, device, table):
    inputs = _state_inputs(B, H, device)
    tab = table.to(device)
    for t, clip, sfg in itertools.product(STEPS, (0.25, None), ref.STATES_FOR_GUIDANCE):
        args = dict(inputs, t=t, step_table=tab, clip_state_change=clip, states_for_guidance=sfg)
        _assert_outputs(guided_state_update(**args), ref.guided_state_update(**args), torch.float32, FP32_TOL)


def test_row_level_ops_match_twins(device, table):
    """The ops the sampler swaps in: step t resolved by the caller into (coef row, clip switch, noise, last),
    against the torch ops of the same signature."""
    states, acts = _state_inputs(3, 10, device), _action_inputs(3, 10, device, per_dim_std=True)
    coef = table[7].to(device)
    for clip, with_noise, sfg in itertools.product((0.25, None), (True, False), ref.STATES_FOR_GUIDANCE):
        args = dict(states, coef=coef, clip_state_change=clip, states_for_guidance=sfg)
        args["noise"] = args["noise"] if with_noise else None
        _assert_outputs(state_update_at(**args), torch_ops.state_update_at(**args), torch.float32, FP32_TOL)
    for gtype, last in itertools.product(torch_ops.GUIDANCE_TYPES, (False, True)):
        args = dict(acts, coef=coef, guidance_scale=0.3, clip_std=2.0, action_noise_scale=0.7, guidance_type=gtype,
                    last=last)
        _assert_outputs(action_update_at(**args), torch_ops.action_update_at(**args), torch.float32, FP32_TOL)


def test_state_update_clamp_and_noise_paths_are_exercised(device, table):
    """The option grid above is only meaningful if the clamp bites and t = 0 really drops the noise."""
    inputs = _state_inputs(3, 10, device)
    tab = table.to(device)
    clamped, _, _ = guided_state_update(**inputs, t=5, step_table=tab, clip_state_change=0.25)
    free, _, _ = guided_state_update(**inputs, t=5, step_table=tab, clip_state_change=None)
    assert not torch.equal(clamped, free)
    no_noise = dict(inputs, noise=None)
    x_next, mean, _ = guided_state_update(**no_noise, t=0, step_table=tab, clip_state_change=0.25)
    torch.testing.assert_close(x_next[:, 1:], mean[:, 1:], atol=0, rtol=0)


@pytest.mark.parametrize("B,H", SHAPES)
def test_action_update_matches_twin(B, H, device, table):
    tab = table.to(device)
    for per_dim_std in (False, True):
        inputs = _action_inputs(B, H, device, per_dim_std=per_dim_std)
        for t, clip, gtype, w in itertools.product(STEPS, (2.0, None), ref.GUIDANCE_TYPES, (0.3, "tensor")):
            if w == "tensor":
                if gtype != "grad":
                    continue
                w = torch.tensor(0.3, device=device)
            args = dict(inputs, t=t, step_table=tab, guidance_scale=w, clip_std=clip, action_noise_scale=0.7,
                        guidance_type=gtype)
            _assert_outputs(guided_action_update(**args), ref.guided_action_update(**args), torch.float32, FP32_TOL)


@pytest.mark.parametrize("B,H", [(3, 10), (7, 1)])
def test_action_update_compounds_over_the_trained_steps_a_row_spans(B, H, device):
    """Rows of respaced chains (T = 32, K = 17 and 3: spans of 2 and 15-16 trained steps): the kernel's pull and
    noise against the twin's step-by-step ones, for weak pulls (w / std^2 << 1), strong ones and the cap
    (w / std^2 >= 1 for the smaller stds)."""
    inputs = _action_inputs(B, H, device)
    for K, w in itertools.product((17, 3), (0.003, 0.1, 0.5)):
        _, tab = NoiseSchedule(T, tau=1.0).respaced(K)
        args = dict(inputs, t=1, step_table=tab.to(device), guidance_scale=w, clip_std=3.0, guidance_type="grad")
        _assert_outputs(guided_action_update(**args), ref.guided_action_update(**args), torch.float32, FP32_TOL)


def test_action_update_clamp_is_exercised(device, table):
    inputs = _action_inputs(3, 10, device)
    tab = table.to(device)
    args = dict(inputs, t=0, step_table=tab, guidance_scale=1.0)
    assert not torch.equal(guided_action_update(**args, clip_std=0.1), guided_action_update(**args, clip_std=None))


@pytest.mark.parametrize("B,H", SHAPES)
def test_q_sample_matches_twin(B, H, device):
    sched = NoiseSchedule(T, tau=1.0)
    sa, s1 = (sched.table(n, device) for n in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    g = torch.Generator().manual_seed(2)
    x0, noise = _randn(B, H, O + 2, gen=g, device=device), _randn(B, H, O + 2, gen=g, device=device)
    actions, act_noise = _randn(B, H, A, gen=g, device=device), _randn(B, H, A, gen=g, device=device)
    t = torch.randint(0, T, (B,), generator=g).to(device)
    for an, scale, obs_dim in itertools.product((None, act_noise), (0.0, 0.5), (None, O)):
        args = (x0, actions, t, sa, s1, noise, an, scale, obs_dim)
        _assert_outputs(q_sample(*args), ref.q_sample(*args), torch.float32, FP32_TOL)


@pytest.mark.parametrize("t", [20, 5, 0])
def test_bf16_inputs(t, device, table):
    tab = table.to(device)
    states = _state_inputs(3, 10, device, dtype=torch.bfloat16)
    args = dict(t=t, step_table=tab, clip_state_change=0.25, states_for_guidance="posterior_mean")
    _assert_outputs(guided_state_update(**states, **args), ref.guided_state_update(**_upcast(states), **args),
                    torch.bfloat16, BF16_TOL)

    acts = _action_inputs(3, 10, device, dtype=torch.bfloat16)
    for gtype in ref.GUIDANCE_TYPES:
        args = dict(t=t, step_table=tab, guidance_scale=0.3, clip_std=2.0, guidance_type=gtype)
        _assert_outputs(guided_action_update(**acts, **args), ref.guided_action_update(**_upcast(acts), **args),
                        torch.bfloat16, BF16_TOL)

    sched = NoiseSchedule(T, tau=1.0)
    sa, s1 = (sched.table(n, device) for n in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    steps = torch.full((3,), t, device=device)
    bf = (states["x0_pred"], acts["actions"], steps, sa, s1, states["noise"], acts["noise"], 0.5, O)
    up = tuple(v.float() if torch.is_tensor(v) and v.is_floating_point() else v for v in bf)
    _assert_outputs(q_sample(*bf), ref.q_sample(*up), torch.bfloat16, BF16_TOL)


def test_mixed_precision_denoiser_output(device, table):
    """The GPU path feeds a bf16 denoiser output next to fp32 states: outputs stay fp32 and exact."""
    inputs = _state_inputs(3, 10, device)
    inputs["x0_pred"] = inputs["x0_pred"].bfloat16()
    args = dict(t=5, step_table=table.to(device), clip_state_change=0.25)
    fast = guided_state_update(**inputs, **args)
    _assert_outputs(fast, ref.guided_state_update(**_upcast(inputs), **args), torch.float32, FP32_TOL)


def test_non_contiguous_inputs(device, table):
    inputs = _state_inputs(3, 10, device)
    strided = {k: (v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() == 3 else v) for k, v in inputs.items()}
    assert not strided["x"].is_contiguous()
    args = dict(t=20, step_table=table.to(device), clip_state_change=None)
    _assert_outputs(guided_state_update(**strided, **args), ref.guided_state_update(**inputs, **args),
                    torch.float32, FP32_TOL)


def test_argument_errors(device, table):
    states = _state_inputs(1, 2, device)
    coef = table[3].to(device)
    with pytest.raises(ValueError, match="states_for_guidance"):
        state_update_at(**states, coef=coef, clip_state_change=None, states_for_guidance="x")
    with pytest.raises(ValueError, match="not both"):
        state_update_at(**states, coef=coef, clip_state_change=None, seed=1, step=3)
    with pytest.raises(ValueError, match="step index"):
        state_update_at(**dict(states, noise=None), coef=coef, clip_state_change=None, seed=1)
    with pytest.raises(ValueError, match=r"coef must be one step-table row \[6\]"):
        state_update_at(**states, coef=table.to(device), clip_state_change=None)
    acts = _action_inputs(1, 2, device)
    with pytest.raises(ValueError, match="guidance_type"):
        action_update_at(**acts, coef=coef, guidance_scale=1.0, clip_std=None, action_noise_scale=1.0,
                         guidance_type="adam", last=False)
    with pytest.raises(ValueError, match="exactly one"):
        q_sample(states["x"], acts["actions"], torch.zeros(1, dtype=torch.long, device=device),
                 table[:, 0].to(device), table[:, 1].to(device), None)
