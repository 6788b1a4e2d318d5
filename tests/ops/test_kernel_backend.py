"""`hlsa.ops.kernel_backend` and `check_backend`: the one backend vocabulary (`hlsa.ops.BACKENDS`) every op takes."""

from __future__ import annotations

import pytest
import torch

from hlsa.config import BACKENDS as CONFIG_BACKENDS
from hlsa.ops import BACKENDS, kernel_backend
from hlsa.ops.decode_attention import decode_attention
from hlsa.ops.gated_delta import chunk_gated_delta_rule
from hlsa.ops.lte_retention import lte_column_end
from hlsa.ops.nsa import nsa

CPU = torch.zeros(1)


def test_auto_picks_the_reference_off_cuda_and_keeps_explicit_choices() -> None:
    assert kernel_backend("op", "auto", CPU) == "torch"
    assert kernel_backend("op", None, CPU) == "torch"  # None is "auto"
    assert kernel_backend("op", "torch", CPU) == "torch"
    assert kernel_backend("op", "triton", CPU) == "triton"  # the interpreter runs it (tests/conftest.py)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match=r"op: backend must be one of \('auto', 'torch', 'triton', 'fla'\)"):
        kernel_backend("op", "scan", CPU)


def test_a_kernel_family_an_op_lacks_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="op: has no 'fla' kernel"):
        kernel_backend("op", "fla", CPU)
    score = torch.ones(1, 4, 1)
    with pytest.raises(ValueError, match="lte_column_end: has no 'fla' kernel"):
        lte_column_end(score, window=1, buffer_size=1, backend="fla")
    q = torch.randn(1, 4, 2, 8)
    g = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="chunk_gated_delta_rule: has no 'triton' kernel"):
        chunk_gated_delta_rule(q, q, q, g, g, backend="triton")
    with pytest.raises(ValueError, match="nsa: has no 'triton' kernel"):
        nsa(q, q, q, g, g, g, block_size=2, block_counts=1, window=1, backend="triton")


def test_the_config_takes_the_ops_vocabulary_a_whole_model_can_force() -> None:
    assert CONFIG_BACKENDS == ("auto", "torch") == BACKENDS[:2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors without the interpreter")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="op: backend='triton' needs CUDA tensors"):
        kernel_backend("op", "triton", CPU)
    # ... and an op says so by name before reaching Triton
    q, kv = torch.randn(1, 2, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="decode_attention: backend='triton' needs CUDA tensors"):
        decode_attention(q, kv, kv, valid=torch.ones(1, 2, 3, dtype=torch.bool), backend="triton")
