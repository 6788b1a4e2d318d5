"""Native Sparse Attention (NSA): compressed, selected and sliding-window branches with per-head gates.

Semantics (docs/nsa.md, "What hlsa computes"), for a query at real position `t` (positions count from the first real
token of its row, so block boundaries start there; left pads are never attended and pad queries output zeros):
* compression: `k_cmp, v_cmp` = mean of `k, v` over each complete block of `block_size` tokens; the query attends
  compressed block `c` iff `c < (t + 1) // block_size`;
* selection: importance `p_c = sum over the G query heads of a kv group of the compressed softmax probability`,
  for `c < IC = t // block_size`; blocks `{0, IC - 1, IC}` are forced; the `block_counts` (S) most important
  candidate blocks `c <= IC` are attended, keys `j <= t` only. Ties go to the later block (so with S < 3 the forced
  blocks are kept in the order IC, IC - 1, 0). The kv group shares its selection;
* window: keys `t - window <= j <= t` (a band of `window + 1` tokens, docs/design.md);
* output `g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`; a branch that sees no key contributes zeros.

Shape legend: `B` batch, `T` length, `HQ` query heads, `HKV` kv heads (`G = HQ // HKV`), `D` head dim,
`N` cache slots, `NC` compressed-cache slots.
"""

from __future__ import annotations

import importlib.util

import torch

from hlsa.ops import check_backend, kernel_backend


def _check_gates(q: torch.Tensor, gates: tuple[torch.Tensor, ...]) -> None:
    for name, g in zip(("g_cmp", "g_slc", "g_swa"), gates):
        if g.shape != q.shape[:-1] or g.device != q.device:
            raise ValueError(f"nsa: {name} must be {tuple(q.shape[:-1])} on {q.device}; got {tuple(g.shape)}")


def _check_config(block_size: int, block_counts: int, window: int) -> None:
    if block_size < 1:
        raise ValueError(f"nsa: block_size must be >= 1; got {block_size}")
    if block_counts < 1:
        raise ValueError(f"nsa: block_counts must be >= 1; got {block_counts}")
    if window < 0:
        raise ValueError(f"nsa: window must be >= 0 (a band of window + 1 tokens); got {window}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"nsa: q must be [B, T, HQ, D], k and v [B, T, HKV, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"nsa: k must be [B, T, HKV, D] with HQ % HKV == 0; got q {q.shape}, k {k.shape}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"nsa: q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None and (key_mask.shape != q.shape[:2] or key_mask.dtype != torch.bool):
        raise ValueError(f"nsa: key_mask must be bool [B, T] = {tuple(q.shape[:2])}; got {key_mask.dtype}")


def left_pad_starts(key_mask: torch.Tensor) -> torch.Tensor:
    """bool `[B, T]` left-padding mask -> int32 `[B]` index of each row's first real token (T if none).

    Raises ValueError (a host sync: prefill only) when a row is not of the form pads-then-tokens.
    """
    T = key_mask.shape[1]
    start = (T - key_mask.sum(dim=1)).to(torch.int32)
    expected = torch.arange(T, device=key_mask.device)[None, :] >= start[:, None]
    if not torch.equal(expected, key_mask):
        raise ValueError(
            "nsa: key_mask must be left padding (False pads, then True tokens); right padding is unsupported"
        )
    return start


def mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[L, H, D]` -> `[L // block_size, H, D]`: mean over each complete block (the partial tail is dropped)."""
    nc = x.shape[0] // block_size
    return x[: nc * block_size].unflatten(0, (nc, block_size)).mean(dim=1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vis: torch.Tensor, scale: float) -> tuple:
    """Masked softmax attention of one sequence; rows with no visible key give zeros.

    q `[TQ, HQ, D]`, k/v `[TK, HKV, D]`, vis bool `[HKV|1, TQ, TK]` -> (o `[TQ, HQ, D]`, p `[HQ, TQ, TK]`).
    """
    G = q.shape[1] // k.shape[1]
    s = torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(G, dim=1)) * scale
    s = s.masked_fill(~vis.repeat_interleave(G, dim=0) if vis.shape[0] > 1 else ~vis, float("-inf"))
    # Shift by the detached row max (softmax is shift-invariant); the clamp keeps fully-masked rows finite.
    m = s.amax(dim=-1, keepdim=True).detach().clamp_min(torch.finfo(s.dtype).min)
    e = torch.exp(s - m)
    p = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return torch.einsum("hij,jhd->ihd", p, v.repeat_interleave(G, dim=1)), p


def select_blocks(p_cmp: torch.Tensor, t: torch.Tensor, *, num_blocks: int, block_size: int, block_counts: int):
    """Top-S block choice from compressed probabilities.

    Args:
        p_cmp: `[HKV, G, TQ, NCC]` compressed softmax probabilities (NCC complete blocks).
        t: int64 `[TQ]` real query positions.
        num_blocks: number of (complete or partial) blocks of the keys, `ceil(TK / block_size)`.
    Returns:
        bool `[HKV, TQ, num_blocks]`: the selected blocks (at most `block_counts` per row).
    """
    HKV, _, TQ, NCC = p_cmp.shape
    c = torch.arange(num_blocks, device=t.device)
    ic = (t // block_size)[:, None]  # [TQ, 1] index of the query's own block
    imp = torch.zeros(HKV, TQ, num_blocks, dtype=torch.float32, device=t.device)
    imp[..., :NCC] = p_cmp.detach().float().sum(dim=1)
    imp = imp.masked_fill(c >= ic, 0.0)  # only blocks c < IC are scored
    forced = (c == 0) | (c == ic - 1) | (c == ic)
    imp = torch.where(forced, float("inf"), imp).masked_fill(c > ic, float("-inf"))
    # Ties go to the later block: a stable descending sort of the reversed block axis puts later blocks first.
    order = torch.sort(imp.flip(-1), dim=-1, descending=True, stable=True).indices[..., :block_counts]
    chosen = torch.zeros_like(imp, dtype=torch.bool).scatter_(-1, num_blocks - 1 - order, True)
    return chosen & (c <= ic)


def _nsa_sequence(q, k, v, k_cmp, v_cmp, gates, *, block_size, block_counts, window, scale) -> torch.Tensor:
    """One unpadded sequence whose queries are its last TQ tokens (TQ = TK in training, 1 in decoding).

    q `[TQ, HQ, D]`, k/v `[TK, HKV, D]`, k_cmp/v_cmp `[TK // block_size, HKV, D]`, gates 3 x `[TQ, HQ]`.
    """
    TQ, HQ, _ = q.shape
    TK, HKV, _ = k.shape
    t = torch.arange(TK - TQ, TK, device=q.device)  # real query positions
    j = torch.arange(TK, device=q.device)
    if k_cmp.shape[0] > 0:
        vis_cmp = torch.arange(k_cmp.shape[0], device=q.device)[None, :] < ((t + 1) // block_size)[:, None]
        o_cmp, p_cmp = _attend(q, k_cmp, v_cmp, vis_cmp[None], scale)
    else:  # no complete block yet: the compressed branch sees nothing
        o_cmp, p_cmp = torch.zeros_like(q), q.new_zeros(HQ, TQ, 0)
    chosen = select_blocks(
        p_cmp.unflatten(0, (HKV, HQ // HKV)),
        t,
        num_blocks=-(-TK // block_size),
        block_size=block_size,
        block_counts=block_counts,
    )
    causal = j[None, :] <= t[:, None]  # [TQ, TK]
    o_slc, _ = _attend(q, k, v, chosen[..., j // block_size] & causal, scale)
    o_swa, _ = _attend(q, k, v, (causal & (j[None, :] >= t[:, None] - window))[None], scale)
    g_cmp, g_slc, g_swa = (g[..., None] for g in gates)
    return g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa


def nsa_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: torch.Tensor,
    g_slc: torch.Tensor,
    g_swa: torch.Tensor,
    *,
    block_size: int,
    block_counts: int,
    window: int,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Readable reference of `nsa`: one unpadded row at a time, dense masks, O(T^2) memory.

    Args and Returns as in `nsa`.
    """
    _check_inputs(q, k, v, key_mask)
    _check_gates(q, (g_cmp, g_slc, g_swa))
    _check_config(block_size, block_counts, window)
    B, T = q.shape[:2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    starts = [0] * B if key_mask is None else left_pad_starts(key_mask).tolist()
    rows = []
    for b, s in enumerate(starts):
        if s == T:  # a row of pads only
            rows.append(torch.zeros_like(q[b]))
            continue
        kb, vb = k[b, s:], v[b, s:]
        o = _nsa_sequence(
            q[b, s:], kb, vb, mean_pool(kb, block_size), mean_pool(vb, block_size),
            (g_cmp[b, s:], g_slc[b, s:], g_swa[b, s:]),
            block_size=block_size, block_counts=block_counts, window=window, scale=scale,
        )  # fmt: skip
        rows.append(torch.cat([o.new_zeros(s, *o.shape[1:]), o]))  # pad queries output zeros
    return torch.stack(rows)


def fla_supports(q: torch.Tensor, k: torch.Tensor, *, block_size: int, block_counts: int) -> str | None:
    """None when fla-core's `parallel_nsa` kernels accept this problem, else the reason (fla 0.6.0 limits)."""
    G, D = q.shape[2] // k.shape[2], q.shape[-1]
    s_pow2 = 1 << (block_counts - 1).bit_length()
    if G < 16 or G & (G - 1):
        return f"fla needs HQ / HKV a power of 2 >= 16 (parallel.py asserts it); got {G}"
    if D > 256 or D & (D - 1) or D < 16:
        return f"fla needs a power-of-2 head dim in [16, 256]; got {D}"
    if block_size & (block_size - 1) or block_size < 2 * s_pow2 or block_size < 16:
        return f"fla needs a power-of-2 block_size >= max(16, 2 * next_pow2(block_counts)); got {block_size}"
    if block_counts < 3:
        return "fla breaks ties among the 3 forced blocks in an unspecified order; block_counts < 3 needs 'torch'"
    return None


def _nsa_fla(q, k, v, g_cmp, g_slc, g_swa, *, block_size, block_counts, window, key_mask, scale) -> torch.Tensor:
    """fla-core's `parallel_nsa` for the compressed and selected branches (its top-k forces {0, IC-1, IC} as we do),
    our `sparse_attention` for the window (fla would call flash-attn, which we do not require). Left padding is
    unpadded to varlen so that blocks start at each row's first real token, as the authors do."""
    from fla.ops.nsa.parallel import parallel_nsa

    from hlsa.ops.sparse_attention import sparse_attention

    B, T = q.shape[:2]
    if key_mask is None:
        o = parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=block_counts, block_size=block_size, scale=scale)
    else:
        lens = key_mask.sum(dim=1)
        cu_seqlens = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        packed = [x[key_mask][None] for x in (q, k, v, g_cmp, g_slc)]  # [1, sum(lens), ...]
        o_packed = parallel_nsa(
            *packed[:3], packed[3], packed[4], None,
            block_counts=block_counts, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        o = q.new_zeros(q.shape).index_put((key_mask,), o_packed[0])
    o_swa = sparse_attention(q, k, v, window=window, key_mask=key_mask, scale=scale)
    return o + g_swa[..., None] * o_swa


def nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: torch.Tensor,
    g_slc: torch.Tensor,
    g_swa: torch.Tensor,
    *,
    block_size: int,
    block_counts: int,
    window: int,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Native Sparse Attention over whole sequences (training / prefill); differentiable in q, k, v and the gates.

    Args:
        q: `[B, T, HQ, D]` (RoPE applied).
        k, v: `[B, T, HKV, D]` (RoPE applied to k); `HQ % HKV == 0`, a group is `G` consecutive query heads.
        g_cmp, g_slc, g_swa: `[B, T, HQ]` branch gates (already through the sigmoid).
        block_size: tokens per compression / selection block.
        block_counts: S, blocks selected per query and kv group (forced blocks included).
        window: W >= 0, the window branch sees keys `t - W..t` (W = 511 for the authors' window_size=512).
        key_mask: bool `[B, T]` or None; False marks left padding (blocks start at the first True).
        scale: softmax scale, default `D ** -0.5`.
        backend: "torch" (reference), "fla" (fla-core kernels, CUDA), or "auto" (fla where `fla_supports`, else
            the reference).

    Returns:
        `[B, T, HQ, D]` in the dtype of q; pad queries are zeros.
    """
    backend = check_backend("nsa", backend, ("fla",))
    reason = None if q.is_cuda else "fla needs CUDA tensors"
    reason = reason or (None if importlib.util.find_spec("fla") else "fla-core is not installed (pip install fla-core)")
    reason = reason or fla_supports(q, k, block_size=block_size, block_counts=block_counts)
    if backend == "fla" and reason is not None:
        raise ValueError(f"nsa: backend='fla' unavailable: {reason}")
    if backend == "torch" or reason is not None:
        return nsa_ref(
            q, k, v, g_cmp, g_slc, g_swa,
            block_size=block_size, block_counts=block_counts, window=window, key_mask=key_mask, scale=scale,
        )  # fmt: skip
    _check_inputs(q, k, v, key_mask)
    _check_gates(q, (g_cmp, g_slc, g_swa))
    _check_config(block_size, block_counts, window)
    if key_mask is not None:
        left_pad_starts(key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _nsa_fla(
        q, k, v, g_cmp, g_slc, g_swa,
        block_size=block_size, block_counts=block_counts, window=window, key_mask=key_mask, scale=scale,
    )  # fmt: skip


def _check_decode(q, k_cache, v_cache, k_cmp, v_cmp, gates, start, seq_len, block_size, block_counts, window) -> None:
    _check_config(block_size, block_counts, window)  # first: the cache checks divide by block_size
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cmp.shape != v_cmp.shape:
        raise ValueError(
            f"nsa_decode: q must be [B, HQ, D], caches [B, HKV, N, D], compressed caches [B, HKV, NC, D]; got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}, {tuple(k_cmp.shape)}"
        )
    B, HQ, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or HQ % k_cache.shape[1] or k_cmp.shape[:2] != k_cache.shape[:2]:
        raise ValueError(
            f"nsa_decode: cache shapes {tuple(k_cache.shape)}, {tuple(k_cmp.shape)} do not fit q {q.shape}"
        )
    N = k_cache.shape[2]
    if isinstance(seq_len, torch.Tensor):
        # A device value: its range is not checked (that would sync), so the compressed caches must fit any seq_len.
        if seq_len.shape != () or seq_len.dtype not in (torch.int32, torch.int64) or seq_len.device != q.device:
            raise ValueError(
                f"nsa_decode: a tensor seq_len must be int32 or int64 [] on {q.device}; got {seq_len.dtype} "
                f"{tuple(seq_len.shape)} on {seq_len.device}"
            )
        longest, bound = N, f"N // block_size = {N // block_size}"
    else:
        if not 0 < seq_len <= N:
            raise ValueError(f"nsa_decode: seq_len must be in [1, N={N}]; got {seq_len}")
        longest, bound = seq_len, f"seq_len // block_size = {seq_len // block_size}"
    if k_cmp.shape[3] != D or k_cmp.shape[2] < longest // block_size:
        raise ValueError(
            f"nsa_decode: compressed caches must be [B, HKV, NC >= {bound}, D={D}] (a row with no left padding "
            f"needs that many blocks); got {tuple(k_cmp.shape)}"
        )
    if {t.dtype for t in (k_cache, v_cache, k_cmp, v_cmp)} != {q.dtype}:
        raise ValueError(
            f"nsa_decode: caches must have q's dtype {q.dtype}; got {k_cache.dtype}, {v_cache.dtype}, "
            f"{k_cmp.dtype}, {v_cmp.dtype}"
        )
    if start.shape != (B,) or start.dtype != torch.int32 or start.device != q.device:
        raise ValueError(f"nsa_decode: start must be int32 [B] on {q.device}; got {start.dtype} {tuple(start.shape)}")
    _check_gates(q, gates)


def nsa_decode_ref(
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
    scale: float | None = None,
) -> torch.Tensor:
    """Readable reference of `nsa_decode` (one row at a time; host syncs on `start` and a tensor `seq_len`).
    Args as in `nsa_decode`."""
    _check_decode(
        q, k_cache, v_cache, k_cmp, v_cmp, (g_cmp, g_slc, g_swa), start, seq_len, block_size, block_counts, window
    )
    seq_len = int(seq_len)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = []
    for b, s in enumerate(start.tolist()):
        nc = (seq_len - s) // block_size
        if seq_len <= s:  # nothing real in this row yet
            rows.append(torch.zeros_like(q[b]))
            continue
        o = _nsa_sequence(
            q[b, None], k_cache[b, :, s:seq_len].transpose(0, 1), v_cache[b, :, s:seq_len].transpose(0, 1),
            k_cmp[b, :, :nc].transpose(0, 1), v_cmp[b, :, :nc].transpose(0, 1),
            (g_cmp[b, None], g_slc[b, None], g_swa[b, None]),
            block_size=block_size, block_counts=block_counts, window=window, scale=scale,
        )  # fmt: skip
        rows.append(o[0])
    return torch.stack(rows)


def nsa_decode(
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
    scale: float | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """One decode step of NSA for the query in cache slot `seq_len - 1` of every row (no host sync on Triton, so
    with a tensor `seq_len` the step can be compiled and replayed from a CUDA graph).

    Args:
        q: `[B, HQ, D]` (RoPE applied).
        k_cache, v_cache: `[B, HKV, N, D]` full history, slots `start[b]..seq_len-1` real (keys carry RoPE).
        k_cmp, v_cmp: `[B, HKV, NC, D]`; slot `c` holds the mean of cache slots `start[b] + c * block_size` ...
            `+ block_size - 1`; valid for `c < (seq_len - start[b]) // block_size`, the rest is ignored.
        g_cmp, g_slc, g_swa: `[B, HQ]` branch gates (after the sigmoid).
        start: int32 `[B]` first real slot of each row (the number of left pads).
        seq_len: slots used (the query is slot `seq_len - 1` of every row), in `[1, N]`: an int, or an int32/int64
            `[]` tensor on q's device, whose value is not checked (then `NC >= N // block_size`, for any value).
        block_size, block_counts, window, scale: as in `nsa`.
        backend: "torch" (reference), "triton", or "auto" (Triton for CUDA tensors, else the reference).

    Returns:
        `[B, HQ, D]` in the dtype of q; zeros for a row with no real token.
    """
    if kernel_backend("nsa_decode", backend, q) == "torch":
        return nsa_decode_ref(
            q, k_cache, v_cache, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start=start, seq_len=seq_len,
            block_size=block_size, block_counts=block_counts, window=window, scale=scale,
        )  # fmt: skip
    _check_decode(
        q, k_cache, v_cache, k_cmp, v_cmp, (g_cmp, g_slc, g_swa), start, seq_len, block_size, block_counts, window
    )
    from hlsa.ops.triton.nsa_decode import nsa_decode_triton

    return nsa_decode_triton(
        q, k_cache, v_cache, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start=start, seq_len=seq_len,
        block_size=block_size, block_counts=block_counts, window=window,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
    )  # fmt: skip
