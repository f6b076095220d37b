import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from polygrad_fast.config import differences, flatten, from_dict, save_config, to_dict
from polygrad_fast.run_logging import RunLogger


@dataclass(frozen=True)
class Inner:
    lr: float = 3e-4
    clip: Optional[float] = 3.0
    kind: Literal["grad", "sample", "none"] = "grad"
    sizes: tuple = (1, 2)


@dataclass(frozen=True)
class Outer:
    seed: int = 0
    fast: bool = True
    inner: Inner = field(default_factory=Inner)


def test_dict_round_trip_and_save(tmp_path):
    cfg = Outer(seed=3, inner=Inner(clip=None, sizes=(4,)))
    assert to_dict(cfg)["inner"]["sizes"] == [4]  # as config.json holds it
    assert from_dict(Outer, to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "config.json")
    assert from_dict(Outer, json.loads(path.read_text())) == cfg
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(KeyError, match="unknown config keys"):
        from_dict(Outer, {"nope": 1})


def test_flatten_and_differences():
    assert flatten(to_dict(Outer())) == {"seed": 0, "fast": True, "inner.lr": 3e-4, "inner.clip": 3.0,
                                         "inner.kind": "grad", "inner.sizes": [1, 2]}
    old, new = to_dict(Outer()), to_dict(Outer(seed=2, inner=Inner(lr=1e-3)))
    assert differences(old, new) == [("inner.lr", 3e-4, 1e-3), ("seed", 0, 2)]
    assert differences(old, old) == []
    del old["inner"]["kind"]  # a field one side lacks (e.g. a config from an older version)
    assert differences(old, to_dict(Outer())) == [("inner.kind", "(absent)", "grad")]


def test_run_logger_writes_jsonl_and_stdout(tmp_path, capsys):
    with RunLogger(tmp_path) as log:
        log.log(5, {"loss": 0.5, "nan": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert rec["step"] == 5 and rec["loss"] == 0.5 and rec["nan"] == "nan"
    assert "loss=0.5" in capsys.readouterr().out


def test_run_logger_resume_drops_records_after_the_checkpoint(tmp_path):
    with RunLogger(tmp_path, stream=open("/dev/null", "w")) as log:
        for step in (0, 10, 20, 30):
            log.log(step, {"x": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "x"')  # the tail of a write cut short by a kill
    with RunLogger(tmp_path, stream=open("/dev/null", "w"), resume_step=20) as log:
        assert [r["step"] for r in log.records] == [0, 10, 20]
        log.log(30, {"x": -30})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 10, 20, 30]
    with RunLogger(tmp_path, stream=open("/dev/null", "w"), resume_step=-1) as log:  # start over
        assert log.records == []
    assert (tmp_path / "metrics.jsonl").read_text() == ""
