"""Triton decode step of Native Sparse Attention: one launch, one program per (row, kv head).

A program holds the G query heads of its kv group (they share the selection) and runs, in order:
1. two passes over the compressed cache: the log-sum-exp, then the compressed output and the per-block importance
   `p_c = sum_g softmax_g(c)`, written to an L2-resident scratch row (one float per block);
2. the top-S choice with the forced blocks {0, IC-1, IC}: each block becomes one int64 key
   `(float bits of p_c) << 32 | c` (p_c >= 0, so its bits order like the floats; forced blocks get +inf; ties go to
   the later block), and S max-reductions over the keys pick the blocks, most important first;
3. attention over each chosen block as soon as it is picked (causal inside the current block);
4. attention over the window band `t - W..t`;
5. the gated sum.
No host sync: `start` and `seq_len` stay on the device and loop bounds are read from them inside the kernel, so the
kernel compiles once per cache shape and a captured CUDA graph replays it at any sequence length.

Legend: `B` batch, `HQ`/`HKV` heads, `G = HQ // HKV`, `D` head dim, `N` cache slots, `NC` compressed slots;
`GP, BD, BSP` are G, D, block_size padded to powers of two >= 16 (the smallest `tl.dot` tile on GPUs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Blocks of the compressed cache per loop step, and window tokens per loop step.
_BC = 64
_BW = 64


@triton.jit
def _online_step(b_q, p_k, p_v, m_kv, m_d, scale, b_m, b_l, b_acc, PREC: tl.constexpr):
    """One flash-attention step: keys `p_k` [BD, n], values `p_v` [n, BD], masked by `m_kv` [n] and `m_d` [BD]."""
    b_k = tl.load(p_k, mask=m_kv[None, :] & m_d[:, None], other=0.0)
    b_s = tl.dot(b_q, b_k, input_precision=PREC) * scale
    b_s = tl.where(m_kv[None, :], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    # Guard rows still at -inf (nothing seen yet): exp(-inf - -inf) would be NaN.
    b_mn_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_alpha = tl.exp(b_m - b_mn_safe)
    b_p = tl.exp(b_s - b_mn_safe[:, None])
    b_v = tl.load(p_v, mask=m_kv[:, None] & m_d[None, :], other=0.0)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return b_mn, b_l * b_alpha + tl.sum(b_p, 1), b_acc


@triton.jit
def nsa_decode_kernel(
    q,
    k,
    v,
    k_cmp,
    v_cmp,
    g_cmp,
    g_slc,
    g_swa,
    start,
    o,
    imp,
    scale,
    seq_len_ptr,
    window,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_cb,
    stride_ch,
    stride_cn,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    S: tl.constexpr,
    BS: tl.constexpr,
    GP: tl.constexpr,
    BD: tl.constexpr,
    BSP: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
    NCP: tl.constexpr,
    PREC: tl.constexpr,
):
    # torch.compile (Inductor) passes Python floats as fp64 scalars; fp32 keeps the loop-carried softmax state fp32.
    scale = tl.cast(scale, tl.float32)
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    st = tl.load(start + i_b).to(tl.int32)
    seq_len = tl.load(seq_len_ptr).to(tl.int32)
    t = seq_len - 1  # the query's cache slot
    n_real = tl.maximum(seq_len - st, 0)
    NC = n_real // BS  # complete blocks visible to the query
    IC = tl.maximum(n_real - 1, 0) // BS  # the query's own block

    o_g, o_d = tl.arange(0, GP), tl.arange(0, BD)
    m_g, m_d = o_g < G, o_d < D
    i_q = i_b * HKV * G + i_h * G + o_g  # query head rows of this group
    b_q = tl.load(q + i_q[:, None] * D + o_d[None, :], mask=m_g[:, None] & m_d[None, :], other=0.0)
    k += i_b * stride_kb + i_h * stride_kh
    v += i_b * stride_kb + i_h * stride_kh
    k_cmp += i_b * stride_cb + i_h * stride_ch
    v_cmp += i_b * stride_cb + i_h * stride_ch
    imp += i_bh * NCP

    # 1a. log-sum-exp of the compressed scores.
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    for c0 in range(0, NC, BC):
        o_c = c0 + tl.arange(0, BC)
        b_k = tl.load(
            k_cmp + o_c[None, :] * stride_cn + o_d[:, None], mask=(o_c < NC)[None, :] & m_d[:, None], other=0.0
        )
        b_s = tl.where((o_c < NC)[None, :], tl.dot(b_q, b_k, input_precision=PREC) * scale, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_l = b_l * tl.exp(b_m - b_mn) + tl.sum(tl.exp(b_s - b_mn[:, None]), 1)
        b_m = b_mn
    b_lse = tl.where(NC > 0, b_m + tl.log(b_l), 0.0)

    # 1b. compressed output and block importance (probabilities summed over the group's heads).
    b_ocmp = tl.zeros([GP, BD], dtype=tl.float32)
    for c0 in range(0, NC, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < NC
        b_k = tl.load(k_cmp + o_c[None, :] * stride_cn + o_d[:, None], mask=m_c[None, :] & m_d[:, None], other=0.0)
        b_s = tl.where(m_c[None, :], tl.dot(b_q, b_k, input_precision=PREC) * scale, float("-inf"))
        b_p = tl.where(m_g[:, None], tl.exp(b_s - b_lse[:, None]), 0.0)
        b_v = tl.load(v_cmp + o_c[:, None] * stride_cn + o_d[None, :], mask=m_c[:, None] & m_d[None, :], other=0.0)
        b_ocmp += tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        tl.store(imp + o_c, tl.sum(b_p, 0), mask=m_c)
    tl.debug_barrier()  # the scratch row is read back below by other threads of this program

    # 2. keys for the top-S choice: forced blocks +inf, candidates c <= IC, the rest -1 (never chosen).
    o_n = tl.arange(0, NCP)
    b_imp = tl.load(imp + o_n, mask=o_n < IC, other=0.0)
    b_imp = tl.where((o_n == 0) | (o_n == IC - 1) | (o_n == IC), float("inf"), b_imp)
    b_key = (b_imp.to(tl.int32, bitcast=True).to(tl.int64) << 32) | o_n.to(tl.int64)
    b_key = tl.where((o_n <= IC) & (n_real > 0), b_key, -1)

    # 3. attention over the chosen blocks, each attended as soon as it is picked.
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    b_oslc = tl.zeros([GP, BD], dtype=tl.float32)
    o_s = tl.arange(0, BSP)
    for _ in range(S):
        b_top = tl.max(b_key, 0)
        b_key = tl.where(b_key == b_top, -1, b_key)
        if b_top >= 0:
            i_s = st + (b_top & 0xFFFFFFFF).to(tl.int32) * BS + o_s  # cache slots of the block
            m_s = (o_s < BS) & (i_s <= t)
            p_k = k + i_s[None, :] * stride_kn + o_d[:, None]
            p_v = v + i_s[:, None] * stride_kn + o_d[None, :]
            b_m, b_l, b_oslc = _online_step(b_q, p_k, p_v, m_s, m_d, scale, b_m, b_l, b_oslc, PREC)
    b_oslc = b_oslc / tl.where(b_l > 0, b_l, 1.0)[:, None]

    # 4. attention over the window band t - W..t (real slots only).
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    b_oswa = tl.zeros([GP, BD], dtype=tl.float32)
    o_w = tl.arange(0, BW)
    for j0 in range(tl.maximum(st, t - window), seq_len, BW):
        i_w = j0 + o_w
        p_k = k + i_w[None, :] * stride_kn + o_d[:, None]
        p_v = v + i_w[:, None] * stride_kn + o_d[None, :]
        b_m, b_l, b_oswa = _online_step(b_q, p_k, p_v, i_w < seq_len, m_d, scale, b_m, b_l, b_oswa, PREC)
    b_oswa = b_oswa / tl.where(b_l > 0, b_l, 1.0)[:, None]

    # 5. gated sum.
    b_gc = tl.load(g_cmp + i_q, mask=m_g, other=0.0).to(tl.float32)
    b_gs = tl.load(g_slc + i_q, mask=m_g, other=0.0).to(tl.float32)
    b_gw = tl.load(g_swa + i_q, mask=m_g, other=0.0).to(tl.float32)
    b_o = b_gc[:, None] * b_ocmp + b_gs[:, None] * b_oslc + b_gw[:, None] * b_oswa
    tl.store(o + i_q[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_g[:, None] & m_d[None, :])


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def nsa_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    g_cmp: torch.Tensor,
    g_slc: torch.Tensor,
    g_swa: torch.Tensor,
    *,
    start: torch.Tensor,
    seq_len: int | torch.Tensor,
    block_size: int,
    block_counts: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Launcher of `nsa_decode_kernel`; inputs validated by `hlsa.ops.nsa.nsa_decode` (same Args, `[B, HQ, D]`)."""
    B, HQ, D = q.shape
    HKV = k_cache.shape[1]
    if k_cache.stride(-1) != 1 or k_cmp.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("nsa_decode: caches need a contiguous last dim, and k/v caches the same strides")
    if v_cmp.stride() != k_cmp.stride():
        raise ValueError("nsa_decode: k_cmp and v_cmp need the same strides")
    q, g_cmp, g_slc, g_swa, start = (x.contiguous() for x in (q, g_cmp, g_slc, g_swa, start))
    if not isinstance(seq_len, torch.Tensor):
        seq_len = torch.full((), seq_len, dtype=torch.int64, device=q.device)
    # Candidate blocks 0..IC fit in NCP keys for any seq_len <= N: sized by the cache, not by seq_len, so that one
    # compiled kernel serves every step until the cache grows.
    NCP = _pow2_at_least_16((k_cache.shape[2] - 1) // block_size + 1)
    imp = torch.empty(B * HKV, NCP, dtype=torch.float32, device=q.device)
    o = torch.empty_like(q)
    nsa_decode_kernel[(B * HKV,)](
        q, k_cache, v_cache, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start, o, imp,
        scale, seq_len, window,
        *k_cache.stride()[:3], *k_cmp.stride()[:3],
        HKV=HKV, G=HQ // HKV, D=D, S=block_counts, BS=block_size,
        GP=_pow2_at_least_16(HQ // HKV), BD=_pow2_at_least_16(D), BSP=_pow2_at_least_16(block_size),
        BC=_BC, BW=_BW, NCP=NCP, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
    return o
