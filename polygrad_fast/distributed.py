"""Data-parallel runs on ``torch.distributed``: one process per device, launched by ``torchrun``.

    torchrun --standalone --nproc_per_node 2 -m polygrad_fast train --preset debug --logdir runs/ddp

The design (``docs/distributed.md`` has the long form and the reasons):

- **One logical run, replicated.** Every rank builds the same agent from the same seed and steps the same
  exploration env with the same actor and action noise, so every rank holds a bit-identical trajectory buffer, env
  state and networks; no buffer owner, no data transport. Env steps count as in the paper (one per loop step, not
  one per rank).
- **Sharded compute.** The denoiser's training batch (B windows, drawn identically on every rank) is split in
  ``world_size`` equal row shards; each rank runs the loss on its shard under ``DistributedDataParallel``, whose
  gradient all-reduce averages the shard gradients. The loss is a mean over equal shards, so the averaged gradient
  is the whole batch's and the Adam step equals a single-process step on the whole batch (same t and noise).
  Imagination: each rank imagines its equal share of the ``agent_batch_size`` start states; the shards are
  all-gathered in rank order.
- **Replicated A2C update.** Every rank runs the same actor-critic update on the same gathered batch, so the
  line search, the learned actor LR and the guidance tuner take the same decisions everywhere with no extra
  collective, and the update is exactly the single-process one on that batch.
- **Rank-specific randomness** (the imagination noise and the diffusion trainer's t / noise draws) comes from
  ``rank_seed``: rank 0 keeps the single-process seeds, the other ranks get distinct streams.

``DistContext`` is what the rest of the package sees: rank, world size, and the few collectives the loop needs,
each wrapped so that a peer that died or hung surfaces as a ``DistributedError`` naming the operation and the
timeout instead of a hang. ``process_group(device)`` reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``,
initialises gloo (CPU) or NCCL (CUDA, device ``cuda:LOCAL_RANK``) with the timeout from
``POLYGRAD_DIST_TIMEOUT`` (seconds), and tears it down at the end; without torchrun's variables (or with
``WORLD_SIZE=1``) it yields ``SINGLE`` and nothing changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch

TIMEOUT_ENV = "POLYGRAD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed or timed out (a peer stopped, hung, or diverged); the message names rank and operation."""


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its node).

    With ``world_size == 1`` (``SINGLE``) every method is the identity or a no-op and issues no collective.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes the run directory, the logs and the checkpoints."""
        return self.rank == 0

    # ------------------------------------------------------------------ devices, seeds, shards
    def device(self, requested: str) -> torch.device:
        """The device of this rank: ``requested`` alone; under torchrun 'cuda' becomes ``cuda:LOCAL_RANK``."""
        dev = torch.device(requested)
        if not self.enabled or dev.type != "cuda":
            return dev
        if dev.index is not None and dev.index != self.local_rank:
            raise ValueError(f"device {requested!r} under torchrun: each rank uses cuda:LOCAL_RANK "
                             f"(here cuda:{self.local_rank}); pass --device cuda")
        return torch.device("cuda", self.local_rank)

    def rank_seed(self, seed: int) -> int:
        """A seed for this rank's own random stream: ``seed`` itself on rank 0 (so rank 0 draws what a
        single-process run draws), a distinct mix of (seed, rank) on the others."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))

    def shard(self, n: int, what: str) -> slice:
        """Rows ``[rank * n / N, (rank + 1) * n / N)`` of a batch of ``n``; ``n`` must split evenly (equal shards
        keep the mean of the shard losses equal to the whole batch's)."""
        if n % self.world_size:
            raise ValueError(f"{what} = {n} must be a multiple of the world size {self.world_size} (equal shards "
                             "per rank)")
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    # ------------------------------------------------------------------ collectives
    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, torch.distributed.DistError) as exc:
            if isinstance(exc, DistributedError):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({type(exc).__name__}: {exc}). Another rank "
                "has most likely stopped (see its error) or did not reach this point within the "
                f"{self.timeout_s:g} s timeout (set {TIMEOUT_ENV} to change it); stopping") from exc

    def gather_rows(self, tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Each tensor [n, ...] of this rank -> [world_size * n, ...]: every rank's rows, in rank order."""
        if not self.enabled:
            return list(tensors)
        out = []
        with self._collective(what):
            for t in tensors:
                t = t.contiguous()
                parts = [torch.empty_like(t) for _ in range(self.world_size)]
                torch.distributed.all_gather(parts, t)
                out.append(torch.cat(parts))
        return out

    def reduce(self, values: torch.Tensor, what: str, op: str = "mean") -> torch.Tensor:
        """``values`` combined over ranks: 'mean', 'max' or 'min' (a new tensor; the input is untouched)."""
        if not self.enabled:
            return values
        ops = {"mean": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {list(ops)}, got {op!r}")
        out = values.detach().clone()
        with self._collective(what):
            torch.distributed.all_reduce(out, op=ops[op])
        return out / self.world_size if op == "mean" else out

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective(what):
            torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self, what: str) -> None:
        if self.enabled:
            with self._collective(what):
                torch.distributed.barrier()

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 only and give its result to every rank; an exception it raises is raised on every
        rank (same type when it can be rebuilt from its message, else ``DistributedError``)."""
        if not self.enabled:
            return fn()
        outcome: list[Any] = [None]
        error: Exception | None = None
        if self.is_main:
            try:
                outcome[0] = ("ok", fn(), None)
            except Exception as exc:  # every rank must hear of it, not wait at the broadcast below
                error = exc
                outcome[0] = ("error", type(exc), str(exc))  # a class and a string always pickle
        with self._collective(what):
            torch.distributed.broadcast_object_list(outcome, src=0)
        kind, value, message = outcome[0]
        if kind == "ok":
            return value
        if error is not None:
            raise error
        try:
            rebuilt = value(message)
        except Exception:
            rebuilt = DistributedError(f"{what} failed on rank 0: {value.__name__}: {message}")
        raise rebuilt

    def check_replicas(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        """Raise ``DistributedError`` unless every named tensor is bit-identical on all ranks (one SHA-1 per name,
        gathered): the replicated design's invariant, checked before each checkpoint."""
        if not self.enabled:
            return
        digests = {name: _digest(t) for name, t in tensors.items()}
        everyone = self.gather_objects(digests, f"the replica check of {what}")
        differ = sorted(name for name in digests if len({d[name] for d in everyone}) > 1)
        if differ:
            raise DistributedError(f"rank {self.rank} of {self.world_size}: {what} differ between ranks: "
                                   f"{', '.join(differ)}; the replicated state diverged (non-deterministic "
                                   "kernels or different hardware per rank?), stopping rather than continuing "
                                   "with mismatched replicas")


SINGLE = DistContext()


def row_shard(batch: T, rows: slice) -> T:
    """A dataclass batch (``buffer.WindowBatch``) with every tensor field cut to ``rows`` of dim 0 (views)."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def gather_imagined(ctx: DistContext, batch: T) -> T:
    """Every rank's shard of an ``ImaginedBatch`` concatenated in rank order, on every rank.

    Tensor fields are all-gathered; the 0-dim tensor ``metrics`` are combined over the ranks (``max_*`` by max,
    ``min_*`` by min, the rest by mean: with equal shards the mean of the shard means, and for ``act_std`` the
    mean of the shard stds), other metrics (``sampling_time``) stay this rank's.
    """
    names = [f.name for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    gathered = dict(zip(names, ctx.gather_rows([getattr(batch, n) for n in names], "gathering the imagined batch")))
    metrics = dict(batch.metrics)
    for op in ("mean", "max", "min"):
        keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.dim() == 0
                and (k.startswith(f"{op}_") if op != "mean" else not k.startswith(("max_", "min_")))]
        if keys:
            combined = ctx.reduce(torch.stack([metrics[k].float() for k in keys]),
                                  "combining the imagined batch's metrics", op)
            metrics.update(zip(keys, combined.unbind()))
    return dataclasses.replace(batch, **gathered, metrics=metrics)


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw bits
        data = data.view(torch.int16)
    return hashlib.sha1(data.numpy().tobytes()).hexdigest()


def timeout_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds from ``POLYGRAD_DIST_TIMEOUT`` (default 600): how long a collective waits for a silent peer."""
    raw = environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def context_from_env(environ: Mapping[str, str] = os.environ) -> DistContext:
    """``DistContext`` from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``SINGLE`` without them)."""
    if "WORLD_SIZE" not in environ:
        return dataclasses.replace(SINGLE, timeout_s=timeout_from_env(environ))
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = environ.get(name)
        if raw is None or not raw.isdigit():
            raise ValueError(f"torchrun's {name} must be an int >= 0, got {raw!r} (WORLD_SIZE is set, so the "
                             "process expects to be one rank of a torchrun launch)")
        values[name] = int(raw)
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if world < 1 or rank >= world:
        raise ValueError(f"RANK {rank} must be in [0, WORLD_SIZE {world})")
    return DistContext(rank, world, values["LOCAL_RANK"], timeout_from_env(environ))


@contextlib.contextmanager
def process_group(device: str, environ: Mapping[str, str] = os.environ) -> Iterator[DistContext]:
    """The run's ``DistContext``; under torchrun (WORLD_SIZE > 1) a gloo (CPU) or NCCL (CUDA) process group is
    initialised for the block and destroyed after it (one already initialised by the caller is used as is)."""
    ctx = context_from_env(environ)
    if not ctx.enabled:
        yield ctx
        return
    dev = ctx.device(device)  # validates before anything starts
    if dev.type == "cuda":
        if not torch.cuda.is_available() or ctx.local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {ctx.rank}: device cuda:{ctx.local_rank} (LOCAL_RANK) is not there; "
                             f"{torch.cuda.device_count()} CUDA devices visible")
        torch.cuda.set_device(dev)
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                             timeout=timedelta(seconds=ctx.timeout_s))
    elif torch.distributed.get_world_size() != ctx.world_size or torch.distributed.get_rank() != ctx.rank:
        raise ValueError(f"the initialised process group (rank {torch.distributed.get_rank()} of "
                         f"{torch.distributed.get_world_size()}) does not match RANK {ctx.rank} / WORLD_SIZE "
                         f"{ctx.world_size}")
    try:
        yield ctx
    finally:
        if owned:
            torch.distributed.destroy_process_group()
