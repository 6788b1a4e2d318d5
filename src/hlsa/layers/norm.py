"""RMSNorm, computed in fp32 and cast back (gpt-fast)."""

from __future__ import annotations

import torch
from torch import nn

from hlsa.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
