"""The default low-precision CPU path (bf16 denoiser and policy copies, closed-form guidance) against the fp32
paper-style reference on the same noise: trajectory statistics agree to what bf16 rounding explains, and a
deliberately wrong option breaks the bound.

bf16 is forced (``denoiser_dtype="bfloat16"``, ``policy_dtype="bfloat16"``): 'auto' picks bf16 only where bf16 GEMMs
measure faster than fp32 (``backend.measured_cpu_dtype``: AMX / AVX512-BF16 CPUs), and the development machine's
(AVX2) auto choice is fp32.
"""
import torch

from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.policy import Actor
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.schedule import NoiseSchedule
from test_sampler import make_normalizer

O, A, H, T, B = 11, 3, 5, 16, 256  # Hopper's obs/action sizes; 1280 imagined steps per statistic
# guidance scale and clip chosen so both matter: the clamp to mean +- 1 std bites, and guidance moves the actions
OPTIONS = dict(guidance_type="grad", guidance_scale=0.05, clip_std=1.0, clip_state_change=0.25)
# bf16 keeps 8 significant bits (a relative step of 2^-8 = 0.0039). Measured (seeds below): per-dimension
# |mean difference| <= 0.0039 std (actions), 0.0009 (observations), 0.0002 (rewards); |std ratio - 1| <= 0.0017;
# the standardised action std act_std 0.8% off. Bounds: 3x those. What bugs give on the same noise:
# clip_std 2.0 instead of 1.0: actions 0.0167 std, act_std +5.9%; clip_std 0.8: act_std -5.2%;
# clip_state_change off: observations 0.0177 std, act_std +4.1%; action_noise_scale 0.9: act_std -5.6%;
# guidance scale doubled: actions 0.10 std, act_std -33%; no guidance: actions 0.10 std, act_std +134%.
STAT_BOUND = 0.012
ACT_STD_RELATIVE_BOUND = 0.025


def _setup():
    torch.manual_seed(0)
    denoiser = ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=128, num_layers=2)).eval()
    policy = Actor(O, A, hidden=32, init_std=0.5)
    return denoiser, NoiseSchedule(T, tau=0.1), policy, make_normalizer(O, A, seed=1)


def _deviations(fast, ref) -> dict[str, float]:
    """Per field, the largest per-dimension |mean difference| and |std ratio - 1|, in units of the reference std;
    and act_std's relative difference."""
    out = {}
    for name in ("observations", "actions", "rewards"):
        f, r = (getattr(b, name).reshape(B * H, -1) for b in (fast, ref))
        scale = r.std(0)
        out[f"{name} mean"] = ((f.mean(0) - r.mean(0)).abs() / scale).max().item()
        out[f"{name} std"] = (f.std(0) / scale - 1).abs().max().item()
    out["act_std"] = abs(fast.metrics["act_std"].item() / ref.metrics["act_std"].item() - 1)
    return out


def _within_bounds(dev: dict[str, float]) -> bool:
    return all(v <= (ACT_STD_RELATIVE_BOUND if k == "act_std" else STAT_BOUND) for k, v in dev.items())


def test_bf16_cpu_path_matches_fp32_reference_statistics():
    setup = _setup()
    start = torch.randn(B, O, generator=torch.Generator().manual_seed(2)) * 2
    noise = SamplerNoise.draw(T, B, H, O + 2, A, generator=torch.Generator().manual_seed(3))
    ref = FastGuidedSampler(*setup, backend="reference", **OPTIONS).sample(start, noise=noise)

    def bf16(**changes):
        sampler = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="bfloat16", policy_dtype="bfloat16",
                                    **dict(OPTIONS, **changes))
        assert sampler.denoiser_dtype == sampler.policy_dtype == torch.bfloat16
        return sampler.sample(start, noise=noise)

    dev = _deviations(bf16(), ref)
    assert _within_bounds(dev), dev
    wrong_clip = _deviations(bf16(clip_std=2.0), ref)
    assert not _within_bounds(wrong_clip), wrong_clip  # the bound is tight enough to see a wrong clip
