"""Data-parallel runs on torch.distributed (gloo, 2 processes on the CPU, launched by torchrun): a 2-rank denoiser
update on two half-batches equals a single-process update on the whole batch, replicas that diverge are caught,
a rank-0-only step hands its result or exception to every rank, a rank that raises or hangs brings the run down with a clear error within the timeout, and (slow) a 2-rank agent
run completes, checkpoints and resumes exactly. Every launch runs under a wall-clock limit and is killed as a
process group past it, so no test can hang."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from polygrad_fast.checkpoint import CheckpointManager
from polygrad_fast.distributed import (SINGLE, TIMEOUT_ENV, DistContext, context_from_env, process_group,
                                       timeout_from_env)

TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (TORCHRUN.exists() and torch.distributed.is_gloo_available()),
                                reason="needs torchrun and the gloo backend")


def _torchrun(args: list[str], tmp_path: Path, wall_s: float = 600, env: dict | None = None, nproc: int = 2):
    """(returncode, combined output, seconds) of ``torchrun --standalone --nproc_per_node nproc ARGS``; the whole
    process group is killed past ``wall_s`` (the test then fails instead of hanging). The limits are generous:
    on a loaded 2-core host two process starts alone have taken minutes."""
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(env or {})}
    log = tmp_path / f"torchrun_{time.monotonic_ns()}.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=wall_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"torchrun {' '.join(args)} still running after {wall_s} s (killed):\n{log.read_text()[-3000:]}")
    return rc, log.read_text(), time.monotonic() - t0


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---------------------------------------------------------------------------------------------- no processes
def test_context_from_torchrun_variables_and_bad_values():
    assert context_from_env({}) == SINGLE and not SINGLE.enabled and SINGLE.is_main
    ctx = context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", TIMEOUT_ENV: "30"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.timeout_s, ctx.is_main) == (3, 4, 1, 30.0, False)
    with pytest.raises(ValueError, match="torchrun's LOCAL_RANK must be an int >= 0, got None"):
        context_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"RANK 2 must be in \[0, WORLD_SIZE 2\)"):
        context_from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    for bad in ("0", "-5", "nan", "soon"):
        with pytest.raises(ValueError, match=f"{TIMEOUT_ENV} must be a number of seconds > 0, got '{bad}'"):
            timeout_from_env({TIMEOUT_ENV: bad})


def test_shards_devices_and_rank_seeds():
    ranks = [DistContext(rank=r, world_size=4, local_rank=r) for r in range(4)]
    assert [c.shard(8, "B") for c in ranks] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="agent_batch_size = 10 must be a multiple of the world size 4"):
        ranks[1].shard(10, "agent_batch_size")
    assert SINGLE.shard(10, "B") == slice(0, 10)
    assert ranks[2].device("cuda") == torch.device("cuda", 2) and ranks[2].device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'cuda:0' under torchrun: each rank uses cuda:LOCAL_RANK \(here cuda:2\)"):
        ranks[2].device("cuda:0")
    seeds = [c.rank_seed(7) for c in ranks]
    assert seeds[0] == 7 and len(set(seeds)) == 4  # rank 0 draws what a single process draws; the rest differ
    assert seeds == [c.rank_seed(7) for c in ranks]  # reproducible
    with process_group("cpu", environ={}) as ctx:  # no torchrun variables: no process group
        assert ctx == SINGLE and not torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------- gloo, 2 ranks
DDP_WORKER = """
    import functools, json, sys
    from types import SimpleNamespace
    import torch
    from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
    from polygrad_fast.diffusion_trainer import DiffusionTrainer, DiffusionTrainerConfig
    from polygrad_fast.distributed import SINGLE, DistributedError, process_group
    from polygrad_fast.schedule import NoiseSchedule

    B, H, O, A, T, STEPS = 8, 4, 3, 2, 8, 3
    FIELDS = ("observations", "actions", "rewards", "terminals")
    g = torch.Generator().manual_seed(1)  # the same batches and draws on every rank
    batches = [SimpleNamespace(observations=torch.randn(B, H, O, generator=g), actions=torch.randn(B, H, A, generator=g),
                               rewards=torch.randn(B, H, generator=g), terminals=(torch.rand(B, H, generator=g) < 0.2).float())
               for _ in range(STEPS)]
    draws = [(torch.randint(0, T, (B,), generator=g), torch.randn(B, H, O + 2, generator=g)) for _ in range(STEPS)]

    def build(dist):
        torch.manual_seed(0)
        denoiser = ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=32, num_layers=2))
        return DiffusionTrainer(denoiser, NoiseSchedule(T), DiffusionTrainerConfig(lr=1e-3, step_start_ema=1,
                                                                                  update_ema_every=1), dist)

    def train(trainer, rows):
        # t and noise of these rows of the whole batch's draws, so the two ways see the same noise
        loss_fn, losses = trainer.loss_fn, []
        for batch, (t, noise) in zip(batches, draws):
            trainer.loss_fn = functools.partial(loss_fn, t=t[rows], noise=noise[rows])
            losses.append(trainer.train_step(SimpleNamespace(**{k: getattr(batch, k)[rows] for k in FIELDS}))["loss"])
        return losses

    def flat(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    with process_group("cpu") as ctx:
        ddp = build(ctx)
        out = {"losses": train(ddp, ctx.shard(B, "B")), "rank": ctx.rank}
        if ctx.is_main:
            whole, half = build(SINGLE), build(SINGLE)
            out["single_losses"] = train(whole, slice(0, B))
            train(half, ctx.shard(B, "B"))  # rank 0's half alone: must differ (the comparison can fail)
            out["max_diff"] = float((flat(ddp.model) - flat(whole.model)).abs().max())
            out["max_diff_ema"] = float((flat(ddp.ema_model) - flat(whole.ema_model)).abs().max())
            out["max_diff_half"] = float((flat(ddp.model) - flat(half.model)).abs().max())
            out["max_step"] = float((flat(whole.model) - flat(build(SINGLE).model)).abs().max())
        ctx.check_replicas({"denoiser": flat(ddp.model), "ema": flat(ddp.ema_model)}, "the test's networks")
        if ctx.rank == 1:
            with torch.no_grad():
                next(ddp.model.parameters()).view(-1)[0] += 1e-6
        try:
            ctx.check_replicas({"denoiser": flat(ddp.model), "ema": flat(ddp.ema_model)}, "the test's networks")
        except DistributedError as exc:
            out["divergence"] = str(exc)
        def refuse():
            raise ValueError("the run directory is refused")

        try:
            ctx.on_main(refuse, "the test's rank-0 step")
        except ValueError as exc:
            out["on_main_error"] = str(exc)
        out["on_main_value"] = ctx.on_main(lambda: 41 + ctx.rank, "the test's rank-0 value")
        with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as f:
            json.dump(out, f)
"""


# slow, not in the default run: on the 2-core AMX VM 3 of 9 runs failed, one of them seen as both ranks killed by
# SIGABRT ("terminate called without an active exception"; the other two were not inspected), while the same
# script passed at every run on AVX2 Zen 3; not yet diagnosed (suspect: gloo threads at process-group teardown),
# see docs/distributed.md
@pytest.mark.slow
def test_two_rank_denoiser_update_equals_single_process_whole_batch(tmp_path):
    rc, log, _ = _torchrun([_script(tmp_path, "ddp_worker.py", DDP_WORKER), str(tmp_path)], tmp_path)
    assert rc == 0, log[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # the returned loss is averaged over the ranks: the whole batch's (equal halves), the same on both ranks
    assert r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(r0["single_losses"], rel=1e-6, abs=0)
    # float32: the averaged half-batch gradients differ from the whole batch's only in summation order (~1e-7
    # relative; how much depends on the CPU's GEMM blocking for each row count); 3 Adam steps of lr 1e-3 move the
    # weights by ~3e-3. Measured largest weight difference: 6e-8 on AVX2 Zen 3, 4.1e-6 on AMX Sapphire Rapids;
    # 2e-5 (0.7% of the step) is above both and far below a half-batch update's (asserted > 1e-4, ~6e-3)
    assert r0["max_step"] > 1e-3
    assert r0["max_diff"] < 2e-5 and r0["max_diff_ema"] < 2e-5
    assert r0["max_diff_half"] > 1e-4  # one half alone is a different update: the check above can fail
    # identical replicas pass the check; a 1e-6 change on rank 1 is caught on both ranks
    for r in (r0, r1):
        assert "the test's networks differ between ranks: denoiser; " in r["divergence"]  # the EMA was not changed
        # a rank-0-only step: its result (rank 0's) and its exception (same type and message) reach every rank
        assert r["on_main_value"] == 41 and r["on_main_error"] == "the run directory is refused"


FAIL_WORKER = """
    import sys, time
    import torch
    from polygrad_fast.distributed import process_group

    with process_group("cpu") as ctx:
        ctx.barrier("the start")
        if ctx.rank == 1:
            if sys.argv[1] == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(3600)  # hangs: never reaches the collective below
        ctx.gather_rows([torch.ones(2)], "the test's all-gather")
"""


# the hang case waits out a 5 s timeout on top of two process starts: slow
@pytest.mark.parametrize("mode", ["raise", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_failing_or_hanging_rank_brings_the_run_down_with_a_clear_error(tmp_path, mode):
    # ending at all (before the wall limit, far below the hang's 3600 s) is the point: nobody waits forever
    rc, log, _ = _torchrun([_script(tmp_path, "fail_worker.py", FAIL_WORKER), mode], tmp_path, wall_s=900,
                           env={TIMEOUT_ENV: "5"})
    assert rc != 0
    if mode == "raise":
        assert "injected failure on rank 1" in log
    else:  # rank 0 waits 5 s at the all-gather, then stops naming it and the timeout; torchrun ends rank 1
        assert ("rank 0 of 2: the test's all-gather failed" in log
                and "did not reach this point within the 5 s timeout" in log), log[-3000:]


# ---------------------------------------------------------------------------------------------- the agent
def _agent(logdir: Path, tmp_path: Path, *extra: str, nproc: int = 2):
    return _torchrun(["-m", "polygrad_fast", "train", "--preset", "debug", "--no_progress", "--logdir", str(logdir),
                      *extra], tmp_path, wall_s=1200, nproc=nproc)


def _records(logdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/") and k != "imagine/sampling_time"}
            for r in rows]


def _final(logdir: Path) -> dict:
    final = json.loads((logdir / "final_metrics.json").read_text())
    return {k: v for k, v in final.items() if k not in ("wall_seconds", "imagine/sampling_time")}


@pytest.mark.slow
def test_two_rank_agent_run_checkpoints_and_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    rc, log, _ = _agent(whole, tmp_path)
    assert rc == 0, log[-3000:]
    final = _final(whole)
    assert (final["env_steps"], final["diffusion_steps"], final["agent_updates"]) == (200, 200, 40)
    assert log.count("done: 200 env steps") == 1  # rank 0 reports, once
    records = _records(whole)
    assert [r["step"] for r in records if "eval/return_mean" in r] == [0, 100, 200]  # one log, rank 0's
    ckpts = CheckpointManager(whole / "checkpoints")
    assert ckpts.steps() == [100, 200]
    state = ckpts.latest()[1]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    ranks = state["ranks"]
    assert not torch.equal(ranks[0]["imagine"], ranks[1]["imagine"])  # each rank its own noise stream
    assert torch.equal(ranks[0]["trainer_generator"], state["trainer"]["generator"])

    # the run as it was at step 100, rerun with 2 ranks: the same log and final metrics as uninterrupted
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        (resumed / name).write_bytes((whole / name).read_bytes())
    name = ckpts.path(100).name
    (resumed / "checkpoints" / name).write_bytes((whole / "checkpoints" / name).read_bytes())
    rc, log, _ = _agent(resumed, tmp_path)
    assert rc == 0, log[-3000:]
    assert "resuming the run" in log
    assert _final(resumed) == final
    assert _records(resumed) == records

    # another world size is refused, naming the one that wrote the checkpoint
    rc, log, _ = _agent(resumed, tmp_path, nproc=1)
    assert rc != 0 and "written by a run of 2 process(es) but this run has 1" in log


@pytest.mark.slow
def test_a_rank_failing_mid_run_stops_the_agent_with_its_error(tmp_path):
    worker = _script(tmp_path, "agent_fail.py", """
        import sys
        from polygrad_fast import agent
        from polygrad_fast.agent_config import get_agent_preset
        from polygrad_fast.distributed import context_from_env

        if context_from_env().rank == 1:
            real = agent.Agent.diffusion_updates

            def failing(self):
                if self.env_steps >= 60:
                    raise RuntimeError(f"injected failure on rank 1 at env step {self.env_steps}")
                real(self)

            agent.Agent.diffusion_updates = failing
        agent.run(get_agent_preset("debug"), sys.argv[1], progress=False)
    """)
    rc, log, _ = _torchrun([worker, str(tmp_path / "run")], tmp_path, wall_s=1200, env={TIMEOUT_ENV: "30"})
    assert rc != 0 and "injected failure on rank 1 at env step 60" in log, log[-3000:]
    assert not (tmp_path / "run" / "final_metrics.json").exists()
