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

INT32_MAX = 2**31 - 1
MAX_TRITON_SLOTS = 8192


# Largest B * HKV * T^2 for which the CPU dispatch uses the brute force (an int32 table of this size: 64 MiB).
BRUTE_FORCE_MAX_PAIRS = 2**24


def _check(score: torch.Tensor, window: int, buffer_size: int) -> None:
    if score.dim() != 3 or not score.is_floating_point():
        raise ValueError(f"lte_column_end: score must be a float [B, T, HKV] tensor; got {score.dtype} {score.shape}")
    if window < 0:
        raise ValueError(f"lte_column_end: window must be >= 0; got {window}")
    if buffer_size < 0:
        raise ValueError(f"lte_column_end: buffer_size must be >= 0; got {buffer_size}")


def lte_column_end_ref(score: torch.Tensor, *, window: int, buffer_size: int) -> torch.Tensor:
    """Brute-force rank count, O(T^2) memory.

    Args:
        score: float `[B, T, HKV]` router scores (`+inf` sinks, `-inf` pads).
        window: `W >= 0`.
        buffer_size: `N >= 0`, the number of retained older keys per kv head.

    Returns:
        int32 `[B, T, HKV]` column ends.
    """
    _check(score, window, buffer_size)
    B, T, H = score.shape
    s = score.permute(0, 2, 1)  # [B, H, T]
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


def lte_column_end_scan(score: torch.Tensor, *, window: int, buffer_size: int) -> torch.Tensor:
    """Streaming min-replacement over T steps, vectorised over (B, HKV); O(T * N) work.

    Args and Returns as in `lte_column_end_ref`.
    """
    _check(score, window, buffer_size)
    B, T, H = score.shape
    s = score.permute(0, 2, 1).reshape(B * H, T)
    end = torch.where(s > 0, torch.arange(T, device=score.device) + window + 1, 0).to(torch.int64)
    if buffer_size == 0:
        return end.to(torch.int32).reshape(B, H, T).permute(0, 2, 1).contiguous()
    # Column T of `end` is a dump for rows that evict nothing (no boolean indexing: no host sync per step).
    end = torch.nn.functional.pad(end, (0, 1))
    # Empty slots hold score -inf and position -1, so any positive score fills them first.
    buf_s = torch.full((B * H, buffer_size), float("-inf"), device=score.device, dtype=s.dtype)
    buf_p = torch.full((B * H, buffer_size), -1, device=score.device, dtype=torch.int64)
    for j in range(T):
        # The slot to replace: the lowest score and, among equal scores, the latest key (ties favour the earlier).
        low = buf_s.min(dim=1, keepdim=True).values
        slot = torch.where(buf_s == low, buf_p, -2).argmax(dim=1, keepdim=True)  # [BH, 1]
        s_j = s[:, j : j + 1]
        take = (s_j > 0) & (s_j > low)  # [BH, 1]
        out = buf_p.gather(1, slot)
        # The evicted key stays visible to the queries before this key's arrival: column_end = j + W + 1.
        end.scatter_(1, torch.where(take & (out >= 0), out, T), j + window + 1)
        end[:, j : j + 1] = torch.where(take, INT32_MAX, end[:, j : j + 1])
        buf_s.scatter_(1, slot, torch.where(take, s_j, buf_s.gather(1, slot)))
        buf_p.scatter_(1, slot, torch.where(take, j, out))
    return end[:, :T].to(torch.int32).reshape(B, H, T).permute(0, 2, 1).contiguous()


def lte_column_end(score: torch.Tensor, *, window: int, buffer_size: int, backend: str | None = None) -> torch.Tensor:
    """Per-key column ends of the per-query top-N rule, for `sparse_attention(..., column_end=...)`.

    Args:
        score: float `[B, T, HKV]` router scores (`+inf` sinks, `-inf` pads; `<= 0` never retained).
        window: `W >= 0`, the band the keys leave before they can be retained.
        buffer_size: `N >= 0` retained older keys per kv head.
        backend: "torch" (brute-force reference, O(T^2) memory), "scan" (torch scan, T steps of small ops),
            "triton" (the same scan, one program per (b, kv head)), or None (Triton for CUDA tensors; on the CPU the
            brute force while its B*HKV*T^2 pair table is small, else the scan).

    Returns:
        int32 `[B, T, HKV]`.
    """
    if backend not in (None, "torch", "scan", "triton"):
        raise ValueError(f"lte_column_end: backend must be None, 'torch', 'scan' or 'triton'; got {backend!r}")
    if backend is None:
        _check(score, window, buffer_size)
        B, T, H = score.shape
        # The register tile of the Triton scan holds min(N, T) slots; beyond MAX_TRITON_SLOTS it would spill.
        fits = min(buffer_size, T) <= MAX_TRITON_SLOTS
        if score.is_cuda:
            backend = "triton" if fits else "scan"
        else:  # T tiny steps of the scan cost more on the CPU than one vectorised pass while the table is small
            backend = "torch" if B * H * T * T <= BRUTE_FORCE_MAX_PAIRS else "scan"
    if backend == "torch":
        return lte_column_end_ref(score, window=window, buffer_size=buffer_size)
    if backend == "scan":
        return lte_column_end_scan(score, window=window, buffer_size=buffer_size)
    _check(score, window, buffer_size)
    from hlsa.ops.triton.lte_retention import lte_column_end_triton

    return lte_column_end_triton(score, window=window, buffer_size=buffer_size)
