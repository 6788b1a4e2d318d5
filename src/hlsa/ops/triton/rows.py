"""Row tiles of `[B, T, H, D]` tensors for the sparse attention kernels: TMA block loads where the GPU and the
tensor allow them, masked pointer loads otherwise.

A TMA descriptor views the tensor as a matrix `[B * T, H * D]`; one block load fetches `BR` consecutive rows of one
head. It needs a Hopper GPU (or the interpreter), a power-of-two head dim (the block is exactly one head wide) of at
least 16 bytes, and 16-byte aligned data. Rows past a sequence's end then hold the next sequence's rows (zeros past
the last), so every caller masks rows `>= T` out of its softmax or gradient, as it does with the pointer loads.
"""

from __future__ import annotations

import ctypes
import functools

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


@triton.jit
def query_rows(i_b, i_hk, g0, m0, T, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
               HP: tl.constexpr):  # fmt: skip
    """The BM rows of a query tile: BM // HP positions from `m0` of each of the HP query heads `g0, g0 + 1, ...` of kv
    head `i_hk` (G query heads per kv head; heads `>= G` are padding when HP does not divide G), row r being (head
    g0 + r // (BM // HP), position m0 + r % (BM // HP)).

    Returns (positions [BM], row mask [BM], offsets [BM] of the rows' first elements in `[B, T, HQ, D]` tensors,
    offsets [BM] into `[B, HQ, T]` ones). Offsets stay 1-D: a `[BM, D]` int64 offset tile held across a loop would
    cost BM * D / (32 * num_warps) * 2 registers per thread."""
    BMQ: tl.constexpr = BM // HP
    o_r = tl.arange(0, BM)
    o_g = g0 + o_r // BMQ
    o_m = m0 + o_r % BMQ
    m_row = (o_g < G) & (o_m < T)
    p_row = ((i_b.to(tl.int64) * T + o_m) * HQ + i_hk * G + o_g) * D
    p_lse = (i_b.to(tl.int64) * HQ + i_hk * G + o_g) * T + o_m
    return o_m, m_row, p_row, p_lse


@triton.jit
def load_query_rows(x, desc, p_row, m_row, i_b, i_h, m0, T, D: tl.constexpr, BD: tl.constexpr,
                    ROWS_TMA: tl.constexpr):  # fmt: skip
    """A query tile's rows of `x [B, T, HQ, D]` -> `[BM, BD]` (`query_rows` gives `p_row`, `m_row`). With ROWS_TMA
    (only for one head per tile, head `i_h`: the rows are then consecutive positions) one TMA block load, whose rows
    `>= T` are junk that the caller masks out."""
    if ROWS_TMA:
        return desc.load([i_b * T + m0, i_h * D])
    else:
        o_d = tl.arange(0, BD)
        return tl.load(x + p_row[:, None] + o_d[None, :], mask=m_row[:, None] & (o_d < D)[None, :], other=0.0)


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether `block_rows` may use TMA for these `[B, T, H, D]` tensors (see the module docstring)."""
    D = tensors[0].shape[-1]
    if D != triton.next_power_of_2(D) or D * tensors[0].element_size() < 16:
        return False
    if any(t.data_ptr() % 16 != 0 or not t.is_contiguous() for t in tensors):
        return False
    return interpreted() or torch.cuda.get_device_capability(tensors[0].device)[0] >= 9


@functools.cache
def _cuda_driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver: nothing to bind
        return None


def bind_cuda_context(device: torch.device) -> None:
    """Make the primary CUDA context of `device` current on this thread if none is.

    Triton's launcher encodes a host TMA descriptor (`cuTensorMapEncodeTiled`) before it makes sure the thread has
    a current context, and fails ("invalid device context") on a thread with none: a thread whose first CUDA work
    is this launch, with the kernel loaded by another thread and its memory from the allocator's cache (a data
    loader's, a profiler's, autograd's). The driver calls are Triton's own for a thread without a context. Skipped
    while dynamo traces, which cannot trace a foreign-function call."""
    driver = _cuda_driver()
    if driver is None or torch.compiler.is_compiling():
        return
    context = ctypes.c_void_p()
    if driver.cuCtxGetCurrent(ctypes.byref(context)) == 0 and context.value:
        return
    handle = ctypes.c_int()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if driver.cuDeviceGet(ctypes.byref(handle), index) != 0:
        return  # let the launch report the driver's error
    if driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle) == 0:
        driver.cuCtxSetCurrent(context)


def rows_descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """The `[B * T, H * D]` view of a contiguous `[B, T, H, D]` tensor, in blocks of `rows` x D (with this thread's
    CUDA context current, which the launch that takes the descriptor needs: `bind_cuda_context`)."""
    if x.is_cuda:
        bind_cuda_context(x.device)
    B, T, H, D = x.shape
    return TensorDescriptor(x, [B * T, H * D], [H * D, 1], [rows, D])
