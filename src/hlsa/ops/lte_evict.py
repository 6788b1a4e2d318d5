"""LTE decode-time eviction: move the token leaving the ring into the retained buffer if it earns a place, then
write the new token into its ring slot (docs/design.md, "Decode-time ops").

Cache layout per kv-head: slots `[0, ring_size)` are a ring (`ring_size = W + 1`), slots `[ring_size, S)` a compact
buffer of `N = S - ring_size` retained tokens whose valid prefix has length `buffer_len`. The new token at `position`
goes to ring slot `position % ring_size`, which holds the token leaving the window (`position - ring_size`).
`pos_cache` records the position of the token in every slot, so that a full buffer can replace the LATEST of the
tokens tied at its minimum score: the buffer then holds exactly the per-query top-N set of docs/design.md ("LTE
retained set at inference": the top-N positive scores, ties broken in favour of the earlier token). Slots are
reused, so slot order says nothing about token age; only the positions do. Unlike the authors' torch swap (a
batch-global branch), every (b, kv-head) decides on its own, and nothing syncs with the host.

With `new_score`, the step also records the router's score of token `j = position - score_lag`, the token whose
right context of `score_lag` tokens has just completed, in its ring slot, after the eviction (for `score_lag = 0`
token j is the new token, whose slot the eviction has just taken over). The score is ranked as inference ranks it:
`+inf` for the row's first `sink_size` tokens after its left padding (`offset`), `-inf` for pads and for `j < 0`.
One op, not a scatter after it: at decode each is a launch of a few microseconds (docs/efficiency.md).

Shape legend: `B` batch, `HKV` kv-heads, `S` slots, `D` head dim, `N` buffer slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hlsa.ops import kernel_backend

_INT32_MIN = -(2**31)


def _check_inputs(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    score_cache: torch.Tensor,
    valid: torch.Tensor,
    buffer_len: torch.Tensor,
    pos_cache: torch.Tensor,
    position: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    ring_size: int,
    new_score: torch.Tensor | None,
    score_lag: int,
    offset: torch.Tensor | None,
    sink_size: int,
) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"lte_evict: k_cache, v_cache must be [B, HKV, S, D] of one shape and dtype; got {tuple(k_cache.shape)} "
            f"{k_cache.dtype}, {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    B, HKV, S, D = k_cache.shape
    if not 1 <= ring_size <= S:
        raise ValueError(f"lte_evict: ring_size must be in [1, S={S}] (ring_size = W + 1); got {ring_size}")
    if score_cache.shape != (B, HKV, S) or score_cache.dtype != torch.float32:
        raise ValueError(
            f"lte_evict: score_cache must be float32 [B, HKV, S] = {(B, HKV, S)}; got "
            f"{score_cache.dtype} {tuple(score_cache.shape)}"
        )
    if valid.shape != (B, HKV, S) or valid.dtype != torch.bool:
        raise ValueError(
            f"lte_evict: valid must be bool [B, HKV, S] = {(B, HKV, S)}; got {valid.dtype} {tuple(valid.shape)}"
        )
    if buffer_len.shape != (B, HKV) or buffer_len.dtype != torch.int32:
        raise ValueError(
            f"lte_evict: buffer_len must be int32 [B, HKV] = {(B, HKV)}; got {buffer_len.dtype} "
            f"{tuple(buffer_len.shape)}"
        )
    if pos_cache.shape != (B, HKV, S) or pos_cache.dtype != torch.int32:
        raise ValueError(
            f"lte_evict: pos_cache must be int32 [B, HKV, S] = {(B, HKV, S)} (the position of each slot's token); "
            f"got {pos_cache.dtype} {tuple(pos_cache.shape)}"
        )
    if position.dim() != 0 or position.dtype != torch.int64:
        raise ValueError(
            f"lte_evict: position must be a 0-d int64 tensor (the position of the new token); got "
            f"{position.dtype} {tuple(position.shape)}"
        )
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != (B, HKV, D) or t.dtype != k_cache.dtype:
            raise ValueError(
                f"lte_evict: {name} must be [B, HKV, D] = {(B, HKV, D)} in {k_cache.dtype}; got "
                f"{t.dtype} {tuple(t.shape)}"
            )
    if new_score is not None:
        if new_score.shape != (B, HKV) or not new_score.is_floating_point():
            raise ValueError(
                f"lte_evict: new_score must be float [B, HKV] = {(B, HKV)} (the router's scores of token "
                f"position - score_lag); got {new_score.dtype} {tuple(new_score.shape)}"
            )
        if offset is None or offset.shape != (B,) or offset.dtype != torch.int64:
            got = None if offset is None else f"{offset.dtype} {tuple(offset.shape)}"
            raise ValueError(f"lte_evict: with new_score, offset must be int64 [B] = ({B},) (left padding); got {got}")
        if not 0 <= score_lag < ring_size or sink_size < 0:
            raise ValueError(
                f"lte_evict: score_lag must be in [0, ring_size={ring_size}) (the scored token is still in the ring) "
                f"and sink_size >= 0; got score_lag={score_lag}, sink_size={sink_size}"
            )
    elif offset is not None:
        raise ValueError("lte_evict: offset is read only with new_score; pass both or neither")
    named = {
        "v_cache": v_cache,
        "score_cache": score_cache,
        "valid": valid,
        "buffer_len": buffer_len,
        "pos_cache": pos_cache,
        "position": position,
        "k_new": k_new,
        "v_new": v_new,
        "new_score": new_score,
        "offset": offset,
    }
    for name, t in named.items():
        if t is not None and t.device != k_cache.device:
            raise ValueError(f"lte_evict: {name} is on {t.device}; move it to the device of k_cache ({k_cache.device})")


def _buffer_victim(
    score_cache: torch.Tensor, pos_cache: torch.Tensor, buffer_len: torch.Tensor, ring_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum score over each valid buffer prefix and the buffer index of the latest token tied at it.

    Returns `(buf_min float32 [B, HKV], victim int64 [B, HKV])`; `victim` is meaningful only for a full buffer.
    """
    N = score_cache.shape[2] - ring_size
    idx = torch.arange(N, device=score_cache.device)
    in_prefix = idx < buffer_len[:, :, None]  # [B, HKV, N]
    buf_score = score_cache[:, :, ring_size:].masked_fill(~in_prefix, float("inf"))
    buf_pos = pos_cache[:, :, ring_size:]
    buf_min = buf_score.amin(dim=2)
    tied = in_prefix & (buf_score == buf_min[:, :, None])
    latest = torch.where(tied, buf_pos, _INT32_MIN).amax(dim=2)
    # Positions are distinct within a buffer; the first-index tie-break only makes the choice well defined.
    victim = torch.where(tied & (buf_pos == latest[:, :, None]), idx, N).amin(dim=2)
    return buf_min, victim


def lte_evict_ref(
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
    new_score: torch.Tensor | None = None,
    score_lag: int = 0,
    offset: torch.Tensor | None = None,
    sink_size: int = 0,
) -> None:
    """Readable reference, vectorised over (b, kv-head); updates the caches in place. Args as in `lte_evict`."""
    cache = (k_cache, v_cache, score_cache, valid, buffer_len, pos_cache)
    _check_inputs(*cache, position, k_new, v_new, ring_size, new_score, score_lag, offset, sink_size)
    B, HKV, S, D = k_cache.shape
    N = S - ring_size
    slot = position.remainder(ring_size)  # 0-d, on the device: no host sync
    slot_idx = slot.view(1, 1, 1).expand(B, HKV, 1)  # [B, HKV, 1]
    if N > 0:
        r_score = score_cache.gather(2, slot_idx).squeeze(2)  # [B, HKV]
        r_valid = valid.gather(2, slot_idx).squeeze(2)
        r_pos = pos_cache.gather(2, slot_idx).squeeze(2)
        buf_min, victim = _buffer_victim(score_cache, pos_cache, buffer_len, ring_size)
        not_full = buffer_len < N
        # The ring token is later than every buffer token, so a tie at the minimum keeps the buffer token.
        move = r_valid & (r_score > 0) & (not_full | (r_score > buf_min))
        dest = ring_size + torch.where(not_full, buffer_len.long(), victim)  # [B, HKV]
        # Heads that do not move copy the ring token onto itself (a no-op; the ring slot is overwritten below).
        dest = torch.where(move, dest, slot).unsqueeze(2)  # [B, HKV, 1]
        for cache in (k_cache, v_cache):
            token = cache.gather(2, slot_idx[..., None].expand(B, HKV, 1, D))  # [B, HKV, 1, D]
            cache.scatter_(2, dest[..., None].expand(B, HKV, 1, D), token)
        score_cache.scatter_(2, dest, r_score.unsqueeze(2))
        valid.scatter_(2, dest, r_valid.unsqueeze(2))
        pos_cache.scatter_(2, dest, r_pos.unsqueeze(2))
        buffer_len.add_((move & not_full).to(torch.int32))
    k_cache.index_copy_(2, slot.view(1), k_new.unsqueeze(2))
    v_cache.index_copy_(2, slot.view(1), v_new.unsqueeze(2))
    score_cache.index_fill_(2, slot.view(1), float("-inf"))  # not yet scored: the router refresh writes it
    valid.index_fill_(2, slot.view(1), True)
    # index_copy_, not index_fill_: a tensor fill value would be read on the host.
    pos_cache.index_copy_(2, slot.view(1), position.to(torch.int32).view(1, 1, 1).expand(B, HKV, 1))
    if new_score is not None:
        j = position - score_lag
        since_start = (j - offset)[:, None]  # [B, 1]: how far past its row's left padding token j is
        ranked = torch.where(since_start < sink_size, float("inf"), new_score.float())
        ranked = torch.where(since_start >= 0, ranked, float("-inf"))
        score_cache.index_copy_(2, j.remainder(ring_size).view(1), ranked[..., None])


def lte_evict(
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
    new_score: torch.Tensor | None = None,
    score_lag: int = 0,
    offset: torch.Tensor | None = None,
    sink_size: int = 0,
    backend: str | None = "auto",
) -> None:
    """One decode step of the LTE cache, in place and without host syncs (CUDA-graph capturable).

    Per (b, kv-head), with `slot = position % ring_size` (the ring slot of the token leaving the window): if
    `valid[slot]`, `score_cache[slot] > 0` and (`buffer_len < N` or the score is strictly greater than the minimum
    buffer score), the ring token (k, v, score, position) moves into the buffer: appended at
    `ring_size + buffer_len` (and `buffer_len += 1`), or, when the buffer is full, replacing the entry with the
    minimum score and, among those tied at the minimum, the largest position (the latest token). Then
    `k_new, v_new` go into ring slot `slot`, whose score becomes `-inf` (not yet scored), which becomes valid and
    whose `pos_cache` becomes `position`. The buffer thus holds the top-N positive scores of the evicted tokens,
    ties broken in favour of the earlier token. Finally, with `new_score`, token `j = position - score_lag` gets its
    ranked score in ring slot `j % ring_size`: `-inf` if `j < offset[b]` (a pad, or `j < 0`), else `+inf` if
    `j < offset[b] + sink_size` (a sink), else `new_score[b, h]`.

    Args:
        k_cache, v_cache: `[B, HKV, S, D]`, `S = ring_size + N` (`N >= 0`; `N = 0` behaves like a plain SWA ring).
        score_cache: float32 `[B, HKV, S]`. valid: bool `[B, HKV, S]`. buffer_len: int32 `[B, HKV]`.
        pos_cache: int32 `[B, HKV, S]`, the position of the token in each slot (read for valid slots only).
        position: int64 0-d tensor on the cache's device, `>= 0`: the position of the new token.
        k_new, v_new: `[B, HKV, D]` (keys already rotated).
        ring_size: `W + 1`.
        new_score: float `[B, HKV]`, the router's scores of token `position - score_lag`, or None (no score is
            recorded; the new token's slot keeps `-inf`).
        score_lag: in `[0, ring_size)`, the router's margin `m`.
        offset: int64 `[B]`, each row's left-padding length (with `new_score` only).
        sink_size: the tokens after a row's padding that rank `+inf` (always kept).
        backend: "torch" (reference), "triton", or "auto" (Triton for CUDA tensors, else the reference).
    """
    args = (k_cache, v_cache, score_cache, valid, buffer_len, pos_cache)
    kwargs = dict(position=position, k_new=k_new, v_new=v_new, ring_size=ring_size, new_score=new_score,
                  score_lag=score_lag, offset=offset, sink_size=sink_size)  # fmt: skip
    if kernel_backend("lte_evict", backend, k_cache) == "torch":
        lte_evict_ref(*args, **kwargs)
        return
    _check_inputs(*args, **kwargs)
    from hlsa.ops.triton.lte_evict import lte_evict_triton

    lte_evict_triton(*args, **kwargs)


def retained_top_n(scores: Sequence[float], n: int) -> set[int]:
    """Model for tests: the set a streaming top-N buffer must hold after tokens `0..len(scores)-1` left the ring.

    The per-query rule of docs/design.md: the `n` highest positive scores, ties broken in favour of the earlier
    token. Plain Python, so it shares no code with the op it checks.
    """
    ranked = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (-scores[i], i))
    return set(ranked[:n])
