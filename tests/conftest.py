import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run the test on one torch thread: on a loaded 2-core host two OpenMP threads wait on each other at every
    barrier (a debug world-model run: ~45 s on two threads, a few seconds on one). Results are compared only
    between runs on the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
