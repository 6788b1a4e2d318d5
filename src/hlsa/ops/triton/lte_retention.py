"""Triton scan for `hlsa.ops.lte_retention.lte_column_end`: streaming min-replacement, in parallel chunks of keys.

Legend: `B` batch, `T` length, `H` kv heads, `N` buffer size, `NB` its power-of-two register tile, `L` keys per
chunk, `C` chunks. The scan walks the keys in order and keeps the buffer of the per-query top-N rule: a positive key
replaces the lowest-scored slot (the latest key among equal lowest scores) if it scores strictly higher. So after key
`j` the buffer holds exactly the top N positive keys among `0..j` in the order "higher score, then earlier
position". That makes the state at any chunk boundary computable without the walk:

1. `hlsa.ops.lte_retention.prefix_buffers` (torch, called by the op): the buffer each chunk starts from.
2. `_column_end_chunk_kernel`: one program per (chunk, b, kv head) walks its L keys from that state, in registers.

Every key is rejected on arrival or evicted at most once, so exactly one program writes its column end (positive
keys start at `INT32_MAX`, "never evicted"; non-positive ones at 0). The walk of a 64K prompt is then C programs of
L steps instead of one program of T steps per (b, kv head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A constexpr global: jitted kernels may only read globals declared this way (the interpreter is laxer).
INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def _column_end_chunk_kernel(score, end, state_s, state_p, T, W, N, L, H: tl.constexpr, NB: tl.constexpr):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_s = tl.arange(0, NB)
    # The buffer this chunk starts from; the slots past N hold +inf so that they are never the lowest.
    p_state = (i_bh.to(tl.int64) * tl.num_programs(0) + i_c) * N
    buf_s = tl.load(state_s + p_state + o_s, mask=o_s < N, other=float("inf"))
    buf_p = tl.load(state_p + p_state + o_s, mask=o_s < N, other=-1)
    p_score = score + i_b.to(tl.int64) * T * H + i_h
    p_end = end + i_b.to(tl.int64) * T * H + i_h
    for j in range(i_c * L, tl.minimum(i_c * L + L, T)):
        s_j = tl.load(p_score + j * H).to(tl.float32)
        low = tl.min(buf_s, 0)
        latest = tl.max(tl.where(buf_s == low, buf_p, -2), 0)
        slot = tl.min(tl.where((buf_s == low) & (buf_p == latest), o_s, NB), 0)
        if (s_j > 0) & (s_j > low):
            # The evicted key stays visible to the queries before this key's arrival (latest = -1: an empty slot).
            if latest >= 0:
                tl.store(p_end + latest * H, j + W + 1)
            buf_s = tl.where(o_s == slot, s_j, buf_s)
            buf_p = tl.where(o_s == slot, j, buf_p)
        elif s_j > 0:  # not in the top N when it arrives: no query beyond the band sees it
            tl.store(p_end + j * H, j + W + 1)


def chunk_length(T: int, n_rows: int) -> int:
    """Keys per program: about 1024 programs over `n_rows` = B * H rows, at least 256 keys each (fewer chunks, fewer
    prefix rounds)."""
    return max(256, triton.next_power_of_2(triton.cdiv(T * n_rows, 1024)))


def lte_column_end_triton(
    score: torch.Tensor, state_s: torch.Tensor, state_p: torch.Tensor, *, window: int, chunk: int
) -> torch.Tensor:
    """score float `[B, T, H]` -> int32 column ends `[B, T, H]` (arguments already validated).

    `state_s`, `state_p`: the buffer each chunk of `chunk` keys starts from, fp32 scores and int32 positions
    `[B * H, C, N]` (`hlsa.ops.lte_retention.prefix_buffers`), `1 <= N <= T`; any `chunk` gives the same result.
    """
    B, T, H = score.shape
    score = score.contiguous()
    n_eff = state_s.shape[-1]
    end = torch.where(score > 0, INT32_MAX.value, 0).to(torch.int32)  # positive keys: "never evicted" until written
    NB = triton.next_power_of_2(n_eff)
    # One warp per 256 slots keeps the per-step reductions short; the walk over a chunk is sequential anyway.
    warps = min(max(NB // 256, 1), 8)
    _column_end_chunk_kernel[(triton.cdiv(T, chunk), B * H)](
        score, end, state_s, state_p, T, window, n_eff, chunk, H=H, NB=NB, num_warps=warps
    )
    return end
