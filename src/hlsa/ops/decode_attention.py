"""Decode attention: one query token per sequence against a head-major KV cache with a per-slot validity mask.

Used by the SWA (ring), LTE (ring + compact buffer) and full-attention caches at decode time. Slot order is
irrelevant because cached keys already carry RoPE, so one op serves every cache layout (docs/design.md,
"Decode-time ops").

Shape legend: `B` batch, `HQ` query heads, `HKV` key/value heads (`G = HQ // HKV`; query head `i` reads kv-head
`i // G`), `S` cache slots, `D` head dim.
"""

from __future__ import annotations

import torch

from hlsa.ops import kernel_backend


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"decode_attention: q must be [B, HQ, D] and k_cache, v_cache [B, HKV, S, D] of one shape; got q "
            f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    B, HQ, D = q.shape
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != D or HQ % HKV != 0:
        raise ValueError(
            f"decode_attention: k_cache must be [B, HKV, S, D] with B, D as in q and HQ divisible by HKV; got q "
            f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}"
        )
    if B == 0 or S == 0:
        raise ValueError(f"decode_attention: empty input (B={B}, S={S} cache slots); pass at least one of each")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not q.is_floating_point():
        raise ValueError(
            f"decode_attention: q, k_cache, v_cache must share one float dtype; got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}"
        )
    if valid.shape != (B, HKV, S) or valid.dtype != torch.bool:
        raise ValueError(
            f"decode_attention: valid must be bool [B, HKV, S] = {(B, HKV, S)}; got {valid.dtype} {tuple(valid.shape)}"
        )
    if not (q.device == k_cache.device == v_cache.device == valid.device):
        raise ValueError("decode_attention: q, k_cache, v_cache and valid must be on the same device")


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    valid: torch.Tensor,
    scale: float | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Readable reference: masked softmax over all valid slots, in the input dtype.

    Args and Returns as in `decode_attention`.
    """
    _check_inputs(q, k_cache, v_cache, valid)
    B, HQ, D = q.shape
    HKV = k_cache.shape[1]
    scale = D**-0.5 if scale is None else scale
    q_BHGD = q.reshape(B, HKV, HQ // HKV, D)
    s = torch.einsum("bhgd,bhsd->bhgs", q_BHGD, k_cache) * scale  # [B, HKV, G, S]
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    # Clamping the row max keeps rows without a valid slot finite: their exp is 0 everywhere, hence output 0.
    m = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)
    e = torch.exp(s - m)
    p = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    o = torch.einsum("bhgs,bhsd->bhgd", p, v_cache).reshape(B, HQ, D)  # [B, HKV, G, D] -> [B, HQ, D]
    return (o, p.float().sum(2)) if return_weights else o


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    valid: torch.Tensor,
    scale: float | None = None,
    backend: str | None = "auto",
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per sequence over the valid slots of a KV cache (no host sync).

    Args:
        q: `[B, HQ, D]`.
        k_cache, v_cache: `[B, HKV, S, D]` (keys already rotated; `HQ % HKV == 0`).
        valid: bool `[B, HKV, S]`: slots that hold a token.
        scale: softmax scale, default `D ** -0.5`.
        backend: "torch" (reference), "triton", or "auto" (Triton for CUDA tensors, else the reference).
        return_weights: also return the softmax weights of each slot, float32 `[B, HKV, S]`, summed over the query
            heads of each kv head (0 on invalid slots), computed within the same attention (the eviction policies
            `h2o` and `tova` score from them; the Triton path writes the logits and log-sum-exp and normalises them
            in a pass over `[B, HQ, S]` floats that reads no K/V).

    Returns:
        `[B, HQ, D]` in the dtype of q (a query whose kv-head has no valid slot gets zeros); with `return_weights`,
        the pair (output, weights).
    """
    if kernel_backend("decode_attention", backend, q) == "torch":
        return decode_attention_ref(q, k_cache, v_cache, valid=valid, scale=scale, return_weights=return_weights)
    _check_inputs(q, k_cache, v_cache, valid)
    from hlsa.ops.triton.decode_attention import decode_attention_triton

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return decode_attention_triton(q, k_cache, v_cache, valid=valid, scale=scale, return_weights=return_weights)
