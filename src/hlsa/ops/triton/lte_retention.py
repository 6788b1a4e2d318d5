"""Triton scan for `hlsa.ops.lte_retention.lte_column_end`: streaming min-replacement, one program per (b, kv head).

Legend: `B` batch, `T` length, `H` kv heads, `N` buffer size, `NB` its power-of-two register tile. The program keeps
the buffer's scores and positions in registers and walks the T keys in order, exactly as the torch scan does: a
positive key replaces the lowest-scored slot (the latest key among equal lowest scores) if it scores strictly higher.
The slots past N hold `+inf` so that they are never the lowest while a real slot is finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A constexpr global: jitted kernels may only read globals declared this way (the interpreter is laxer).
INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def _column_end_scan_kernel(score, end, T, W, N, H: tl.constexpr, NB: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_s = tl.arange(0, NB)
    buf_s = tl.where(o_s < N, float("-inf"), float("inf"))
    buf_p = tl.full([NB], -1, dtype=tl.int32)
    p_score = score + i_b.to(tl.int64) * T * H + i_h
    p_end = end + i_b.to(tl.int64) * T * H + i_h
    for j in range(T):
        s_j = tl.load(p_score + j * H).to(tl.float32)
        low = tl.min(buf_s, 0)
        latest = tl.max(tl.where(buf_s == low, buf_p, -2), 0)
        slot = tl.min(tl.where((buf_s == low) & (buf_p == latest), o_s, NB), 0)
        take = (s_j > 0) & (s_j > low)
        if take:
            # The evicted key stays visible to the queries before this key's arrival (latest = -1: an empty slot).
            if latest >= 0:
                tl.store(p_end + latest * H, j + W + 1)
            tl.store(p_end + j * H, INT32_MAX)
            buf_s = tl.where(o_s == slot, s_j, buf_s)
            buf_p = tl.where(o_s == slot, j, buf_p)
        else:
            tl.store(p_end + j * H, tl.where(s_j > 0, j + W + 1, 0))


def lte_column_end_triton(score: torch.Tensor, *, window: int, buffer_size: int) -> torch.Tensor:
    """score float `[B, T, H]` -> int32 column ends `[B, T, H]` (arguments already validated)."""
    B, T, H = score.shape
    score = score.contiguous()
    end = torch.empty(B, T, H, device=score.device, dtype=torch.int32)
    # A buffer of T slots never evicts, like any larger one: cap N at T to bound the register tile.
    n_eff = min(buffer_size, T)
    NB = triton.next_power_of_2(max(n_eff, 1))
    # One warp per 256 slots keeps the per-step reductions short; the walk over T is sequential anyway.
    warps = min(max(NB // 256, 1), 8)
    _column_end_scan_kernel[(B * H,)](score, end, T, window, n_eff, H=H, NB=NB, num_warps=warps)
    return end
