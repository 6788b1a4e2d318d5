"""RoPE of one token inside a Triton kernel (`hlsa.ops.rope` is the reference): the decode kernels rotate the new
query or key as they load it, instead of a separate elementwise kernel per step."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rope_rotate(b_x, p_x, o_d, mask, inv_freq, position, D: tl.constexpr):
    """`b_x`: the values at pointers `p_x` (any tile whose last axis is the channel `o_d`, masked by `mask`);
    returns them rotated by `position * inv_freq`, in fp32, with cos and sin rounded to `b_x`'s dtype as the
    reference does. Channel `d < D/2` pairs with `d + D/2`: `x_d cos - x_(d+D/2) sin`, `x_(d+D/2) cos + x_d sin`."""
    lo = o_d < D // 2
    b_partner = tl.load(p_x + tl.where(lo, D // 2, -(D // 2)), mask=mask, other=0.0).to(tl.float32)
    b_freq = tl.load(inv_freq + tl.where(lo, o_d, o_d - D // 2), mask=o_d < D, other=0.0)
    b_angle = tl.load(position).to(tl.float32) * b_freq
    b_cos = tl.cos(b_angle).to(b_x.dtype).to(tl.float32)
    b_sin = tl.sin(b_angle).to(b_x.dtype).to(tl.float32)
    return b_x.to(tl.float32) * b_cos + tl.where(lo, -b_partner, b_partner) * b_sin
