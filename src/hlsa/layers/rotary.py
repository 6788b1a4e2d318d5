"""Rotary position embedding (RoPE), non-interleaved halves as in fla/Llama (the math: `hlsa.ops.rope`)."""

from __future__ import annotations

import torch
from torch import nn

from hlsa.ops.rope import rope_cos_sin, rope_inv_freq, rope_rotate


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

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """fp32 `[dim / 2]`, for the decode ops that rotate in-kernel (`rope_inv_freq=`)."""
        return rope_inv_freq(self.dim, self.base, device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, HQ, D], k [B, T, HKV, D], positions int [T] or [B, T] -> rotated (q, k); channels beyond `dim`
        pass through."""
        cos, sin = rope_cos_sin(positions, self.inv_freq(positions.device), dtype=q.dtype)
        cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
        return rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
