"""Triton kernel for `hlsa.ops.router_window.router_window_logits`: one launch per conv of the LTE router's decode
scoring, each reading its taps straight from the previous layer's output (the first, from the ring).

The PyTorch form gathers the window from the ring, stacks the `k` shifted copies of each layer's input for one GEMM
per conv, and masks and activates in separate passes. Compiled by Inductor, the gathers of a GDN+LTE 0.4B decode
step at batch 64 ran at ~1/18 of the H200's bandwidth and, with the router's GEMMs, took 0.9 of its 3.7 ms
(session 8). Here a program computes a block of `ROWS` batch rows of one head: for each tap it loads the
`[ROWS * BN, C]` input rows that tap reads (ring slots wrap around) and accumulates one `tl.dot` with the tap's
`[C, O]` weights, then adds the bias, masks by the validity of the output's centre positions and applies SiLU
(except after the logit projection).

Legend: `B` batch, `H` heads, `R` ring slots, `C` input channels, `O` output channels, `N` output positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from hlsa.ops.router_window import window_length

# Rows of the dot: ROWS batch rows x BN positions; 64 keeps a [64, 128] input tile and a [64, 64] fp32 accumulator
# in registers at 4 warps.
DOT_ROWS = 64


@triton.jit
def router_window_conv_kernel(x, stride_xb, stride_xh, stride_xp, valid, stride_vb, stride_vp, start, w, bias, out,
                              B, H, HEADS_PER_CNN, R, C: tl.constexpr, O: tl.constexpr, N: tl.constexpr,
                              TAPS: tl.constexpr, DILATION: tl.constexpr, KEEP_AT: tl.constexpr,
                              FROM_RING: tl.constexpr, LAST: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
                              BC: tl.constexpr, BO: tl.constexpr):  # fmt: skip
    """Program (head, block of ROWS batch rows): out[b, h, n] = act(bias + sum_t x[b, h, n + t * DILATION] @ W_t)."""
    i_h, i_blk = tl.program_id(0), tl.program_id(1)
    i_cnn = i_h // HEADS_PER_CNN
    o_m = tl.arange(0, ROWS * BN)
    o_b = (i_blk * ROWS + o_m // BN).to(tl.int64)  # batch row of each dot row
    o_n = o_m % BN  # output position of each dot row
    m_m = (o_b < B) & (o_n < N)
    o_c, o_o = tl.arange(0, BC), tl.arange(0, BO)
    m_c, m_o = o_c < C, o_o < O
    first = tl.load(start)  # ring slot of window position 0
    acc = tl.zeros([ROWS * BN, BO], dtype=tl.float32)
    for t in tl.static_range(TAPS):
        p = o_n + t * DILATION  # input position (window position for the ring) read by output o_n
        slot = (first + p) % R if FROM_RING else p
        m_x = m_m
        if FROM_RING:  # invalid inputs read as zeros, whatever the slot holds
            m_x = m_x & (tl.load(valid + o_b * stride_vb + slot * stride_vp, mask=m_m, other=0) != 0)
        b_x = tl.load(
            x + o_b[:, None] * stride_xb + i_h * stride_xh + slot[:, None] * stride_xp + o_c[None, :],
            mask=m_x[:, None] & m_c[None, :],
            other=0.0,
        )
        b_w = tl.load(
            w + ((i_cnn * TAPS + t) * C + o_c[:, None]) * O + o_o[None, :], mask=m_c[:, None] & m_o[None, :], other=0.0
        )
        acc += tl.dot(b_x, b_w, input_precision="ieee")  # fp32 inputs: no TF32 rounding
    acc += tl.load(bias + i_cnn * O + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    if not LAST:
        b_keep = tl.load(valid + o_b * stride_vb + ((first + KEEP_AT + o_n) % R) * stride_vp, mask=m_m, other=0)
        acc = tl.where(b_keep[:, None] != 0, acc, 0.0)
        acc = acc * tl.sigmoid(acc)
    p_out = out + ((o_b * H + i_h) * N + o_n) * O
    tl.store(p_out[:, None] + o_o[None, :], acc.to(out.dtype.element_ty), mask=m_m[:, None] & m_o[None, :])


def router_window_triton(
    x: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor, int]]
) -> torch.Tensor:
    """Triton path of `router_window_logits` (inputs already validated): one launch per layer."""
    B, H, R, C = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    h, n, lo = x, window_length(layers), 0
    for i, (w, b, d) in enumerate(layers):
        cnns, k, c_in, c_out = w.shape
        n -= (k - 1) * d
        lo += (k - 1) * d // 2
        out = torch.empty(B, H, n, c_out, device=x.device, dtype=x.dtype)
        BN = triton.next_power_of_2(n)
        rows = max(1, DOT_ROWS // BN)
        router_window_conv_kernel[(H, triton.cdiv(B, rows))](
            h, h.stride(0), h.stride(1), h.stride(2), valid, valid.stride(0), valid.stride(1), start,
            w.contiguous(), b.contiguous(), out, B, H, H // cnns, R, C=c_in, O=c_out, N=n, TAPS=k, DILATION=d,
            KEEP_AT=lo, FROM_RING=i == 0, LAST=i == len(layers) - 1, ROWS=rows, BN=BN,
            BC=max(16, triton.next_power_of_2(c_in)), BO=max(16, triton.next_power_of_2(c_out)),
            num_warps=4,
        )  # fmt: skip
        h = out
    return h[:, :, 0, 0]
