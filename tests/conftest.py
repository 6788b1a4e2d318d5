"""Test-wide setup.

Triton kernels run under the interpreter on machines without CUDA. The interpreter is chosen when `@triton.jit`
decorates a kernel, so the variable must be set before any kernel module is imported: that is here, before the
tests import `hlsa.ops.triton.*`.
"""

import functools
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run many tiny ops; with pytest-xdist each worker has a core of its own, and intra-op threads only add
# contention (a 2-thread `.min()` on a loaded 2-core machine was measured at ~10 ms, single-threaded at ~0.1 ms).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def compile_env() -> dict:
    """The environment of a subprocess that compiles kernels rather than interpreting them (without TRITON_INTERPRET),
    with src and benchmarks importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'benchmarks'}"}


@pytest.fixture
def sm90_compile_env(compile_env: dict) -> dict:
    """`compile_env` for compiling kernels for sm_90 without a GPU (benchmarks/kernel_resources.py's way); skips the
    test where this Triton has no NVIDIA backend tools."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / tool).exists() for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton has no NVIDIA backend tools (ptxas, cuobjdump)")
    return compile_env


@pytest.fixture
def opaque_nsa_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """NSA layers decode through the Triton kernel wrapped as a custom op, so that dynamo can compile a decode step
    on the CPU with `fullgraph=True`: it traces the kernels it knows (CUDA `JITFunction`s) but not the interpreter
    that runs them here, and the reference reads `start` and `seq_len` on the host. The op is one opaque node of the
    graph whose schema takes `seq_len` as a tensor: a step that passed a Python int would not compile."""
    from hlsa.ops.triton import interpreted

    if not interpreted():
        pytest.skip("the CPU stand-in for the CUDA kernel runs under TRITON_INTERPRET=1")
    import hlsa.layers.nsa

    op = _nsa_decode_op()

    def decode(q, k_cache, v_cache, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, start, seq_len, backend, **config):
        return op(q, k_cache, v_cache, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start, seq_len, **config)

    monkeypatch.setattr(hlsa.layers.nsa, "nsa_decode", decode)


@functools.cache
def _nsa_decode_op():
    """The interpreted NSA decode kernel as the custom op `hlsa_test::nsa_decode` (registered once per process)."""
    from hlsa.ops.nsa import nsa_decode

    @torch.library.custom_op("hlsa_test::nsa_decode", mutates_args=())
    def op(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
        g_cmp: torch.Tensor, g_slc: torch.Tensor, g_swa: torch.Tensor, start: torch.Tensor, seq_len: torch.Tensor,
        block_size: int, block_counts: int, window: int,
    ) -> torch.Tensor:  # fmt: skip
        return nsa_decode(
            q, k_cache, v_cache, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start=start, seq_len=seq_len,
            block_size=block_size, block_counts=block_counts, window=window, backend="triton",
        )  # fmt: skip

    op.register_fake(lambda q, *args, **kwargs: torch.empty_like(q))
    return op
