"""Base-2 exponentials of softmax tiles, with part of them moved off the special-function unit.

`tl.exp2` compiles to `MUFU.EX2`, which an H100 SM issues for 16 elements per cycle, against 128 for FP32
multiply-adds. In the attention forward's mask-free tiles the exponentials are the busiest unit: at D = 64 a
`[128, 64]` tile spends about 544 cycles on them, 512 on its two matrix products and about 290 on FP32 arithmetic
(docs/kernels.md). `exp2_mixed` computes a quarter of a tile's exponentials with a cubic on the FP32 and integer
units instead (the split FlashAttention-4 makes), which balances the two at about 410 cycles each.

The cubic's relative error is below 8e-5 (bf16 rounds to 4e-3), so this is for bf16/fp16 tiles only; fp32 inputs
keep `tl.exp2`, the exact path.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 1.5 * 2^23: adding it to an fp32 of magnitude < 2^22 rounds it to an integer, which the sum's low mantissa bits
# then hold (two's complement, offset by 2^22).
ROUNDING_SHIFT = tl.constexpr(12582912.0)
# 2^f ~ C0 + C1 f + C2 f^2 + C3 f^3 on [-1/2, 1/2], fitted for the least maximum relative error (7.5e-5).
C0, C1, C2, C3 = (tl.constexpr(c) for c in (0.99992807, 0.69326102, 0.24261118, 0.0551715))


@triton.jit
def exp2_poly(x):
    """2^x for x <= 0 without the special-function unit: 2^x = 2^r * 2^f with r = round(x), f = x - r in
    [-1/2, 1/2], 2^f from the cubic and 2^r added to its exponent bits. x is clamped to >= -125, so that the result
    stays a normal float (the cubic dips just below 1 at f = 0); where 2^x is smaller it returns about 2.4e-38,
    never 0, so callers must not rely on an exact zero (a masked logit of -inf)."""
    x = tl.maximum(x, -125.0)
    shifted = x + ROUNDING_SHIFT
    f = x - (shifted - ROUNDING_SHIFT)
    p = ((C3 * f + C2) * f + C1) * f + C0
    # r << 23 is the shifted sum's bits << 23: the rounding shift's own bits all move past bit 31.
    bits = p.to(tl.int32, bitcast=True) + (shifted.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _halves(x, R: tl.constexpr, C: tl.constexpr):
    """Columns `[0, C/2)` and `[C/2, C)` of `x [R, C]`. Split this way (not even and odd columns), neither half
    needs a layout conversion through shared memory on Hopper (checked in the compiled sm_90 code)."""
    return tl.split(tl.permute(tl.reshape(x, [R, 2, C // 2]), [0, 2, 1]))


@triton.jit
def _joined(a, b, R: tl.constexpr, C: tl.constexpr):
    """`_halves` undone: `[R, C]` with `a` in the first C/2 columns and `b` in the others."""
    return tl.reshape(tl.permute(tl.join(a, b), [0, 2, 1]), [R, C])


@triton.jit
def exp2_mixed(x, R: tl.constexpr, C: tl.constexpr):
    """2^x of a tile `x [R, C]` of values <= 0 (C a multiple of 4): the last quarter of the columns by `exp2_poly`,
    the others by `tl.exp2`."""
    lo, hi = _halves(x, R, C)
    hi_lo, hi_hi = _halves(hi, R, C // 2)
    return _joined(tl.exp2(lo), _joined(tl.exp2(hi_lo), exp2_poly(hi_hi), R, C // 2), R, C)
