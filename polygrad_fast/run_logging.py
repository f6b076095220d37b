"""Run logging: every record goes to stdout and to ``metrics.jsonl``; TensorBoard is optional.

In a data-parallel run only rank 0 logs (``RunLogger``); the other ranks hold a ``NullLogger``, so the loop calls
``log`` the same way everywhere and the run directory gets one log.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping


class RunLogger:
    """Writes ``{"step": s, "time": seconds since start, **metrics}`` lines to ``<logdir>/metrics.jsonl``.

    Values must be numbers (torch scalars are converted); stdout gets a short line per record.
    ``resume_step``: continue an interrupted run whose checkpoint is at that step: records of later steps (they
    will be logged again) are dropped from the file first, ``records`` holds the ones kept, and ``time`` continues
    from the last kept record's. None (the default) appends to the file as it is.
    """

    def __init__(self, logdir: str | Path, tensorboard: bool = False, stream=None, resume_step: int | None = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        path = self.logdir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None:
            self.records = _truncate(path, resume_step)
        self._file = open(path, "a", buffering=1)
        self._stream = stream
        self._start = time.perf_counter() - (self.records[-1]["time"] if self.records else 0.0)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("tensorboard logging was requested but the tensorboard package is missing: "
                                   "pip install tensorboard") from exc
            self._tb = SummaryWriter(str(self.logdir / "tb"))

    def log(self, step: int, metrics: Mapping[str, Any], echo: bool | Iterable[str] = True) -> None:
        """Append one record; ``echo`` is True (print all), False, or the keys to print (long records)."""
        record = {"step": int(step), "time": round(time.perf_counter() - self._start, 3)}
        for key, value in metrics.items():
            value = float(value.item() if hasattr(value, "item") else value)
            record[key] = value if math.isfinite(value) else str(value)
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self._tb.add_scalar(key, value, step)
        if echo:
            keys = record if echo is True else ["step", "time", *echo]
            shown = "  ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
                              for k in keys if k in record)
            print(shown, file=self._stream or sys.stdout, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullLogger:
    """``RunLogger``'s interface, writing nothing: the logger of a data-parallel run's ranks other than 0."""

    def __init__(self):
        self.records: list[dict[str, Any]] = []

    def log(self, step: int, metrics: Mapping[str, Any], echo: bool | Iterable[str] = True) -> None:
        pass

    def close(self) -> None:
        pass


def _truncate(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records of ``path`` with step <= ``last_step`` (atomic rewrite); returns them.

    A line that does not parse can only be the tail of a write cut short by a kill: it is dropped too.
    """
    if not path.exists():
        return []
    kept, lines = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= last_step:
            kept.append(record)
            lines.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return kept
