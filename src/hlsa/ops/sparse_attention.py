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
) -> torch.Tensor:
    """The dense boolean pattern.

    Returns:
        bool `[B or 1, HKV or 1, T, T]` indexed `[b, h, i, j]`: True where query `i` sees key `j`.
    """
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    vis = (j <= i)[None, None]  # [1, 1, T, T]
    if window is not None:
        near = (i - j <= window)[None, None]
        if column_end is not None:
            # column_end [B, T, HKV] indexed by key j -> [B, HKV, 1, T]
            near = near | (i[None, None] < column_end.permute(0, 2, 1)[:, :, None, :])
        vis = vis & near
    if key_mask is not None:
        vis = vis & key_mask[:, None, None, :]
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
        backend: "torch" (reference), "triton", or "auto" (Triton for CUDA tensors, else the reference).

    Returns:
        `[B, T, HQ, D]` in the dtype of q; rows that see no key are zeros.
    """
    if kernel_backend("sparse_attention", backend, q) == "torch":
        return sparse_attention_ref(q, k, v, window=window, column_end=column_end, key_mask=key_mask, scale=scale)
    _check_inputs(q, k, v, window, column_end, key_mask, scale)
    from hlsa.ops.triton.sparse_attention import sparse_attention_triton

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return sparse_attention_triton(q, k, v, window=window, column_end=column_end, key_mask=key_mask, scale=scale)
