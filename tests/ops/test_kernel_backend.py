"""`hlsa.ops.kernel_backend`: the backend choice every op with a Triton kernel and a reference shares."""

from __future__ import annotations

import pytest
import torch

from hlsa.ops import kernel_backend
from hlsa.ops.decode_attention import decode_attention

CPU = torch.zeros(1)


def test_auto_picks_the_reference_off_cuda_and_keeps_explicit_choices() -> None:
    assert kernel_backend("op", None, CPU) == "torch"
    assert kernel_backend("op", "torch", CPU) == "torch"
    assert kernel_backend("op", "triton", CPU) == "triton"  # the interpreter runs it (tests/conftest.py)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="op: backend must be None, 'torch' or 'triton'; got 'fla'"):
        kernel_backend("op", "fla", CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors without the interpreter")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="op: backend='triton' needs CUDA tensors"):
        kernel_backend("op", "triton", CPU)
    # ... and an op says so by name before reaching Triton
    q, kv = torch.randn(1, 2, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="decode_attention: backend='triton' needs CUDA tensors"):
        decode_attention(q, kv, kv, valid=torch.ones(1, 2, 3, dtype=torch.bool), backend="triton")
