"""Triton scan for `hlsa.ops.lte_retention.lte_column_end`: streaming min-replacement, in parallel chunks of keys.

Legend: `B` batch, `T` length, `H` kv heads, `N` buffer size, `NB` its power-of-two register tile, `L` keys per
chunk, `C` chunks. The scan walks the keys in order and keeps the buffer of the per-query top-N rule: a positive key
replaces the lowest-scored slot (the latest key among equal lowest scores) if it scores strictly higher. So after key
`j` the buffer holds exactly the top N positive keys among `0..j` in the order "higher score, then earlier
position". That makes the state at any chunk boundary computable without the walk:

1. `prefix_buffers` (torch): per chunk, the top N of its keys; then a prefix over chunks by doubling (top N of the
   union of two disjoint ranges' top N, log2(C) rounds) gives the buffer each chunk starts from.
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
POS_BITS = 31  # positions < 2^31 fill the low bits of a rank key


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


def prefix_buffers(score: torch.Tensor, n: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffer at the start of each chunk: scores fp32 and positions int32 `[R, C, n]` for score `[R, T]`.

    Empty slots are (-inf, -1). Keys are ranked by one int64 per key: the bits of a positive fp32 score (monotone
    in its value) above the reversed position, so a larger key is a higher score or, on equal scores, an earlier
    position; non-positive keys get -1 and never enter.
    """
    R, T = score.shape
    C = triton.cdiv(T, chunk)
    pos = torch.arange(T, device=score.device, dtype=torch.int64)
    s = score.float()
    bits = torch.where(s > 0, s, 0.0).view(torch.int32).to(torch.int64)
    key = torch.where(s > 0, (bits << POS_BITS) | ((1 << POS_BITS) - 1 - pos), -1)
    key = torch.nn.functional.pad(key, (0, C * chunk - T), value=-1).view(R, C, chunk)
    top = key.topk(min(n, chunk), dim=-1).values
    top = torch.nn.functional.pad(top, (0, n - top.shape[-1]), value=-1)  # [R, C, n]: top n of each chunk
    step = 1
    while step < C:  # inclusive prefix: chunk c then covers chunks c - 2 * step + 1 .. c
        earlier = torch.nn.functional.pad(top[:, : C - step], (0, 0, step, 0), value=-1)
        top = torch.cat([top, earlier], dim=-1).topk(n, dim=-1).values
        step *= 2
    start = torch.nn.functional.pad(top[:, : C - 1], (0, 0, 1, 0), value=-1)  # exclusive: keys before the chunk
    kept = start >= 0
    buf_p = torch.where(kept, (1 << POS_BITS) - 1 - (start & ((1 << POS_BITS) - 1)), -1).to(torch.int32)
    buf_s = torch.where(kept, (start >> POS_BITS).to(torch.int32).view(torch.float32), float("-inf"))
    return buf_s.contiguous(), buf_p.contiguous()


def lte_column_end_triton(
    score: torch.Tensor, *, window: int, buffer_size: int, chunk: int | None = None
) -> torch.Tensor:
    """score float `[B, T, H]` -> int32 column ends `[B, T, H]` (arguments already validated).

    `chunk`: keys per program (default `chunk_length`); any value gives the same result (tests use small ones).
    """
    B, T, H = score.shape
    score = score.contiguous()
    end = torch.where(score > 0, INT32_MAX.value, 0).to(torch.int32)
    # A buffer of T slots never evicts, like any larger one: cap N at T to bound the register tile.
    n_eff = min(buffer_size, T)
    if n_eff == 0:
        positions = torch.arange(T, device=score.device, dtype=torch.int32)[None, :, None]
        return torch.where(score > 0, positions + window + 1, 0).to(torch.int32)
    chunk = chunk or chunk_length(T, B * H)
    state_s, state_p = prefix_buffers(score.permute(0, 2, 1).reshape(B * H, T), n_eff, chunk)
    NB = triton.next_power_of_2(n_eff)
    # One warp per 256 slots keeps the per-step reductions short; the walk over a chunk is sequential anyway.
    warps = min(max(NB // 256, 1), 8)
    _column_end_chunk_kernel[(triton.cdiv(T, chunk), B * H)](
        score, end, state_s, state_p, T, window, n_eff, chunk, H=H, NB=NB, num_warps=warps
    )
    return end
