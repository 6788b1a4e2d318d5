"""Test-wide setup.

Triton kernels run under the interpreter on machines without CUDA. The interpreter is chosen when `@triton.jit`
decorates a kernel, so the variable must be set before any kernel module is imported: that is here, before the
tests import `hlsa.ops.triton.*`.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run many tiny ops; with pytest-xdist each worker has a core of its own, and intra-op threads only add
# contention (a 2-thread `.min()` on a loaded 2-core machine was measured at ~10 ms, single-threaded at ~0.1 ms).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
