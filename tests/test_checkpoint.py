"""CheckpointManager (atomic save, rotation, stale temp files, unreadable newest), RNG capture/restore and the
run-directory rules of prepare_run_dir."""
import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from polygrad_fast.checkpoint import CheckpointManager, capture_rng_states, restore_rng_states
from polygrad_fast.run_dir import RunDirError, prepare_run_dir


def test_save_latest_and_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        mgr.save(step, {"w": torch.full((3,), float(step)), "meta": {"step": step, "name": "x"}})
    assert mgr.steps() == [20, 30]
    step, state = mgr.latest()
    assert step == 30 and state["meta"] == {"step": 30, "name": "x"}
    torch.testing.assert_close(state["w"], torch.full((3,), 30.0), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_0000000020.pt", "step_0000000030.pt"]


def test_stale_temp_files_are_removed_and_never_loaded(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(5, {"a": 1})
    stale = tmp_path / ".step_0000000010.pt.12345.tmp"  # a save killed before its rename
    stale.write_bytes(b"half a checkpoint")
    assert CheckpointManager(tmp_path).latest()[0] == 5
    assert not stale.exists()


def test_unreadable_newest_checkpoint_raises(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"a": 1})
    mgr.path(2).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"(?s)step_0000000002.pt cannot be read .*delete it to resume from the "
                                           r"previous one \(1 older kept\)"):
        mgr.latest()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_keep_last_is_checked(tmp_path, bad):
    with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
        CheckpointManager(tmp_path, keep_last=bad)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    mgr = CheckpointManager(tmp_path)
    mgr.save(0, {"rng": capture_rng_states()})
    expected = (torch.rand(4), np.random.normal(size=4), [random.random() for _ in range(4)])
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    restore_rng_states(mgr.latest()[1]["rng"])  # loaded with weights_only=True
    got = (torch.rand(4), np.random.normal(size=4), [random.random() for _ in range(4)])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3


@dataclass(frozen=True)
class Config:
    seed: int = 0
    inner: Inner = field(default_factory=Inner)


def test_new_run_dir_and_resume(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(run, Config()) is False
    assert json.loads((run / "config.json").read_text()) == {"seed": 0, "inner": {"lr": 1e-3}}
    (run / "metrics.jsonl").write_text("{}\n")
    assert prepare_run_dir(run, Config()) is True  # same config: resume
    assert (run / "metrics.jsonl").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_run_dir(empty, Config(seed=1)) is False


def test_different_config_is_refused_with_the_differing_fields(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, Config())
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError) as info:
        prepare_run_dir(run, Config(seed=3, inner=Inner(lr=0.5)))
    message = str(info.value)
    assert "holds a run with a different config; refusing to replace it" in message
    assert "  inner.lr: 0.001 (saved) -> 0.5 (given)\n  seed: 0 (saved) -> 3 (given)" in message
    assert "--overwrite" in message
    assert json.loads((run / "config.json").read_text())["seed"] == 0 and (run / "metrics.jsonl").exists()


def test_overwrite_says_what_it_deletes(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, Config())
    (run / "metrics.jsonl").write_text("{}\n")
    CheckpointManager(run / "checkpoints").save(1, {"a": 1})
    said = []
    assert prepare_run_dir(run, Config(seed=3), overwrite=True, report=said.append) is False
    assert len(said) == 1 and "seed: 0 (saved) -> 3 (given)" in said[0]
    assert "deleting: checkpoints/ (1 files), config.json, metrics.jsonl" in said[0]
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert json.loads((run / "config.json").read_text())["seed"] == 3


def test_a_directory_that_is_not_a_run_is_never_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match=r"is not empty and holds no config.json.*notes.txt"):
            prepare_run_dir(tmp_path, Config(), overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine"
