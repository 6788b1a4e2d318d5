"""Triton kernels for `hlsa.ops.gated_delta_decode.gated_delta_decode`: a GDN layer's decode token in two launches,
its caches updated in place.

`gdn_step_inputs_kernel`, one program per (sequence, head): adds the projection's partial sums for the head's
columns, runs the short conv over the cached inputs (then shifts the cache by one), normalises q and k and forms the
gates. Every load is issued up front (the partial sums are unrolled), so a program waits on memory about once.
Unfused, the same work was six Inductor kernels per layer at batch 64 (~10 us in a profile on the H200).

`gated_delta_step_kernel`, one program per (sequence, head, block of `BV` value columns): the delta step on the
fp32 state, read once and written back to the same place. fla's fused recurrent kernel returns a fresh state, which
a static decode cache must copy back: at batch 64 that copy moves as many bytes as the step (33.5 MB per 0.4B layer,
read and written). Small blocks put every program of a layer on the GPU at once; the step runs at the bandwidth.

Single-kernel versions were measured first (one program per head doing both): the state of a head does not fit
a program at full occupancy, and the per-head chain of dependent loads left them at 2-3x the state's bandwidth floor
(docs/efficiency.md).

Legend: `S` partial sums, `B` batch, `H` heads, `K` key dim, `V` value dim, `W` conv size, `BV` value block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Value columns per step program: a [128, 32] fp32 block is 32 values per thread with 4 warps; B * H * V / 32
# programs.
STEP_BV = 32


@triton.jit
def _split_sum(p_row, stride_ps, cols, mask, S: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 sum of the `S` partial sums of the projection columns `cols` of one row (unrolled: loads in flight
    together)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(p_row + s * stride_ps + cols, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _conv_silu(p_row, stride_ps, p_cache, conv_weight, cols, mask, DT: tl.constexpr, S: tl.constexpr,
               BLOCK: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, CONV: tl.constexpr):  # fmt: skip
    """`silu(conv(cache, x))` of the projection columns `cols` (just `silu(x)` without a conv), rounded to `DT` at each
    step as the layer's sequence path is; and the conv window `[BLOCK, BW]` (the `W-1` cached inputs, then x), for
    `_shift_cache` (x itself without a conv)."""
    x = _split_sum(p_row, stride_ps, cols, mask, S, BLOCK).to(DT).to(tl.float32)
    window = x
    if CONV:
        o_w = tl.arange(0, BW)
        m_hist = mask[:, None] & (o_w[None, :] < W - 1)
        b_hist = tl.load(p_cache + cols[:, None] * (W - 1) + o_w[None, :], mask=m_hist, other=0.0).to(tl.float32)
        window = tl.where(o_w[None, :] == W - 1, x[:, None], b_hist)
        m_w = mask[:, None] & (o_w[None, :] < W)
        b_w = tl.load(conv_weight + cols[:, None] * W + o_w[None, :], mask=m_w, other=0.0).to(tl.float32)
        x = tl.sum(window * b_w, 1).to(DT).to(tl.float32)
    return (x * tl.sigmoid(x)).to(DT).to(tl.float32), window


@triton.jit
def _shift_cache(p_cache, cols, mask, window, W: tl.constexpr, BW: tl.constexpr):
    """Window positions 1..W-1 to cache slots 0..W-2: the cache then holds the last `W-1` inputs."""
    o_w = tl.arange(0, BW)
    p = p_cache + cols[:, None] * (W - 1) + o_w[None, :] - 1
    m = mask[:, None] & (o_w[None, :] >= 1) & (o_w[None, :] < W)
    tl.store(p, window.to(p_cache.dtype.element_ty), mask=m)


@triton.jit
def _l2norm(x, EPS: tl.constexpr, DT: tl.constexpr):
    return (x * tl.rsqrt(tl.sum(x * x, 0) + EPS)).to(DT).to(tl.float32)


@triton.jit
def _softplus(z):
    """PyTorch's softplus (the identity above 20); `log1p(exp(z))` written with `log` alone (the interpreter has no
    log1p): `log(w) * u / (w - 1)` with `w = 1 + u` is accurate to a few ulps even where `w` rounds to 1 (Goldberg)."""
    u = tl.exp(z)
    w = 1.0 + u
    rounded_to_one = w == 1.0
    log1p = tl.where(rounded_to_one, u, tl.log(w) * (u / tl.where(rounded_to_one, 1.0, w - 1.0)))
    return tl.where(z > 20.0, z, log1p)


@triton.jit
def gdn_step_inputs_kernel(proj, stride_ps, stride_pb, conv_state, conv_weight, decay, q, k, v, g, beta, H,
                           S: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVH: tl.constexpr,
                           W: tl.constexpr, BW: tl.constexpr, CONV: tl.constexpr, GATED: tl.constexpr,
                           L2_EPS: tl.constexpr):  # fmt: skip
    """Program (b * H + h): q, k `[K]` (L2-normed), v `[V]` in the activations' dtype, g and beta in fp32. `decay` is
    `[2, H]` fp32: A_log, then dt_bias."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    DT: tl.constexpr = q.dtype.element_ty
    C = 2 * H * K + H * V  # conv channels: q, k, v
    p_row = proj + i_b.to(tl.int64) * stride_pb
    p_cache = conv_state + i_b.to(tl.int64) * C * (W - 1)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BVH)
    m_k, m_v = o_k < K, o_v < V
    c_q, c_k, c_v = i_h * K + o_k, H * K + i_h * K + o_k, 2 * H * K + i_h * V + o_v
    b_q, window_q = _conv_silu(p_row, stride_ps, p_cache, conv_weight, c_q, m_k, DT, S, BK, W, BW, CONV)
    b_k, window_k = _conv_silu(p_row, stride_ps, p_cache, conv_weight, c_k, m_k, DT, S, BK, W, BW, CONV)
    b_v, window_v = _conv_silu(p_row, stride_ps, p_cache, conv_weight, c_v, m_v, DT, S, BVH, W, BW, CONV)
    # a and b of the head: columns c_a and c_a + H, as the two lanes of a 2-vector.
    o_ab = tl.arange(0, 2)
    b_ab = _split_sum(p_row, stride_ps, C + (H * V if GATED else 0) + i_h + o_ab * H, o_ab < 2, S, 2)
    b_ab = b_ab.to(DT).to(tl.float32)
    a, b = tl.sum(tl.where(o_ab == 0, b_ab, 0.0), 0), tl.sum(tl.where(o_ab == 1, b_ab, 0.0), 0)
    # g = -exp(A_log) * softplus(a + dt_bias); beta = sigmoid(b).
    z = a + tl.load(decay + H + i_h)
    tl.store(g + i_bh, -tl.exp(tl.load(decay + i_h)) * _softplus(z))
    tl.store(beta + i_bh, tl.sigmoid(b).to(DT).to(tl.float32))
    tl.store(q + i_bh * K + o_k, _l2norm(b_q, L2_EPS, DT).to(DT), mask=m_k)
    tl.store(k + i_bh * K + o_k, _l2norm(b_k, L2_EPS, DT).to(DT), mask=m_k)
    tl.store(v + i_bh * V + o_v, b_v.to(DT), mask=m_v)
    if CONV:  # the head's channels belong to this program alone
        tl.debug_barrier()  # every thread has loaded the conv cache before any entry moves
        _shift_cache(p_cache, c_q, m_k, window_q, W, BW)
        _shift_cache(p_cache, c_k, m_k, window_k, W, BW)
        _shift_cache(p_cache, c_v, m_v, window_v, W, BW)


@triton.jit
def gated_delta_step_kernel(q, k, v, g, beta, state, o, scale, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr):  # fmt: skip
    """Program (b * H + h, value block): S <- exp(g) S; S += beta k (v - S^T k)^T; o = scale S^T q (S is `[K, V]`)."""
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = state + i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_state, mask=m_kv, other=0.0)
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_s = b_s * tl.exp(tl.load(g + i_bh))
    # The delta rule moves the value the decayed state returns for k towards v, by a step of beta.
    b_delta = tl.load(beta + i_bh) * (b_v - tl.sum(b_s * b_k[:, None], 0))
    b_s = b_s + b_k[:, None] * b_delta[None, :]
    b_o = scale * tl.sum(b_s * b_q[:, None], 0)
    tl.store(p_state, b_s, mask=m_kv)
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def gated_delta_decode_triton(
    proj: torch.Tensor,
    conv_state: torch.Tensor | None,
    conv_weight: torch.Tensor | None,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    gated: bool,
    dtype: torch.dtype,
    l2_eps: float,
) -> torch.Tensor:
    """Triton path of `gated_delta_decode` up to the output norm (inputs already validated): the delta step's output
    `[B, H, V]` in `dtype`, the state and conv cache updated in place. `l2_eps`: the epsilon of q's and k's L2 norm
    (`hlsa.ops.gated_delta.L2NORM_EPS`)."""
    B, H, K, V = state.shape
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    conv = conv_state is not None
    W = conv_weight.shape[1] if conv else 1
    q, k = (torch.empty(B, H, K, device=state.device, dtype=dtype) for _ in range(2))
    v = torch.empty(B, H, V, device=state.device, dtype=dtype)
    g, beta = (torch.empty(B, H, device=state.device, dtype=torch.float32) for _ in range(2))
    BK = triton.next_power_of_2(K)
    # One [2, H] tensor: compiled with freezing, a 1-D parameter of at most 8 values (A_log, dt_bias at 8 heads)
    # becomes inline constants that Inductor writes back to a buffer for the kernel every step (a launch each).
    decay = torch.stack((A_log.float(), dt_bias.float()))
    gdn_step_inputs_kernel[(B * H,)](
        proj, proj.stride(0), proj.stride(1), conv_state if conv else q, conv_weight.contiguous() if conv else q,
        decay, q, k, v, g, beta, H, S=proj.shape[0], K=K, V=V, BK=BK,
        BVH=triton.next_power_of_2(V), W=W, BW=max(2, triton.next_power_of_2(W)), CONV=conv, GATED=gated,
        L2_EPS=l2_eps, num_warps=4,
    )  # fmt: skip
    o = torch.empty(B, H, V, device=state.device, dtype=dtype)
    BV = min(STEP_BV, triton.next_power_of_2(V))
    gated_delta_step_kernel[(B * H, triton.cdiv(V, BV))](
        q, k, v, g, beta, state, o, K**-0.5, K=K, V=V, BK=BK, BV=BV, num_warps=4
    )
    return o
