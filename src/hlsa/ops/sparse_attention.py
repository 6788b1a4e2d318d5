"""Sparse attention with columns: one op for SWA, LTE training, LTE prefill and LTE inference.

Visible(i, j) = `j <= i` and `key_mask[b, j]` and (`i - j <= W` or `i < column_end[b, j, h]`), see docs/design.md
("Sparse attention with columns"). `window=None` is full causal attention (`column_end` is then irrelevant).

Shape legend: `B` batch, `T` length, `HQ` query heads, `HKV` key/value heads (`G = HQ // HKV`), `D` head dim.
"""

from __future__ import annotations

import torch

from hlsa.ops import kernel_backend


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    column_end: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float | None,
) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"sparse_attention: q must be [B, T, HQ, D] and k, v [B, T, HKV, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, T, HQ, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D or HQ % k.shape[2] != 0:
        raise ValueError(
            f"sparse_attention: k, v must be [B, T, HKV, D] with HQ divisible by HKV; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    if B == 0 or T == 0:
        raise ValueError(f"sparse_attention: empty input (B={B}, T={T}); pass at least one token per row")
    if scale is not None and not scale > 0:  # the kernel's running max assumes scores grow with q.k
        raise ValueError(f"sparse_attention: scale must be > 0 (default D ** -0.5); got {scale}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"sparse_attention: q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("sparse_attention: q, k, v must be on the same device")
    if window is not None and window < 0:
        raise ValueError(f"sparse_attention: window must be >= 0 or None (full causal); got {window}")
    if column_end is not None:
        if column_end.shape != (B, T, k.shape[2]) or column_end.dtype != torch.int32:
            raise ValueError(
                f"sparse_attention: column_end must be int32 [B, T, HKV] = {(B, T, k.shape[2])}; got "
                f"{column_end.dtype} {tuple(column_end.shape)}"
            )
        if column_end.device != q.device:
            raise ValueError("sparse_attention: column_end must be on the device of q")
    if key_mask is not None and (key_mask.shape != (B, T) or key_mask.dtype != torch.bool):
        raise ValueError(
            f"sparse_attention: key_mask must be bool [B, T] = {(B, T)}; got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    if key_mask is not None and key_mask.device != q.device:
        raise ValueError("sparse_attention: key_mask must be on the device of q")


def visible_mask(
    T: int,
    *,
    window: int | None,
    column_end: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
    queries: tuple[int, int] | None = None,
    keys: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The boolean pattern, dense or restricted to query positions `queries = (i0, i1)` and keys `keys = (j0, j1)`
    (half-open ranges; default `(0, T)` each).

    Returns:
        bool `[B or 1, HKV or 1, i1 - i0, j1 - j0]` indexed `[b, h, i - i0, j - j0]`: True where query `i` sees key `j`.
    """
    i0, i1 = (0, T) if queries is None else queries
    j0, j1 = (0, T) if keys is None else keys
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    vis = (j <= i)[None, None]  # [1, 1, I, J]
    if window is not None:
        near = (i - j <= window)[None, None]
        if column_end is not None:
            # column_end [B, T, HKV] indexed by key j -> [B, HKV, 1, J]
            near = near | (i[None, None] < column_end[:, j0:j1].permute(0, 2, 1)[:, :, None, :])
        vis = vis & near
    if key_mask is not None:
        vis = vis & key_mask[:, None, None, j0:j1]
    return vis


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    column_end: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Readable reference: dense mask and explicit softmax in the input dtype; O(T^2) memory.

    Args and Returns as in `sparse_attention`. Rows that see no key output zeros.
    """
    _check_inputs(q, k, v, window, column_end, key_mask, scale)
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    vis = visible_mask(T, window=window, column_end=column_end, key_mask=key_mask, device=q.device)
    vis = vis.repeat_interleave(G, dim=1) if vis.shape[1] > 1 else vis  # [B|1, HQ|1, T, T]
    k_rep = k.repeat_interleave(G, dim=2)  # [B, T, HQ, D]
    v_rep = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k_rep) * scale  # [B, HQ, T, T]
    s = torch.where(vis, s, float("-inf"))
    # Softmax is shift-invariant, so the row max can be detached; clamping keeps fully-masked rows finite.
    m = s.amax(dim=-1, keepdim=True).detach().clamp_min(torch.finfo(s.dtype).min)
    e = torch.exp(s - m)  # masked entries: exp(-inf) = 0
    p = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return torch.einsum("bhij,bjhd->bihd", p, v_rep)


# Query rows per block of `sparse_attention_blocked`: each block's scores `[B, HQ, rows, keys]` stay a few MB at
# training shapes (B * HQ = 8, 2048 keys: 8 MB in fp32), below glibc's 32 MB mmap threshold, so the allocator reuses
# them instead of mapping fresh pages every call. Long rows get fewer query rows so that a block stays this size.
# Measured on 2 CPU cores (B=2, T=2048, 4 heads, D=32, forward + backward): 128 rows beat 64 and 256.
BLOCK_ROWS = 128
BLOCK_ELEMENTS = 2**21


def sparse_attention_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    column_end: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """The PyTorch path ("torch" backend): `sparse_attention_ref`'s function, one block of queries at a time.

    Queries `[i0, i1)` score keys `[max(0, i0 - W), i1)` for plain SWA (`column_end` None), else `[0, i1)`, so plain SWA
    costs O(T * (W + rows)) and no tensor is `[T, T]`. `block_rows` (default: `BLOCK_ROWS`, fewer where a block would
    exceed `BLOCK_ELEMENTS` scores) is exposed for tests. Args and Returns as in `sparse_attention`.
    """
    _check_inputs(q, k, v, window, column_end, key_mask, scale)
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    scale = D**-0.5 if scale is None else scale
    banded = window is not None and column_end is None
    if block_rows is None:
        keys = min(T, window + BLOCK_ROWS) if banded else T  # the most keys one block scores
        block_rows = max(16, min(BLOCK_ROWS, BLOCK_ELEMENTS // (B * HQ * keys)))
    qh = q.view(B, T, HKV, G, D).permute(0, 2, 3, 1, 4)  # [B, HKV, G, T, D]
    kh = k.permute(0, 2, 3, 1)  # [B, HKV, D, T]
    vh = v.permute(0, 2, 1, 3)  # [B, HKV, T, D]
    blocks = []
    for i0 in range(0, T, block_rows):
        i1 = min(i0 + block_rows, T)
        j0 = max(0, i0 - window) if banded else 0
        n, m = i1 - i0, i1 - j0
        vis = visible_mask(
            T, window=window, column_end=column_end, key_mask=key_mask, device=q.device, queries=(i0, i1), keys=(j0, i1)
        )[:, :, None]  # [B|1, HKV|1, 1, n, m]
        seen = vis.any(dim=-1, keepdim=True)
        # A row that sees no key attends to all keys of the block instead (finite softmax) and is zeroed below.
        vis = vis | ~seen
        s = torch.matmul(qh[:, :, :, i0:i1].reshape(B, HKV, G * n, D), kh[..., j0:i1])  # [B, HKV, G*n, m]
        s = s.mul_(scale).view(B, HKV, G, n, m).masked_fill_(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p.view(B, HKV, G * n, m), vh[:, :, j0:i1]).view(B, HKV, G, n, D)
        blocks.append(o.masked_fill(~seen, 0.0))
    o = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=3)  # [B, HKV, G, T, D]
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, HQ, D)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    column_end: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Causal attention over a band of `window + 1` keys plus per-key columns; differentiable in q, k, v.

    Args:
        q: `[B, T, HQ, D]`.
        k, v: `[B, T, HKV, D]` (`HQ % HKV == 0`, GQA groups consecutive query heads).
        window: `W >= 0` (query `i` sees keys `i - W..i`), or `None` for full causal attention.
        column_end: int32 `[B, T, HKV]` or None: key `j` is also visible to queries `j + W < i < column_end`.
            Training: INT32_MAX where selected, else 0. Inference: from `hlsa.ops.lte_retention.lte_column_end`.
        key_mask: bool `[B, T]` or None: False marks left-padding keys (never attended).
        scale: softmax scale, default `D ** -0.5`.
        backend: "torch" (`sparse_attention_blocked`), "triton", or "auto" (Triton for CUDA tensors, else "torch").

    Returns:
        `[B, T, HQ, D]` in the dtype of q; rows that see no key are zeros.
    """
    if kernel_backend("sparse_attention", backend, q) == "torch":
        return sparse_attention_blocked(q, k, v, window=window, column_end=column_end, key_mask=key_mask, scale=scale)
    _check_inputs(q, k, v, window, column_end, key_mask, scale)
    from hlsa.ops.triton.sparse_attention import sparse_attention_triton

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return sparse_attention_triton(q, k, v, window=window, column_end=column_end, key_mask=key_mask, scale=scale)
