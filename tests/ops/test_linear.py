"""linear: the split-K Triton kernel (interpreted on CPU, fp16: the interpreter's bf16 dot is wrong) against an fp32
matmul on awkward shapes, the choice of path, and the errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlsa.ops.linear import MAX_ROWS, linear, linear_partials
from hlsa.ops.triton.linear import Tiles, linear_partials_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _inputs(M: int, N: int, K: int, seed: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(DEVICE, dtype)
    return x, w


def _close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    want = x.float() @ w.float().T
    # fp32 accumulation; the only rounding beyond the reference's is the output's (fp16/bf16 relative eps).
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(got.float(), want, atol=4 * eps * want.abs().max().item(), rtol=2 * eps)


@settings(max_examples=12, deadline=None)
@given(
    M=st.integers(1, MAX_ROWS),
    N=st.integers(1, 130),
    K=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_a_float_matmul(M: int, N: int, K: int, seed: int) -> None:
    """Rows, output and reduction lengths that are not tile multiples; K split in two when it has more than a block."""
    x, w = _inputs(M, N, K, seed)
    got = linear(x, w, backend="triton")
    assert got.shape == (M, N) and got.dtype == x.dtype
    _close(got, x, w)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_every_split_count_sums_to_the_product(splits: int) -> None:
    """Uneven splits (K = 5 blocks of 32 over 3 splits), more splits than K blocks (8 -> 5), and none."""
    x, w = _inputs(5, 40, 150, seed=splits)
    tiles = Tiles(BN=32, BK=32, splits=splits, num_warps=1, num_stages=1)
    out = linear_partials_triton(x, w, tiles)
    if splits == 1:
        assert out.dtype == x.dtype and out.shape == (5, 40)
    else:
        assert out.dtype == torch.float32 and out.shape == (min(splits, 5), 5, 40)
        out = out.sum(0)
    _close(out, x, w)


def test_batched_and_strided_rows() -> None:
    """`x [B, 1, K]` (a decode step) and a column slice of a wider tensor (rows not contiguous)."""
    x, w = _inputs(6, 24, 70, seed=1)
    got = linear(x.view(6, 1, 70), w, backend="triton")
    assert got.shape == (6, 1, 24)
    _close(got[:, 0], x, w)
    wide = torch.cat([x, x], dim=1)[:, 70:]
    _close(linear(wide, w, backend="triton"), x, w)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_partials_keep_the_leading_dims_and_add_up(backend: str) -> None:
    """`[S, B, 1, N]` for `x [B, 1, K]`: one term on F.linear, the kernel's splits otherwise (interpreted: K = 70 in
    blocks of 32, two splits; on a GPU, K fits one block: no split)."""
    x, w = _inputs(6, 24, 70, seed=4)
    partials = linear_partials(x.view(6, 1, 70), w, backend=backend)
    splits = 2 if backend == "triton" and DEVICE == "cpu" else 1
    assert partials.shape == (splits, 6, 1, 24)
    _close(partials.float().sum(0)[:, 0].to(x.dtype), x, w)


def test_auto_falls_back_where_the_kernel_does_not_apply() -> None:
    """More rows than a tile, fp32 and gradients take `F.linear`; on CPU, auto is always the reference."""
    x, w = _inputs(MAX_ROWS + 1, 8, 16, seed=2, dtype=torch.float32)
    w.requires_grad_(True)
    y = linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, -1))


@pytest.mark.parametrize(
    ("rows", "dtype", "grad", "match"),
    [
        (MAX_ROWS + 1, torch.float16, False, f"1 to {MAX_ROWS} rows"),
        (4, torch.float32, False, "bf16/fp16"),
        (4, torch.float16, True, "requires grad: True"),
    ],
    ids=["rows", "dtype", "grad"],
)
def test_explicit_triton_outside_the_kernel_is_an_error(rows: int, dtype: torch.dtype, grad: bool, match: str) -> None:
    x, w = _inputs(rows, 8, 16, seed=3, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        linear(x.requires_grad_(grad), w, backend="triton")


def test_bad_inputs_are_named() -> None:
    x, w = _inputs(2, 8, 16, seed=4)
    with pytest.raises(ValueError, match="the same K"):
        linear(x, w[:, :15])
    with pytest.raises(ValueError, match="one device"):
        linear(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"a weight of one bf16/fp16 dtype.*weight torch.float32"):
        linear(x, w.float(), backend="triton")


def test_autocast_mixes_dtypes_as_f_linear_does() -> None:
    """Training runs fp32 weights under bf16 autocast: the op must leave the casts to `F.linear`."""
    x, w = _inputs(3, 8, 16, seed=6, dtype=torch.float32)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        got = linear(x, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), x @ w.T, atol=0.05, rtol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA (bf16 at the 0.4B model's shapes)")
@pytest.mark.parametrize(("N", "K"), [(4112, 1024), (1024, 2816), (32000, 1024)])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_model_shapes_on_gpu(M: int, N: int, K: int) -> None:
    """The kernel eagerly (partials summed by one reduction) and compiled (summed by pointwise adds)."""
    x, w = _inputs(M, N, K, seed=M)
    _close(linear(x, w, backend="triton"), x, w)
    _close(torch.compile(linear)(x, w), x, w)


def test_auto_takes_the_kernel_only_off_the_host_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="auto": `F.linear` for eager calls (cheaper to launch), the kernel inside compile or a graph capture."""
    import hlsa.ops.linear as op

    x, w = _inputs(4, 8, 16, seed=5)
    calls = []
    monkeypatch.setattr(op, "F", type("F", (), {"linear": lambda *a: calls.append("torch") or a[0] @ a[1].T}))
    monkeypatch.setattr(op, "kernel_backend", lambda *a: "triton")  # as for CUDA tensors
    linear(x, w)
    monkeypatch.setattr(op, "_launches_off_the_clock", lambda: True)
    _close(linear(x, w), x, w)
    assert calls == ["torch"]
