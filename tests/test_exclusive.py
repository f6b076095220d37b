"""Trainers and the guidance tuner reject concurrent use from a second thread with a clear error."""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from polygrad_fast.a2c import A2CTrainer
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.diffusion_trainer import DiffusionTrainer
from polygrad_fast.exclusive import ExclusiveUse
from polygrad_fast.guidance import GuidanceScaleTuner
from polygrad_fast.policy import Actor, Critic
from polygrad_fast.schedule import NoiseSchedule


def held_elsewhere(guard: ExclusiveUse):
    """Start a thread that holds ``guard`` until the returned event is set."""
    entered, release = threading.Event(), threading.Event()

    def hold():
        with guard("update"):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(10)
    return release, thread


def objects():
    tuner = GuidanceScaleTuner()
    a2c = A2CTrainer(Actor(3, 2, hidden=8), Critic(3, hidden=8))
    diffusion = DiffusionTrainer(ResidualMLPDenoiser(2, 5, 2, MLPDenoiserConfig(hidden_dim=8, num_layers=1)),
                                 NoiseSchedule(4))
    return [(tuner, "update", (torch.tensor(1.0),)), (tuner, "load_state_dict", ({},)),
            (a2c, "update", (None,)), (a2c, "load_state_dict", ({},)),
            (diffusion, "train_step", (None,)), (diffusion, "load_state_dict", ({},))]


@pytest.mark.parametrize("index", range(6))
def test_second_thread_is_refused_naming_the_method(index):
    obj, method, args = objects()[index]
    release, thread = held_elsewhere(obj._exclusive)
    try:
        with pytest.raises(RuntimeError, match=rf"{type(obj).__name__}\.{method} was called while another thread"):
            getattr(obj, method)(*args)
    finally:
        release.set()
        thread.join()
    if method == "update" and isinstance(obj, GuidanceScaleTuner):  # free again once the other thread is done
        obj.update(torch.tensor(1.0))


def test_same_thread_may_reenter_and_copies_get_their_own_guard():
    guard = ExclusiveUse("Thing")
    with guard("a"), guard("b"):
        pass
    tuner = GuidanceScaleTuner()
    release, thread = held_elsewhere(tuner._exclusive)
    try:
        for clone in (copy.deepcopy(tuner), pickle.loads(pickle.dumps(tuner))):
            before = float(clone.log_scale)
            clone.update(torch.tensor(2.0))  # not blocked by the original's holder
            assert float(clone.log_scale) != before
    finally:
        release.set()
        thread.join()
