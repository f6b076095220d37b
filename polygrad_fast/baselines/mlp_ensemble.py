"""MBPO-style probabilistic ensemble of one-step models (Janner et al. 2019, "When to trust your model").

Each of E members maps a normalised (s, a) to a diagonal Gaussian over y = (normalised s' - s, normalised r):
mean mu_e and a log-variance bounded softly between learned limits,
    log sigma^2 = maxlv - softplus(maxlv - l),  log sigma^2 = minlv + softplus(log sigma^2 - minlv),
trained on the Gaussian negative log-likelihood sum_e mean[(mu_e - y)^2 / sigma_e^2 + log sigma_e^2]
+ 0.01 (sum maxlv - sum minlv), each member on its own bootstrap draws. The ``elites`` members with the lowest
held-out NLL are kept; a rollout picks one elite per trajectory and step at random and samples from it.
Shapes: E members, N transitions, O obs dim, A action dim, Y = O + 1 outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..buffer import TrajectoryBuffer
from .rollout import Rollout, sample_action


@dataclass(frozen=True)
class EnsembleConfig:
    """Sizes and training of the ensemble (MBPO's defaults: 7 members, 5 elites, 4 x 200 swish layers)."""

    members: int = 7
    elites: int = 5
    hidden: int = 200
    layers: int = 4
    lr: float = 1e-3
    weight_decay: float = 5e-5
    batch_size: int = 256
    train_steps: int = 2000
    holdout_fraction: float = 0.1
    logvar_bound_weight: float = 0.01

    def __post_init__(self) -> None:
        for name in ("members", "elites", "hidden", "layers", "batch_size", "train_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EnsembleConfig.{name} must be an int >= 1, got {v!r}")
        if self.elites > self.members:
            raise ValueError(f"EnsembleConfig.elites ({self.elites}) must be <= members ({self.members})")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"EnsembleConfig.holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")
        for name in ("lr", "weight_decay", "logvar_bound_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or (name == "lr" and v == 0):
                raise ValueError(f"EnsembleConfig.{name} must be a finite number >= 0 (lr > 0), got {v!r}")


@dataclass
class Transitions:
    """One-step transitions in raw units: obs [N,O], actions [N,A], rewards [N], next_obs [N,O]."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor

    def __len__(self) -> int:
        return self.obs.shape[0]

    def subset(self, index: torch.Tensor) -> "Transitions":
        return Transitions(self.obs[index], self.actions[index], self.rewards[index], self.next_obs[index])


def buffer_transitions(buffer: TrajectoryBuffer, seed: int, draws_per_transition: int = 4) -> Transitions:
    """The buffer's transitions (s, a, r, s') through its public window sampler: H=2 windows drawn
    ``draws_per_transition`` x N times, duplicates dropped (covers ~1 - e^-4 = 98% of them), and the terminating
    steps dropped (their s' is padding, not a state). Order is the sampled one (random)."""
    n = max(1, buffer.num_transitions * draws_per_transition)
    w = buffer.sample_windows(n, 2, seed=seed, normalize=False, sim_states=False)
    key = w.episode_ids.numpy() * (1 << 20) + w.start_steps.numpy()
    _, first = np.unique(key, return_index=True)
    keep = torch.from_numpy(np.sort(first))
    keep = keep[w.terminals[keep, 0] < 0.5]
    if len(keep) < 2:
        raise ValueError(f"the buffer yields {len(keep)} non-terminal transitions; need at least 2 (train and "
                         "held out)")
    return Transitions(w.observations[keep, 0], w.actions[keep, 0], w.rewards[keep, 0], w.observations[keep, 1])


class ProbabilisticEnsemble(nn.Module):
    """E one-step Gaussian MLPs run as one batched network ([E, N, in] -> mean, log-variance [E, N, Y])."""

    def __init__(self, obs_dim: int, act_dim: int, config: EnsembleConfig = EnsembleConfig()):
        super().__init__()
        if not isinstance(config, EnsembleConfig):
            raise TypeError(f"config must be an EnsembleConfig, got {type(config).__name__}")
        self.obs_dim, self.act_dim, self.config = obs_dim, act_dim, config
        E, Y = config.members, obs_dim + 1
        sizes = [obs_dim + act_dim] + [config.hidden] * config.layers + [2 * Y]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init, per member
            self.weights.append(nn.Parameter(torch.empty(E, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(E, 1, fan_out).uniform_(-bound, bound)))
        self.max_logvar = nn.Parameter(torch.full((Y,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((Y,), -10.0))
        for name, dim in (("in_mean", obs_dim + act_dim), ("in_std", obs_dim + act_dim), ("out_mean", Y),
                          ("out_std", Y)):
            self.register_buffer(name, torch.zeros(dim) if "mean" in name else torch.ones(dim))
        self.register_buffer("elite_index", torch.arange(config.elites))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [E,N,O+A] normalised inputs -> (mean [E,N,Y], bounded log-variance [E,N,Y]) in normalised y units."""
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = F.silu(h)
        mean, logvar = h.chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        return mean, self.min_logvar + F.softplus(logvar - self.min_logvar)

    def _inputs(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return (torch.cat([obs, actions], -1) - self.in_mean) / self.in_std

    def _targets(self, t: Transitions) -> torch.Tensor:
        y = torch.cat([t.next_obs - t.obs, t.rewards[:, None]], -1)
        return (y - self.out_mean) / self.out_std

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member Gaussian NLL [E] of targets y [N,Y] (or [E,N,Y]) given inputs x [N,O+A] (or [E,N,O+A])."""
        E = self.config.members
        mean, logvar = self(x.expand(E, *x.shape[-2:]))
        return 0.5 * (((mean - y) ** 2) * torch.exp(-logvar) + logvar + math.log(2 * math.pi)).mean(dim=(1, 2))

    def fit(self, data: Transitions, seed: int) -> dict[str, float]:
        """Train on a random (1 - holdout_fraction) of ``data``, choose the elites on the held-out NLL.

        Returns the final training loss, each member's held-out NLL (``holdout_nll_<e>``) and the elites' mean.
        """
        cfg = self.config
        for name, t, cols in (("obs", data.obs, self.obs_dim), ("actions", data.actions, self.act_dim),
                              ("next_obs", data.next_obs, self.obs_dim)):
            if t.dim() != 2 or t.shape[1] != cols:
                raise ValueError(f"transitions.{name}: expected [N, {cols}], got {list(t.shape)}")
        if data.rewards.shape != (len(data),):
            raise ValueError(f"transitions.rewards: expected [{len(data)}], got {list(data.rewards.shape)}")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(data), generator=g)
        n_hold = max(1, int(round(cfg.holdout_fraction * len(data))))
        if len(data) - n_hold < 1:
            raise ValueError(f"{len(data)} transitions leave none to train on after holding out {n_hold}")
        dev = self.in_mean.device
        train, hold = (data.subset(perm[n_hold:]), data.subset(perm[:n_hold]))
        with torch.no_grad():  # normalisation from the training split only
            x = torch.cat([train.obs, train.actions], -1)
            self.in_mean.copy_(x.mean(0)), self.in_std.copy_(x.std(0, correction=0) + 1e-6)
            y = torch.cat([train.next_obs - train.obs, train.rewards[:, None]], -1)
            self.out_mean.copy_(y.mean(0)), self.out_std.copy_(y.std(0, correction=0) + 1e-6)
        x_tr = self._inputs(train.obs, train.actions).to(dev)
        y_tr = self._targets(train).to(dev)
        opt = torch.optim.Adam(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        E = cfg.members
        for _ in range(cfg.train_steps):
            idx = torch.randint(0, len(train), (E, cfg.batch_size), generator=g).to(dev)  # one bootstrap per member
            mean, logvar = self(x_tr[idx])
            loss = (((mean - y_tr[idx]) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
            loss = loss + cfg.logvar_bound_weight * (self.max_logvar.sum() - self.min_logvar.sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        final = loss.item()
        if not math.isfinite(final):
            raise FloatingPointError(f"the ensemble's training loss became {final}")
        with torch.no_grad():
            held = self.nll(self._inputs(hold.obs, hold.actions).to(dev), self._targets(hold).to(dev))
            self.elite_index.copy_(torch.argsort(held)[: cfg.elites])
        out = {"train_loss": final, "elite_holdout_nll": float(held[self.elite_index].mean())}
        out.update({f"holdout_nll_{e}": float(v) for e, v in enumerate(held)})
        return out

    @torch.no_grad()
    def rollout(self, start_obs: torch.Tensor, policy, horizon: int,
                generator: torch.Generator | None = None) -> Rollout:
        """On-policy rollout from raw start_obs [B,O]: a_k ~ pi(s_k), then (s_{k+1} - s_k, r_k) sampled from an
        elite drawn per trajectory and step. Returns a ``Rollout`` with H = ``horizon`` steps."""
        if start_obs.dim() != 2 or start_obs.shape[1] != self.obs_dim:
            raise ValueError(f"start_obs: expected [B, {self.obs_dim}], got {list(start_obs.shape)}")
        B, O = start_obs.shape
        obs, acts, rews = [start_obs], [], []
        for k in range(horizon):
            a = sample_action(policy, obs[-1], generator)
            mean, logvar = self(self._inputs(obs[-1], a).expand(self.config.members, B, -1))
            pick = self.elite_index[torch.randint(0, self.config.elites, (B,), generator=generator,
                                                  device=start_obs.device)]
            rows = torch.arange(B, device=start_obs.device)
            mean, std = mean[pick, rows], torch.exp(0.5 * logvar[pick, rows])
            y = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
            y = y * self.out_std + self.out_mean
            acts.append(a)
            rews.append(y[:, O])
            if k < horizon - 1:
                obs.append(obs[-1] + y[:, :O])
        return Rollout(torch.stack(obs, 1), torch.stack(acts, 1), torch.stack(rews, 1))
