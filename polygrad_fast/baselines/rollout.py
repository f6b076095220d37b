"""What a world-model rollout returns, and the on-policy action draw every model-based rollout shares."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..policy import policy_mean_std


class Rollout(NamedTuple):
    """An imagined trajectory batch in RAW units: observations [B,H,O] (index 0 = the start state), actions
    [B,H,A] (a_k taken in observations[:, k]), rewards [B,H] (r_k for (s_k, a_k))."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor


def sample_action(policy, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """a ~ pi(.|s) for raw obs [B,O] -> raw actions [B,A], drawn from ``generator`` (a diagonal Normal policy)."""
    with torch.no_grad():
        mean, std = policy_mean_std(policy(obs))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise
