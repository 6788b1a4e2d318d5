"""SwiGLU feed-forward block (`gate_proj`, `up_proj`, `down_proj`, as in fla's GatedMLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, hidden_act: str = "swish") -> None:
        super().__init__()
        if hidden_act not in ("swish", "silu"):
            raise ValueError(f"GatedMLP: hidden_act must be 'swish' (SiLU), got {hidden_act!r}")
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
