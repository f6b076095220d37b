import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from polygrad_fast.config import apply_overrides, from_dict, save_config, to_dict
from polygrad_fast.run_logging import RunLogger


@dataclass(frozen=True)
class Inner:
    lr: float = 3e-4
    clip: Optional[float] = 3.0
    kind: Literal["grad", "sample", "none"] = "grad"


@dataclass(frozen=True)
class Outer:
    seed: int = 0
    fast: bool = True
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_types():
    cfg = apply_overrides(Outer(), {"seed": "7", "fast": "false", "inner.lr": "1e-3", "inner.clip": "None",
                                    "inner.kind": "sample"})
    assert cfg == Outer(seed=7, fast=False, inner=Inner(lr=1e-3, clip=None, kind="sample"))
    assert apply_overrides(Outer(), {"seed": "1e3"}).seed == 1000


@pytest.mark.parametrize("key,value,exc,match", [
    ("sede", "1", KeyError, "unknown config key 'sede'"),
    ("inner", "1", KeyError, "is a config section"),
    ("seed", "abc", ValueError, "seed: expected int"),
    ("fast", "maybe", ValueError, "expected a boolean"),
    ("inner.kind", "bogus", ValueError, r"expected one of \['grad', 'sample', 'none'\]"),
])
def test_bad_overrides(key, value, exc, match):
    with pytest.raises(exc, match=match):
        apply_overrides(Outer(), {key: value})


def test_dict_round_trip_and_save(tmp_path):
    cfg = Outer(seed=3, inner=Inner(clip=None))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "config.json")
    assert from_dict(Outer, json.loads(path.read_text())) == cfg
    with pytest.raises(KeyError, match="unknown config keys"):
        from_dict(Outer, {"nope": 1})


def test_run_logger_writes_jsonl_and_stdout(tmp_path, capsys):
    with RunLogger(tmp_path) as log:
        log.log(5, {"loss": 0.5, "nan": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert rec["step"] == 5 and rec["loss"] == 0.5 and rec["nan"] == "nan"
    assert "loss=0.5" in capsys.readouterr().out
