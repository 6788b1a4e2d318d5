"""LTE retained set at inference: per-key `column_end` from router scores (the per-query top-N rule).

For a query at position `t`, the retained older keys of a kv head are the top-`N` positive scores among keys
`j < t - W`, ties broken in favour of the earlier key (sinks score `+inf`, pads `-inf`). A key enters the candidates at
query `t = j + W + 1` and, once outranked by `N` others, never comes back (later keys only add competitors), so its
visibility beyond the band is one interval and `column_end` describes it (docs/design.md, "LTE retained set"):
* score <= 0: `0`;
* not in the top N when it arrives: `j + W + 1` (no query beyond the band);
* pushed out when the key at position `u'` arrives: `u' + W + 1`;
* never pushed out: `INT32_MAX`.
`sparse_attention(..., window=W, column_end=lte_column_end(score, window=W, buffer_size=N))` is then exactly
attention over the window plus the retained buffer that streaming min-replacement (decode) keeps.
"""

from __future__ import annotations

import torch

from hlsa.ops import kernel_backend

INT32_MAX = 2**31 - 1
MAX_TRITON_SLOTS = 8192
POS_BITS = 31  # positions < 2^31 fill the low bits of a rank key (`prefix_buffers`)


# Largest B * HKV * T^2 for which the CPU dispatch uses the brute force: where the chunked scan overtakes it (2-core
# CPU, N = 64: both ~0.02 s at T = 512 with 4 heads; at T = 2048 the brute force takes 0.45 s, the scan 0.04 s).
BRUTE_FORCE_MAX_PAIRS = 2**20


def _check(score: torch.Tensor, window: int, buffer_size: int) -> None:
    if score.dim() != 3 or not score.is_floating_point():
        raise ValueError(f"lte_column_end: score must be a float [B, T, HKV] tensor; got {score.dtype} {score.shape}")
    if window < 0:
        raise ValueError(f"lte_column_end: window must be >= 0; got {window}")
    if buffer_size < 0:
        raise ValueError(f"lte_column_end: buffer_size must be >= 0; got {buffer_size}")


def lte_column_end_ref(score: torch.Tensor, *, window: int, buffer_size: int) -> torch.Tensor:
    """Brute-force rank count, O(T^2) memory. Scores are compared in fp32, as in the scan and the kernel.

    Args:
        score: float `[B, T, HKV]` router scores (`+inf` sinks, `-inf` pads).
        window: `W >= 0`.
        buffer_size: `N >= 0`, the number of retained older keys per kv head.

    Returns:
        int32 `[B, T, HKV]` column ends.
    """
    _check(score, window, buffer_size)
    B, T, H = score.shape
    s = score.float().permute(0, 2, 1)  # [B, H, T]
    pos = torch.arange(T, device=score.device)
    s_k, s_j = s[:, :, :, None], s[:, :, None, :]  # competitor k on dim 2, key j on dim 3
    # k outranks j: a higher score, or an equal score at an earlier position.
    beats = (s_k > s_j) | ((s_k == s_j) & (pos[:, None] < pos[None, :]))  # [B, H, Tk, Tj]
    # rank[m, j] = number of keys at positions <= m that outrank j.
    rank = beats.to(torch.int32).cumsum(dim=2)
    enters = rank[:, :, pos, pos] < buffer_size  # [B, H, T]: in the top N when it arrives
    # The pushing key u' is the first position where the rank reaches N (rank never decreases along m).
    push = (rank < buffer_size).sum(dim=2)  # [B, H, T]; == T when never pushed out
    end = torch.where(push < T, push + window + 1, INT32_MAX)
    end = torch.where(enters, end, pos + window + 1)
    end = torch.where(s_j[:, :, 0, :] > 0, end, 0)
    return end.to(torch.int32).permute(0, 2, 1).contiguous()


def prefix_buffers(score: torch.Tensor, n: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffer at the start of each chunk: scores fp32 and positions int32 `[R, C, n]` for score `[R, T]`.

    Empty slots are (-inf, -1). Keys are ranked by one int64 per key: the bits of a positive fp32 score (monotone
    in its value) above the reversed position, so a larger key is a higher score or, on equal scores, an earlier
    position; non-positive keys get -1 and never enter.
    """
    if chunk < 1:
        raise ValueError(f"lte_column_end: chunk must be >= 1 keys; got {chunk}")
    R, T = score.shape
    C = -(-T // chunk)
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


def scan_chunk(buffer_size: int) -> int:
    """Keys per chunk of the torch scan: half the buffer, within [32, 256]. Longer chunks mean fewer steps of ~10
    small ops, more chunks a costlier prefix (~C log C top-N merges). Measured on 2 CPU cores: N = 64 at T = 256-1024
    is fastest at 32 (0.02 s; 0.03 s at 128); N = 512 at T = 4096 x 16 heads at 256 (0.11 s; 0.18 s at 64)."""
    return min(256, max(32, (1 << max(buffer_size - 1, 0).bit_length()) // 2))


def lte_column_end_scan(
    score: torch.Tensor, *, window: int, buffer_size: int, chunk: int | None = None
) -> torch.Tensor:
    """Streaming min-replacement in chunks of `chunk` keys, each from its prefix buffer (`prefix_buffers`), all
    chunks of all (b, kv head) rows in one vectorised walk of `chunk` steps; O(T * N) work. Scores are compared in
    fp32. Every key is rejected or evicted at most once, so exactly one chunk writes its column end.

    Args and Returns as in `lte_column_end_ref`; `chunk` (default `scan_chunk`) changes the speed, not the result.
    """
    _check(score, window, buffer_size)
    B, T, H = score.shape
    R, n = B * H, min(buffer_size, T)
    s = score.permute(0, 2, 1).reshape(R, T).float()
    pos = torch.arange(T, device=score.device)
    if n == 0:
        end = torch.where(s > 0, pos + window + 1, 0)
        return end.to(torch.int32).reshape(B, H, T).permute(0, 2, 1).contiguous()
    chunk = scan_chunk(n) if chunk is None else chunk
    buf_s, buf_p = prefix_buffers(s, n, chunk)  # checks chunk
    C = -(-T // chunk)
    buf_s, buf_p = buf_s.reshape(R * C, n), buf_p.reshape(R * C, n).long()
    keys = torch.nn.functional.pad(s, (0, C * chunk - T), value=float("-inf")).reshape(R * C, chunk)
    first = (torch.arange(C, device=score.device) * chunk).repeat(R)[:, None]  # [R*C, 1]: a chunk's first key
    # `end` flattened with a spare slot T per row, where rows that write nothing at a step dump their value (no
    # boolean indexing: no host sync per step). Positive keys start "never evicted", the rest at 0.
    end = torch.nn.functional.pad(torch.where(s > 0, INT32_MAX, 0), (0, 1)).reshape(-1)
    row = (torch.arange(R, device=score.device) * (T + 1)).repeat_interleave(C)[:, None]
    dump = row + T
    for t in range(chunk):
        j, s_j = first + t, keys[:, t : t + 1]
        # The slot to replace: the lowest score and, among equal scores, the latest key (ties favour the earlier).
        low = buf_s.min(dim=1, keepdim=True).values
        slot = torch.where(buf_s == low, buf_p, -2).argmax(dim=1, keepdim=True)
        take = (s_j > 0) & (s_j > low)
        out = buf_p.gather(1, slot)
        # The evicted key stays visible to the queries before this key's arrival; a rejected one to none past the band.
        end.scatter_(0, torch.where(take & (out >= 0), row + out, dump).view(-1), (j + window + 1).view(-1))
        end.scatter_(0, torch.where((s_j > 0) & ~take, row + j, dump).view(-1), (j + window + 1).view(-1))
        buf_s.scatter_(1, slot, torch.where(take, s_j, buf_s.gather(1, slot)))
        buf_p.scatter_(1, slot, torch.where(take, j, out))
    return end.view(R, T + 1)[:, :T].to(torch.int32).reshape(B, H, T).permute(0, 2, 1).contiguous()


def lte_column_end_kernel(
    score: torch.Tensor, *, window: int, buffer_size: int, chunk: int | None = None
) -> torch.Tensor:
    """The Triton scan (`hlsa.ops.triton.lte_retention`): the prefix buffers in torch, then one program per chunk
    and (b, kv head). Args and Returns as in `lte_column_end_scan` (arguments already validated); `chunk` defaults
    to `hlsa.ops.triton.lte_retention.chunk_length`."""
    from hlsa.ops.triton.lte_retention import chunk_length, lte_column_end_triton

    B, T, H = score.shape
    # A buffer of T slots never evicts, like any larger one: cap N at T to bound the register tile.
    n = min(buffer_size, T)
    if n == 0:  # nothing is ever retained: no walk, in either scan
        return lte_column_end_scan(score, window=window, buffer_size=0)
    chunk = chunk_length(T, B * H) if chunk is None else chunk
    state_s, state_p = prefix_buffers(score.permute(0, 2, 1).reshape(B * H, T), n, chunk)  # checks chunk
    return lte_column_end_triton(score, state_s, state_p, window=window, chunk=chunk)


def lte_column_end(score: torch.Tensor, *, window: int, buffer_size: int, backend: str | None = "auto") -> torch.Tensor:
    """Per-key column ends of the per-query top-N rule, for `sparse_attention(..., column_end=...)`.

    Args:
        score: float `[B, T, HKV]` router scores (`+inf` sinks, `-inf` pads; `<= 0` never retained).
        window: `W >= 0`, the band the keys leave before they can be retained.
        buffer_size: `N >= 0` retained older keys per kv head.
        backend: "torch" (PyTorch: the brute-force reference while its B*HKV*T^2 pair table is small, else the scan
            in chunks `lte_column_end_scan`), "triton" (the same chunks, one program per chunk and (b, kv head)), or
            "auto" (Triton for CUDA tensors while the buffer fits its registers, else "torch"); `hlsa.ops.BACKENDS`.

    Returns:
        int32 `[B, T, HKV]`.
    """
    chosen = kernel_backend("lte_column_end", backend, score)  # an explicit "triton" needs CUDA or the interpreter
    _check(score, window, buffer_size)
    B, T, H = score.shape
    # The register tile of the Triton scan holds min(N, T) slots; beyond MAX_TRITON_SLOTS it would spill.
    if chosen == "triton" and backend != "triton" and min(buffer_size, T) > MAX_TRITON_SLOTS:  # "auto"
        chosen = "torch"
    if chosen == "triton":
        return lte_column_end_kernel(score, window=window, buffer_size=buffer_size)
    # The scan's 256 steps of small ops cost more than one pass while the table is small (measured on the CPU).
    if B * H * T * T <= BRUTE_FORCE_MAX_PAIRS:
        return lte_column_end_ref(score, window=window, buffer_size=buffer_size)
    return lte_column_end_scan(score, window=window, buffer_size=buffer_size)
