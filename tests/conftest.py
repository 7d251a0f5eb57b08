"""Fixtures shared by several test modules (request them with ``pytestmark``)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module, restored after: these tests' tensors are tiny, and torch's
    CPU kernels still wake their OpenMP threads on every call, which costs milliseconds per call
    (tiny matmuls ran ~20x slower with two threads on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
