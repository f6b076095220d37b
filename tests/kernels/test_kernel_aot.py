"""Every launched kernel variant compiles ahead of time for real GPUs (sm_80, sm_90), with no GPU present.

The interpreter (chosen in conftest.py) replaces the kernels by interpreted functions in this process, so the
compilation runs in a child Python without TRITON_INTERPRET: it runs this file as a script. The variants are
built by the launchers' own ``_launch_args`` on small CPU tensors, so the signatures and constexprs compiled here
are the ones a real launch uses.
"""
import json
import os
import subprocess
import sys

import pytest

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32"}


def launch_variants():
    """(name, kernel, args) for each distinct variant the public functions launch."""
    import importlib

    import torch

    from polygrad_fast.schedule import NoiseSchedule

    # The package re-exports each public function under its module's name, so fetch the modules themselves.
    ks, ka, kq = (importlib.import_module(f"polygrad_fast.kernels.{m}")
                  for m in ("guided_state_update", "guided_action_update", "q_sample"))

    sched = NoiseSchedule(8)
    table, sa, s1 = sched.step_table(), sched.table("sqrt_alphas_cumprod"), sched.table("sqrt_one_minus_alphas_cumprod")
    B, H, O, A = 2, 3, 5, 3
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(B, H, O + 2, dtype=dtype)
        act = torch.zeros(B, H, A, dtype=dtype)
        obs, one_a = torch.zeros(O), torch.ones(A)
        dn = str(dtype).removeprefix("torch.")
        # bf16 goes through the default variant of each kernel; fp32 through all of them.
        for sfg in ("recon", "posterior_mean") if dtype == torch.float32 else ("recon",):
            for noise, seed in ((x, None), (None, 3)):
                _, args = ks._launch_args(x, x, x[:, 0, :O], table[4], obs, obs, 0.5, noise, sfg, seed, 4)
                yield f"state_update/{sfg}/seed={seed}/{dn}", ks._guided_state_update_kernel, args
        for gtype in ("grad", "sample", "none") if dtype == torch.float32 else ("grad",):
            for noise, seed in ((act, None), (None, 3)):
                _, args = ka._launch_args(act, act, one_a, one_a, one_a, table[4], 1.0, 2.0, noise, 1.0, gtype,
                                          False, seed, 4)
                yield f"action_update/{gtype}/seed={seed}/{dn}", ka._guided_action_update_kernel, args
        steps = torch.zeros(B, dtype=torch.int64)
        for noise, seed in ((x, None), (None, 3)):
            for scale in (0.0, 0.5) if dtype == torch.float32 else (0.5,):
                _, args = kq._launch_args(x, act, steps, sa, s1, noise, None if seed else act, scale, O, seed)
                yield f"q_sample/scale={scale}/seed={seed}/{dn}", kq._q_sample_kernel, args


def signature(kernel, args):
    """ASTSource signature and constexprs of one launch's arguments."""
    import torch

    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    sig, constexprs = {}, {}
    for name, value in args.items():
        if name in constexpr_names:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + DTYPES[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig, constexprs


def compile_all(capability):
    """Compiles every variant for ``capability``; prints one JSON line {name: error or None}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results, seen = {}, set()
    for name, kernel, args in launch_variants():
        sig, constexprs = signature(kernel, args)
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())))
        if key in seen:  # e.g. 'none' guidance never reads noise: both noise modes launch the same variant
            continue
        seen.add(key)
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", capability, 32))
            results[name] = None if compiled.asm.get("cubin") else "no cubin produced"
        except Exception as exc:  # report every failing variant, not just the first
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]
    print(json.dumps(results))


@pytest.mark.parametrize("capability", [90, 80])
def test_kernels_compile_for_gpu(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__, str(capability)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) >= 14, results  # every kernel, every constexpr variant, plus bf16
    failures = {name: err for name, err in results.items() if err is not None}
    assert not failures, json.dumps(failures, indent=1)


if __name__ == "__main__":
    compile_all(int(sys.argv[1]))
