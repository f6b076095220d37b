"""Kernel tests run on a real GPU when there is one, otherwise under the Triton interpreter.

The interpreter is chosen when a kernel is decorated, so TRITON_INTERPRET must be set here, before any test module
imports ``polygrad_fast.kernels`` (nothing else in the package imports it eagerly).
"""
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if "polygrad_fast.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("polygrad_fast.kernels was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.fixture
def device():
    """Where the kernels run: the GPU, or the CPU under the interpreter."""
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The tensors here are tiny: one intra-op thread is faster on a busy 2-core machine, and it keeps torch's
    OpenMP pool unstarted, which a later test that forks the pytest process relies on (GNU OpenMP is not
    fork-safe once its threads exist)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
