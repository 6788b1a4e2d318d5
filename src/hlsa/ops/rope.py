"""Rotary position embedding (RoPE), non-interleaved halves as in fla/Llama: the math that the layer
(`hlsa.layers.rotary`) and the decode ops that rotate their new token in-kernel (`decode_attention`'s query,
`lte_evict`'s key) share.

Channel `i < dim/2` pairs with `i + dim/2`; the pair turns by the angle `position * inv_freq[i]`,
`inv_freq[i] = base ** (-2i / dim)`. Angles are fp32 (positions up to millions times frequencies would lose
precision in bf16); cos and sin are then rounded to the activations' dtype, and channels beyond `dim` pass through.
"""

from __future__ import annotations

import torch


def rope_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 `[dim / 2]`: the frequency of each rotated channel pair."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, *, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer `positions` of any shape -> cos, sin of shape `[*positions.shape, dim / 2]` in `dtype`."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x [..., D]` with cos/sin `[..., dim / 2]` broadcastable to it; channels beyond `dim` pass through."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def check_rope_args(
    op: str, inv_freq: torch.Tensor, position: torch.Tensor, head_dim: int, device: torch.device
) -> None:
    """The arguments of an op that rotates a new token in-kernel: `inv_freq` fp32 `[D / 2]` (every channel rotated)
    and `position` a 0-d int64 tensor, both on the op's device."""
    if inv_freq.dim() != 1 or inv_freq.dtype != torch.float32 or 2 * inv_freq.shape[0] != head_dim:
        raise ValueError(
            f"{op}: rope_inv_freq must be float32 [D / 2] = [{head_dim / 2:g}] (the kernel rotates every channel); "
            f"got {inv_freq.dtype} {tuple(inv_freq.shape)}"
        )
    if position.dim() != 0 or position.dtype != torch.int64:
        raise ValueError(
            f"{op}: the RoPE position must be a 0-d int64 tensor; got {position.dtype} {tuple(position.shape)}"
        )
    if inv_freq.device != device or position.device != device:
        raise ValueError(f"{op}: rope_inv_freq and the position must be on {device}")
