"""Triton kernel for `hlsa.ops.router_window.router_window_logits`: the whole CNN of the LTE router's decode scoring
in one launch, reading its first conv's taps straight from the ring.

The PyTorch form gathers the window from the ring, stacks the `k` shifted copies of each layer's input for one GEMM
per conv, and masks and activates in separate passes. Compiled by Inductor, the gathers of a GDN+LTE 0.4B decode
step at batch 64 ran at ~1/18 of the H200's bandwidth and, with the router's GEMMs, took 0.9 of its 3.7 ms
(session 8). One launch per conv brought that to 48 launches of ~4.7 us (0.22 ms, session 9): the work is tiny, so
launches are the cost, and here the layers run one after another inside one program.

A program computes a block of `ROWS` batch rows of one head through every layer (`_layer`). Per layer and tap it
loads the `[ROWS * BN, C]` input rows that tap reads and accumulates one `tl.dot` with the tap's `[C, O]` weights,
then adds the bias, masks by the validity of the output's centre positions and applies SiLU (except after the logit
projection). The first layer reads the ring (slots wrap around, invalid slots read as zeros); each later layer reads
the previous layer's output from the program's own scratch rows, written before a CTA barrier (so that every thread
sees every row). Two scratch buffers alternate, so a layer never overwrites the rows it reads.

The arguments are flat (one pointer and a few constants per layer, up to `MAX_LAYERS`) rather than tuples, which
torch.compile's capture of user-defined Triton kernels does not take.

Legend: `B` batch, `H` heads, `R` ring slots, `C` input channels, `O` output channels, `N` output positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from hlsa.ops.router_window import MAX_LAYERS, window_length

# Rows of each dot: ROWS batch rows x BN positions; 64 keeps a [64, 128] input tile and a [64, 64] fp32 accumulator
# in registers at 4 warps.
DOT_ROWS = 64


@triton.jit
def _layer(x, stride_xb, stride_xh, stride_xp, valid, stride_vb, stride_vp, first, R, src, dst, w, bias, out, B, H,
           i_h, i_cnn, o_m, o_b, o_n, C: tl.constexpr, O: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr,
           TAPS: tl.constexpr, DILATION: tl.constexpr, N: tl.constexpr, KEEP_AT: tl.constexpr,
           FROM_RING: tl.constexpr, LAST: tl.constexpr, ROWS_BN: tl.constexpr, SCRATCH_C: tl.constexpr):  # fmt: skip
    """One layer for the program's rows: `y[b, n] = act(bias + sum_t in[b, n + t * DILATION] @ W_t)` for n < N, the
    input from the ring (`FROM_RING`) or the scratch rows `src`; stored to the scratch rows `dst`, or the logit
    `out[b, h] = y[b, 0]` for the `LAST` layer."""
    o_c, o_o = tl.arange(0, BC), tl.arange(0, BO)
    m_c, m_o = o_c < C, o_o < O
    m_m = (o_b < B) & (o_n < N)
    acc = tl.zeros([ROWS_BN, BO], dtype=tl.float32)
    for t in tl.static_range(TAPS):
        if FROM_RING:
            slot = (first + o_n + t * DILATION) % R
            # Invalid inputs read as zeros, whatever the slot holds.
            m_x = m_m & (tl.load(valid + o_b * stride_vb + slot * stride_vp, mask=m_m, other=0) != 0)
            p_x = x + o_b[:, None] * stride_xb + i_h * stride_xh + slot[:, None] * stride_xp + o_c[None, :]
        else:  # the previous layer's rows, shifted by the tap (n + t * DILATION < its positions for n < N)
            m_x = m_m
            p_x = src + (o_m + t * DILATION)[:, None] * SCRATCH_C + o_c[None, :]
        b_x = tl.load(p_x, mask=m_x[:, None] & m_c[None, :], other=0.0)
        b_w = tl.load(w + ((i_cnn * TAPS + t) * C + o_c[:, None]) * O + o_o[None, :], mask=m_c[:, None] & m_o[None, :])
        acc += tl.dot(b_x, b_w, input_precision="ieee")  # fp32 inputs: no TF32 rounding
    acc += tl.load(bias + i_cnn * O + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    if LAST:  # the logit projection: one channel, one position
        logit = tl.sum(tl.where(o_o[None, :] == 0, acc, 0.0), 1)
        tl.store(out + o_b * H + i_h, logit.to(out.dtype.element_ty), mask=m_m)
    else:
        b_keep = tl.load(valid + o_b * stride_vb + ((first + KEEP_AT + o_n) % R) * stride_vp, mask=m_m, other=0)
        acc = tl.where(b_keep[:, None] != 0, acc, 0.0)
        acc = acc * tl.sigmoid(acc)
        # Rounded to the input dtype between layers, as the reference's per-layer matmuls are.
        p_y = dst + o_m[:, None] * SCRATCH_C + o_o[None, :]
        tl.store(p_y, acc.to(dst.dtype.element_ty), mask=m_m[:, None] & m_o[None, :])
        tl.debug_barrier()


@triton.jit
def router_window_kernel(x, stride_xb, stride_xh, stride_xp, valid, stride_vb, stride_vp, start, scratch, out, B, H,
                         HEADS_PER_CNN, R, w0, b0, w1, b1, w2, b2, w3, b3, LAYERS: tl.constexpr, C0: tl.constexpr,
                         C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr, BC0: tl.constexpr,
                         BC1: tl.constexpr, BC2: tl.constexpr, BC3: tl.constexpr, BC4: tl.constexpr,
                         K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, D0: tl.constexpr,
                         D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr,
                         N2: tl.constexpr, N3: tl.constexpr, KEEP0: tl.constexpr, KEEP1: tl.constexpr,
                         KEEP2: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
                         SCRATCH_C: tl.constexpr):  # fmt: skip
    """Program (head, block of ROWS batch rows): layers 0..LAYERS-1 of the CNN; layer i has `C{i}` -> `C{i+1}`
    channels, `K{i}` taps of dilation `D{i}` and `N{i}` output positions, centred on window position `KEEP{i}`."""
    i_h, i_blk = tl.program_id(0), tl.program_id(1)
    i_cnn = i_h // HEADS_PER_CNN
    o_m = tl.arange(0, ROWS * BN)
    o_b = (i_blk * ROWS + o_m // BN).to(tl.int64)  # batch row of each dot row
    o_n = o_m % BN  # output position of each dot row
    first = tl.load(start)  # ring slot of window position 0
    s_a = scratch + (i_h * tl.num_programs(1) + i_blk).to(tl.int64) * (2 * ROWS * BN * SCRATCH_C)
    s_b = s_a + ROWS * BN * SCRATCH_C
    # Layer i reads scratch buffer (i + 1) % 2 (layer 0 reads the ring) and writes buffer i % 2.
    _layer(x, stride_xb, stride_xh, stride_xp, valid, stride_vb, stride_vp, first, R, s_b, s_a, w0, b0, out, B, H,
           i_h, i_cnn, o_m, o_b, o_n, C0, C1, BC0, BC1, K0, D0, N0, KEEP0, True, LAYERS == 1, ROWS * BN,
           SCRATCH_C)  # fmt: skip
    if LAYERS > 1:
        _layer(x, stride_xb, stride_xh, stride_xp, valid, stride_vb, stride_vp, first, R, s_a, s_b, w1, b1, out, B,
               H, i_h, i_cnn, o_m, o_b, o_n, C1, C2, BC1, BC2, K1, D1, N1, KEEP1, False, LAYERS == 2, ROWS * BN,
               SCRATCH_C)  # fmt: skip
    if LAYERS > 2:
        _layer(x, stride_xb, stride_xh, stride_xp, valid, stride_vb, stride_vp, first, R, s_b, s_a, w2, b2, out, B,
               H, i_h, i_cnn, o_m, o_b, o_n, C2, C3, BC2, BC3, K2, D2, N2, KEEP2, False, LAYERS == 3, ROWS * BN,
               SCRATCH_C)  # fmt: skip
    if LAYERS > 3:
        _layer(x, stride_xb, stride_xh, stride_xp, valid, stride_vb, stride_vp, first, R, s_a, s_b, w3, b3, out, B,
               H, i_h, i_cnn, o_m, o_b, o_n, C3, C4, BC3, BC4, K3, D3, N3, 0, False, True, ROWS * BN,
               SCRATCH_C)  # fmt: skip


def router_window_triton(
    x: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor, int]]
) -> torch.Tensor:
    """Triton path of `router_window_logits` (inputs already validated, at most `MAX_LAYERS` layers): one launch."""
    B, H, R, C = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    channels, taps, dilations, positions, keep_at = [C], [], [], [], []
    n, lo = window_length(layers), 0
    for w, _, d in layers:
        n -= (w.shape[1] - 1) * d
        lo += (w.shape[1] - 1) * d // 2
        channels.append(w.shape[3])
        taps.append(w.shape[1])
        dilations.append(d)
        positions.append(n)
        keep_at.append(lo)
    BN = triton.next_power_of_2(positions[0])
    rows = max(1, DOT_ROWS // BN)
    blocks = triton.cdiv(B, rows)
    scratch_c = max(channels[1:-1], default=1)  # intermediate layers' widths (the last layer writes `out`)
    scratch = torch.empty(H * blocks * 2 * rows * BN * scratch_c, device=x.device, dtype=x.dtype)
    out = torch.empty(B, H, device=x.device, dtype=x.dtype)
    unused = MAX_LAYERS - len(layers)
    tensors = [t.contiguous() for w, b, _ in layers for t in (w, b)] + [out, out] * unused
    channels += [1] * unused
    taps, dilations, positions, keep_at = (v + [1] * unused for v in (taps, dilations, positions, keep_at))
    router_window_kernel[(H, blocks)](
        x, x.stride(0), x.stride(1), x.stride(2), valid, valid.stride(0), valid.stride(1), start, scratch, out,
        B, H, H // layers[0][0].shape[0], R, *tensors, len(layers), *channels,
        *(max(16, triton.next_power_of_2(c)) for c in channels), *taps, *dilations, *positions, *keep_at[:3],
        ROWS=rows, BN=BN, SCRATCH_C=scratch_c, num_warps=4,
    )  # fmt: skip
    return out
