"""Triton kernel for `hlsa.ops.router_step.router_step_logits`: one decode step of the LTE router's CNN in one
launch, one new output per conv.

A program takes a block of `ROWS` batch rows of one head through every layer. Conv `i` accumulates one `tl.dot` per
tap: `k_i - 1` taps of older inputs loaded from the ring (masked by their slots' validity) and the last tap on the
fresh input, which the previous layer has just computed and which stays in registers, so no layer waits on
another's stores. The fresh inputs are stored to the ring after the last layer.

The work is tiny (~2 MB of weights and ring per step at batch 64), so the time is latency. Measured alone on the
H200 (batch 64, 16 heads, the default CNN, us per launch in a CUDA graph, ~1.1 of it the launch): 10.3 with 16-wide
channel blocks and int64 slot arithmetic; 6.0 with channel blocks of at least 32 (a 16-wide `tl.dot` output splits
into 4-column slices over 4 warps, below the MMA's 8) and the slots computed in int32 (int64 `%` is a long software
sequence). Issuing every layer's loads before the first dot was slower (14-31: the weights held in registers spill);
2 or 8 warps and 32 rows per program were no better (64 rows, where Triton switches to Hopper's warpgroup MMA,
faulted with an illegal address in Triton 3.6 and was not pursued).

The kernel's arguments are flat (one weight, bias and a few constants per conv, up to `MAX_CONVS`) rather than
tuples, which torch.compile's capture of user-defined Triton kernels does not take.

This module imports nothing from its op (`hlsa.ops.router_step`, which imports it lazily): the op checks the inputs
and hands over plain tensors and ints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Convs one launch computes (the kernel has a weight, bias, taps and dilation argument for each): the paper's router
# has 3, then the logit projection.
MAX_CONVS = 3
# Batch rows per program: tl.dot's smallest M.
ROWS = 16
# The narrowest channel block of a conv's tl.dot (see the module docstring).
MIN_BLOCK = 32


@triton.jit
def _conv(fresh, x, stride_xh, stride_xp, valid, stride_vb, stride_vp, o_x, o_b, m_b, pos, lag, R, w, bias, i_cnn,
          CH: tl.constexpr, C: tl.constexpr, O: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr,
          TAPS: tl.constexpr, DILATION: tl.constexpr):  # fmt: skip
    """Conv output at position `pos - lag - r` for the program's rows: `silu(keep * (bias + sum_t in_t @ W_t))`,
    taps `t < TAPS - 1` from the ring's channels `CH .. CH + C`, the last on `fresh [ROWS, BC]`; -> `[ROWS, BO]`
    rounded to the ring's dtype (as the reference's per-layer matmuls are)."""
    r = (TAPS - 1) * DILATION // 2
    o_c, o_o = tl.arange(0, BC), tl.arange(0, BO)
    m_c, m_o = o_c < C, o_o < O
    p_w = w + (i_cnn * TAPS * C + o_c[:, None]) * O + o_o[None, :]
    m_w = m_c[:, None] & m_o[None, :]
    acc = tl.dot(fresh, tl.load(p_w + (TAPS - 1) * C * O, mask=m_w, other=0.0), input_precision="ieee")
    for t in tl.static_range(TAPS - 1):
        slot = ((pos - lag - 2 * r + t * DILATION) % R + R) % R  # positions before 0 wrap to unwritten slots
        m_x = m_b & (tl.load(valid + o_b * stride_vb + slot * stride_vp, mask=m_b, other=0) != 0)
        b_x = tl.load(o_x + slot * stride_xp + CH + o_c[None, :], mask=m_x[:, None] & m_c[None, :], other=0.0)
        acc += tl.dot(b_x, tl.load(p_w + t * C * O, mask=m_w, other=0.0), input_precision="ieee")
    acc += tl.load(bias + i_cnn * O + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    keep = tl.load(valid + o_b * stride_vb + (((pos - lag - r) % R + R) % R) * stride_vp, mask=m_b, other=0)
    keep = (keep != 0) | (lag + r == 0)  # an output at `pos` is the new token's: real, its slot not yet marked
    acc = tl.where(keep[:, None], acc, 0.0)
    return (acc * tl.sigmoid(acc)).to(x.dtype.element_ty)


@triton.jit
def _store(x, o_x, stride_xp, fresh, slot, m_b, CH: tl.constexpr, C: tl.constexpr, BC: tl.constexpr):
    """A conv's fresh input `[ROWS, BC]` into its ring channels at `slot`."""
    o_c = tl.arange(0, BC)
    tl.store(o_x + slot * stride_xp + CH + o_c[None, :], fresh, mask=m_b[:, None] & (o_c < C)[None, :])


@triton.jit
def _logit(last, w_proj, b_proj, i_cnn, out, o_b, m_b, H, C: tl.constexpr, BC: tl.constexpr):
    """The 1 x 1 logit projection of the last conv's output `[ROWS, BC]`: one dot product per row, into `out`."""
    o_c = tl.arange(0, BC)
    w = tl.load(w_proj + i_cnn * C + o_c, mask=o_c < C, other=0.0).to(tl.float32)
    logit = tl.sum(last.to(tl.float32) * w[None, :], 1) + tl.load(b_proj + i_cnn).to(tl.float32)
    tl.store(out + o_b * H + tl.program_id(0), logit.to(out.dtype.element_ty), mask=m_b)


@triton.jit
def router_step_kernel(kv, stride_kvb, stride_kvh, x, stride_xb, stride_xh, stride_xp, valid,
                       stride_validb, stride_validp, position, out, B, H, HEADS_PER_CNN, R, w0, b0, w1, b1, w2, b2,
                       w_proj, b_proj, CONVS: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                       C3: tl.constexpr, BC0: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr,
                       BC3: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, D0: tl.constexpr,
                       D1: tl.constexpr, D2: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """Program (head, block of ROWS batch rows). Conv `i` maps `C{i}` -> `C{i+1}` channels (`C0 = 2 D`) with `K{i}`
    taps of dilation `D{i}`; the logit projection maps `C{CONVS}` -> 1. The ring's channel blocks are the convs'
    inputs in that order. Every ring store comes after the last layer's loads."""
    i_h, i_blk = tl.program_id(0), tl.program_id(1)
    i_cnn = i_h // HEADS_PER_CNN
    o_b = (i_blk * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    m_b = o_b < B
    pos = tl.load(position).to(tl.int32)  # slots in int32: positions stay far below 2**31
    o_x = x + o_b[:, None] * stride_xb + i_h * stride_xh  # [ROWS, 1] row bases of the ring
    # Conv 0's fresh input: [k || v] of the new token.
    o_c = tl.arange(0, BC0)
    m_kv = m_b[:, None] & (o_c < C0)[None, :]
    in0 = tl.load(kv + o_b[:, None] * stride_kvb + i_h * stride_kvh + o_c[None, :], mask=m_kv, other=0.0)
    lag1 = (K0 - 1) * D0 // 2
    in1 = _conv(in0, x, stride_xh, stride_xp, valid, stride_validb, stride_validp, o_x, o_b, m_b, pos, 0, R, w0, b0,
                i_cnn, 0, C0, C1, BC0, BC1, K0, D0)  # fmt: skip
    if CONVS == 1:
        _logit(in1, w_proj, b_proj, i_cnn, out, o_b, m_b, H, C1, BC1)
    else:
        lag2 = lag1 + (K1 - 1) * D1 // 2
        in2 = _conv(in1, x, stride_xh, stride_xp, valid, stride_validb, stride_validp, o_x, o_b, m_b, pos, lag1, R,
                    w1, b1, i_cnn, C0, C1, C2, BC1, BC2, K1, D1)  # fmt: skip
        if CONVS == 2:
            _logit(in2, w_proj, b_proj, i_cnn, out, o_b, m_b, H, C2, BC2)
        else:
            in3 = _conv(in2, x, stride_xh, stride_xp, valid, stride_validb, stride_validp, o_x, o_b, m_b, pos,
                        lag2, R, w2, b2, i_cnn, C0 + C1, C2, C3, BC2, BC3, K2, D2)  # fmt: skip
            _logit(in3, w_proj, b_proj, i_cnn, out, o_b, m_b, H, C3, BC3)
            _store(x, o_x, stride_xp, in2, ((pos - lag2) % R + R) % R, m_b, C0 + C1, C2, BC2)
        _store(x, o_x, stride_xp, in1, ((pos - lag1) % R + R) % R, m_b, C0, C1, BC1)
    _store(x, o_x, stride_xp, in0, pos % R, m_b, 0, C0, BC0)
    # The new token is real (written once per row, by head 0's programs; no program reads this slot).
    m_first = m_b & (tl.zeros([ROWS], tl.int32) + i_h == 0)
    tl.store(valid + o_b * stride_validb + (pos % R) * stride_validp, tl.full([ROWS], 1, tl.int1), mask=m_first)


def router_step_triton(
    kv: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor,
    position: torch.Tensor,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
) -> torch.Tensor:
    """Triton path of `router_step_logits` (inputs already validated, at most `MAX_CONVS` convs): one launch.
    `layers`: `(weight [g, k, C_in, C_out], bias [g, C_out], dilation)` per conv, then the logit projection."""
    B, H, C0 = kv.shape
    if kv.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("router_step_logits: kv and the ring x need a contiguous last dim (the kernel's rows)")
    convs, (w_proj, b_proj, _) = layers[:-1], layers[-1]
    channels = [w.shape[2] for w, _, _ in layers]  # C0 .. C{CONVS}: each layer's input channels
    unused = MAX_CONVS - len(convs)
    tensors = [t.contiguous() for w, b, _ in convs for t in (w, b)] + [w_proj, b_proj] * unused
    blocks = [max(MIN_BLOCK, triton.next_power_of_2(c)) for c in channels]
    out = torch.empty(B, H, device=kv.device, dtype=kv.dtype)
    pad = [1] * unused
    router_step_kernel[(H, triton.cdiv(B, ROWS))](
        kv, kv.stride(0), kv.stride(1), x, x.stride(0), x.stride(1), x.stride(2), valid,
        valid.stride(0), valid.stride(1), position, out, B, H, H // w_proj.shape[0], x.shape[2], *tensors,
        w_proj.contiguous(), b_proj.contiguous(), len(convs), C0, *(channels[1:] + pad), *(blocks + pad),
        *([w.shape[1] for w, _, _ in convs] + pad), *([d for _, _, d in convs] + pad),
        ROWS=ROWS, num_warps=4,
    )  # fmt: skip
    return out
