"""Row tiles of `[B, T, H, D]` tensors for the sparse attention kernels: TMA block loads where the GPU and the
tensor allow them, masked pointer loads otherwise.

A TMA descriptor views the tensor as a matrix `[B * T, H * D]`; one block load fetches `BR` consecutive rows of one
head. It needs a Hopper GPU (or the interpreter), a power-of-two head dim (the block is exactly one head wide) of at
least 16 bytes, and 16-byte aligned data. Rows past a sequence's end then hold the next sequence's rows (zeros past
the last), so every caller masks rows `>= T` out of its softmax or gradient, as it does with the pointer loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from hlsa.ops.triton import interpreted


@triton.jit
def load_rows(p_base, o_rows, m_rows, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Rows `o_rows` of one head from a `[T, H, D]` slab starting at `p_base` -> `[len(o_rows), BD]` (masked)."""
    o_d = tl.arange(0, BD)
    m_rd = m_rows[:, None] & (o_d < D)[None, :]
    return tl.load(p_base + o_rows[:, None] * (H * D) + o_d[None, :], mask=m_rd, other=0.0)


@triton.jit
def block_rows(p_base, desc, i_b, i_h, r0, T, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               BR: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """Rows `[r0, r0 + BR)` of head `i_h` of sequence `i_b` -> `[BR, BD]`: one TMA block load from `desc`, or
    pointer loads from the head's slab `p_base` (rows `>= T` zero). Rows `>= T` are junk with TMA: mask them."""
    if TMA:
        return desc.load([i_b * T + r0, i_h * D])
    else:
        o_rows = r0 + tl.arange(0, BR)
        return load_rows(p_base, o_rows, o_rows < T, H, D, BD)


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether `block_rows` may use TMA for these `[B, T, H, D]` tensors (see the module docstring)."""
    D = tensors[0].shape[-1]
    if D != triton.next_power_of_2(D) or D * tensors[0].element_size() < 16:
        return False
    if any(t.data_ptr() % 16 != 0 or not t.is_contiguous() for t in tensors):
        return False
    return interpreted() or torch.cuda.get_device_capability(tensors[0].device)[0] >= 9


def rows_descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """The `[B * T, H * D]` view of a contiguous `[B, T, H, D]` tensor, in blocks of `rows` x D."""
    B, T, H, D = x.shape
    return TensorDescriptor(x, [B * T, H * D], [H * D, 1], [rows, D])
