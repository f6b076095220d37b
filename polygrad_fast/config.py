"""Typed dataclass configs: conversion to and from plain dicts, dotted-name differences, saving.

Each component owns its config dataclass next to its code; run configs nest them, named presets build them and
the command line (``polygrad_fast.cli``) sets any field from its type.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

_MISSING = "(absent)"


def to_dict(cfg) -> dict[str, Any]:
    """Nested plain dict of a (nested) dataclass config, as written to ``config.json`` (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls, data: dict[str, Any]):
    """Rebuild a (nested) dataclass config from ``to_dict`` output; unknown keys raise ``KeyError``."""
    types = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp = types[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"lr": 1e-4}}`` -> ``{"trainer.lr": 1e-4}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted name, old value, new value) for every field that differs between two ``to_dict`` outputs, sorted by
    name; a field only one side has shows the other side's value as ``"(absent)"``."""
    a, b = flatten(old), flatten(new)
    return [(key, a.get(key, _MISSING), b.get(key, _MISSING)) for key in sorted(a.keys() | b.keys())
            if a.get(key, _MISSING) != b.get(key, _MISSING)]


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write the resolved config as JSON (atomically: a half-written config never replaces a good one)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
