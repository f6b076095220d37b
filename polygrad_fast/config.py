"""Typed dataclass configs: conversion to/from plain dicts, dotted command-line overrides, saving.

Each component owns its config dataclass next to its code; run configs nest them and named presets build them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any


def to_dict(cfg) -> dict[str, Any]:
    """Nested plain dict of a (nested) dataclass config."""
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: str, annotation, where: str):
    """Parse a command-line string into the field's declared type (int, float, bool, str, Optional, Literal)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if text.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _parse_value(text, a, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: cannot parse {text!r} as {annotation}: {'; '.join(errors)}")
    if origin is typing.Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ValueError(f"{where}: expected one of {list(args)}, got {text!r}")
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean (true/false), got {text!r}")
    if annotation in (int, float, str):
        try:
            return annotation(float(text)) if annotation is int and "e" in text.lower() else annotation(text)
        except ValueError:
            raise ValueError(f"{where}: expected {annotation.__name__}, got {text!r}") from None
    raise ValueError(f"{where}: cannot set a field of type {annotation} from the command line")


def apply_overrides(cfg, overrides: dict[str, str]):
    """A copy of ``cfg`` with dotted-key overrides applied, e.g. ``{"trainer.lr": "1e-4", "seed": "3"}``.

    Unknown keys raise ``KeyError`` listing the valid ones; values are parsed into the field's declared type.
    """
    for key, text in overrides.items():
        parts = key.split(".")
        cfg = _replace_path(cfg, parts, text, key)
    return cfg


def _replace_path(node, parts: list[str], text: str, full_key: str):
    if not dataclasses.is_dataclass(node):
        raise KeyError(f"{full_key}: {'.'.join(parts)} does not name a config section")
    names = {f.name for f in dataclasses.fields(node)}
    head = parts[0]
    if head not in names:
        raise KeyError(f"unknown config key {full_key!r}; valid keys here: {sorted(names)}")
    current = getattr(node, head)
    if len(parts) == 1:
        if dataclasses.is_dataclass(current):
            raise KeyError(f"{full_key} is a config section; set one of its fields, e.g. {full_key}.<field>")
        value = _parse_value(text, _field_types(type(node))[head], full_key)
    else:
        value = _replace_path(current, parts[1:], text, full_key)
    return dataclasses.replace(node, **{head: value})


def from_dict(cls, data: dict[str, Any]):
    """Rebuild a (nested) dataclass config from ``to_dict`` output; unknown keys raise ``KeyError``."""
    types = _field_types(cls)
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


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write the resolved config as JSON (atomically: a half-written config never replaces a good one)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
