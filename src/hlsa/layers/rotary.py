"""Rotary position embedding (RoPE), non-interleaved halves as in fla/Llama."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates the first `dim` channels of queries/keys by their absolute position.

    Positions count left padding too: RoPE is relative, so a constant shift per row does not change attention scores.
    """

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding: dim must be even, got {dim}")
        self.dim = dim
        self.base = base

    def cos_sin(self, positions: torch.Tensor, *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions` int [T] or [B, T] -> cos, sin of shape [..., T, 1, dim/2] (broadcast over heads)."""
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim)
        )
        # Angles in fp32: positions up to millions times frequencies would lose precision in bf16.
        angles = positions.to(torch.float32)[..., None] * inv_freq
        return angles.cos()[..., None, :].to(dtype), angles.sin()[..., None, :].to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] with cos/sin from `cos_sin`; channels beyond `dim` pass through unrotated."""
        half = self.dim // 2
        x1, x2, rest = x[..., :half], x[..., half : self.dim], x[..., self.dim :]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, HQ, D], k [B, T, HKV, D], positions int [T] or [B, T] -> rotated (q, k)."""
        cos, sin = self.cos_sin(positions, dtype=q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
