"""Actor and critic of the A2C agent: the paper's actor-critic networks (two hidden layers of 256 with LayerNorm).

The actor consumes RAW (unnormalised) observations and returns a Normal over raw actions whose mean is
``tanh(mlp(obs))`` and whose std is state independent: ``exp(logstd) + min_std`` (learned) or ``init_std``.
The distribution is NOT squashed: samples may leave [-1, 1] (the env wrapper clips them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Independent, Normal

LAYER_NORM_EPS = 1e-3  # the paper's MLP uses LayerNorm(eps=1e-3), not torch's default 1e-5


def _check_dims(**dims) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` × [Linear → LayerNorm(eps 1e-3) → ELU], then Linear(hidden, out_dim)."""
    _check_dims(in_dim=in_dim, out_dim=out_dim, hidden=hidden, layers=layers)
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.LayerNorm(hidden, eps=LAYER_NORM_EPS), nn.ELU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


@dataclass(frozen=True)
class ActorConfig:
    """Actor sizes and std: ``exp(logstd) + min_std`` starting at ``init_std`` (learned), or ``init_std`` (fixed)."""

    obs_dim: int
    act_dim: int
    hidden: int = 256
    layers: int = 2
    init_std: float = 1.0
    min_std: float = 0.1
    learned_std: bool = True

    def __post_init__(self):
        _check_dims(obs_dim=self.obs_dim, act_dim=self.act_dim, hidden=self.hidden, layers=self.layers)
        if not isinstance(self.learned_std, bool):
            raise ValueError(f"learned_std must be a bool, got {self.learned_std!r}")
        for name in ("init_std", "min_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.min_std < 0:
            raise ValueError(f"min_std must be >= 0, got {self.min_std!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
        if self.learned_std and not self.init_std > self.min_std:
            raise ValueError(f"learned std needs init_std > min_std, got {self.init_std} <= {self.min_std}")


@dataclass(frozen=True)
class CriticConfig:
    obs_dim: int
    hidden: int = 256
    layers: int = 2

    def __post_init__(self):
        _check_dims(obs_dim=self.obs_dim, hidden=self.hidden, layers=self.layers)


class Actor(nn.Module):
    """Policy π(a|s) = Normal(tanh(mlp(s)), std) over raw actions, s raw observations [..., O]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 2,
                 init_std: float = 1.0, min_std: float = 0.1, learned_std: bool = True):
        super().__init__()
        self.config = ActorConfig(obs_dim, act_dim, hidden, layers, init_std, min_std, learned_std)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.mlp = mlp(obs_dim, act_dim, hidden, layers)
        self.min_std = float(min_std)
        self.learned_std = learned_std
        if learned_std:
            self.logstd = nn.Parameter(torch.full((act_dim,), math.log(init_std - min_std)))
        else:
            self.register_buffer("fixed_std", torch.full((act_dim,), float(init_std)))

    def std(self) -> torch.Tensor:
        """State-independent std [A]."""
        return self.logstd.exp() + self.min_std if self.learned_std else self.fixed_std

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [..., O] raw -> (mean [..., A] = tanh(mlp(obs)), std [..., A] (an expanded view))."""
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"actor expects observations [..., {self.obs_dim}], got {tuple(obs.shape)}")
        mean = torch.tanh(self.mlp(obs))
        return mean, self.std().to(mean.dtype).expand_as(mean)

    def distribution(self, obs: torch.Tensor) -> Independent:
        """Independent(Normal(mean, std), 1): log_prob sums over the action dims."""
        mean, std = self(obs)
        return Independent(Normal(mean, std), 1)


class Critic(nn.Module):
    """State value V(s) [...] of raw observations [..., O] (same MLP as the actor, one output)."""

    def __init__(self, obs_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.config = CriticConfig(obs_dim, hidden, layers)
        self.obs_dim = obs_dim
        self.mlp = mlp(obs_dim, 1, hidden, layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs [..., O] raw -> V(s) [...]."""
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"critic expects observations [..., {self.obs_dim}], got {tuple(obs.shape)}")
        return self.mlp(obs).squeeze(-1)


def standardized_action_moments(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """act_mean, act_std of standardised actions z = (a − μπ(s))/σπ(s) [..., A]: per-dim mean / std over all
    leading entries, averaged over A (0-dim tensors; act_std is 0 for a single entry). On-policy actions give 0, 1."""
    flat = z.reshape(-1, z.shape[-1])
    act_std = flat.std(dim=0).mean() if flat.shape[0] > 1 else torch.zeros_like(flat[0, 0])
    return {"act_mean": flat.mean(dim=0).mean(), "act_std": act_std}


def policy_mean_std(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a policy output: a (mean, std) pair, a Normal, or an Independent(Normal).

    The fast samplers use closed-form guidance, which is exact only for a diagonal Normal over raw actions
    (the repository's Actor qualifies); squashed or mixture policies must use the reference backend.
    """
    if isinstance(out, Independent):
        out = out.base_dist
    if isinstance(out, Normal):
        return out.mean, out.stddev
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1]
    raise TypeError("policy must return (mean, std), a Normal or an Independent(Normal); "
                    f"got {type(out).__name__}")


def policy_distribution(out, validate_args: bool | None = None) -> Independent:
    """Independent(Normal, 1) over the last dim from a policy output (see ``policy_mean_std``); ``validate_args``
    as torch.distributions' (False: no check of the parameters, for callers that check finiteness themselves)."""
    if isinstance(out, Independent):
        return out
    mean, std = policy_mean_std(out)
    return Independent(Normal(mean, std.expand_as(mean), validate_args=validate_args), 1,
                       validate_args=validate_args)
