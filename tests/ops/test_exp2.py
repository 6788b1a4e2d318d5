"""`exp2_poly` and `exp2_mixed` (hlsa.ops.triton.exp2) against torch.exp2, run by the Triton interpreter."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from hlsa.ops.triton.exp2 import exp2_mixed, exp2_poly


@triton.jit
def _poly_kernel(x, y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y + o, exp2_poly(tl.load(x + o)))


@triton.jit
def _mixed_kernel(x, y, R: tl.constexpr, C: tl.constexpr):
    o = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(y + o, exp2_mixed(tl.load(x + o), R, C))


def test_exp2_poly_is_within_8e_5_of_exp2_down_to_its_clamp() -> None:
    x = torch.cat([torch.linspace(-125.0, 0.0, 4093), torch.tensor([-0.5, -1e-7, 0.0])])
    got = torch.empty_like(x)
    _poly_kernel[(1,)](x, got, N=x.numel())
    rel = (got.double() / torch.exp2(x.double()) - 1).abs()
    assert rel.max() < 8e-5, (rel.max(), x[rel.argmax()])


def test_exp2_poly_clamps_below_minus_125() -> None:
    """Below -125 (down to -inf) it returns 2^-125 within the cubic's error, a positive normal float, not 0."""
    x = torch.tensor([-125.0, -127.3, -500.0, float("-inf")])
    got = torch.empty_like(x)
    _poly_kernel[(1,)](x, got, N=x.numel())
    assert torch.allclose(got, torch.full_like(x, 2.0**-125), rtol=8e-5, atol=0)


@settings(max_examples=20, deadline=None)
@given(R=st.sampled_from([1, 2, 16]), C=st.sampled_from([4, 8, 16, 32, 64]), seed=st.integers(0, 2**16))
def test_exp2_mixed_takes_the_last_quarter_of_the_columns_by_the_cubic(R: int, C: int, seed: int) -> None:
    """Exactly `tl.exp2` (numpy's under the interpreter) in the first three quarters of the columns, the cubic in the
    last one: the split and the join keep every element in its place."""
    gen = torch.Generator().manual_seed(seed)
    x = -30 * torch.rand(R, C, generator=gen)
    got = torch.empty_like(x)
    _mixed_kernel[(1,)](x, got, R=R, C=C)
    poly = torch.empty_like(x)
    _poly_kernel[(1,)](x.flatten(), poly.view(-1), N=x.numel())
    q = 3 * C // 4
    torch.testing.assert_close(got[:, :q], torch.exp2(x[:, :q]), rtol=1e-6, atol=0)
    assert torch.equal(got[:, q:], poly[:, q:])
    assert not torch.equal(got[:, q:], torch.exp2(x[:, q:]))  # the cubic did run there
