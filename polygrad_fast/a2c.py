"""Actor-critic update on imagined trajectories (the paper's policy-optimisation step in imagination).

One ``A2CTrainer.update`` consumes an ``ImaginedBatch`` (raw observations [B,H,O], raw actions [B,H,A], raw rewards
[B,H], binary terminals [B,H]) and does what the paper's agent does: EMA of the target critic, λ-returns from the
target critic, reality-weighted REINFORCE actor loss with an entropy bonus and a squared-error critic loss, one AdamW
step each, a line search on the actor's learning rate that aims at a fixed mean |Δ log π|, and a learned log actor LR.
An update that produces a non-finite loss, gradient, parameter or line-search result raises ``NonFiniteUpdateError``
and leaves the trainer exactly as it was.

Shapes: B trajectories, H horizon (H >= 2: the last step only bootstraps), O obs dim, A action dim.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch.distributions import Independent, Normal

from .diffusion_trainer import (NonFiniteUpdateError, batch_magnitude_hint, check_number, cloned, config_differences,
                                module_state_problems, nonfinite_tensors, optimizer_state_problems,
                                raise_if_problems, step_problems)
from .exclusive import ExclusiveUse, exclusive
from .policy import Actor, Critic, policy_distribution, standardized_action_moments

ADV_EPS = 1e-8  # added to the advantage std when normalising (as the paper)


@dataclass(frozen=True)
class A2CConfig:
    """Hyper-parameters of the update; defaults are the paper's (its config key in brackets where it differs).
    Invalid values raise ValueError at construction.

    ``linesearch_max_iters``: re-steps of the line search after the first step (the paper's hard-coded 50).
    ``weight_decay``: AdamW's default 0.01, which the paper keeps for the actor, the critic and the log actor LR.
    """

    gamma: float = 0.99
    lambda_gae: float = 0.9
    entropy_weight: float = 1e-5  # α, fixed
    lr_actor: float = 3e-5  # also the cap of the line search and of the learned LR
    lr_critic: float = 3e-4
    target_ema: float = 0.995  # [ema] decay of the target critic
    grad_clip: float | None = 0.1  # [ac_grad_clip] per network (actor without logstd, critic); None: no clipping
    normalize_adv: bool = True
    target_update: float = 0.01  # target mean |Δ log π| of one actor update
    linesearch: bool = True
    linesearch_tolerance: float = 0.2  # accept target · [1 - tol, 1 + tol]
    linesearch_ratio: float = 0.8  # LR *= ratio (too large) or /= ratio (too small) per iteration
    linesearch_max_iters: int = 50
    update_actor_lr: bool = True
    actorlr_lr: float = 3e-4  # AdamW LR of the log actor LR
    weight_decay: float = 0.01

    def __post_init__(self):
        for name in ("gamma", "lambda_gae", "target_ema"):
            check_number(name, getattr(self, name), 0.0, 1.0)
        for name in ("lr_actor", "lr_critic", "actorlr_lr", "target_update"):
            check_number(name, getattr(self, name), 0.0, low_open=True)
        for name in ("entropy_weight", "weight_decay"):
            check_number(name, getattr(self, name), 0.0)
        if self.grad_clip is not None:
            check_number("grad_clip (or None)", self.grad_clip, 0.0, low_open=True)
        check_number("linesearch_tolerance", self.linesearch_tolerance, 0.0, 1.0, high_open=True)
        check_number("linesearch_ratio", self.linesearch_ratio, 0.0, 1.0, low_open=True, high_open=True)
        check_number("linesearch_max_iters", self.linesearch_max_iters, 0, integer=True)
        for name in ("normalize_adv", "linesearch", "update_actor_lr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


class TrajectoryBatch(Protocol):
    """What ``A2CTrainer.update`` reads (``sampler.ImaginedBatch`` qualifies): raw observations [B,H,O], raw
    actions [B,H,A], raw rewards [B,H], terminals [B,H] (0/1)."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminals: torch.Tensor


# ---------------------------------------------------------------------------------------------- pure functions
def lambda_returns(values: torch.Tensor, rewards: torch.Tensor, terminals: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and λ-return value targets of H-step trajectories (the paper's actor-critic targets).

    values [B,H] (target critic), rewards [B,H], terminals [B,H] (d_t = 1: the transition at t terminates).
    δ_t = r_t + γ(1 − d_t)V_{t+1} − V_t and A_t = δ_t + λγ(1 − d_t)A_{t+1} for t = 0..H−2, A_{H−2} = δ_{H−2};
    returns (advantages [B,H−1], value_targets = advantages + V[:, :−1] [B,H−1]). Needs H >= 2.
    """
    if values.dim() != 2 or values.shape != rewards.shape or values.shape != terminals.shape:
        raise ValueError("values, rewards and terminals must all be [B, H]; got "
                         f"{list(values.shape)}, {list(rewards.shape)}, {list(terminals.shape)}")
    if values.shape[1] < 2:
        raise ValueError(f"need a horizon H >= 2 (the last step only bootstraps), got H = {values.shape[1]}")
    cont = gamma * (1.0 - terminals[:, :-1])  # [B,H-1] discount of each transition
    deltas = rewards[:, :-1] + cont * values[:, 1:] - values[:, :-1]
    advantages = torch.empty_like(deltas)
    running = deltas[:, -1]
    advantages[:, -1] = running
    for t in range(deltas.shape[1] - 2, -1, -1):
        running = deltas[:, t] + lam * cont[:, t] * running
        advantages[:, t] = running
    return advantages, advantages + values[:, :-1]


def reality_weights(terminals: torch.Tensor) -> torch.Tensor:
    """Reality weights w_t = Π_{k<=t} (1 − d_k) for t = 0..H−2: terminals [B,H] -> [B,H−1].

    The terminating transition itself and every later one get weight 0 (as the paper's code). With binary
    terminals this equals the paper's exp(cumsum(log(1 − d))) exactly.
    """
    return torch.cumprod(1.0 - terminals[:, :-1], dim=1)


def normalize_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """(A − mean) / (std + 1e-8) over the whole batch (unbiased std, as torch.std), any shape with >= 2 entries."""
    return (advantages - advantages.mean()) / (advantages.std() + ADV_EPS)


def actor_loss(log_probs: torch.Tensor, entropy: torch.Tensor | None, advantages: torch.Tensor,
               weights: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """mean(w · (−log π(a|s) · A − α · H[π(·|s)])) (REINFORCE with an entropy bonus), all inputs [B,H−1]; advantages are used as given
    (already normalised if wanted, detached here). entropy None: no entropy term (fixed-std policy)."""
    per_step = -log_probs * advantages.detach()
    if entropy is not None:
        per_step = per_step - entropy_weight * entropy
    return (weights * per_step).mean()


def critic_loss(values: torch.Tensor, value_targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean(w · ½ (target − V)²) (squared error to the λ-returns), all inputs [B,H−1]; targets detached here."""
    return (weights * 0.5 * (value_targets.detach() - values).square()).mean()


def standardized_stats(mean: torch.Tensor, std: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of z = (a − μ)/σ for actions [B,T,A] under a diagonal Normal (mean, std broadcastable):
    log N(z; 0, I) summed over A ([B,T]) as avg/std/min/max, and act_mean / act_std (per-dim mean / std over
    (B,T), then averaged over A). 0-dim tensors; the stds are 0 for a single (B,T) entry, as in the sampler."""
    z = (actions - mean) / std
    logp = Independent(Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False), 1,
                       validate_args=False).log_prob(z)  # NaN in z is reported by the update's check
    return {
        **standardized_action_moments(z),
        "standardized_logprob_avg": logp.mean(),
        "standardized_logprob_std": logp.std() if logp.numel() > 1 else torch.zeros_like(logp.reshape(-1)[0]),
        "standardized_logprob_min": logp.min(),
        "standardized_logprob_max": logp.max(),
    }


class A2CLosses(NamedTuple):
    """``A2CTrainer._losses`` output: the two losses and what they were built from (all [B,H−1] but the
    losses). ``log_probs`` carries the actor's graph; ``values`` the critic's."""

    loss_actor: torch.Tensor
    loss_critic: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor  # before normalisation
    value_targets: torch.Tensor
    weights: torch.Tensor
    values: torch.Tensor
    policy_mean: torch.Tensor  # [B,H-1,A]
    policy_std: torch.Tensor  # [B,H-1,A]


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one update is up to ~20 optimiser steps (the line search re-steps), and at
    the CPU presets' sizes (64 x 2 MLPs, 1 thread, AVX2 Zen 3) the fused step took 0.53 ms against 4.2 ms for
    torch's default per-tensor loop."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


# ---------------------------------------------------------------------------------------------- trainer
class A2CTrainer:
    """Owns the target critic, the actor / critic AdamW optimisers and the learned log actor LR of one agent.

    ``update(batch)`` does one actor-critic update on imagined trajectories and returns float metrics;
    ``update(batch, log_only=True)`` only measures (no EMA, no optimiser step, nothing changes). The actor's
    ``logstd`` is optimised with the actor but excluded from gradient clipping and from the line-search restore
    (as the paper). Not safe to share across threads: a call made while another thread is inside
    ``update``/``load_state_dict`` raises RuntimeError.
    """

    def __init__(self, actor: Actor, critic: Critic, config: A2CConfig = A2CConfig()):
        self._exclusive = ExclusiveUse("A2CTrainer")
        if not isinstance(config, A2CConfig):
            raise TypeError(f"config must be an A2CConfig, got {type(config).__name__}")
        # the update reads the actor's std parameterisation and both networks' configs (saved in the state dict)
        if not isinstance(actor, Actor) or not isinstance(critic, Critic):
            raise TypeError(f"need a policy.Actor and a policy.Critic, got {type(actor).__name__} and "
                            f"{type(critic).__name__}")
        self.config = config
        self.actor, self.critic = actor, critic
        params = list(actor.parameters())
        if not params:
            raise ValueError("the actor has no parameters")
        self.device = params[0].device
        self.dtype = params[0].dtype
        critic_device = next(critic.parameters()).device
        if critic_device != self.device:
            raise ValueError(f"actor is on {self.device} but critic on {critic_device}")
        if getattr(critic, "obs_dim", actor.obs_dim) != actor.obs_dim:
            raise ValueError(f"actor expects obs dim {actor.obs_dim} but critic {critic.obs_dim}")
        self.critic_target = copy.deepcopy(critic).requires_grad_(False)
        # The actor's network weights: clipped and restored by the line search. The learned logstd is neither.
        self._actor_weights = [p for name, p in actor.named_parameters() if name != "logstd"]
        self.optimizer_actor = _adamw(params, config.lr_actor, config.weight_decay)
        self.optimizer_critic = _adamw(critic.parameters(), config.lr_critic, config.weight_decay)
        self.max_lr = config.lr_actor
        self.log_actor_lr = torch.tensor(math.log(config.lr_actor), device=self.device, requires_grad=True)
        self.optimizer_actor_lr = _adamw([self.log_actor_lr], config.actorlr_lr, config.weight_decay)
        self.step = 0  # non-log_only updates done

    @property
    def lr_actor(self) -> float:
        return self.optimizer_actor.param_groups[0]["lr"]

    # ------------------------------------------------------------------ inputs
    def _check_batch(self, batch: TrajectoryBatch) -> tuple[torch.Tensor, ...]:
        names = ("observations", "actions", "rewards", "terminals")
        tensors = []
        for name in names:
            t = getattr(batch, name, None)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"batch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise ValueError(f"batch.{name} is on {t.device} but the actor on {self.device}")
            if t.dtype != self.dtype:
                raise TypeError(f"batch.{name} must be {self.dtype} (the networks' dtype), got {t.dtype}")
            tensors.append(t)
        obs, act, rew, term = tensors
        O, A = self.actor.obs_dim, self.actor.act_dim
        if obs.dim() != 3 or obs.shape[2] != O:
            raise ValueError(f"batch.observations: expected [B, H, {O}], got {list(obs.shape)}")
        B, H = obs.shape[:2]
        if B < 1 or H < 2:
            raise ValueError(f"batch.observations: need B >= 1 trajectories of horizon H >= 2 (the last step only "
                             f"bootstraps), got B = {B}, H = {H}")
        expected = {"actions": (act, [B, H, A]), "rewards": (rew, [B, H]), "terminals": (term, [B, H])}
        for name, (t, shape) in expected.items():
            if list(t.shape) != shape:
                raise ValueError(f"batch.{name}: expected {shape} (observations are {list(obs.shape)}), "
                                 f"got {list(t.shape)}")
        if self.config.normalize_adv and B * (H - 1) < 2:
            raise ValueError(f"normalize_adv needs at least 2 advantages (B·(H−1) >= 2), got B = {B}, H = {H}")
        # one host sync for all value checks
        ok = torch.stack([torch.isfinite(obs).all(), torch.isfinite(act).all(), torch.isfinite(rew).all(),
                          ((term == 0) | (term == 1)).all()]).tolist()
        for name, good in zip(names, ok):
            if not good:
                raise ValueError(f"batch.{name} contains " + ("values other than 0 and 1" if name == "terminals"
                                                               else "NaN or inf"))
        return obs, act, rew, term

    # ------------------------------------------------------------------ losses
    def _losses(self, obs, act, rew, term) -> A2CLosses:
        """Both losses of a checked batch with the current networks and target critic (no state change)."""
        c = self.config
        with torch.no_grad():
            target_values = self.critic_target(obs)  # [B,H]
            advantages, value_targets = lambda_returns(target_values, rew, term, c.gamma, c.lambda_gae)
            weights = reality_weights(term)
        mean, std = self.actor(obs[:, :-1])
        dist = policy_distribution((mean, std), validate_args=False)  # NaN is caught by the update's check
        log_probs = dist.log_prob(act[:, :-1])  # [B,H-1]
        entropy = dist.entropy()
        adv = normalize_advantages(advantages) if c.normalize_adv else advantages
        loss_a = actor_loss(log_probs, entropy if self.actor.learned_std else None, adv, weights, c.entropy_weight)
        values = self.critic(obs)[:, :-1]
        loss_c = critic_loss(values, value_targets, weights)
        return A2CLosses(loss_a, loss_c, log_probs, entropy, advantages, value_targets, weights, values, mean, std)

    def _log_probs(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return policy_distribution(self.actor(obs), validate_args=False).log_prob(act)

    # ------------------------------------------------------------------ update
    @exclusive
    def update(self, batch: TrajectoryBatch, log_only: bool = False) -> dict[str, float]:
        """One actor-critic update on imagined trajectories -> float metrics (the paper's, without the env ones).

        Metrics always: loss_actor, loss_critic, policy_entropy, policy_std, policy_value (V at t = 0),
        policy_value_im, policy_reward(_std), alpha, act_std, act_mean, standardized_logprob_{avg,std,min,max},
        maximum_logprob, minimum_logprob, lr_actor. Unless log_only: gradients/{actor,critic}_grad_norm (before
        clipping), update_kl, update_delta_logprob_initial; with the line search also update_delta_logprob_final,
        update_linesearch_steps and update_linesearch_lr_capped (1 when it stopped because the LR would pass
        lr_actor).

        Raises ValueError/TypeError for a bad batch (before anything changes) and ``NonFiniteUpdateError`` when a
        loss, gradient norm, new parameter or the line-search result is NaN/inf: the trainer is then restored to
        exactly its state before the call (one combined check, folded into the metrics' host sync).
        """
        obs, act, rew, term = self._check_batch(batch)
        if log_only:
            with torch.no_grad():
                losses = self._losses(obs, act, rew, term)
                stats = self._loss_metrics(losses, rew, act[:, :-1])
            metrics, failed = self._to_floats(stats, {"lr_actor": self.lr_actor}, self._loss_checks(losses))
            if failed:
                self._raise_nonfinite(failed, metrics, obs, act, rew, term, restored=False)
            return metrics
        saved = cloned(self.state_dict())  # paper sizes: ~3.5 ms (1 thread), vs ~1 s for the update itself
        try:
            metrics, failed = self._step(obs, act, rew, term)
        except BaseException:
            self._restore(saved)
            raise
        if failed:
            self._restore(saved)
            self._raise_nonfinite(failed, metrics, obs, act, rew, term, restored=True)
        return metrics

    def _step(self, obs, act, rew, term) -> tuple[dict[str, float], list[str]]:
        c = self.config
        self._update_target()
        losses = self._losses(obs, act, rew, term)
        stats = self._loss_metrics(losses, rew, act[:, :-1])
        self.optimizer_actor.zero_grad(set_to_none=True)
        self.optimizer_critic.zero_grad(set_to_none=True)
        (losses.loss_actor + losses.loss_critic).backward()
        max_norm = float("inf") if c.grad_clip is None else c.grad_clip
        stats["gradients/actor_grad_norm"] = torch.nn.utils.clip_grad_norm_(self._actor_weights, max_norm)
        stats["gradients/critic_grad_norm"] = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), max_norm)
        snapshot = [p.detach().clone() for p in self._actor_weights]
        self.optimizer_actor.step()
        self.optimizer_critic.step()

        obs_a, act_a = obs[:, :-1], act[:, :-1]
        old_log_probs = losses.log_probs.detach()
        with torch.no_grad():
            delta = old_log_probs - self._log_probs(obs_a, act_a)
            stats["update_kl"] = delta.mean()
            initial_size = delta.abs().mean()
        stats["update_delta_logprob_initial"] = initial_size
        extra: dict[str, float] = {}
        if c.linesearch:
            extra = self._line_search(float(initial_size), snapshot, old_log_probs, obs_a, act_a)
        if c.update_actor_lr:
            self._update_actor_lr(initial_size)
        extra["lr_actor"] = self.lr_actor
        self.step += 1
        checks = self._loss_checks(losses)
        actor_grad_ok = torch.isfinite(stats["gradients/actor_grad_norm"])
        if self.actor.learned_std and self.actor.logstd.grad is not None:  # not in the clipped (normed) weights
            actor_grad_ok = actor_grad_ok & torch.isfinite(self.actor.logstd.grad).all()
        checks["actor gradient"] = actor_grad_ok
        checks["critic gradient"] = torch.isfinite(stats["gradients/critic_grad_norm"])
        for name, module in (("actor", self.actor), ("critic", self.critic), ("target critic", self.critic_target)):
            checks[f"{name} parameters after the step"] = torch.stack(
                [torch.isfinite(p).all() for p in module.parameters()]).all()
        checks["log actor LR"] = torch.isfinite(self.log_actor_lr.detach())
        metrics, failed = self._to_floats(stats, extra, checks)
        for key in ("update_delta_logprob_final", "lr_actor"):
            if key in metrics and not math.isfinite(metrics[key]):
                failed.append(f"line-search result {key}")
        return metrics, failed

    def _loss_checks(self, losses: A2CLosses) -> dict[str, torch.Tensor]:
        return {"actor loss": torch.isfinite(losses.loss_actor.detach()),
                "critic loss": torch.isfinite(losses.loss_critic.detach())}

    def _restore(self, saved: dict[str, Any]) -> None:
        """Back to ``saved`` (a deep copy of ``state_dict()``), gradients cleared."""
        self.load_state_dict(saved)
        for p in [*self.actor.parameters(), *self.critic.parameters(), self.log_actor_lr]:
            p.grad = None

    def _raise_nonfinite(self, failed: list[str], metrics: dict[str, float], obs, act, rew, term,
                         restored: bool) -> None:
        values = {"actor loss": "loss_actor", "critic loss": "loss_critic",
                  "actor gradient": "gradients/actor_grad_norm", "critic gradient": "gradients/critic_grad_norm",
                  "line-search result update_delta_logprob_final": "update_delta_logprob_final",
                  "line-search result lr_actor": "lr_actor"}
        parts = [f"{name} is {metrics[values[name]]}" if name in values and values[name] in metrics
                 else f"{name} not finite" for name in failed]
        hint = batch_magnitude_hint({"observations": obs, "actions": act, "rewards": rew, "terminals": term})
        state = ("the trainer was restored to its state before this update (networks, target critic, "
                 "optimisers, log actor LR, step)") if restored else "log_only: nothing was changed"
        raise NonFiniteUpdateError(f"A2C update not finite: {', '.join(parts)}; {hint}; {state}")

    @torch.no_grad()
    def _update_target(self) -> None:
        """target ← ema · target + (1 − ema) · critic, on the parameters, at the start of each update (as the
        paper); buffers copied."""
        ema = self.config.target_ema
        for t, p in zip(self.critic_target.parameters(), self.critic.parameters()):
            t.mul_(ema).add_(p, alpha=1.0 - ema)
        for t, b in zip(self.critic_target.buffers(), self.critic.buffers()):
            t.copy_(b)

    @torch.no_grad()
    def _line_search(self, size: float, snapshot: list[torch.Tensor], old_log_probs: torch.Tensor,
                     obs: torch.Tensor, act: torch.Tensor) -> dict[str, float]:
        """Rescale the actor LR until mean |Δ log π| is in target · [1 − tol, 1 + tol] (the paper's line search).

        Each iteration multiplies the LR by ratio (update too large) or divides by it (too small), stops when it
        would exceed ``lr_actor`` (keeping the last tried step), otherwise restores the actor's network weights and
        re-steps AdamW with the same gradients: the moments and step counters advance again and the logstd,
        never restored, takes one more step (as the paper's code does). At most ``linesearch_max_iters`` re-steps.
        The LR is restored afterwards. A non-finite size skips the search (the update is then rejected).
        """
        c = self.config
        group = self.optimizer_actor.param_groups[0]
        old_lr = group["lr"]
        low, high = c.target_update * (1 - c.linesearch_tolerance), c.target_update * (1 + c.linesearch_tolerance)
        steps, capped = 1, False
        while math.isfinite(size) and (size > high or size < low) and steps <= c.linesearch_max_iters:
            if size > c.target_update:
                group["lr"] *= c.linesearch_ratio
            else:
                group["lr"] /= c.linesearch_ratio
            if group["lr"] > self.max_lr:
                capped = True
                break
            for p, saved in zip(self._actor_weights, snapshot):
                p.copy_(saved)
            self.optimizer_actor.step()
            size = float((old_log_probs - self._log_probs(obs, act)).abs().mean())
            steps += 1
        group["lr"] = old_lr
        return {"update_delta_logprob_final": size, "update_linesearch_steps": float(steps),
                "update_linesearch_lr_capped": float(capped)}

    def _update_actor_lr(self, initial_size: torch.Tensor) -> None:
        """One AdamW step on −log_lr · (target − initial size), clamp to log(lr_actor), set the LR (the paper's
        learned actor learning rate)."""
        loss = -(self.log_actor_lr * (self.config.target_update - initial_size.detach()))
        self.optimizer_actor_lr.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_actor_lr.step()
        with torch.no_grad():
            self.log_actor_lr.clamp_(max=math.log(self.max_lr))
        self.optimizer_actor.param_groups[0]["lr"] = float(self.log_actor_lr.detach().exp())

    def _loss_metrics(self, losses: A2CLosses, rewards: torch.Tensor,
                      actions: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            lp = losses.log_probs.detach()
            metrics = {
                "loss_actor": losses.loss_actor.detach(),
                "loss_critic": losses.loss_critic.detach(),
                "policy_entropy": losses.entropy.detach().mean(),
                "policy_std": losses.policy_std.detach().mean(),
                "policy_value": losses.values.detach()[:, 0].mean(),
                "policy_value_im": losses.values.detach().mean(),
                "policy_reward": rewards.mean(),
                "policy_reward_std": rewards.std(),
                "maximum_logprob": lp.max(),
                "minimum_logprob": lp.min(),
            }
            metrics.update(standardized_stats(losses.policy_mean.detach(), losses.policy_std.detach(),
                                              actions))
        return metrics

    def _to_floats(self, tensors: dict[str, torch.Tensor], extra: dict[str, float],
                   checks: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[str]]:
        """Metrics as floats and the names of the failed ``checks`` (bool tensors), in one host sync."""
        flat = [t.detach().float().reshape(()) for t in tensors.values()] + [c.float() for c in checks.values()]
        values = torch.stack(flat).tolist()
        out = dict(zip(tensors, values))
        out["alpha"] = self.config.entropy_weight
        out.update(extra)
        failed = [name for name, ok in zip(checks, values[len(tensors):]) if not ok]
        return out, failed

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: configs, networks, target critic, the three optimisers, log actor LR,
        step."""
        return {
            "step": self.step,
            "config": asdict(self.config),
            "actor_config": asdict(self.actor.config),
            "critic_config": asdict(self.critic.config),
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "optimizer_actor": self.optimizer_actor.state_dict(),
            "optimizer_critic": self.optimizer_critic.state_dict(),
            "log_actor_lr": self.log_actor_lr.detach().clone(),
            "optimizer_actor_lr": self.optimizer_actor_lr.state_dict(),
        }

    @exclusive
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()``; refused (nothing loaded) if made with another A2CConfig, other network sizes,
        or if it holds non-finite weights."""
        keys = ("step", "config", "actor_config", "critic_config", "actor", "critic", "critic_target",
                "optimizer_actor", "optimizer_critic", "log_actor_lr", "optimizer_actor_lr")
        raise_if_problems("A2C trainer", [f"missing key {k!r}" for k in keys if k not in state])
        problems = [f"config {d}" for d in config_differences(self.config, state["config"])]
        problems += [f"actor {d}" for d in config_differences(self.actor.config, state["actor_config"])]
        problems += [f"critic {d}" for d in config_differences(self.critic.config, state["critic_config"])]
        for name, module in (("actor", self.actor), ("critic", self.critic), ("critic_target", self.critic_target)):
            problems += module_state_problems(name, module, state[name])
        for name in ("optimizer_actor", "optimizer_critic", "optimizer_actor_lr"):
            problems += optimizer_state_problems(name, getattr(self, name), state[name])
        problems += step_problems(state["step"])
        log_lr = state["log_actor_lr"]
        if not (isinstance(log_lr, torch.Tensor) and log_lr.dim() == 0):
            problems.append(f"log_actor_lr: expected a 0-dim tensor, got {log_lr!r}")
        if not problems:
            for name in ("actor", "critic", "critic_target"):
                problems += nonfinite_tensors(name, state[name])
            problems += nonfinite_tensors("state", {"log_actor_lr": log_lr})
        raise_if_problems("A2C trainer", problems)
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        # torch's optimisers keep the given state tensors (no copy): clone, or two trainers loaded from one state
        # dict would share (and both update) the same Adam moments
        self.optimizer_actor.load_state_dict(cloned(state["optimizer_actor"]))
        self.optimizer_critic.load_state_dict(cloned(state["optimizer_critic"]))
        with torch.no_grad():
            self.log_actor_lr.copy_(state["log_actor_lr"])
        self.optimizer_actor_lr.load_state_dict(cloned(state["optimizer_actor_lr"]))
        self.step = int(state["step"])
