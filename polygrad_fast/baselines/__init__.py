"""World-model baselines evaluated next to PolyGRAD on the same data and the same evaluation (``wm_eval``).

- ``autoregressive_diffusion``: the same denoiser family on H=2 windows, rolled out one step at a time;
- ``mlp_ensemble``: an MBPO-style probabilistic ensemble of one-step MLP models;
- ``rollout``: what every baseline rollout returns, and the policy draw they share.
"""
from .autoregressive_diffusion import AutoregressiveDiffusion, AutoregressiveDiffusionConfig
from .mlp_ensemble import EnsembleConfig, ProbabilisticEnsemble, Transitions, buffer_transitions
from .rollout import Rollout, sample_action

__all__ = ["AutoregressiveDiffusion", "AutoregressiveDiffusionConfig", "EnsembleConfig", "ProbabilisticEnsemble",
           "Rollout", "Transitions", "buffer_transitions", "sample_action"]
