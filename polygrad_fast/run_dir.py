"""Run directories: one run per directory, never replaced without being asked.

``prepare_run_dir(path, config, overwrite)`` makes ``path`` the directory of a run of the dataclass ``config``:

- missing or empty: created, ``config.json`` written; returns False (a new run);
- holds ``config.json`` of the same config: returns True (the caller resumes from its newest checkpoint);
- holds a different config: ``RunDirError`` naming every differing field (dotted name, saved and given value),
  unless ``overwrite``: then everything in it is deleted, each entry named on ``report``, and a new run starts;
- not empty and without ``config.json`` (not a run directory): ``RunDirError``, even with ``overwrite``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from .cli import UsageError
from .config import differences, save_config, to_dict

CONFIG_FILE = "config.json"


class RunDirError(UsageError):
    """The run directory cannot be used for this run as asked (the message says why and what to do)."""


def _describe(entry: Path) -> str:
    if entry.is_dir():
        return f"{entry.name}/ ({sum(1 for p in entry.rglob('*') if p.is_file())} files)"
    return entry.name


def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_run_dir(path: str | os.PathLike, config, overwrite: bool = False,
                    report: Callable[[str], None] = _report) -> bool:
    """Create or check the run directory of ``config``; True when it continues a run of the same config."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a directory")
    entries = sorted(path.iterdir()) if path.exists() else []
    config_path = path / CONFIG_FILE
    if entries and not config_path.is_file():
        shown = ", ".join(e.name for e in entries[:10]) + (", ..." if len(entries) > 10 else "")
        raise RunDirError(f"{path} is not empty and holds no {CONFIG_FILE}, so it is not a run directory "
                          f"(it holds: {shown}); choose another --logdir")
    if entries:
        try:
            saved = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{config_path} cannot be read ({exc}); move the directory away or pass "
                              "--overwrite to replace it") from exc
        diff = differences(saved, to_dict(config))
        if not diff and not overwrite:
            return True
        lines = "\n".join(f"  {key}: {old!r} (saved) -> {new!r} (given)" for key, old, new in diff)
        if not overwrite:
            raise RunDirError(f"{path} holds a run with a different config; refusing to replace it. Differing "
                              f"fields:\n{lines}\nRerun with the saved values to resume that run, choose another "
                              "--logdir, or pass --overwrite to delete it and start a new run there.")
        why = f"differing fields:\n{lines}" if diff else "same config"
        report(f"--overwrite: replacing the run in {path} ({why})\n  deleting: "
               + ", ".join(_describe(e) for e in entries))
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    save_config(config, config_path)
    return False
