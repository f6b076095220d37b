"""Atomic, rotating checkpoints of a run and the process RNG states an exact continuation needs.

``CheckpointManager(directory, keep_last)``: ``save(step, state)`` writes ``step_<step>.pt`` atomically (temp file,
fsync, rename, fsync of the directory) and deletes all but the newest ``keep_last``; ``latest()`` loads the newest
as ``(step, state)``. A state is a nested dict of tensors, numbers, strings, lists and tuples (it is loaded with
``torch.load(weights_only=True)``: no pickled code runs at resume). ``capture_rng_states()`` /
``restore_rng_states()`` put the global torch, CUDA, numpy and Python generators into such a state.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"step_(\d+)\.pt")
_TEMP_SUFFIX = ".tmp"


class CheckpointManager:
    """Checkpoints ``step_<step>.pt`` in ``directory``, the newest ``keep_last`` kept.

    Temp files left by a save that was killed before its rename are deleted on construction (they were never a
    checkpoint: the rename is the commit).
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".step_*.pt*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:010d}.pt"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.fullmatch(p.name)))

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step`` (replacing one of the same step), then drop old ones."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        path = self.path(step)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{_TEMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                torch.save({"step": step, "state": state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        for old in self.steps()[:-self.keep_last]:
            self.path(old).unlink(missing_ok=True)
        return path

    def latest(self, map_location=None) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest checkpoint, or None when there is none.

        A newest checkpoint that cannot be read raises (it is never skipped silently: a silent fallback to an
        older one would redo steps without saying so).
        """
        steps = self.steps()
        if not steps:
            return None
        path = self.path(steps[-1])
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise RuntimeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                               f"resume from the previous one ({len(steps) - 1} older kept)") from exc
        if data.get("step") != steps[-1]:
            raise RuntimeError(f"checkpoint {path} records step {data.get('step')!r}, its name says {steps[-1]}")
        return steps[-1], data["state"]


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a crash after it cannot bring the old name back)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture_rng_states() -> dict[str, Any]:
    """The global torch (and, once initialised, CUDA), numpy and Python RNG states, in checkpointable form."""
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_states``."""
    torch.set_rng_state(states["torch"].cpu())
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states:
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
