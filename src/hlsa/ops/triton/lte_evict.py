"""Triton LTE eviction for `hlsa.ops.lte_evict`: one launch, one program per (b, kv-head).

Each program derives the ring slot `position % RING` on the device (no host sync), reads the score of the token
leaving the window, finds the buffer victim (minimum score over the valid buffer prefix; among the entries tied at
it, the largest position, i.e. the latest token), copies the token's K/V/score/position into the buffer when it
earns a place, updates `buffer_len`, then writes the new token and its position into the ring slot, and with
`HAS_SCORE` the ranked score of token `position - LAG` into its ring slot.

Legend: `B` batch, `HKV` kv-heads, `S` slots, `D` head dim, `N` buffer slots (`BN`, `BD`: power-of-2 tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["RING", "N", "SINK"])
def lte_evict_kernel(
    k,
    v,
    score,
    valid,
    buffer_len,
    pos,
    position,
    k_new,
    v_new,
    new_score,
    offset,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_sb,
    stride_sh,
    stride_ab,
    stride_ah,
    stride_lb,
    stride_lh,
    stride_pb,
    stride_ph,
    stride_nkb,
    stride_nkh,
    stride_nvb,
    stride_nvh,
    stride_rb,
    stride_rh,
    RING,
    N,
    SINK,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    HAS_BUFFER: tl.constexpr,
    HAS_SCORE: tl.constexpr,
    LAG: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b, i_h = (i_bh // HKV).to(tl.int64), i_bh % HKV  # int64: caches of 2^31 elements or more
    i_pos_new = tl.load(position)  # int64
    i_slot = i_pos_new % RING
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    p_score = score + i_b * stride_sb + i_h * stride_sh
    p_valid = valid + i_b * stride_ab + i_h * stride_ah
    p_pos = pos + i_b * stride_pb + i_h * stride_ph

    if HAS_BUFFER:
        p_len = buffer_len + i_b * stride_lb + i_h * stride_lh
        b_len = tl.load(p_len)
        b_r = tl.load(p_score + i_slot)
        b_r_valid = tl.load(p_valid + i_slot) != 0
        b_r_pos = tl.load(p_pos + i_slot)
        o_n = tl.arange(0, BN)
        m_buf = (o_n < b_len) & (o_n < N)
        b_buf = tl.load(p_score + RING + o_n, mask=m_buf, other=float("inf"))  # [BN]
        b_buf_pos = tl.load(p_pos + RING + o_n, mask=m_buf, other=0)  # [BN]
        b_min = tl.min(b_buf, 0)
        # Slots are reused, so the latest token tied at the minimum is found by position, not by slot index.
        m_tie = m_buf & (b_buf == b_min)
        b_latest = tl.max(tl.where(m_tie, b_buf_pos, -2147483648), 0)
        i_victim = tl.min(tl.where(m_tie & (b_buf_pos == b_latest), o_n, BN), 0)
        b_not_full = b_len < N
        # The ring token is later than every buffer token: on a tie with the minimum the buffer token stays.
        b_move = b_r_valid & (b_r > 0) & (b_not_full | (b_r > b_min))
        i_dst = RING + tl.where(b_not_full, b_len, i_victim)
        b_k = tl.load(p_k + i_slot * stride_ks + o_d, mask=m_d)
        b_v = tl.load(p_v + i_slot * stride_vs + o_d, mask=m_d)
        # Row mask that is empty unless the token moves (a scalar & vector mask trips the interpreter).
        m_move = o_d < tl.where(b_move, D, 0)
        tl.store(p_k + i_dst * stride_ks + o_d, b_k, mask=m_move)
        tl.store(p_v + i_dst * stride_vs + o_d, b_v, mask=m_move)
        tl.store(p_score + i_dst, b_r, mask=b_move)
        tl.store(p_valid + i_dst, tl.full([], 1, tl.int1), mask=b_move)
        tl.store(p_pos + i_dst, b_r_pos, mask=b_move)
        tl.store(p_len, b_len + 1, mask=b_move & b_not_full)
        # The ring slot is overwritten next; every thread must have read the old token first.
        tl.debug_barrier()

    b_k_new = tl.load(k_new + i_b * stride_nkb + i_h * stride_nkh + o_d, mask=m_d)
    b_v_new = tl.load(v_new + i_b * stride_nvb + i_h * stride_nvh + o_d, mask=m_d)
    tl.store(p_k + i_slot * stride_ks + o_d, b_k_new, mask=m_d)
    tl.store(p_v + i_slot * stride_vs + o_d, b_v_new, mask=m_d)
    b_new_score = tl.full([], float("-inf"), tl.float32)  # not scored yet: the router's score comes LAG steps later
    if HAS_SCORE:
        # Token j = position - LAG: -inf before its row's padding ends (or j < 0), +inf for the sinks after it.
        i_j = i_pos_new - LAG
        i_since = i_j - tl.load(offset + i_b)
        b_ranked = tl.load(new_score + i_b * stride_rb + i_h * stride_rh).to(tl.float32)
        b_ranked = tl.where(i_since < SINK, float("inf"), b_ranked)
        b_ranked = tl.where(i_since >= 0, b_ranked, float("-inf"))
        if LAG == 0:  # token j is the new token
            b_new_score = b_ranked
        else:  # a token still in the ring; `%` keeps the dividend's sign, so j < 0 wraps explicitly
            tl.store(p_score + (i_j % RING + RING) % RING, b_ranked)
    tl.store(p_score + i_slot, b_new_score)
    tl.store(p_valid + i_slot, tl.full([], 1, tl.int1))
    tl.store(p_pos + i_slot, i_pos_new.to(tl.int32))


def lte_evict_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    score_cache: torch.Tensor,
    valid: torch.Tensor,
    buffer_len: torch.Tensor,
    pos_cache: torch.Tensor,
    *,
    position: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    ring_size: int,
    new_score: torch.Tensor | None,
    score_lag: int,
    offset: torch.Tensor | None,
    sink_size: int,
) -> None:
    """Launch the eviction kernel (in place); inputs are validated by `hlsa.ops.lte_evict.lte_evict`.

    Args: as in `lte_evict`; the caches must have unit stride along D and S where they are written in place.
    """
    B, HKV, S, D = k_cache.shape
    N = S - ring_size
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1:
            raise ValueError(f"lte_evict: {name} needs unit stride along its last dim (it is updated in place)")
    for name, t in (("score_cache", score_cache), ("valid", valid), ("pos_cache", pos_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"lte_evict: {name} needs unit stride along S (it is updated in place)")
    offset = None if offset is None else offset.contiguous()  # the kernel reads row b at offset + b
    lte_evict_kernel[(B * HKV,)](
        k_cache,
        v_cache,
        score_cache,
        valid,
        buffer_len,
        pos_cache,
        position,
        k_new,
        v_new,
        new_score,
        offset,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        score_cache.stride(0),
        score_cache.stride(1),
        valid.stride(0),
        valid.stride(1),
        buffer_len.stride(0),
        buffer_len.stride(1),
        pos_cache.stride(0),
        pos_cache.stride(1),
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        0 if new_score is None else new_score.stride(0),
        0 if new_score is None else new_score.stride(1),
        RING=ring_size,
        N=N,
        SINK=sink_size,
        HKV=HKV,
        D=D,
        BN=triton.next_power_of_2(max(N, 1)),
        BD=triton.next_power_of_2(D),
        HAS_BUFFER=N > 0,
        HAS_SCORE=new_score is not None,
        LAG=score_lag,
        num_warps=1 if N <= 256 and D <= 128 else 4,
    )
